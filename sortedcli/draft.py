"""Which exit should draft for self-speculative decoding: chosen from measurements, not guessed.

For each trained exit E of a causal LM, ``sortednet eval`` measures

- ``agreement`` a: the fraction of held-out positions (those the task counts) where exit E's argmax
  equals the full model's: the acceptance rate a greedy draft from E gets;
- ``cost_ratio`` c: the time of one decoding step with a KV cache (one token, head included) through
  the first E layers, over the same through all of them;

- ``verify`` v(T): the time of one full-model step of T tokens (all layers, head on every row) over
  one token's, for a few T (interpolated between them): what checking k drafts costs on this device;

and predicts the speed-up of drafting k tokens from E, ``(1 - a^(k+1)) / ((1 - a)(k c + v(k+1)))``
(tokens per round over full-model costs per round). Where decoding is bound by reading the weights
(a GPU at batch 1) v is about 1 and this is the paper's bound; on a CPU it grows with T (SmolLM2-135M
on 2 quiet cores: v(2) = 1.05, v(5) = 1.55, v(9) = 1.9), and a prediction that ignored it would
over-promise and pick too long a draft. The exit and k with the best prediction are the run's draft: ``sortednet
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


VERIFY_SIZES = (1, 2, 3, 5, 9, MAX_K + 1)


def verify_cost(verify: dict[int, float] | None, T: int) -> float:
    """v(T): a T-token full-model step over a one-token step, linearly interpolated between the
    measured sizes of ``verify`` (``{T: ratio}``); 1 when nothing was measured."""
    if not verify:
        return 1.0
    sizes = sorted(int(t) for t in verify)
    ratio = {int(t): float(v) for t, v in verify.items()}
    if T <= sizes[0]:
        return ratio[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if T <= hi:
            return ratio[lo] + (ratio[hi] - ratio[lo]) * (T - lo) / (hi - lo)
    return ratio[sizes[-1]] * T / sizes[-1]  # beyond the largest measured: proportional


def check_first(verify: dict[int, float] | None, k: int) -> float:
    """The ``check_first`` of :func:`sortedcli.decoding.speculative` that measured verification costs
    call for: checking the first draft's position alone costs v(1) = 1 and, when that draft is accepted
    (probability p), v(k) more for the others; verifying all k + 1 positions at once costs v(k + 1). So
    checking first is cheaper while p < (v(k + 1) - 1) / v(k): about 0.3 on a CPU (v(5) ~ 1.5), 0 on a
    GPU where k + 1 tokens cost one token's time. None (nothing measured): 0.5."""
    if not verify:
        return 0.5
    return min(1.0, max(0.0, (verify_cost(verify, k + 1) - 1) / verify_cost(verify, k)))


def speedup(a: float, c: float, k: int, verify: dict[int, float] | None = None) -> float:
    """Predicted speed-up over greedy decoding of k drafts per round at acceptance a, cost ratio c
    and verification costs ``verify`` (see :func:`verify_cost`; None: verifying costs one step)."""
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (k * c + verify_cost(verify, k + 1))


def best_k(a: float, c: float, max_k: int = MAX_K, verify: dict[int, float] | None = None) -> tuple[int, float]:
    """``(k, speed-up)`` with the best predicted speed-up for k in 1..max_k."""
    return max(((k, speedup(a, c, k, verify)) for k in range(1, max_k + 1)), key=lambda kv: kv[1])


def break_even(c: float, verify: dict[int, float] | None = None, max_k: int = MAX_K) -> float | None:
    """The lowest acceptance at which drafting (best k) stops losing to greedy decoding at cost ratio
    ``c`` and verification costs ``verify``; None when even a = 1 loses. What
    :func:`sortedcli.decoding.speculative` should give up below: on SmolLM2's exit 3 with an 8,192-token
    draft head (c = 0.09, v(2) = 1.09) it is 0.18, so a fixed 0.4 dropped drafts that pay."""
    if best_k(1.0, c, max_k, verify)[1] < 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if best_k(mid, c, max_k, verify)[1] >= 1 else (mid, hi)
    return hi


def give_up(c: float | None, verify: dict[int, float] | None) -> float:
    """``speculative(give_up=)`` for a draft of cost ratio ``c`` at verification costs ``verify``: its
    :func:`break_even` acceptance, else (unmeasured, or a draft that never pays) the decoder's default."""
    from .decoding import GIVE_UP

    a = break_even(float(c), verify) if c is not None and verify else None
    return GIVE_UP if a is None else a


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
    (:func:`~sortedcli.nest.run_exits`), at the positions the task counts only (``Task.keep``): a
    49k-token head at every position of 10 exits of a batch of chats is ~6 GB of logits, most of them
    for prompt and padding tokens that are never scored."""
    full = nesting(model).depth
    vocabs = {n: v.to(device) for n, v in (vocabs or {}).items()}
    keys = [(e, n) for e in exits for n in (None, *vocabs)]
    sums = {key: torch.zeros(2) for key in keys}
    depths = sorted(set(exits) | {full})
    model.eval()
    with use(model, None), autocast(device, amp):
        for batch in test:
            batch = task.to_device(batch, device)
            at = task.keep(batch)
            logits = run_exits(model, task.inputs(batch), depths, at=at)
            reference = logits.pop(full)
            target = reference.argmax(-1) if at is not None else None
            for e in exits:
                z = logits.pop(e)  # freed exit by exit
                for n in (None, *vocabs):
                    if at is None:  # every position's logits: the task says which count
                        zn = z if n is None else restrict(z, vocabs[n])
                        sums[e, n] += task.agreement(zn, reference, batch).float().cpu()
                        continue
                    # gathered at the counted positions: all of them count. Over a draft
                    # vocabulary, the argmax of its ids' logits mapped back to token ids.
                    pick = z.argmax(-1) if n is None else vocabs[n][z.index_select(-1, vocabs[n]).argmax(-1)]
                    sums[e, n] += torch.tensor([float((pick == target).sum()), float(target.numel())])
                del z
    return {key: float(s[0] / s[1]) if s[1] else float("nan") for key, s in sums.items()}


#: eval's own-text agreement: the full model's greedy continuation of this many held-out prompts,
#: this many tokens each (SmolLM2-135M on 2 cores: about 15 s)
OWN_TEXT_PROMPTS, OWN_TEXT_TOKENS = 8, 32


@torch.no_grad()
def own_text_agreement(model, stack, task: Task, prompts: list[list[int]], exits: list[int], device, amp,
                       vocabs: dict[int, torch.Tensor] | None = None,
                       new_tokens: int = OWN_TEXT_TOKENS) -> dict[tuple[int, int | None], float]:
    """:func:`agreement` on the text a draft meets while decoding: the full model's own greedy
    continuation of each prompt (``stack``, the model's decoding stack), teacher-forced, every
    continuation token counted. On held-out reference answers the agreement can be far from it: the
    exit-3 readout of SmolLM2 agreed on 0.37 of GSM8K's answers and 0.23 of the drafts while decoding
    the model's own (docs/results/smollm2/study-quiet)."""
    from .decoding import generate

    batches = []
    for prompt in prompts:
        with torch.inference_mode():
            cont = generate(stack, prompt, max_new_tokens=new_tokens).tokens
        ids = torch.tensor([list(prompt) + list(cont)], dtype=torch.long)
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt):] = ids[0, len(prompt):]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return agreement(model, task, exits, batches, device, amp, vocabs)


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
        stack.head(stack.layers(one, 0, exit, cache, pos)[:, -1], exit)
        stack.crop(cache, context)

    return latency_ms(step, dev, warmup, reps)


@torch.inference_mode()
def verify_ratios(stack, sizes=VERIFY_SIZES, context: int = 32, warmup: int = 2, reps: int = 5,
                  ms: bool = False) -> dict[int, float]:
    """``{T: time of one full-model step of T tokens / one token's}`` (KV cache of ``context`` tokens,
    the head on every row, as a verification pass computes it). The sizes are timed in turns, one step
    each per round, the order reversed every other round, and each is the median of its ``reps``: a
    burst of load then slows every size alike instead of the one measured at the time. A step of more
    tokens does more work than one of a single token, so a ratio below 1 is noise and counts as 1 (a
    busy machine once measured 3 tokens at 0.72x one, which predicted a 1.22x speed-up from an exit
    agreeing on 3% of tokens). ``ms``: the medians themselves, in milliseconds, instead of ratios."""
    dev = stack.device
    cache = stack.new_cache()
    stack.layers(stack.embed(torch.zeros(1, context, dtype=torch.long, device=dev)), 0, stack.num_layers, cache,
                 torch.arange(context, device=dev))
    steps = {}
    for T in sizes:
        x = stack.embed(torch.zeros(1, T, dtype=torch.long, device=dev))
        pos = torch.arange(context, context + T, device=dev)

        def step(x=x, pos=pos):
            stack.head(stack.layers(x, 0, stack.num_layers, cache, pos))
            stack.crop(cache, context)

        steps[T] = step
    times = {T: [] for T in sizes}
    for r in range(warmup + reps):
        for T in (sizes if r % 2 == 0 else sizes[::-1]):
            took = latency_ms(steps[T], dev, warmup=0, reps=1)
            if r >= warmup:
                times[T].append(took)
    median = {T: sorted(t)[len(t) // 2] for T, t in times.items()}
    return median if ms else as_ratios(median)


def as_ratios(ms: dict[int, float]) -> dict[int, float]:
    """Verification times (``{T: ms}``, the smallest T first) as :func:`verify_ratios` gives them: over the
    smallest size's, and never below 1 for a larger size (more work cannot be cheaper: that is noise)."""
    sizes = list(ms)
    one = ms[sizes[0]]
    return {T: max(1.0, ms[T] / one) if T > sizes[0] else ms[T] / one for T in sizes}


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


def choose(a: dict, c: dict, full: int, verify: dict[int, float] | None = None) -> dict | None:
    """The draft with the best predicted speed-up among the exits below ``full`` (keys ``(exit, N)``
    as :func:`agreement` and :func:`cost_ratios` give them; plain exits as keys work too): ``{"exit",
    "vocab" (N or None), "k", "speedup", "agreement", "cost_ratio"}``, or None when there is none."""
    best = None
    for key in sorted(a, key=lambda kv: (kv, 0) if isinstance(kv, int) else (kv[0], kv[1] or 0)):
        e, n = (key, None) if isinstance(key, int) else key
        if e >= full or a[key] != a[key]:
            continue
        k, s = best_k(a[key], c[key], verify=verify)
        if best is None or s > best["speedup"]:
            best = {"exit": e, "vocab": n, "k": k, "speedup": s, "agreement": a[key], "cost_ratio": c[key]}
    return best


@torch.inference_mode()
def samples(stack, prompts: list[list[int]], exits: list[int], max_new_tokens: int = 16) -> dict[int, list[list[int]]]:
    """``{exit: greedy continuation of each prompt from that exit}`` (the full model among them)."""
    from . import decoding

    return {e: [decoding.generate(stack, p, exit=e, max_new_tokens=max_new_tokens).tokens for p in prompts]
            for e in exits}
