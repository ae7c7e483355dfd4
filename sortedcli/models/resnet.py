"""ResNet (torchvision's own classes) as a sorted model.

- **width**: every hidden channel count is a prefix of the same fraction (rounded up). The image
  channels in and the classes out stay fixed. Because every layer with the same full width keeps the
  same prefix, residual additions (identity or projection) always add tensors of equal width.
- **depth**: residual blocks are kept in a fixed sorted order, round-robin over the stages, each
  stage's blocks front to back: ``layer1.0, layer2.0, layer3.0, layer4.0, layer1.1, layer2.1, ...``.
  ``depth=k`` runs the first ``k`` blocks of that order. A dropped block whose shape changes (the
  first of a stage: stride 2 or more channels) keeps its projection shortcut, computing
  ``relu(downsample(x))``, i.e. the block with its residual branch set to zero; other dropped
  blocks are the identity. ``depth=1`` is stem + ``layer1.0`` + three projections + classifier.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..errors import UsageError
from ..nest import COUNT, FRACTION, DepthUnit, SubModel, extract, sortify
from ..nest.importance import Group, sort_by_importance
from . import weights as pretrained
from .vision import VisionFamily

DIMS = {"width": FRACTION, "depth": COUNT}


def _skip_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if block.downsample is None else F.relu(block.downsample(x))


def _plain_skip(block: nn.Module) -> nn.Module:
    return nn.Identity() if block.downsample is None else nn.Sequential(block.downsample, nn.ReLU())


def block_order(model: ResNet) -> list[str]:
    """Qualified names of the residual blocks in sorted (keep-first) order."""
    stages = [[f"layer{i}.{j}" for j in range(len(getattr(model, f"layer{i}")))] for i in range(1, 5)]
    order = []
    for j in range(max(len(s) for s in stages)):
        order += [s[j] for s in stages if j < len(s)]
    return order


def sortify_resnet(model: ResNet) -> ResNet:
    units = [DepthUnit(model.get_submodule(n), _skip_block, _plain_skip) for n in block_order(model)]
    return sortify(model, out_dim=lambda name, m: None if name == "fc" else ("width", 1), units=units)


def _adapt_stem(model: ResNet, in_channels: int, small_stem: bool) -> None:
    """Small images (CIFAR, MNIST): 3x3 stride-1 stem and no max-pool. Other channel counts: the
    pretrained stem's filters are summed over RGB (grey) or repeated, as timm does."""
    old = model.conv1
    if not small_stem and in_channels == old.in_channels:
        return
    kernel, stride, padding = ((3, 3), 1, 1) if small_stem else (old.kernel_size, old.stride, old.padding)
    new = nn.Conv2d(in_channels, old.out_channels, kernel, stride, padding, bias=False)
    if not small_stem:
        with torch.no_grad():
            w = old.weight.sum(1, keepdim=True) if in_channels == 1 else old.weight.repeat(
                1, (in_channels + 2) // 3, 1, 1)[:, :in_channels] * 3 / in_channels
            new.weight.copy_(w)
    model.conv1 = new
    if small_stem:
        model.maxpool = nn.Identity()


def importance_groups(model: ResNet) -> list[Group]:
    """The coupled channel groups of a ResNet (see :mod:`sortedcli.nest.importance`).

    - the inner channels of every block (BasicBlock: conv1 -> conv2; Bottleneck: conv1 -> conv2 and
      conv2 -> conv3), as Once-for-All sorts them;
    - the **residual stream** of every stage, sorted too (with one permutation for the whole stream,
      so the additions still add matching channels): its producers are the projection shortcut (or
      the stem, for a stage without one) and the last conv + BN of every block; its consumers are
      the first conv of every block, the next stage's projection shortcut and, for the last stage,
      the classifier.
    """
    groups: list[Group] = []
    stream = Group("stem", [model.conv1, model.bn1])
    for name, block in ((n, m) for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))):
        if block.downsample is not None:
            stream.consumers += [block.conv1, block.downsample[0]]
            groups.append(stream)
            stream = Group(f"{name}.downsample", [block.downsample[0], block.downsample[1]])
        else:
            stream.consumers.append(block.conv1)
        if isinstance(block, Bottleneck):
            groups.append(Group(f"{name}.conv1", [block.conv1, block.bn1], [block.conv2]))
            groups.append(Group(f"{name}.conv2", [block.conv2, block.bn2], [block.conv3]))
            stream.producers += [block.conv3, block.bn3]
        else:
            groups.append(Group(f"{name}.conv1", [block.conv1, block.bn1], [block.conv2]))
            stream.producers += [block.conv2, block.bn2]
    stream.consumers.append(model.fc)
    groups.append(stream)
    return groups


def build_resnet(arch: str, num_classes: int, in_channels: int, small_stem: bool = False,
                 weights: str | None = None, importance: str | None = "l1") -> ResNet:
    """torchvision ``resnet18/34/50`` with the stem and classifier fitted to the data; pretrained
    ``weights`` (see :mod:`.weights`) are importance-sorted (``importance``, ``none`` to keep
    torchvision's channel order) once the model is sorted."""
    importance = pretrained.importance_method(importance)
    model = getattr(torchvision.models, arch)(weights=None)
    if weights:
        state, source = pretrained.resolve(arch, weights)
        rows = state.get("fc.weight")
        if rows is not None and rows.ndim == 2 and rows.shape[0] != model.fc.out_features:
            model.fc = nn.Linear(model.fc.in_features, rows.shape[0])  # e.g. a fine-tuned file
        pretrained.load_into(model, state, arch, source)
    _adapt_stem(model, in_channels, small_stem)
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    sortify_resnet(model)
    if weights and importance:
        sort_by_importance(importance_groups(model), importance)
    return model


def build_resnet_tiny(num_classes: int, in_channels: int, small_stem: bool = True,
                      weights: str | None = None, importance: str | None = "l1") -> ResNet:
    """A torchvision ``ResNet(BasicBlock, [1, 1, 1, 1])`` at 1/8 width (8-16-32-64 channels) for
    tests and quick runs: it is the width-0.125 sub-model of the full-width one, cut out with
    :func:`~sortedcli.nest.extract` and then sorted again, so it is an ordinary torchvision ResNet."""
    if weights:
        raise UsageError("resnet_tiny has no pretrained weights: set model.weights=null")
    wide = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    _adapt_stem(wide, in_channels, small_stem)
    sortify_resnet(wide)
    tiny = extract(wide, SubModel.of(width=0.125), torch.zeros(1, in_channels, 32, 32))
    tiny.train()
    return sortify_resnet(tiny)


__all__ = ["DIMS", "BasicBlock", "Bottleneck", "block_order", "build_resnet", "build_resnet_tiny",
           "importance_groups", "sortify_resnet"]


class ResNetFamily(VisionFamily):
    """torchvision ResNets (``arch``: resnet18/34/50, or ``tiny``)."""

    def build(self, **args) -> ResNet:
        arch = self.options["arch"]
        return build_resnet_tiny(**args) if arch == "tiny" else build_resnet(arch, **args)

    def importance_groups(self, model: ResNet) -> list[Group]:
        return importance_groups(model)


Family = ResNetFamily
