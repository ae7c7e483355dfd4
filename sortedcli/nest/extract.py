"""Cut one sub-model out of a sorted model as a plain, physically smaller library model.

The widths each layer really sees are recorded by running the sub-model once on an example input;
every sorted layer is then replaced by a plain torch layer holding a copy of its slice, every kept
depth unit gets its library class back, and every dropped one is replaced by its plain stand-in.
The result has no sortedcli classes in it. ``check_equal`` verifies that it computes what the
sub-model computes inside the full model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .convert import _DepthUnitMixin, call, nesting, plain_class, use
from .layers import SortedLayer
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
    """A plain copy of sub-model ``sub`` (in eval mode) with physically sliced layers."""
    sizes = trace(model, sub, example)
    nest = nesting(model)
    plain = copy.deepcopy(model)
    del plain.sortednet
    scope = nest.scope
    depth = None if sub is None else sub.get(scope.depth_dim)
    # Depth units: note which are dropped before their children are replaced.
    dropped = {
        name for name, m in plain.named_modules()
        if isinstance(m, _DepthUnitMixin) and depth is not None and m.sorted_rank >= depth
    }
    # Layers: the slices that ran become plain layers; layers inside dropped units go with them.
    for name, m in list(plain.named_modules()):
        if not isinstance(m, SortedLayer):
            continue
        if name in sizes:
            _set(plain, name, m.to_plain(*sizes[name]))
        elif not any(name.startswith(d + ".") for d in dropped):
            m.__class__ = plain_class(m)  # never ran (unused branch): keep it whole
            _strip(m)
    for name, m in list(plain.named_modules()):
        if isinstance(m, _DepthUnitMixin):
            rank = m.sorted_rank
            m.__class__ = plain_class(m)
            _strip(m)
            if name in dropped:
                _set(plain, name, nest.units[rank].plain_skip(m))
    _retie(plain, _shared(model))
    if nest.finish is not None:
        nest.finish(plain, sub)
    return plain.eval()


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
    for attr in ("sorted_scope", "sorted_dim", "sorted_unit", "sorted_rank", "sorted_skip"):
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
