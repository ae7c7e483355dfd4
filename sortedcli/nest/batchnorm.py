"""BatchNorm recalibration per sub-model.

All sub-models share one set of BatchNorm layers, but the statistics of a channel depend on which
sub-model computed it (fewer input channels, skipped blocks). The running statistics left by
training are a blend over whatever sub-models were sampled and are wrong for each of them, so
before a sub-model is evaluated or exported its statistics are recomputed:

1. reset every BatchNorm's running mean/var (0/1) and ``num_batches_tracked``;
2. set ``momentum=None``, which makes BatchNorm keep a *cumulative* average (factor
   ``1 / num_batches_tracked``), so every calibration batch counts equally;
3. run the sub-model with its BatchNorm layers in **train** mode (batch statistics; eval mode would
   update nothing) and everything else in eval mode (dropout off: it would draw from the global random
   stream) over ``num_batches`` batches without gradients;
4. restore the momentum and leave the model in eval mode.

Recalibrating overwrites the shared statistics: a model still being trained (an epoch-end evaluation)
is evaluated inside :func:`batchnorm_kept`, which puts its statistics and modes back afterwards, so
that the checkpoint written next holds the training statistics, not the last evaluated sub-model's.

This is US-Nets' post-training BN calibration, applied to the shared, sliced layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .convert import call, use
from .space import SubModel


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def synchronize(model: nn.Module, on: bool = True) -> int:
    """Make ``model``'s sorted BatchNorm layers compute their training statistics over the batches of
    all data-parallel ranks (an initialized ``torch.distributed`` process group). Returns how many."""
    from .layers import SortedBatchNorm

    layers = [m for m in model.modules() if isinstance(m, SortedBatchNorm)]
    for m in layers:
        m.sync = on
    return len(layers)


@torch.no_grad()
def recalibrate(model: nn.Module, sub: SubModel | None, batches: Iterable) -> int:
    """Recompute the BatchNorm statistics of ``model`` for sub-model ``sub`` from ``batches`` (inputs
    already on the model's device: tensors, or mappings of keyword arguments), only BatchNorm in train
    mode. Returns the number of batches used. The model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    synced = [getattr(bn, "sync", False) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.sync = False  # recalibration stays local: each rank calibrates its own sub-models
    model.eval()
    for bn in bns:
        bn.train()
    n = 0
    try:
        with use(model, sub):
            for x in batches:
                call(model, x)
                n += 1
    finally:
        for bn, momentum, sync in zip(bns, momenta, synced):
            bn.momentum = momentum
            if sync:
                bn.sync = True
        model.eval()
    if n == 0:
        raise ValueError("no calibration batches: BatchNorm statistics cannot be recalibrated")
    return n


@contextmanager
def batchnorm_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, recalibrate and evaluate ``model`` freely; on leaving it, every BatchNorm's
    running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) and every module's
    train/eval mode are put back as they were on entering."""
    saved = [(buf, buf.detach().clone()) for m in model.modules() if isinstance(m, _BatchNorm)
             for buf in m.buffers(recurse=False) if buf is not None]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
        for m, training in modes:
            m.training = training


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example) -> int:
    """Fold every BatchNorm that directly normalizes a convolution's output into that convolution, as
    a deployed model has it: the convolution gets ``W * s`` and the bias ``(b - mean) * s + beta``
    (``s = gamma / sqrt(var + eps)``, the BatchNorm's eval-mode affine map) and the BatchNorm becomes
    ``nn.Identity``. Returns how many were folded.

    Generic over the model's code: ``model`` runs once on ``example`` (a tensor, or a mapping of
    keyword arguments) with hooks, and a BatchNorm is folded into a convolution when the tensor it
    normalizes *is* the one that convolution returned, the call right before it (each module called
    once): ``Conv2d -> BatchNorm2d`` in an ``nn.Sequential``, and torchvision's ``conv1``/``bn1``
    pairs inside blocks alike. Only eval-mode behaviour is kept (the running statistics): the caller
    checks the folded model equal to the original in eval mode, which also catches a convolution
    whose output something else used too. Works on plain models (after :func:`~.extract.extract`)."""
    from .convert import call

    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    calls: list[tuple[nn.Module, object, object]] = []  # (module, its input, its output) in call order

    def record(m, args, out):
        calls.append((m, args[0] if args else None, out))

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, conv_types) or (isinstance(m, _BatchNorm) and m.track_running_stats)]
    was_training = model.training
    model.eval()
    try:
        call(model, example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    counts: dict[int, int] = {}
    for m, _, _ in calls:
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs = []
    for (conv, _, out), (bn, x, _) in zip(calls, calls[1:]):
        if (isinstance(conv, conv_types) and isinstance(bn, _BatchNorm) and x is out
                and counts[id(conv)] == counts[id(bn)] == 1 and len(names[id(conv)]) == len(names[id(bn)]) == 1
                and bn.running_mean is not None and conv.out_channels == bn.num_features):
            pairs.append((conv, bn))
    for conv, bn in pairs:
        w = conv.weight.double()
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (bias - bn.running_mean.double()) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        conv.weight = nn.Parameter(
            (w * scale.reshape(-1, *[1] * (w.dim() - 1))).to(conv.weight.dtype), conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), conv.weight.requires_grad)
        parent, _, leaf = names[id(bn)][0].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return len(pairs)
