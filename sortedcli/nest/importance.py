"""Importance sorting: permute units so that every prefix keeps the most important ones.

A pretrained model's channels are in no particular order, so the width-0.25 prefix of a layer is a
random quarter of it. Before sorted fine-tuning, Once-for-All and SortedNet reorder the units of
each sorted layer by an importance score, so that the prefixes start from the best units.

A permutation must not change what the full model computes. Units that are tied together must move
together; the adapter describes them as a :class:`Group`:

- ``producers``: modules whose **output** axis holds the units (rows of a Conv2d / Linear weight and
  bias; a BatchNorm's weight, bias and running statistics; a depthwise convolution, whose input and
  output are the same channels, is a producer only);
- ``consumers``: modules whose **input** axis holds them (columns of a Conv2d / Linear weight);
- ``unit``: how many consecutive channels form one unit (1 channel; ``head_dim`` for attention heads);
  or ``units``: how many units there are, each module's unit then being its size / ``units`` (a
  key/value group of grouped-query attention: ``head_dim`` rows of k and v, ``groups x head_dim``
  rows of q and columns of the output projection);
- ``blocks``: for fused producers, the sizes of the consecutive blocks of their output axis, each
  holding every unit of the group in the same order (ModernBERT's ``Wqkv``: q | k | v; a fused GLU
  projection: input | gate); each block is permuted alike, and consumers read one block's layout.

Examples: the hidden channels of a MobileNetV2 block (expand conv + BN, depthwise conv + BN ->
project conv); a ResNet stage's residual stream (every block's last conv + BN and the projection
shortcut -> every block's first conv, the next stage's shortcut, the classifier). Element-wise
functions, pooling and additions of equally permuted tensors commute with the permutation, so the
full model's function is unchanged.

The score of a unit (``method``):

- ``l1`` (default, as Once-for-All): the sum over the group's weighted producers (Conv2d / Linear) of
  the L1 norm of the unit's filters;
- ``l2``: the same with L2 norms;
- ``bn``: the sum of ``|gamma|`` of the group's BatchNorm producers (the scale each channel ends with).

Units are then sorted by descending score (stable: ties keep their order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

METHODS = ("l1", "l2", "bn")


@dataclass
class Group:
    """Units that share one permutation (see the module docstring)."""

    name: str
    producers: list[nn.Module]
    consumers: list[nn.Module] = field(default_factory=list)
    unit: int = 1
    units: int | None = None
    blocks: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        """Channels along the group's axis: a producer's outputs (one block of a fused producer's)."""
        return self.blocks[0] if self.blocks else _out_size(self.producers[0])

    @property
    def count(self) -> int:
        """The number of units."""
        return self.units if self.units is not None else self.size // self.unit

    def split(self, m: nn.Module) -> tuple[int, ...]:
        """The blocks of producer ``m``'s output axis (one block unless the group is fused)."""
        size = _out_size(m)
        if not self.blocks:
            return (size,)
        if sum(self.blocks) != size:
            raise ValueError(f"group {self.name}: producer {type(m).__name__} has {size} outputs, not the "
                             f"blocks {'+'.join(map(str, self.blocks))}")
        return self.blocks

    def unit_of(self, size: int) -> int:
        """The channels of one unit in a module with ``size`` channels along the group's axis."""
        if size % self.count:
            raise ValueError(f"group {self.name}: {size} channels do not split into {self.count} units")
        return size // self.count


def _out_size(m: nn.Module) -> int:
    if isinstance(m, _BatchNorm):
        return m.num_features
    return m.weight.shape[0]


def _weighted(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


@torch.no_grad()
def scores(group: Group, method: str = "l1") -> torch.Tensor:
    """One importance score per unit of ``group`` (a float tensor of ``size // unit`` values)."""
    if method not in METHODS:
        raise ValueError(f"importance method must be one of {', '.join(METHODS)}, got {method!r}")
    n = group.count
    total = torch.zeros(n, dtype=torch.float64)
    used = 0
    for m in group.producers:
        if method == "bn":
            if not isinstance(m, _BatchNorm) or m.weight is None:
                continue
            per_channel = m.weight.detach().abs().double()
        else:
            if not _weighted(m):
                continue
            w = m.weight.detach().double().flatten(1)
            per_channel = w.abs().sum(1) if method == "l1" else w.pow(2).sum(1).sqrt()
        for block in per_channel.split(group.split(m)):
            total += block.view(n, -1).sum(1).cpu()
        used += 1
    if used == 0:
        raise ValueError(f"group {group.name}: no producer to score with method {method!r}")
    return total


def _take(t: torch.Tensor | None, index: torch.Tensor, dim: int) -> None:
    if t is not None:
        t.data = t.data.index_select(dim, index.to(t.device)).contiguous()


@torch.no_grad()
def permute(group: Group, order: torch.Tensor) -> None:
    """Reorder the units of ``group`` in place: new unit ``i`` is old unit ``order[i]``."""
    n = group.count
    if len(order) != n or sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"group {group.name}: not a permutation of {n} units")

    def index_for(size: int) -> torch.Tensor:
        unit = group.unit_of(size)
        return (order.view(-1, 1) * unit + torch.arange(unit)).flatten()

    size = group.size
    for m in group.producers:
        blocks = group.split(m)
        if group.units is None and any(b != size for b in blocks):
            raise ValueError(f"group {group.name}: producer {type(m).__name__} has {_out_size(m)} outputs, "
                             f"not {size}")
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        index = torch.cat([start + index_for(b) for start, b in zip(starts, blocks)])
        if isinstance(m, _BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _take(getattr(m, name), index, 0)
        else:
            _take(m.weight, index, 0)
            _take(m.bias, index, 0)
    for m in group.consumers:
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            raise ValueError(f"group {group.name}: a depthwise convolution is a producer, not a consumer")
        if group.units is None and m.weight.shape[1] != size:
            raise ValueError(f"group {group.name}: consumer {type(m).__name__} reads {m.weight.shape[1]} "
                             f"inputs, not {size}")
        _take(m.weight, index_for(m.weight.shape[1]), 1)


def sort_by_importance(groups: list[Group], method: str = "l1") -> dict[str, torch.Tensor]:
    """Permute every group's units by descending score; returns ``{group name: order}``."""
    orders = {}
    for group in groups:
        s = scores(group, method)
        order = torch.sort(s, descending=True, stable=True).indices
        permute(group, order)
        orders[group.name] = order
    return orders
