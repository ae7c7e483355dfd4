"""FLOPs and parameters of a sub-model, measured on the shapes it really runs.

Convention: **FLOPs = 2 x multiply-adds**, per sample (an image; a sequence of a stated length),
counted by ``torch.utils.flop_counter`` on the sliced forward (convolutions and matrix multiplies,
attention's included when it runs eagerly; BatchNorm, normalization, activations, pooling, softmax and
additions are not counted, as in most papers' tables). Parameters are those of the physically sliced layers that run
(a dropped block's parameters are not counted; its projection shortcut, when it has one, is; a
tensor that two layers share, such as tied embeddings and LM head, is counted once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .nest import SubModel, call, use
from .nest.layers import SortedLayer


@dataclass(frozen=True)
class Cost:
    flops: int  # per sample
    params: int


@torch.no_grad()
def measure(model: nn.Module, sub: SubModel | None, example) -> Cost:
    """FLOPs per sample and parameters of ``sub``; ``example`` is a batch of one or more inputs (a
    tensor, or a mapping of keyword arguments such as ``input_ids``)."""
    counted: dict[nn.Module, int] = {}
    seen: set[int] = set()  # parameters already counted: a tied LM head is the embedding, counted once

    def hook(m, args, out):
        if m not in counted:
            own = list(m.parameters(recurse=False))
            shared = sum(p.numel() for p in own if id(p) in seen)
            seen.update(id(p) for p in own)
            n = m.active_parameters(*m.sizes(args[0])) if isinstance(m, SortedLayer) else sum(p.numel() for p in own)
            counted[m] = max(0, n - shared)

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if next(m.parameters(recurse=False), None) is not None]
    was_training = model.training
    model.eval()
    try:
        with use(model, sub), FlopCounterMode(display=False) as counter:
            call(model, example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    first = next(iter(example.values())) if isinstance(example, Mapping) else example
    return Cost(flops=int(counter.get_total_flops()) // first.shape[0], params=sum(counted.values()))
