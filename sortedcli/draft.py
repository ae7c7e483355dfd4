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

The same is measured with the draft reading out through the N most frequent tokens of the training
data only (FR-Spec; N in :data:`VOCAB_SIZES` below the vocabulary size): the agreement of the argmax
over those N ids, the cost with those N rows of the head. The run's token ranking is stored as
``eval/token-ranks.safetensors``; the chosen N (or none) is part of the draft.
"""

from __future__ import annotations

import torch

from .engine import autocast, latency_ms
from .nest import nesting, run_exits, use
from .tasks import Task

MAX_K = 16
VOCAB_SIZES = (4096, 8192, 16384)


def token_ranks(sequences, vocab_size: int) -> torch.Tensor:
    """Every token id, most frequent in ``sequences`` (the training data's ids) first."""
    from .decoding import frequent_tokens

    return frequent_tokens(sequences, vocab_size, vocab_size)


def speedup(a: float, c: float, k: int) -> float:
    """Predicted speed-up over greedy decoding of k drafts per round at acceptance a and cost ratio c."""
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (k * c + 1)


def best_k(a: float, c: float, max_k: int = MAX_K) -> tuple[int, float]:
    """``(k, speed-up)`` with the best predicted speed-up for k in 1..max_k."""
    return max(((k, speedup(a, c, k)) for k in range(1, max_k + 1)), key=lambda kv: kv[1])


def restrict(logits: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token outside ``vocab`` at -inf: its argmax is the draft's over ``vocab``."""
    out = torch.full_like(logits, float("-inf"))
    return out.index_copy_(-1, vocab, logits.index_select(-1, vocab))


@torch.no_grad()
def agreement(model, task: Task, exits: list[int], test, device, amp,
              vocabs: dict[int, torch.Tensor] | None = None) -> dict[tuple[int, int | None], float]:
    """``{(exit, N): fraction of counted held-out positions where the exit's argmax is the full
    model's}``; ``N`` is None for the full head, else the size of a draft vocabulary in ``vocabs``
    (argmax over those ids only). Every exit is read from one trunk pass of the full model per batch
    (:func:`~sortedcli.nest.run_exits`)."""
    full = nesting(model).depth
    vocabs = {n: v.to(device) for n, v in (vocabs or {}).items()}
    keys = [(e, n) for e in exits for n in (None, *vocabs)]
    sums = {key: torch.zeros(2) for key in keys}
    model.eval()
    with use(model, None), autocast(device, amp):
        for batch in test:
            batch = task.to_device(batch, device)
            logits = run_exits(model, task.inputs(batch), sorted(set(exits) | {full}))
            for e, n in keys:
                z = logits[e] if n is None else restrict(logits[e], vocabs[n])
                sums[e, n] += task.agreement(z, logits[full], batch).float().cpu()
    return {key: float(s[0] / s[1]) if s[1] else float("nan") for key, s in sums.items()}


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


class _Restricted:
    """A stack whose head reads out over a draft vocabulary only (:meth:`Stack.vocab_head`)."""

    def __init__(self, stack, vocab: torch.Tensor):
        self._stack, self.head = stack, stack.vocab_head(vocab)

    def __getattr__(self, name):
        return getattr(self._stack, name)


def cost_ratios(stack, exits: list[int], warmup: int = 3, reps: int = 10,
                vocabs: dict[int, torch.Tensor] | None = None) -> dict[tuple[int, int | None], float]:
    """``{(exit, N): step time of that exit / step time of the full model}`` (measured, head
    included; ``N`` None: the full head, else the head over the draft vocabulary ``vocabs[N]``)."""
    full = step_ms(stack, stack.num_layers, warmup=warmup, reps=reps)
    out = {}
    for n, vocab in {None: None, **(vocabs or {})}.items():
        s = stack if vocab is None else _Restricted(stack, vocab.to(stack.device))
        out.update({(e, n): step_ms(s, e, warmup=warmup, reps=reps) / full for e in exits})
    return out


def choose(a: dict, c: dict, full: int) -> dict | None:
    """The draft with the best predicted speed-up among the exits below ``full`` (keys ``(exit, N)``
    as :func:`agreement` and :func:`cost_ratios` give them; plain exits as keys work too): ``{"exit",
    "vocab" (N or None), "k", "speedup", "agreement", "cost_ratio"}``, or None when there is none."""
    best = None
    for key in sorted(a, key=lambda kv: (kv, 0) if isinstance(kv, int) else (kv[0], kv[1] or 0)):
        e, n = (key, None) if isinstance(key, int) else key
        if e >= full or a[key] != a[key]:
            continue
        k, s = best_k(a[key], c[key])
        if best is None or s > best["speedup"]:
            best = {"exit": e, "vocab": n, "k": k, "speedup": s, "agreement": a[key], "cost_ratio": c[key]}
    return best


@torch.inference_mode()
def samples(stack, prompts: list[list[int]], exits: list[int], max_new_tokens: int = 16) -> dict[int, list[list[int]]]:
    """``{exit: greedy continuation of each prompt from that exit}`` (the full model among them)."""
    from . import decoding

    return {e: [decoding.generate(stack, p, exit=e, max_new_tokens=max_new_tokens).tokens for p in prompts]
            for e in exits}
