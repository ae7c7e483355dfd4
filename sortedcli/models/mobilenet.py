"""MobileNetV2 (torchvision's own class) as a sorted model.

- **width**: every hidden channel count is a prefix of the same fraction (rounded up): the stem, the
  expanded channels of each inverted-residual block (its depthwise convolution follows its input
  width), the block outputs and the 1280-channel last convolution (``model.sort_last_channel=false``
  pins that one). The image channels in and the classes out stay fixed. A residual addition adds
  two prefixes of the same full width, so they always have equal widths.
- **depth**: the droppable units are the blocks *with* a residual connection (stride 1, equal input
  and output channels): dropped, such a block is the identity. Blocks that change the shape always
  run. The sorted (keep-first) order is round-robin over the stages, each stage's residual blocks
  front to back, so the **last residual block of each stage is dropped first**. For the standard
  MobileNetV2 that is ``features.3, 5, 8, 12, 15, 6, 9, 13, 16, 10`` (10 units; ``depth=1`` keeps
  the 7 shape-changing blocks and ``features.3``).
- **small images**: ``model.small_stem=true`` sets the stride of the stem convolution and of the
  first stride-2 block to 1 (total stride 8 instead of 32, as CIFAR MobileNetV2s do); the pretrained
  3x3 filters are kept. Otherwise inputs should be upsampled (``data.image_size``); grey images get
  the pretrained RGB stem filters summed.
- **pretrained**: ``model.weights`` (a file or ``IMAGENET1K_V1``, see :mod:`.weights`), then a new
  classifier for the target classes, then importance sorting (``model.importance``: ``l1`` by default,
  ``none`` to keep torchvision's channel order; see :mod:`sortedcli.nest.importance`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import MobileNetV2
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from ..nest import COUNT, FRACTION, DepthUnit, sortify
from ..nest.importance import Group, sort_by_importance
from . import weights as pretrained
from .vision import VisionFamily

DIMS = {"width": FRACTION, "depth": COUNT}


def _identity(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def _plain_identity(block: nn.Module) -> nn.Module:
    return nn.Identity()


def blocks(model: MobileNetV2) -> list[tuple[str, InvertedResidual]]:
    return [(f"features.{i}", m) for i, m in enumerate(model.features) if isinstance(m, InvertedResidual)]


def stages(model: MobileNetV2) -> list[list[str]]:
    """The residual blocks of each stage (a stage starts at every block that changes the shape)."""
    out: list[list[str]] = []
    for name, block in blocks(model):
        if not block.use_res_connect:
            out.append([])
        elif out:
            out[-1].append(name)
    return [s for s in out if s]


def block_order(model: MobileNetV2) -> list[str]:
    """Qualified names of the droppable (residual) blocks in sorted, keep-first order."""
    per_stage = stages(model)
    order = []
    for j in range(max((len(s) for s in per_stage), default=0)):
        order += [s[j] for s in per_stage if j < len(s)]
    return order


def sortify_mobilenet(model: MobileNetV2, sort_last_channel: bool = True) -> MobileNetV2:
    last = f"features.{len(model.features) - 1}.0"
    fixed = {"classifier.1"} | (set() if sort_last_channel else {last})
    units = [DepthUnit(model.get_submodule(n), _identity, _plain_identity) for n in block_order(model)]
    return sortify(model, out_dim=lambda name, m: None if name in fixed else ("width", 1), units=units)


def importance_groups(model: MobileNetV2) -> list[Group]:
    """The coupled channel groups of a MobileNetV2 (see :mod:`sortedcli.nest.importance`): the
    expanded channels of every block, and every stream of block outputs tied by residual additions
    (from the block that creates it through the residual blocks that add to it)."""
    groups: list[Group] = []
    stem = model.features[0]
    stream = Group("features.0", [stem[0], stem[1]])
    for name, block in blocks(model):
        layers = list(block.conv)
        if len(layers) == 4:  # expand (1x1 conv + BN), depthwise (conv + BN), project conv, BN
            expand, dw, project, bn = layers
            stream.consumers.append(expand[0])
            groups.append(Group(f"{name}.hidden", [expand[0], expand[1], dw[0], dw[1]], [project]))
        else:  # expand ratio 1: the depthwise conv works on the stream itself
            dw, project, bn = layers
            stream.producers += [dw[0], dw[1]]
            stream.consumers.append(project)
        if block.use_res_connect:
            stream.producers += [project, bn]
        else:
            groups.append(stream)
            stream = Group(name, [project, bn])
    last = model.features[-1]
    stream.consumers.append(last[0])
    groups.append(stream)
    head = model.classifier[-1]
    groups.append(Group(f"features.{len(model.features) - 1}", [last[0], last[1]],
                        [head] if head.in_features == last[0].out_channels else []))
    return groups


def _small_stem(model: MobileNetV2) -> None:
    model.features[0][0].stride = (1, 1)
    first = next(b for _, b in blocks(model) if b.stride == 2)
    dw = next(m for m in first.conv.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    dw.stride = (1, 1)
    first.stride = 1


def fit(model: MobileNetV2, arch: str, num_classes: int, in_channels: int, small_stem: bool,
        weights: str | None, importance: str | None, sort_last_channel: bool) -> MobileNetV2:
    """Load weights, fit stem and classifier to the data, sort, then importance-sort pretrained weights."""
    importance = pretrained.importance_method(importance)
    if weights:
        state, source = pretrained.resolve(arch, weights) if arch else (pretrained.read_state_dict(
            weights, "model.weights"), weights)
        head = model.classifier[-1]
        rows = state.get("classifier.1.weight")
        if rows is not None and rows.ndim == 2 and rows.shape[0] != head.out_features:
            model.classifier[-1] = nn.Linear(head.in_features, rows.shape[0])  # e.g. a fine-tuned file
        pretrained.load_into(model, state, arch or "this model", source)
    stem = model.features[0]
    stem[0] = pretrained.adapt_stem_channels(stem[0], in_channels)
    if small_stem:
        _small_stem(model)
    head = model.classifier[-1]
    if head.out_features != num_classes:
        model.classifier[-1] = nn.Linear(head.in_features, num_classes)
    sortify_mobilenet(model, sort_last_channel)
    if weights and importance:
        sort_by_importance(importance_groups(model), importance)
    return model


def build_mobilenet_v2(num_classes: int, in_channels: int, small_stem: bool = False, weights: str | None = None,
                       importance: str | None = "l1", sort_last_channel: bool = True,
                       dropout: float = 0.2) -> MobileNetV2:
    """torchvision ``mobilenet_v2`` with the stem and classifier fitted to the data."""
    model = MobileNetV2(num_classes=1000, dropout=dropout)
    return fit(model, "mobilenet_v2", num_classes, in_channels, small_stem, weights, importance,
               sort_last_channel)


#: the tiny variant: torchvision's MobileNetV2 with 3 small stages and a 64-channel last conv.
TINY_SETTING = [[1, 8, 1, 1], [4, 12, 2, 2], [4, 16, 3, 2]]
TINY_LAST = 64


def tiny_mobilenet(num_classes: int = 1000) -> MobileNetV2:
    """A torchvision ``MobileNetV2(inverted_residual_setting=TINY_SETTING)`` whose last conv has
    :data:`TINY_LAST` channels: 6 blocks, 3 of them residual, ~40k parameters."""
    model = MobileNetV2(num_classes=num_classes, inverted_residual_setting=TINY_SETTING)
    last = model.features[-1][0]
    model.features[-1] = Conv2dNormActivation(last.in_channels, TINY_LAST, kernel_size=1,
                                              norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
    model.last_channel = TINY_LAST
    model.classifier[-1] = nn.Linear(TINY_LAST, num_classes)
    return model


def build_mobilenet_tiny(num_classes: int, in_channels: int, small_stem: bool = True, weights: str | None = None,
                         importance: str | None = "l1", sort_last_channel: bool = True,
                         dropout: float = 0.2) -> MobileNetV2:
    """:func:`tiny_mobilenet` for tests and quick runs (``weights``: a state_dict file of it)."""
    model = tiny_mobilenet()
    model.classifier[0].p = dropout
    return fit(model, "", num_classes, in_channels, small_stem, weights, importance, sort_last_channel)


__all__ = ["DIMS", "block_order", "build_mobilenet_tiny", "build_mobilenet_v2", "importance_groups",
           "sortify_mobilenet", "stages", "tiny_mobilenet"]


class MobileNetFamily(VisionFamily):
    """torchvision MobileNetV2 (``arch``: mobilenet_v2, or ``tiny``)."""

    def build(self, **args) -> MobileNetV2:
        return build_mobilenet_tiny(**args) if self.options["arch"] == "tiny" else build_mobilenet_v2(**args)

    def importance_groups(self, model: MobileNetV2) -> list[Group]:
        return importance_groups(model)


Family = MobileNetFamily
