"""Turn a library model into a sorted one, in place, and select a sub-model.

``sortify`` swaps the class of every supported layer (``Conv2d``, ``Linear``, ``BatchNorm``) for its
prefix-sliced subclass and the class of every depth unit (a residual block, a decoder layer) for a
subclass that can skip it. Weights, buffers and state_dict keys are untouched: a sorted model loads
and saves the library model's checkpoints.

All sorted modules of one model share one :class:`~sortedcli.nest.layers.Scope`. Selecting a
sub-model is one assignment on that scope, made by the context manager ``use``::

    with use(model, SubModel.of(width=0.5, depth=12)):
        logits = model(x)

Outside ``use`` the model is the full model.

``add_exit_readouts`` is the one addition to a model's weights: exits of a stack that read out through
modules of their own (registered as ``sortednet_exits``, so those are new state_dict keys), which run in
place of the shared module whenever their exit is read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .layers import SORTED_LAYERS, Scope, SortedLayer
from .space import SubModel

#: ``out_dim(qualified_name, module) -> (dim, unit) | None``: which dimension sizes a layer's output.
OutDim = Callable[[str, nn.Module], "tuple[str, int] | None"]


@dataclass
class DepthUnit:
    """A module that the depth dimension can drop, and what replaces it when dropped.

    ``skip(module, *args, **kwargs)`` computes the dropped unit's output inside the sorted model (e.g.
    the projection shortcut of a residual block, or the unchanged hidden state of a decoder layer);
    ``plain_skip(module)`` builds the plain module that stands in for it in an extracted model.
    """

    module: nn.Module
    skip: Callable
    plain_skip: Callable[[nn.Module], nn.Module]


@dataclass
class Nesting:
    """What conversion attached to a model (``model.sortednet``).

    ``readout(model, hidden)``, when the adapter gives one, turns the hidden state after depth unit
    k-1 into the logits of the sub-model with depth k (the model's own final norm and head: an *exit*,
    no new parameters). It says that depth is "the first k layers" of a stack, so one forward pass to
    the deepest exit yields every shallower exit (:func:`run_exits`). ``finish(plain, sub)`` lets the
    adapter tidy a model cut out by :func:`~sortedcli.nest.extract.extract` (drop the skipped layers,
    shrink the library config).

    ``exits``, after :func:`add_exit_readouts`: the exits that read out through their own module
    instead of the shared one (``exits[str(k)]`` for exit k), registered on the model as
    :data:`EXITS` so that they train, move and checkpoint with it.
    """

    scope: Scope
    units: list[DepthUnit] = field(default_factory=list)  # in sorted order: units[k] is kept k-th
    readout: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    finish: Callable[[nn.Module, object], None] | None = None
    exits: nn.ModuleDict | None = None

    @property
    def depth(self) -> int:
        return len(self.units)


class _DepthUnitMixin:
    """Runs the wrapped module when its rank is kept by the active sub-model, else its skip."""

    sorted_scope: Scope
    sorted_rank: int
    sorted_skip: Callable

    def forward(self, *args, **kwargs):
        if self.sorted_scope.keeps(self.sorted_rank):
            return super().forward(*args, **kwargs)
        return self.sorted_skip(self, *args, **kwargs)


class _ExitSwitchMixin:
    """The shared module every exit reads out through (a decoder's final norm), when some exits have
    their own (:func:`add_exit_readouts`): at such an exit, its own module runs instead."""

    sorted_scope: Scope
    sorted_exits: nn.ModuleDict  # held outside ``_modules``: the model registers it once, as EXITS

    def forward(self, *args, **kwargs):
        depth = self.sorted_scope.exit_depth()
        own = self.sorted_exits[str(depth)] if depth is not None and str(depth) in self.sorted_exits else None
        self.sorted_delegated = own is not None  # its own parameters did not run (FLOP counting)
        return super().forward(*args, **kwargs) if own is None else own(*args, **kwargs)


_UNIT_CLASSES: dict[type, type] = {}
_SWITCH_CLASSES: dict[type, type] = {}


def _unit_class(base: type) -> type:
    if base not in _UNIT_CLASSES:
        _UNIT_CLASSES[base] = type(f"Sorted{base.__name__}", (_DepthUnitMixin, base), {"__module__": __name__})
    return _UNIT_CLASSES[base]


def _switch_class(base: type) -> type:
    if base not in _SWITCH_CLASSES:
        _SWITCH_CLASSES[base] = type(f"ExitSwitched{base.__name__}", (_ExitSwitchMixin, base), {"__module__": __name__})
    return _SWITCH_CLASSES[base]


def plain_class(module: nn.Module) -> type:
    """The library class a sorted module was converted from."""
    cls = type(module)
    if isinstance(module, (_DepthUnitMixin, _ExitSwitchMixin)):
        return cls.__mro__[2]
    if isinstance(module, SortedLayer):  # a family's own subclass of a sorted layer too (e.g. a fused one)
        plain = {sorted_cls: base for base, sorted_cls in SORTED_LAYERS.items()}
        return next(plain[c] for c in cls.__mro__ if c in plain)
    return cls


def sortify(model: nn.Module, out_dim: OutDim, units: Sequence[DepthUnit] = (),
            depth_dim: str = "depth", readout=None, finish=None) -> nn.Module:
    """Convert ``model`` in place into a sorted model and return it.

    ``out_dim`` says, for each supported layer, which dimension sizes its output and in which unit
    (``("width", 1)``), or ``None`` to keep its output full. ``units`` lists the depth units in
    sorted order: with ``depth=k`` the first ``k`` run and the others are skipped. ``readout`` and
    ``finish``: see :class:`Nesting`.
    """
    if hasattr(model, "sortednet"):
        raise ValueError("model is already sorted")
    scope = Scope(depth_dim)
    for name, module in model.named_modules():
        sorted_cls = SORTED_LAYERS.get(type(module))
        if sorted_cls is None:
            continue
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(f"{name}: padding_mode={module.padding_mode!r} is not supported")
            if module.groups not in (1, module.in_channels) or (
                module.groups > 1 and module.out_channels != module.in_channels
            ):
                raise ValueError(f"{name}: grouped convolutions other than depthwise are not supported")
        dim = out_dim(name, module)
        module.__class__ = sorted_cls
        module.sorted_scope = scope
        module.sorted_dim, module.sorted_unit = (None, 1) if dim is None else dim
    for rank, unit in enumerate(units):
        unit.module.__class__ = _unit_class(type(unit.module))
        unit.module.sorted_scope = scope
        unit.module.sorted_rank = rank
        unit.module.sorted_skip = unit.skip
    model.sortednet = Nesting(scope, list(units), readout, finish)
    return model


def nesting(model: nn.Module) -> Nesting:
    try:
        return model.sortednet
    except AttributeError:
        raise ValueError("model is not sorted: convert it with sortify() first") from None


@contextlib.contextmanager
def use(model: nn.Module, sub: SubModel | None) -> Iterator[nn.Module]:
    """Run ``model`` as the sub-model ``sub`` inside the block (``None``: the full model)."""
    scope = nesting(model).scope
    depth = None if sub is None else sub.get(scope.depth_dim)
    if depth is not None and not 1 <= depth <= nesting(model).depth:
        raise ValueError(f"depth={depth} is outside 1..{nesting(model).depth}")
    previous, scope.sub = scope.sub, sub
    try:
        yield model
    finally:
        scope.sub = previous


def resolved(model: nn.Module, sub: SubModel | None) -> tuple:
    """The physical slices ``sub`` selects in ``model``: the depth units it keeps and the output size
    of every sliced layer (as the scope rounds them: whole units, at least one). Two sub-models with
    the same ``resolved`` compute the same function (:meth:`~sortedcli.nest.space.Grid.distinct`)."""
    n = nesting(model)
    with use(model, sub):
        kept = tuple(n.scope.keeps(rank) for rank in range(n.depth))
        sizes = tuple(m.out_size(m.weight.shape[0]) for m in model.modules()
                      if isinstance(m, SortedLayer) and m.sorted_dim is not None)
    return kept, sizes


def call(model: nn.Module, inputs) -> torch.Tensor:
    """``model(inputs)`` (a tensor) or ``model(**inputs)`` (a mapping of keyword arguments); the logits
    (a library model's output object holds them first)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


#: the attribute (and state_dict prefix) of the exits' own readouts on a model (:func:`add_exit_readouts`)
EXITS = "sortednet_exits"


def add_exit_readouts(model: nn.Module, shared: nn.Module, make: Callable[[int], nn.Module],
                      depths: Sequence[int]) -> nn.ModuleDict:
    """Give each exit in ``depths`` its own readout module, ``make(k)`` for exit ``k``, which runs in
    place of ``shared`` (the module every exit reads through, e.g. the final norm; its class is
    swapped in place) whenever exit ``k`` is read out: by :func:`run_exits`, by :func:`read_exit`,
    and by the model's own forward pass as a depth-``k`` sub-model. The full model keeps ``shared``.
    The modules are registered on ``model`` as :data:`EXITS` (``state_dict`` keys
    ``sortednet_exits.<k>.*``): they train, move and checkpoint with it, and a plain model cut out at
    depth ``k`` (:func:`~sortedcli.nest.extract.extract`) has ``make(k)``'s trained copy where
    ``shared`` was."""
    nest = nesting(model)
    if nest.readout is None:
        raise ValueError("exit readouts need exits: this model's depth units are not exits of one stack")
    if nest.exits is not None:
        raise ValueError("this model's exits already have their own readouts")
    bad = [k for k in depths if not 1 <= k < nest.depth]
    if bad:
        raise ValueError(f"exit readouts: depth {bad[0]} is outside 1..{nest.depth - 1} (the full model keeps its own)")
    exits = nn.ModuleDict({str(k): make(k) for k in sorted(set(depths))})
    model.add_module(EXITS, exits)
    shared.__class__ = _switch_class(type(shared))
    shared.sorted_scope = nest.scope
    object.__setattr__(shared, "sorted_exits", exits)  # not a second registration of the same modules
    nest.exits = exits
    return exits


@contextlib.contextmanager
def reading(model: nn.Module, depth: int | None) -> Iterator[None]:
    """Inside the block, a readout computes exit ``depth``'s logits (its own readout module, if it has
    one) whatever sub-model is active; ``None``: the active sub-model's own exit."""
    scope = nesting(model).scope
    previous, scope.reading = scope.reading, depth
    try:
        yield
    finally:
        scope.reading = previous


def read_exit(model: nn.Module, hidden: torch.Tensor, depth: int) -> torch.Tensor:
    """Exit ``depth``'s logits of ``hidden``, the hidden state after depth unit ``depth - 1``."""
    with reading(model, depth):
        return nesting(model).readout(model, hidden)


def has_exits(model: nn.Module) -> bool:
    """Whether the depth sub-models of ``model`` are exits of one stack (see :class:`Nesting`)."""
    return nesting(model).readout is not None


def run_exits(model: nn.Module, inputs, depths: Sequence[int],
              at: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """The logits of every exit in ``depths`` from one forward pass of the active sub-model, whose
    depth must be the deepest of them: the hidden state after unit ``k-1`` is caught on the way and
    read out through the model's own head. Costs one trunk pass plus a readout per extra exit.

    ``at``: a boolean mask over the hidden state's leading dimensions (e.g. batch x positions) of the
    places whose logits are needed; every exit's logits are then those places only, flattened in
    row-major order (``logits[at]``), and the extra exits' readouts skip the rest. With a large head
    (a language model's vocabulary) and a loss on a fraction of the positions (answer tokens), this is
    most of an exit's cost."""
    nest = nesting(model)
    if nest.readout is None:
        raise ValueError("this model's depth units are not exits of one stack (no readout)")
    active = nest.scope.sub.get(nest.scope.depth_dim) if nest.scope.sub is not None else None
    deepest = nest.depth if active is None else active
    if max(depths) != deepest:
        raise ValueError(f"run_exits: the active sub-model has depth {deepest}, the deepest exit asked "
                         f"for is {max(depths)}")
    caught: dict[int, torch.Tensor] = {}

    def catch(k):
        def hook(module, args, out):
            caught[k] = out[0] if isinstance(out, tuple) else out
        return hook

    hooks = [nest.units[k - 1].module.register_forward_hook(catch(k)) for k in set(depths) if k != deepest]
    try:
        final = call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    logits = {k: read_exit(model, h if at is None else h[at], k) for k, h in caught.items()}
    logits[deepest] = final if at is None else final[at]
    return logits


def trunk_groups(model: nn.Module, subs: Sequence[SubModel]) -> list[tuple[SubModel, list[SubModel]]]:
    """``[(trunk, members)]``: ``subs`` grouped so that one forward pass of ``trunk`` yields all of its
    members' logits (:func:`run_exits`). With exits, sub-models that differ only in depth share the
    trunk of the deepest of them; otherwise each sub-model is its own trunk. Order of first appearance;
    repeated sub-models stay repeated."""
    depth_dim = nesting(model).scope.depth_dim
    if not has_exits(model):
        return [(sub, [sub]) for sub in subs]
    groups: dict[tuple, list[SubModel]] = {}
    for sub in subs:
        key = tuple((d, v) for d, v in sub.levels if d != depth_dim) if sub.get(depth_dim) is not None else sub
        groups.setdefault(key, []).append(sub)
    out = []
    for members in groups.values():
        deepest = max(members, key=lambda s: s.get(depth_dim) or 0)
        out.append((deepest, members))
    return out
