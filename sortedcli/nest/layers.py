"""Layers that compute on a prefix of their weights.

Each sorted layer subclasses the torch layer it replaces, so parameters, buffers and state_dict keys
stay exactly torch's. The input width is read from the tensor (``x.shape[1]`` for images, the last
dimension for ``Linear``); the output width comes from the model's :class:`Scope`, which says which
sub-model is active. A layer whose ``sorted_dim`` is ``None`` keeps its full output (the classifier,
image channels). The weights used are *views* of the leading rows and columns, so a smaller sub-model
does less arithmetic; nothing is masked or copied.

``sliced(n_in, n_out)`` is the single place that says which part of the weights a sub-model uses: the
forward, parameter counting and extraction into a plain layer all go through it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Scope:
    """Which sub-model the sorted layers of one model compute. One per converted model.

    ``sub is None`` means the full model. Sizes are rounded up to whole units (a head, a channel) and
    never below one unit, so every level of a fraction dimension keeps at least one unit and sizes grow
    monotonically with the level (the sub-models are nested).
    """

    def __init__(self, depth_dim: str = "depth"):
        self.sub = None
        self.depth_dim = depth_dim
        self.reading: int | None = None  # the exit being read out, when not the active sub-model's own

    def exit_depth(self) -> int | None:
        """The depth whose exit the readout is computing: the one :func:`~sortedcli.nest.convert.reading`
        names, else the active sub-model's depth (None: the full model)."""
        if self.reading is not None:
            return self.reading
        return None if self.sub is None else self.sub.get(self.depth_dim)

    def size(self, dim: str, full: int, unit: int = 1) -> int:
        level = None if self.sub is None else self.sub.get(dim)
        if level is None:
            return full
        return sorted_size(full, level, unit)

    def keeps(self, rank: int) -> bool:
        """Whether the depth unit with this rank (0 = kept first) runs in the active sub-model."""
        depth = None if self.sub is None else self.sub.get(self.depth_dim)
        return depth is None or rank < depth


def sorted_size(full: int, fraction: float, unit: int = 1) -> int:
    """``ceil(fraction * units) * unit``, at least one unit: the size of a fraction level."""
    units = full // unit
    return max(1, math.ceil(fraction * units - 1e-9)) * unit


class SortedLayer:
    """Mixin for prefix-sliced layers. Set by :func:`sortedcli.nest.convert.sortify`:

    - ``sorted_scope``: the model's :class:`Scope`;
    - ``sorted_dim``: the dimension that sizes the output (``None``: output stays full);
    - ``sorted_unit``: the granularity of the output (1 channel, or ``head_dim`` for attention).
    """

    sorted_scope: Scope
    sorted_dim: str | None = None
    sorted_unit: int = 1
    feature_axis: int = 1  # where the channel / feature axis of input and output is

    def out_size(self, full: int) -> int:
        if self.sorted_dim is None:
            return full
        return self.sorted_scope.size(self.sorted_dim, full, self.sorted_unit)

    # Each layer class defines ``sizes(x) -> (n_in, n_out)`` (input width read from the tensor, output
    # width from the scope), ``sliced(n_in, n_out) -> {name: view}`` and ``to_plain(n_in, n_out)``.

    def active_parameters(self, n_in: int, n_out: int) -> int:
        """Parameters of the sliced layer (buffers such as running statistics are not parameters)."""
        names = {n for n, _ in self.named_parameters(recurse=False)}
        return sum(t.numel() for n, t in self.sliced(n_in, n_out).items() if n in names and t is not None)


def prefix(t: torch.Tensor | None, *sizes: int) -> torch.Tensor | None:
    """The leading ``sizes`` of ``t``'s first dimensions; ``t`` itself when that is all of it (no
    slicing op, so the full model's backward has no extra copy)."""
    if t is None or tuple(t.shape[: len(sizes)]) == sizes:
        return t
    return t[tuple(slice(0, n) for n in sizes)]


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().contiguous()


class SortedConv2d(SortedLayer, nn.Conv2d):
    """``Conv2d`` on its first input/output channels. Depthwise convolutions (groups == channels)
    follow their input width; other grouped convolutions are not supported."""

    @property
    def depthwise(self) -> bool:
        return self.groups > 1

    def sizes(self, x):
        n_in = x.shape[1]
        return n_in, (n_in if self.depthwise else self.out_size(self.out_channels))

    def sliced(self, n_in, n_out):
        if self.depthwise:
            return {"weight": prefix(self.weight, n_in), "bias": prefix(self.bias, n_in)}
        return {"weight": prefix(self.weight, n_out, n_in), "bias": prefix(self.bias, n_out)}

    def forward(self, x):
        n_in, n_out = self.sizes(x)
        p = self.sliced(n_in, n_out)
        groups = n_in if self.depthwise else 1
        return F.conv2d(x, p["weight"], p["bias"], self.stride, self.padding, self.dilation, groups)

    def to_plain(self, n_in, n_out):
        p = self.sliced(n_in, n_out)
        plain = nn.Conv2d(
            n_in, n_out, self.kernel_size, self.stride, self.padding, self.dilation,
            groups=n_in if self.depthwise else 1, bias=self.bias is not None,
            device="meta", dtype=self.weight.dtype,  # no memory: its parameters are the copies below
        )
        plain.weight = nn.Parameter(_copy(p["weight"]))
        if self.bias is not None:
            plain.bias = nn.Parameter(_copy(p["bias"]))
        return plain


class SortedLinear(SortedLayer, nn.Linear):
    """``Linear`` on its first input features (read from the tensor) and first output features."""

    feature_axis = -1

    def sizes(self, x):
        return x.shape[-1], self.out_size(self.out_features)

    def sliced(self, n_in, n_out):
        return {"weight": prefix(self.weight, n_out, n_in), "bias": prefix(self.bias, n_out)}

    def forward(self, x):
        p = self.sliced(*self.sizes(x))
        return F.linear(x, p["weight"], p["bias"])

    def to_plain(self, n_in, n_out):
        p = self.sliced(n_in, n_out)
        plain = nn.Linear(n_in, n_out, bias=self.bias is not None,
                          device="meta", dtype=self.weight.dtype)  # no memory: its parameters are the copies below
        plain.weight = nn.Parameter(_copy(p["weight"]))
        if self.bias is not None:
            plain.bias = nn.Parameter(_copy(p["bias"]))
        return plain


class SortedBatchNorm(SortedLayer):
    """BatchNorm (1d/2d/3d) over the first ``x.shape[1]`` channels, statistics shared by all
    sub-models (and therefore recalibrated per sub-model, see :mod:`sortedcli.nest.batchnorm`).

    It mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``, including ``momentum=None``
    meaning a cumulative average with factor ``1 / num_batches_tracked``.
    """

    #: training statistics over the batches of all data-parallel ranks (``nest.batchnorm.synchronize``)
    sync = False

    def sizes(self, x):
        return x.shape[1], x.shape[1]

    def sliced(self, n_in, n_out):
        return {name: prefix(getattr(self, name), n_in)
                for name in ("weight", "bias", "running_mean", "running_var")}

    def forward(self, x):
        self._check_input_dim(x)
        p = self.sliced(*self.sizes(x))
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if self.training and self.sync:
            return self._synchronized(x, p, factor)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            p["running_mean"] if keep_stats else None,
            p["running_var"] if keep_stats else None,
            p["weight"], p["bias"], use_batch_stats, factor, self.eps,
        )

    def _synchronized(self, x, p, factor):
        """Batch statistics over every rank's batch (torch's SyncBatchNorm runs on GPUs only): one
        differentiable all-reduce of per-channel sums, so the gradients equal one process's on the
        global batch."""
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        stats = sum_over_ranks(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and p["running_mean"] is not None:
            with torch.no_grad():
                p["running_mean"].mul_(1 - factor).add_(mean.detach(), alpha=factor)
                p["running_var"].mul_(1 - factor).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=factor)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if p["weight"] is not None:
            y = y * p["weight"].view(shape) + p["bias"].view(shape)
        return y.to(x.dtype)

    def to_plain(self, n_in, n_out):
        base = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn"))
        p = self.sliced(n_in, n_out)
        plain = base(n_in, eps=self.eps, momentum=self.momentum, affine=self.affine,
                     track_running_stats=self.track_running_stats,
                     device=self.running_mean.device if self.running_mean is not None else None)
        with torch.no_grad():
            if self.affine:
                plain.weight.copy_(p["weight"])
                plain.bias.copy_(p["bias"])
            if self.track_running_stats:
                plain.running_mean.copy_(p["running_mean"])
                plain.running_var.copy_(p["running_var"])
                plain.num_batches_tracked.copy_(self.num_batches_tracked)
        return plain


class SortedBatchNorm1d(SortedBatchNorm, nn.BatchNorm1d):
    pass


class SortedBatchNorm2d(SortedBatchNorm, nn.BatchNorm2d):
    pass


#: torch layer type -> its sorted subclass. Conversion swaps ``__class__`` to the value.
SORTED_LAYERS: dict[type, type] = {
    nn.Conv2d: SortedConv2d,
    nn.Linear: SortedLinear,
    nn.BatchNorm1d: SortedBatchNorm1d,
    nn.BatchNorm2d: SortedBatchNorm2d,
}


class _SumOverRanks(torch.autograd.Function):
    """``sum over ranks of x`` with its gradient (the sum over ranks of the output's gradient)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum), used by synchronized BatchNorm."""
    return _SumOverRanks.apply(x)
