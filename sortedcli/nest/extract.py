"""Cut one sub-model out of a sorted model as a plain, physically smaller library model.

The widths each layer really sees are recorded by running the sub-model once on an example input;
every sorted layer is then replaced by a plain torch layer holding a copy of its slice, every kept
depth unit gets its library class back, and every dropped one is replaced by its plain stand-in.
The result has no sortedcli classes in it. ``check_equal`` verifies that it computes what the
sub-model computes inside the full model.

Nothing is copied that the sub-model does not keep: the structure is copied with empty stand-ins for
the parameters, and only the parameters (or slices) that remain at the end are copied from the model,
so cutting a sub-model out of a large model needs about the sub-model's memory, not the model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .convert import EXITS, _DepthUnitMixin, _ExitSwitchMixin, call, nesting, plain_class, use
from .layers import SORTED_LAYERS, SortedLayer
from .space import SubModel


@torch.no_grad()
def trace(model: nn.Module, sub: SubModel | None, example) -> dict[str, tuple[int, int]]:
    """``{qualified name: (n_in, n_out)}`` for every sorted layer that runs in ``sub`` on ``example``
    (a tensor, or a mapping of keyword arguments)."""
    seen: dict[str, tuple[int, int]] = {}

    def record(name):
        def hook(m, args, out):  # returns None: a forward hook's return value replaces the output
            seen.setdefault(name, m.sizes(args[0]))
        return hook

    hooks = [m.register_forward_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, SortedLayer)]
    was_training = model.training
    model.eval()
    try:
        with use(model, sub):
            call(model, example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def extract(model: nn.Module, sub: SubModel | None, example) -> nn.Module:
    """A plain copy of sub-model ``sub`` (in eval mode) with physically sliced layers.

    Only what the sub-model keeps is copied: the model's structure is copied with every parameter
    replaced by an empty (meta) stand-in, sliced layers are built from the original's slices, dropped
    units are replaced, and only then are the parameters that remain copied from the original. The
    extra memory is about the sub-model's size, not the full model's."""
    sizes = trace(model, sub, example)
    nest = nesting(model)
    plain, originals = _skeleton(model)
    del plain.sortednet
    scope = nest.scope
    depth = None if sub is None else sub.get(scope.depth_dim)
    # Depth units: note which are dropped before their children are replaced.
    dropped = {
        name for name, m in plain.named_modules()
        if isinstance(m, _DepthUnitMixin) and depth is not None and m.sorted_rank >= depth
    }
    # Layers: the slices that ran become plain layers holding copies of the model's slices (a layer that
    # ran whole, or never ran (an unused branch), gets its class back and its parameters are copied by
    # _fill, tied ones once); layers inside dropped units go with them.
    for name, m in list(plain.named_modules()):
        if not isinstance(m, SortedLayer):
            continue
        if name in sizes and not _whole(model.get_submodule(name), sizes[name]):
            _set(plain, name, model.get_submodule(name).to_plain(*sizes[name]))
        elif name in sizes or not any(name.startswith(d + ".") for d in dropped):
            m.__class__ = plain_class(m)
            _strip(m)
    for name, m in list(plain.named_modules()):
        if isinstance(m, _DepthUnitMixin):
            rank = m.sorted_rank
            m.__class__ = plain_class(m)
            _strip(m)
            if name in dropped:
                _set(plain, name, nest.units[rank].plain_skip(m))
    # Exits' own readouts: the cut-out depth's own (if it has one) takes the shared module's place;
    # the others are not part of this sub-model.
    own = plain._modules.pop(EXITS, None)
    for name, m in list(plain.named_modules()):
        if isinstance(m, _ExitSwitchMixin):
            m.__class__ = plain_class(m)
            _strip(m)
            if own is not None and depth is not None and str(depth) in own:
                _set(plain, name, own[str(depth)])
    _retie(plain, _shared(model))
    if nest.finish is not None:
        nest.finish(plain, sub)
    _fill(plain, originals)
    return plain.eval()


def _skeleton(model: nn.Module) -> tuple[nn.Module, dict[int, tuple[nn.Parameter, nn.Parameter]]]:
    """A deep copy of ``model`` whose parameters are stand-ins on the meta device (no memory; tied
    parameters share one stand-in), and ``{id(stand-in): (stand-in, original)}`` for :func:`_fill`."""
    memo: dict[int, object] = {}
    originals: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for p in model.parameters():  # each tensor once, tied ones included
        stand_in = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
        memo[id(p)] = stand_in
        originals[id(stand_in)] = (stand_in, p)
    return copy.deepcopy(model, memo), originals


def _fill(plain: nn.Module, originals: dict[int, tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Replace every stand-in left in ``plain`` by a copy of its original (one copy per tensor, so tied
    parameters stay tied)."""
    made: dict[int, nn.Parameter] = {}
    for m in plain.modules():
        for key, p in m._parameters.items():
            if p is None or id(p) not in originals:
                continue
            if id(p) not in made:
                source = originals[id(p)][1]
                made[id(p)] = nn.Parameter(source.detach().clone(), requires_grad=source.requires_grad)
            m._parameters[key] = made[id(p)]


def _whole(layer: SortedLayer, size: tuple[int, int]) -> bool:
    """Whether the slice of ``layer`` that ran is all of it, in a layer whose class is a torch layer's
    sorted class (a subclass of one, such as a fused projection, is always cut by its ``to_plain``)."""
    return type(layer) in SORTED_LAYERS.values() and all(
        t is None or t is getattr(layer, name) for name, t in layer.sliced(*size).items())


def _shared(model: nn.Module) -> list[list[str]]:
    """Qualified names of parameters that are one tensor in ``model`` (tied embeddings and LM head)."""
    names: dict[int, list[str]] = {}
    for module_name, m in model.named_modules(remove_duplicate=False):
        for leaf, p in m.named_parameters(recurse=False):
            full = f"{module_name}.{leaf}" if module_name else leaf
            if full not in names.setdefault(id(p), []):
                names[id(p)].append(full)
    return [group for group in names.values() if len(group) > 1]


def _retie(plain: nn.Module, groups: list[list[str]]) -> None:
    """Make each group of tied parameters one tensor again in the cut-out model (slicing copied each
    layer's slice on its own); a group whose members were cut to different shapes stays untied."""
    for group in groups:
        try:
            found = [(name, plain.get_parameter(name)) for name in group]
        except AttributeError:  # in a dropped unit
            continue
        first = found[0][1]
        if any(p.shape != first.shape for _, p in found):
            continue
        for name, _ in found[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(owner) if owner else plain, leaf, first)


def _strip(m: nn.Module) -> None:
    for attr in ("sorted_scope", "sorted_dim", "sorted_unit", "sorted_rank", "sorted_skip", "sorted_exits",
                 "sorted_delegated", "sync"):
        m.__dict__.pop(attr, None)


@torch.no_grad()
def check_equal(model: nn.Module, sub: SubModel | None, plain: nn.Module, example,
                atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Max abs difference between the plain model and the sub-model inside ``model`` (both in eval
    mode) on ``example``; raises ``AssertionError`` when they differ beyond tolerance."""
    was_training = model.training
    model.eval()
    try:
        with use(model, sub):
            want = call(model, example)
    finally:
        model.train(was_training)
    got = call(plain.eval(), example)
    if got.shape != want.shape:
        raise AssertionError(f"extracted model output shape {tuple(got.shape)} != {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        raise AssertionError(f"extracted model differs from the sub-model: max |diff| = {diff:.3g}")
    return diff
