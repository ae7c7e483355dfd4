"""Which exit should draft for self-speculative decoding: chosen from measurements, not guessed.

For each trained exit E of a causal LM, ``sortednet eval`` measures

- ``agreement`` a: the fraction of held-out positions (those the task counts) where exit E's argmax
  equals the full model's: the acceptance rate a greedy draft from E gets;
- ``cost_ratio`` c: the time of one decoding step with a KV cache (one token, head included) through
  the first E layers, over the same through all of them;

and predicts the speed-up of drafting k tokens from E, ``(1 - a^(k+1)) / ((1 - a)(k c + 1))`` (tokens
per round over full-model costs per round; it assumes verifying k+1 tokens costs one step, which
holds where decoding is bound by reading the weights; on a CPU it costs more, see
benchmarks/decoding.py). The exit and k with the best prediction are the run's draft: ``sortednet
generate --speculative`` uses them when no ``--draft-exit`` is given.
"""

from __future__ import annotations

import torch

from .engine import autocast, latency_ms
from .nest import nesting, run_exits, use
from .tasks import Task

MAX_K = 16


def speedup(a: float, c: float, k: int) -> float:
    """Predicted speed-up over greedy decoding of k drafts per round at acceptance a and cost ratio c."""
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (k * c + 1)


def best_k(a: float, c: float, max_k: int = MAX_K) -> tuple[int, float]:
    """``(k, speed-up)`` with the best predicted speed-up for k in 1..max_k."""
    return max(((k, speedup(a, c, k)) for k in range(1, max_k + 1)), key=lambda kv: kv[1])


@torch.no_grad()
def agreement(model, task: Task, exits: list[int], test, device, amp) -> dict[int, float]:
    """``{exit: fraction of counted held-out positions where its argmax is the full model's}``, every
    exit read from one trunk pass of the full model per batch (:func:`~sortedcli.nest.run_exits`)."""
    full = nesting(model).depth
    sums = {e: torch.zeros(2) for e in exits}
    model.eval()
    with use(model, None), autocast(device, amp):
        for batch in test:
            batch = task.to_device(batch, device)
            logits = run_exits(model, task.inputs(batch), sorted(set(exits) | {full}))
            for e in exits:
                sums[e] += task.agreement(logits[e], logits[full], batch).float().cpu()
    return {e: float(s[0] / s[1]) if s[1] else float("nan") for e, s in sums.items()}


@torch.inference_mode()
def step_ms(stack, exit: int, context: int = 32, warmup: int = 3, reps: int = 10) -> float:
    """Median time of one decoding step through the first ``exit`` layers and the head: one token,
    a KV cache already holding ``context`` tokens (cropped back after each step)."""
    dev = stack.device
    cache = stack.new_cache()
    ids = torch.zeros(1, context, dtype=torch.long, device=dev)
    stack.layers(stack.embed(ids), 0, exit, cache, torch.arange(context, device=dev))
    one = stack.embed(torch.zeros(1, 1, dtype=torch.long, device=dev))
    pos = torch.tensor([context], device=dev)

    def step():
        stack.head(stack.layers(one, 0, exit, cache, pos)[:, -1])
        stack.crop(cache, context)

    return latency_ms(step, dev, warmup, reps)


def cost_ratios(stack, exits: list[int], warmup: int = 3, reps: int = 10) -> dict[int, float]:
    """``{exit: step time of that exit / step time of the full model}`` (measured, head included)."""
    full = step_ms(stack, stack.num_layers, warmup=warmup, reps=reps)
    return {e: step_ms(stack, e, warmup=warmup, reps=reps) / full for e in exits}


def choose(a: dict[int, float], c: dict[int, float], full: int) -> dict | None:
    """The draft with the best predicted speed-up among the exits below ``full``: ``{"exit", "k",
    "speedup", "agreement", "cost_ratio"}``, or None when no exit is below the full model."""
    best = None
    for e in sorted(a):
        if e >= full or a[e] != a[e]:
            continue
        k, s = best_k(a[e], c[e])
        if best is None or s > best["speedup"]:
            best = {"exit": e, "k": k, "speedup": s, "agreement": a[e], "cost_ratio": c[e]}
    return best


@torch.inference_mode()
def samples(stack, prompts: list[list[int]], exits: list[int], max_new_tokens: int = 16) -> dict[int, list[list[int]]]:
    """``{exit: greedy continuation of each prompt from that exit}`` (the full model among them)."""
    from . import decoding

    return {e: [decoding.generate(stack, p, exit=e, max_new_tokens=max_new_tokens).tokens for p in prompts]
            for e in exits}
