"""FLOPs and parameters of a sub-model, measured on the shapes it really runs.

Convention: **FLOPs = 2 x multiply-adds**, per sample, counted by ``torch.utils.flop_counter`` on the
sliced forward (convolutions and matrix multiplies; BatchNorm, activations, pooling and additions are
not counted, as in most papers' tables). Parameters are those of the physically sliced layers that run
(a dropped block's parameters are not counted; its projection shortcut, when it has one, is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .nest import SubModel, use
from .nest.layers import SortedLayer


@dataclass(frozen=True)
class Cost:
    flops: int  # per sample
    params: int


@torch.no_grad()
def measure(model: nn.Module, sub: SubModel | None, example: torch.Tensor) -> Cost:
    """FLOPs per sample and parameters of ``sub``; ``example`` is a batch of one or more inputs."""
    counted: dict[nn.Module, int] = {}

    def hook(m, args, out):
        if m not in counted:
            counted[m] = m.active_parameters(*m.sizes(args[0])) if isinstance(m, SortedLayer) else sum(
                p.numel() for p in m.parameters(recurse=False))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if next(m.parameters(recurse=False), None) is not None]
    was_training = model.training
    model.eval()
    try:
        with use(model, sub), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return Cost(flops=int(counter.get_total_flops()) // example.shape[0], params=sum(counted.values()))
