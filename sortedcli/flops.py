"""FLOPs and parameters of a sub-model, measured on the shapes it really runs.

Convention: **FLOPs = 2 x multiply-adds**, per sample (an image; a sequence of a stated length),
counted by ``torch.utils.flop_counter`` on the sliced forward (convolutions and matrix multiplies,
attention's included when it runs eagerly; BatchNorm, normalization, activations, pooling, softmax and
additions are not counted, as in most papers' tables). Parameters are those of the physically sliced layers that run
(a dropped block's parameters are not counted; its projection shortcut, when it has one, is; a
tensor that two layers share, such as tied embeddings and LM head, is counted once).

:func:`measure` counts one sub-model with one forward pass. :func:`measure_all` counts a whole grid
with two passes per setting of the other dims instead of one per depth: a depth unit costs the same
whichever other units run (its input has the same shape either way, which is what lets a dropped
unit's skip stand in for it), so the pass with every unit kept and the pass with only the first kept
give each unit's cost kept and dropped, and the cost outside the units; a depth-k sub-model is their
sum. Each part is still measured by the counter on the sliced model; where the parts do not add up
(a module that runs in two units, or outside and inside one, or a cost outside the units that
changes with depth) every sub-model of that setting is measured whole instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .nest import SubModel, call, nesting, use
from .nest.layers import SortedLayer


@dataclass(frozen=True)
class Cost:
    flops: int  # per sample
    params: int


@contextlib.contextmanager
def _one_thread():
    """One CPU thread while counting: a batch of one gains nothing from more, and on a busy machine
    each small op of a multi-threaded forward waits for the other cores (a ResNet-50 pass 40x longer)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _batch(example) -> int:
    first = next(iter(example.values())) if isinstance(example, Mapping) else example
    return first.shape[0]


@dataclass
class _Parts:
    """One counted pass, split by depth unit: FLOPs and parameters outside the units and in each unit
    (kept or skipped, whichever ran); ``separable`` is False when they cannot be recombined."""

    flops: dict  # unit index (None: outside every unit) -> FLOPs of the whole batch
    params: dict
    separable: bool


@torch.no_grad()
def _count(model: nn.Module, sub: SubModel | None, example) -> _Parts:
    units = {id(u.module): i for i, u in enumerate(nesting(model).units)}
    flops: dict = {None: 0}
    params: dict = {None: 0}
    seen: dict[nn.Module, object] = {}  # module -> the unit it first ran in
    owner: dict[int, object] = {}  # parameter -> the unit it was first counted in: a tied LM head is the
    # embedding, counted once (and a tensor shared by a unit and the rest cannot be split by unit)
    state = {"unit": None, "start": 0, "separable": True}
    counter = FlopCounterMode(display=False)

    def enter(m, args, kwargs=None):
        if state["unit"] is not None or units[id(m)] in flops:
            state["separable"] = False  # a unit inside a unit, or one that runs twice
        state["unit"], state["start"] = units[id(m)], counter.get_total_flops()

    def leave(m, args, out):
        i = units[id(m)]
        flops[i] = flops.get(i, 0) + counter.get_total_flops() - state["start"]
        state["unit"] = None

    def count(m, args, out):
        where = state["unit"]
        if m in seen:
            if seen[m] != where:
                state["separable"] = False  # shared by two units, or by a unit and the rest
            return
        seen[m] = where
        # a module that handed its input to another (an exit's own readout, nest.add_exit_readouts) ran
        # none of its own parameters
        own = [] if getattr(m, "sorted_delegated", False) else list(m.parameters(recurse=False))
        shared = 0
        for p in own:
            if id(p) in owner:
                shared += p.numel()
                if owner[id(p)] != where:
                    state["separable"] = False
            else:
                owner[id(p)] = where
        n = m.active_parameters(*m.sizes(args[0])) if isinstance(m, SortedLayer) else sum(p.numel() for p in own)
        params[where] = params.get(where, 0) + max(0, n - shared)

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if next(m.parameters(recurse=False), None) is not None]
    for u in nesting(model).units:
        hooks += [u.module.register_forward_pre_hook(enter), u.module.register_forward_hook(leave)]
    was_training = model.training
    model.eval()
    try:
        with _one_thread(), use(model, sub), counter:
            call(model, example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    flops[None] = counter.get_total_flops() - sum(v for k, v in flops.items() if k is not None)
    return _Parts(flops, params, state["separable"])


def measure(model: nn.Module, sub: SubModel | None, example) -> Cost:
    """FLOPs per sample and parameters of ``sub``; ``example`` is a batch of one or more inputs (a
    tensor, or a mapping of keyword arguments such as ``input_ids``)."""
    parts = _count(model, sub, example)
    return Cost(flops=int(sum(parts.flops.values())) // _batch(example), params=sum(parts.params.values()))


def _at_depth(sub: SubModel, dim: str, depth: int) -> SubModel:
    return SubModel(tuple((d, depth if d == dim else v) for d, v in sub.levels))


def measure_all(model: nn.Module, subs: Iterable[SubModel], example,
                done: Callable[[int], None] | None = None) -> dict[SubModel, Cost]:
    """:func:`measure` of every sub-model in ``subs``, two passes per setting of the dims other than
    depth (see the module doc); ``done(n)`` is told each time ``n`` more are counted."""
    subs = list(subs)
    nest = nesting(model)
    dim, n_units = nest.scope.depth_dim, nest.depth
    done = done or (lambda n: None)
    groups: dict[tuple, list[SubModel]] = {}
    for sub in subs:
        key = tuple((d, v) for d, v in sub.levels if d != dim) if sub.get(dim) is not None else (sub,)
        groups.setdefault(key, []).append(sub)
    out: dict[SubModel, Cost] = {}
    batch = _batch(example)
    for members in groups.values():
        depths = {sub.get(dim) for sub in members}
        if len(depths) < 3:  # two passes would not save any
            for sub in members:
                out[sub] = measure(model, sub, example)
                done(1)
            continue
        full, one = (_count(model, _at_depth(members[0], dim, k), example) for k in (n_units, 1))
        if not (full.separable and one.separable and full.flops[None] == one.flops[None]
                and full.params[None] == one.params[None]):
            for sub in members:
                out[sub] = measure(model, sub, example)
                done(1)
            continue
        for sub in members:
            k = sub[dim]
            pick = [full if i < k else one for i in range(n_units)]
            flops = full.flops[None] + sum(p.flops.get(i, 0) for i, p in enumerate(pick))
            params = full.params[None] + sum(p.params.get(i, 0) for i, p in enumerate(pick))
            out[sub] = Cost(flops=int(flops) // batch, params=params)
        done(len(members))
    return {sub: out[sub] for sub in subs}
