"""Generation from any exit, self-speculative decoding and per-token early exit.

Everything here is written against a small *stack* protocol (see :class:`Stack`), which an adapter
in :mod:`sortedcli.models` provides for a model family; nothing here names an architecture.

- :func:`generate`: the sub-model made of the first ``exit`` layers (read out through the model's own
  final norm and head) generates on its own with a KV cache: greedy, or sampling with temperature
  and top-p; ``max_new_tokens``; stops at EOS; ``on_token`` is called with every token as it is
  produced (streaming).
- :func:`speculative`: LayerSkip-style self-speculation. The first ``draft_exit`` layers draft ``k``
  tokens one at a time; the full model verifies them in one pass that runs only the remaining layers
  ``[draft_exit, L)`` on the hidden states the draft saved (the shared layers' keys/values are the
  draft's own); the longest agreeing prefix is kept plus the full model's next token, every layer's
  cache is cropped back to it, and ``k`` adapts (+2 after a fully accepted round, -1 after a
  rejection, as transformers' "heuristic" schedule). Greedy output is the full model's greedy output;
  with sampling, drafts are accepted by the standard rejection rule (min(1, p/q), resampling from
  max(0, p - q) on rejection), so tokens follow the full model's distribution.
  ``draft_vocab`` (FR-Spec, arXiv 2502.14856): the draft reads out through the rows of the LM head of
  a subset of the vocabulary only (e.g. the N most frequent tokens of the training data,
  :func:`frequent_tokens`), which cuts the head's share of a draft's cost; verification keeps the
  full head, so greedy output is unchanged (a draft outside the subset is never proposed).
  Rejections are cheap: while the first draft of a round is often wrong, the full model checks the
  position it predicts alone (one token, as greedy decoding does) before verifying the others, so a
  rejected round costs greedy's step plus the drafts (``k x c``), not a (k+1)-token verify pass.
  Drafting never makes decoding slower than greedy for long: the decoder times its own greedy steps
  and its speculative rounds (seconds per emitted token, on this device, for this prompt, over the
  rounds since the last probe, each earlier round weighing :data:`ROUND_DECAY` as much, judged from
  the :data:`JUDGE_ROUNDS`-th round on), and while rounds cost more per token than a greedy step it
  decodes greedily instead, probing again after 8
  greedy tokens, then 16, 32, ... up to 128 while probes keep losing (back to 8 when a round wins).
  A probe drafts one token: rejected, it costs greedy's step plus one draft step (the draft's own
  layers are the full model's first ones, so only the draft's readout is extra), which is what keeps
  a model whose exits never agree (the untouched SmolLM2: a = 0.03-0.10) near greedy's speed; accepted,
  the next round drafts 2 tokens (at most ``k``) and is timed as any other, growing as ``adaptive``
  says. A probe always checks its draft's position alone (that check is greedy's own step). A
  rejected probe is followed by another until the running estimate of first-draft acceptance
  ((hits + 2) / (tries + 4)) is below ``give_up`` (0.4, or the acceptance at which this draft breaks
  even, :func:`sortedcli.draft.break_even`, which ``generate`` passes from eval's measured costs: 0.18
  for a draft as cheap as SmolLM2's exit 3 with an 8k head), so one unlucky draft of a model that
  agrees does not cost it 8 greedy tokens. The first round after the opening greedy steps is such a probe too.
  Output is unchanged: a greedy step is the full model's own step.
- :func:`early_exit`: per token, run the exits from the smallest up and stop at the first whose top
  probability reaches its threshold (Sorted LLaMA's "instance-aware dynamic inference"); the
  deepest layer always answers. The layers the token skipped get keys/values computed from the
  hidden state it exited with (CALM's propagation, :meth:`Stack.fill`), so later tokens can attend.
  Where the time goes: on SmolLM2-135M (30 layers of 3.5M multiply-adds, a 49,152 x 576 head of
  28.3M = 8 layers) every exit checked with the full head costs 8 layers' worth; the fill of a
  skipped layer costs 1/16 of a layer. So exits whose threshold is above 1 are never checked, and
  ``vocab`` reads an exit's confidence over a confidence vocabulary (the 4096 most frequent training
  tokens: 1/12 of the head, 0.67 of a layer), the full head computed only at the exit that answers.
  That confidence is the top probability of the softmax *over those tokens*, which is not the
  full-vocabulary top probability (an exact pre-check would need a bound on the other 45k logits; the
  Cauchy-Schwarz bound on SmolLM2 is ~350 against true maxima of ~15, so it never rejects): the rule
  is defined with it, its thresholds are chosen with it, and the decoded token is the argmax (or a
  sample) of that exit's full head, so it can lie outside the confidence vocabulary.
  :func:`tune_thresholds` chooses thresholds from data: per exit, the lowest that keeps the
  perplexity on held-out sequences within ``1 + x`` of the full model's at the fewest multiply-adds
  (:class:`ExitCosts`: layers, checks, head, fills), so an exit that saves less than its checks cost
  is left off, and the choice is measured as decoding runs it before it is returned.

Decoding is for one sequence (batch size 1). Each function returns a :class:`Decoded` with the new
tokens and counters (drafted/accepted, exits taken, forward passes) that the benchmark reports.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch

#: the first-draft acceptance below which speculation goes back to greedy when the draft's costs are
#: unknown (with them: :func:`sortedcli.draft.give_up`, the draft's break-even)
GIVE_UP = 0.4

# Sorted LLaMA's thresholds for LLaMA-2 13B (40 layers): exit layer -> top-probability threshold.
PAPER_THRESHOLDS = {12: 0.95, 16: 0.95, 20: 0.9, 24: 0.9, 28: 0.8, 32: 0.8, 36: 0.7}


class Stack(Protocol):
    """What decoding needs from a model (batch size 1, positions of one sequence).

    ``layers`` runs layers ``[start, stop)`` and appends their keys/values to ``cache``; all layers in
    that range hold the same number of cached tokens when it is called. ``fill`` appends keys/values
    for layers ``[start, stop)`` computed from a hidden state without running them. ``head(h, layer)``
    is exit ``layer``'s readout (the final norm + LM head; the exit's own norm where the model has one)
    of the hidden state after that many layers (default: all that run); ``vocab_head(vocab)`` is the
    same readout restricted to the token ids ``vocab`` (its logits are ``head(h, layer)[..., vocab]``,
    computed from those rows of the head only).
    """

    num_layers: int
    device: torch.device

    def new_cache(self): ...
    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...
    def layers(self, hidden: torch.Tensor, start: int, stop: int, cache, positions: torch.Tensor) -> torch.Tensor: ...
    def head(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor: ...
    def vocab_head(self, vocab: torch.Tensor) -> Callable[..., torch.Tensor]: ...
    def fill(self, hidden: torch.Tensor, start: int, stop: int, cache, positions: torch.Tensor) -> None: ...
    def cached(self, cache, layer: int) -> int: ...
    def crop(self, cache, length: int) -> None: ...


@dataclass
class Sampling:
    """How the next token is chosen: ``temperature == 0`` is greedy (argmax); otherwise softmax of
    logits / temperature, restricted to the smallest set of tokens whose probability reaches
    ``top_p``, sampled with ``generator`` (seeded by the caller)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from (last dim), after temperature and top-p."""
        logits = logits.float()
        # the top logit moved to 0 first: a tiny temperature sends the others to -inf, not inf - inf = nan
        p = torch.softmax((logits - logits.amax(-1, keepdim=True)) / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = p.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
            p = torch.zeros_like(p).scatter(-1, order, sorted_p)
            p = p / p.sum(-1, keepdim=True)
        return p

    def draw(self, p: torch.Tensor) -> int:
        return int(torch.multinomial(p.cpu(), 1, generator=self.generator))

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one position's logits (a 1-d tensor)."""
        if self.greedy:
            return int(logits.argmax(-1))
        return self.draw(self.probs(logits))


@dataclass
class Decoded:
    """New tokens (prompt excluded) and what it took to produce them."""

    tokens: list[int] = field(default_factory=list)
    stopped_at_eos: bool = False
    rounds: int = 0  # speculative: draft-and-verify rounds
    drafted: int = 0  # speculative: draft tokens proposed
    accepted: int = 0  # speculative: draft tokens the full model kept
    exits: dict[int, int] = field(default_factory=dict)  # early exit: exit layer -> tokens that left there
    layer_passes: int = 0  # decoder-layer applications per token position, summed (prompt excluded)
    greedy_tokens: int = 0  # speculative: tokens decoded greedily while drafting was measured to lose
    checks: int = 0  # early exit: exit confidences read (prompt excluded)

    @property
    def acceptance(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return self.accepted / self.drafted if self.drafted else float("nan")


class _Emitter:
    """Collects tokens, calls ``on_token``, and says when to stop (EOS or ``max_new_tokens``)."""

    def __init__(self, out: Decoded, max_new_tokens: int, eos: Iterable[int] | int | None,
                 on_token: Callable[[int], None] | None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.out, self.max, self.on_token = out, max_new_tokens, on_token
        self.eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
        self.done = False

    @property
    def left(self) -> int:
        return self.max - len(self.out.tokens)

    def emit(self, token: int) -> None:
        if self.done:
            return
        self.out.tokens.append(token)
        if self.on_token is not None:
            self.on_token(token)
        if token in self.eos:
            self.out.stopped_at_eos = True
            self.done = True
        elif self.left <= 0:
            self.done = True


def _prompt(stack: Stack, prompt) -> torch.Tensor:
    """One sequence of token ids (a list, a 1-d tensor or a 1 x T tensor) as a 1 x T tensor; a batch
    of prompts is refused rather than joined into one."""
    ids = torch.as_tensor(prompt, dtype=torch.long, device=stack.device)
    if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
        raise ValueError(f"decoding takes one prompt (a sequence of token ids), got a batch of shape "
                         f"{tuple(ids.shape)}: decode each prompt on its own")
    ids = ids.view(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    return ids


def _positions(start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)


def _prefill(stack: Stack, prompt, sampling: Sampling | None, max_new_tokens: int, eos, on_token,
             first_logits: Callable) -> tuple:
    """The start every decoder shares: the prompt through ``first_logits(cache, embedded, positions)``
    (which fills ``cache``), the first token picked and emitted. Returns
    ``(sampling, out, emitter, cache, n, token)`` with ``n`` the prompt length (where ``token`` sits)."""
    sampling = sampling or Sampling()
    ids = _prompt(stack, prompt)
    out = Decoded()
    emitter = _Emitter(out, max_new_tokens, eos, on_token)
    cache = stack.new_cache()
    n = ids.shape[1]
    token = sampling.pick(first_logits(cache, stack.embed(ids), _positions(0, n, stack.device)))
    emitter.emit(token)
    return sampling, out, emitter, cache, n, token


def _check_exit(stack: Stack, exit: int | None) -> int:
    exit = stack.num_layers if exit is None else int(exit)
    if not 1 <= exit <= stack.num_layers:
        raise ValueError(f"exit must be in 1..{stack.num_layers}, got {exit}")
    return exit


@torch.inference_mode()
def generate(stack: Stack, prompt, *, exit: int | None = None, max_new_tokens: int = 64,
             sampling: Sampling | None = None, eos: Iterable[int] | int | None = None,
             on_token: Callable[[int], None] | None = None) -> Decoded:
    """The sub-model of the first ``exit`` layers (default: all) generates after ``prompt`` (token
    ids) with a KV cache of those layers only."""
    exit = _check_exit(stack, exit)
    sampling, out, emitter, cache, n, token = _prefill(
        stack, prompt, sampling, max_new_tokens, eos, on_token,
        lambda cache, x, pos: stack.head(stack.layers(x, 0, exit, cache, pos)[:, -1], exit)[0])
    while not emitter.done:
        x = torch.tensor([[token]], device=stack.device)
        hidden = stack.layers(stack.embed(x), 0, exit, cache, _positions(n, 1, stack.device))
        out.layer_passes += exit
        n += 1
        token = sampling.pick(stack.head(hidden[:, -1], exit)[0])
        emitter.emit(token)
    return out


#: with a predicted speed-up below 1 (:func:`speculative`'s ``expected``): greedy tokens before the first
#: probe, and between probes until a round is measured to win
DOUBT = 32

#: timed speculative rounds after a probe before their cost per token is compared with greedy's, and
#: the weight each earlier round keeps in that comparison: one round is no verdict (at SmolLM2's
#: exit-3 acceptance of 0.4 a round of 2 drafts is rejected at once 6 times in 10 and then costs 1.4
#: greedy steps for its one token), and judging on it sent decoding greedy for half of its tokens,
#: 1.00-1.09x greedy where drafting throughout ran at 1.14-1.18x (8 rounds at 0.9: 1.06-1.08x)
JUDGE_ROUNDS = 8
ROUND_DECAY = 0.9
#: timed rounds after which drafting is judged early when none of them accepted a draft
JUDGE_MISSES = 3


@torch.inference_mode()
def speculative(stack: Stack, prompt, *, draft_exit: int, max_new_tokens: int = 64, k: int = 4,
                adaptive: bool = True, max_k: int = 16, sampling: Sampling | None = None,
                eos: Iterable[int] | int | None = None, on_token: Callable[[int], None] | None = None,
                draft_vocab=None, check_first: float = 0.5, fallback: bool = True,
                expected: float | None = None, give_up: float = GIVE_UP,
                clock: Callable[[], float] = time.perf_counter) -> Decoded:
    """The full model's output, drafted by its own first ``draft_exit`` layers (see module doc).

    ``k`` is the first draft length; with ``adaptive`` it grows by 2 (up to ``max_k``) after a round
    whose drafts were all accepted and shrinks by 1 (down to 1) after a rejection. ``draft_vocab``
    (token ids) restricts the draft's readout to those rows of the head. ``check_first``: while the
    first draft of a round has been accepted less often than this (a running estimate, (hits + 1) /
    (tries + 3): one accepted probe is not yet evidence enough to verify k + 1 positions at once), the
    full model checks that position alone before verifying the rest in one pass (cheap
    rejections where verifying several tokens costs more than one, as on a CPU; 0 never splits,
    the choice for a device where k+1 tokens cost one token's time). ``fallback``: decode greedily
    while speculative rounds are measured (``clock``) to cost more per token than greedy steps, probing
    with one-token drafts (see the module doc); False drafts ``k`` tokens every round. ``expected``:
    the speed-up predicted for this draft beforehand (``sortednet eval``'s, from a, c and the measured
    verification costs); below 1, with ``fallback``, decoding starts greedy and probes only every
    :data:`DOUBT` tokens (then twice as far apart while drafting keeps losing): an exit that agrees
    often enough to pass probes but too seldom to pay for its rounds (SmolLM2's untouched exit 27,
    a = 0.57) otherwise loses a probe and a timed round every few tokens, until measured rounds
    win. ``give_up``: the first-draft acceptance (running estimate) below which rejected probes send
    decoding back to greedy for a while; the draft's break-even acceptance where its costs are known."""
    L = stack.num_layers
    if not 1 <= draft_exit < L:
        raise ValueError(f"draft_exit must be in 1..{L - 1} (below the full model's {L} layers), got {draft_exit}")
    if not 0 <= give_up <= 1:
        raise ValueError(f"give_up must be an acceptance rate in [0, 1], got {give_up}")
    if not 1 <= k <= max_k:
        raise ValueError(f"need 1 <= k <= max_k, got k={k}, max_k={max_k}")
    E, dev = draft_exit, stack.device
    if draft_vocab is None:
        draft_head, vocab = stack.head, None
    else:
        vocab = torch.as_tensor(draft_vocab, dtype=torch.long, device=dev).view(-1)
        if vocab.numel() == 0:
            raise ValueError("draft_vocab must hold at least one token id")
        draft_head, ids_of = stack.vocab_head(vocab), vocab.tolist()
    sampling, out, emitter, cache, n, token = _prefill(
        stack, prompt, sampling, max_new_tokens, eos, on_token,
        lambda cache, x, pos: stack.head(stack.layers(x, 0, L, cache, pos)[:, -1])[0])
    first_hits, first_tries = 0, 0
    # seconds per emitted token of a greedy step (the median of the last 5, never the decode's first
    # one-token step, which pays for cold kernels and would let rounds slower than greedy pass as
    # winners) and of the speculative rounds since the last probe (their seconds over their tokens,
    # older rounds decayed: a long round that was rejected early weighs what it cost, not as much as a
    # whole round), and how many greedy tokens to decode before the next probe (fallback)
    step_cost: float | None = None
    step_costs: list[float] = []
    round_time = round_tokens = 0.0
    judged = hits = 0  # timed rounds since the last probe (JUDGE_ROUNDS before a verdict), those accepting a draft
    greedy_left, backoff = (2 if fallback else 0), 8  # 2 greedy steps first: what a round must beat
    if fallback and expected is not None and expected < 1:  # predicted to lose: greedy first, rare probes
        greedy_left, backoff = DOUBT, 2 * DOUBT
    probing = fallback  # the next round drafts one token: is the first draft accepted at all?
    # Invariant at the top of a round: every layer caches positions [0, n); `token` sits at n, uncached.
    while not emitter.done:
        if greedy_left > 0:  # the full model's own step: what greedy decoding does
            t0 = clock()
            x = torch.tensor([[token]], device=dev)
            hidden = stack.layers(stack.embed(x), 0, L, cache, _positions(n, 1, dev))
            token = sampling.pick(stack.head(hidden[:, -1])[0])
            step_costs.append(clock() - t0)
            step_cost = statistics.median(step_costs[1:][-5:] or step_costs)
            out.layer_passes += L
            out.greedy_tokens += 1
            n += 1
            greedy_left -= 1
            emitter.emit(token)
            continue
        t0 = clock()
        kk = min(1 if probing else k, emitter.left - 1)  # a round yields at most kk + 1 tokens
        drafts: list[int] = []
        draft_probs: list[torch.Tensor] = []  # over the draft's vocabulary
        saved: list[torch.Tensor] = []  # layer-E hidden states of positions n .. n + kk - 1
        x = token
        for j in range(kk):
            h = stack.layers(stack.embed(torch.tensor([[x]], device=dev)), 0, E, cache, _positions(n + j, 1, dev))
            saved.append(h)
            logits = draft_head(h[:, -1], E)[0]
            if sampling.greedy:
                i = int(logits.argmax(-1))
            else:
                q = sampling.probs(logits)
                i = sampling.draw(q)
                draft_probs.append(q)
            x = i if vocab is None else ids_of[i]
            drafts.append(x)
            if x in emitter.eos:
                kk = j + 1  # nothing follows an EOS: verify up to it
                break
        out.layer_passes += kk * E
        rows: list[torch.Tensor] = []  # the full model's logits at positions n, n + 1, ...

        def row(m: int) -> torch.Tensor:
            """The full model's logits at position n + m: layers [E, L) on the saved layer-E states of
            every position from the first not yet verified up to n + kk, in one pass."""
            if m >= len(rows):
                start = len(rows)
                last = stack.layers(stack.embed(torch.tensor([[x]], device=dev)), 0, E, cache,
                                    _positions(n + kk, 1, dev))
                hs = torch.cat(saved[start:] + [last], dim=1)
                rows.extend(stack.head(stack.layers(hs, E, L, cache, _positions(n + start, kk + 1 - start, dev)))[0])
                out.layer_passes += E + (kk + 1 - start) * (L - E)
            return rows[m]

        if kk and (probing or (first_hits + 1) / (first_tries + 3) < check_first):  # check position n alone
            rows.append(stack.head(stack.layers(saved[0], E, L, cache, _positions(n, 1, dev)))[0, -1])
            out.layer_passes += L - E
        if sampling.greedy:
            m = 0
            while m < kk and drafts[m] == int(row(m).argmax(-1)):
                m += 1
            new = drafts[:m] + [int(row(m).argmax(-1))]
        else:
            new, m = [], 0
            while m < kk:
                p, d = sampling.probs(row(m)), drafts[m]
                q = draft_probs[m] if vocab is None else torch.zeros_like(p).index_copy_(0, vocab, draft_probs[m])
                accept = float(p[d]) / max(float(q[d]), 1e-30)
                if torch.rand((), generator=sampling.generator).item() < min(1.0, accept):
                    new.append(d)
                    m += 1
                    continue
                residual = (p - q).clamp_min(0)
                new.append(sampling.draw(residual / residual.sum()) if residual.sum() > 0 else sampling.draw(p))
                break
            if m == kk:
                new.append(sampling.pick(row(kk)))
        t1 = clock()  # the round's time is the decoder's: not what on_token does with its tokens
        if kk:
            first_tries += 1
            first_hits += m > 0
        out.rounds += 1
        out.drafted += kk
        out.accepted += m
        for t in new:
            emitter.emit(t)
        # Keep positions [0, n + m + 1): `token` and the m accepted drafts; the new last token is uncached.
        n += m + 1
        stack.crop(cache, n)
        token = new[-1]
        if probing:  # accepted: draft k from the next round on (timed); rejected: greedy for a while
            probing = m < kk  # once the first drafts are seldom accepted (a running estimate, prior 1/2)
            k = k if probing or not adaptive else min(k, 2)  # accepted: grow from 2 rather than risk k at once
            if probing and (first_hits + 2) / (first_tries + 4) < give_up:
                greedy_left, backoff = backoff, min(2 * backoff, 128)
            continue
        if fallback and step_cost is not None:
            round_time = ROUND_DECAY * round_time + t1 - t0
            round_tokens = ROUND_DECAY * round_tokens + len(new)
            judged, hits = judged + 1, hits + (m > 0)
            # a verdict after JUDGE_ROUNDS rounds, or sooner when none of JUDGE_MISSES accepted a draft (an
            # exit that passed its probe by luck, as the untouched model's a = 0.03 sometimes does)
            if judged >= JUDGE_ROUNDS or (judged >= JUDGE_MISSES and hits == 0):
                if round_time / round_tokens > step_cost:  # drafting loses here: greedy for a while, then probe
                    greedy_left, backoff, probing = backoff, min(2 * backoff, 128), True
                    round_time = round_tokens = 0.0
                    judged = hits = 0
                else:
                    backoff = 8
        if adaptive:
            k = min(k + 2, max_k) if m == kk and kk == k else (max(1, k - 1) if m < kk else k)
    return out


def frequent_tokens(token_ids: Iterable, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent ids in ``token_ids`` (an iterable of id sequences or tensors), most
    frequent first (ties: the smaller id first); ids never seen fill up in id order. FR-Spec's draft
    vocabulary."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_ids:
        t = torch.as_tensor(ids, dtype=torch.long).view(-1)
        counts += torch.bincount(t[(t >= 0) & (t < vocab_size)], minlength=vocab_size)
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
    return torch.tensor(order[:min(n, vocab_size)], dtype=torch.long)


def _exits(stack: Stack, thresholds: dict[int, float]) -> list[tuple[int, float]]:
    """``thresholds`` as ``[(exit layer, threshold), ...]`` from the shallowest up, ending with the full
    model (threshold -inf: it always answers). An exit whose threshold is above 1 can never answer (no
    probability exceeds 1): it is left out, so it is never checked (no readout computed there)."""
    L = stack.num_layers
    exits = []
    for e, t in thresholds.items():
        e, t = int(e), float(t)
        if not 1 <= e <= L:
            raise ValueError(f"early-exit layers must be in 1..{L}, got {e}")
        if t != t:
            raise ValueError(f"the threshold of exit {e} is not a number")
        if e < L and t <= 1:
            exits.append((e, t))
    return sorted(exits) + [(L, float("-inf"))]  # the full model always answers


def scaled_thresholds(num_layers: int, reference: dict[int, float] = PAPER_THRESHOLDS,
                      reference_layers: int = 40, exits: Iterable[int] | None = None) -> dict[int, float]:
    """The paper's exits and thresholds (for a 40-layer model) mapped onto ``num_layers`` layers:
    exit ``e`` becomes ``round(e * num_layers / reference_layers)`` (at least 1, below the last
    layer), keeping the strictest threshold where two map to the same layer. With ``exits`` (the
    exits a run trained), each lands on the nearest of those below the last layer (the deeper on a
    tie); none are left when the run trained no such exit."""
    trained = None if exits is None else sorted({int(e) for e in exits if 1 <= int(e) < num_layers})
    out: dict[int, float] = {}
    for e, t in reference.items():
        layer = max(1, round(e * num_layers / reference_layers))
        if trained is not None:
            if not trained:
                break
            layer = min(trained, key=lambda x: (abs(x - layer), -x))
        if layer < num_layers:
            out[layer] = max(t, out.get(layer, 0.0))
    return out


#: the size of the confidence vocabulary that :func:`tune_thresholds` reads exits through by default
#: (the most frequent tokens of the training data); none where it would be over a quarter of the vocabulary
CONFIDENCE_VOCAB = 4096


def _top(logits: torch.Tensor) -> float:
    return float(torch.softmax(logits.float(), -1).max())


def _early_step(stack: Stack, exits, cache, hidden, pos, fill: bool, check=None):
    """Run the exits in order from layer 0 on ``hidden``; return (logits of the last position at the
    exit that answers, that exit's layer, confidence checks made). An exit checks its confidence: the
    top probability of its full head's softmax, or with ``check`` (the readout over a confidence
    vocabulary, :meth:`Stack.vocab_head`) the top probability of the softmax over those tokens only,
    the full head then computed at the exit that answers alone. A threshold <= 0 answers unread. With
    ``fill`` the layers after the answering exit get keys/values from its hidden state
    (:meth:`Stack.fill`); without, they run anyway (a prompt needs every layer's cache)."""
    L, start, chosen, checks = stack.num_layers, 0, None, 0
    for layer, threshold in exits:
        hidden = stack.layers(hidden, start, layer, cache, pos)
        start = layer
        if chosen is None:
            last = hidden[:, -1]
            if layer == L or threshold <= 0:
                chosen = (stack.head(last, layer)[0], layer)
            elif check is None:
                checks += 1
                logits = stack.head(last, layer)[0]
                if _top(logits) >= threshold:
                    chosen = (logits, layer)
            else:
                checks += 1
                if _top(check(last, layer)[0]) >= threshold:
                    chosen = (stack.head(last, layer)[0], layer)
            if chosen is not None and fill:
                stack.fill(hidden, layer, L, cache, pos)
                return (*chosen, checks)
    return (*chosen, checks)


def _confidence_head(stack: Stack, vocab):
    """The readout an exit's confidence is read through: None (the full head) or the head over ``vocab``."""
    if vocab is None:
        return None
    vocab = torch.as_tensor(vocab, dtype=torch.long, device=stack.device).view(-1)
    if vocab.numel() == 0:
        raise ValueError("the confidence vocabulary must hold at least one token id")
    return stack.vocab_head(vocab)


@torch.inference_mode()
def early_exit(stack: Stack, prompt, *, thresholds: dict[int, float], max_new_tokens: int = 64,
               sampling: Sampling | None = None, eos: Iterable[int] | int | None = None,
               on_token: Callable[[int], None] | None = None, vocab=None) -> Decoded:
    """Per-token dynamic depth: each token leaves at the first exit (smallest first) whose confidence
    is >= its threshold in ``thresholds`` (exit layer -> threshold); the full model answers when none
    does. Confidence: the top probability of the exit's softmax (temperature 1) over the whole
    vocabulary, or with ``vocab`` (token ids, e.g. the most frequent ones: :func:`frequent_tokens`)
    over those tokens only, read from those rows of the head (a check then costs |vocab| rows, and
    the full head runs once, at the exit that answers; the token is picked from that full head, so it
    can be any token). Exits whose threshold is above 1 are never checked. The prompt runs through all
    layers; its last position picks its exit the same way."""
    exits = _exits(stack, thresholds)
    check = _confidence_head(stack, vocab)
    dev = stack.device
    sampling, out, emitter, cache, n, token = _prefill(
        stack, prompt, sampling, max_new_tokens, eos, on_token,
        lambda cache, x, pos: _early_step(stack, exits, cache, x, pos, fill=False, check=check)[0])
    while not emitter.done:
        x = stack.embed(torch.tensor([[token]], device=dev))
        logits, layer, checks = _early_step(stack, exits, cache, x, _positions(n, 1, dev), fill=True, check=check)
        out.exits[layer] = out.exits.get(layer, 0) + 1
        out.layer_passes += layer
        out.checks += checks
        n += 1
        token = sampling.pick(logits)
        emitter.emit(token)
    return out


@torch.inference_mode()
def early_exit_nll(stack: Stack, ids, *, thresholds: dict[int, float], score_from: int = 1,
                   vocab=None) -> tuple[list[float], list[int]]:
    """Teacher-forced early exit over a given sequence ``ids``: the tokens before ``score_from`` run
    as a prompt (all layers); from there on each next token is predicted one position at a time by
    the exit the rule picks, as :func:`early_exit` would (same ``vocab``), and its negative
    log-likelihood (of that exit's full head) is recorded. Returns (NLL of tokens ``score_from..``,
    exit layer of each). The perplexity cost of early exit is exp(mean NLL) against the same with
    ``thresholds={}`` (the full model)."""
    exits = _exits(stack, thresholds)
    check = _confidence_head(stack, vocab)
    dev = stack.device
    ids = _prompt(stack, ids)[0]
    if not 1 <= score_from < ids.numel():
        raise ValueError(f"score_from must be in 1..{ids.numel() - 1}, got {score_from}")
    cache = stack.new_cache()
    logits, layer, _ = _early_step(stack, exits, cache, stack.embed(ids[None, :score_from]),
                                   _positions(0, score_from, dev), fill=False, check=check)
    nll, layers = [], []
    for n in range(score_from, ids.numel()):
        nll.append(float(-torch.log_softmax(logits.float(), -1)[ids[n]]))
        layers.append(layer)
        if n + 1 < ids.numel():
            logits, layer, _ = _early_step(stack, exits, cache, stack.embed(ids[None, n:n + 1]),
                                           _positions(n, 1, dev), fill=True, check=check)
    return nll, layers


# --- what early exit costs, and thresholds chosen from data --------------------------------------

@dataclass(frozen=True)
class ExitCosts:
    """Multiply-adds per decoded token of what early exit spends, counted from the weights' shapes
    (attention over the cached context is not counted: it is small beside the projections at the
    contexts of a chat answer): a decoder layer, the full head (final norm and soft-cap are not
    counted), one confidence check (the head's rows over the confidence vocabulary, or the full
    head), the keys/values of one skipped layer (:meth:`Stack.fill`), and an exit's own readout
    (``model.exits.readout=affine``: its map, run at every check; 0 for the shared readout)."""

    layer: float
    head: float
    check: float
    fill: float
    readout: float = 0.0

    def token(self, exit, checks, layers: int):
        """Cost of a token that answered at ``exit`` after ``checks`` confidence checks (numbers or
        tensors): its layers, its checks (each through its exit's readout), the full head once, and
        the fill of the layers it skipped."""
        return exit * self.layer + checks * (self.check + self.readout) + self.head + (layers - exit) * self.fill

    def full(self, layers: int) -> float:
        """A token of plain greedy decoding: every layer and the head."""
        return layers * self.layer + self.head


def exit_costs(stack: Stack, vocab_rows: int | None = None) -> ExitCosts:
    """:class:`ExitCosts` of a stack whose model is a transformers decoder (``stack.base.layers``,
    ``stack.lm_head``, as :class:`~sortedcli.models.decoder.DecoderStack`): a layer is the
    multiply-adds of its Linear modules (mean over the layers), a fill its key/value projections
    (the fused qkv projection where there is one), a check ``vocab_rows`` rows of the head (None: all
    of them), a readout what the stack's ``readout_macs()`` says (the mean over its exits' own readouts;
    none: 0). Any other stack counts layer passes only (layer 1, the rest 0)."""
    base, lm_head = getattr(stack, "base", None), getattr(stack, "lm_head", None)
    layers = getattr(base, "layers", None)
    if layers is None or lm_head is None:
        return ExitCosts(1.0, 0.0, 0.0, 0.0)
    used = list(layers)[:stack.num_layers]
    per_layer = sum(m.weight.numel() for layer in used for m in layer.modules()
                    if isinstance(m, torch.nn.Linear)) / len(used)
    fill = 0
    for layer in used:
        attn = layer.self_attn
        names = ("qkv_proj",) if hasattr(attn, "qkv_proj") else ("k_proj", "v_proj")
        fill += sum(getattr(attn, p).weight.numel() for p in names)
    fill /= len(used)
    V, H = lm_head.weight.shape
    rows = V if vocab_rows is None else min(int(vocab_rows), V)
    readout = getattr(stack, "readout_macs", None)
    return ExitCosts(float(per_layer), float(V * H), float(rows * H), float(fill),
                     float(readout()) if readout is not None else 0.0)


@torch.inference_mode()
def exit_profile(stack: Stack, sequences, exits: Iterable[int], vocab=None, kl: bool = False) -> tuple[torch.Tensor, ...]:
    """One teacher-forced pass of the full model (every layer, one pass per sequence) over
    ``sequences`` (``(ids, score_from)`` pairs, scored as :func:`early_exit_nll` scores them): at
    every scored position, each exit's confidence as the rule reads it (``vocab`` as in
    :func:`early_exit`) and each exit's NLL of the next token. Returns ``(confidence, nll)``:
    positions x exits, and positions x (exits + 1) with the full model's NLL last. These are the
    exits' readouts on the full model's own states (every earlier token ran every layer); under
    early exit, earlier tokens that left early leave filled keys/values instead, which
    :func:`tune_thresholds` measures afterwards. ``kl``: a third tensor, positions x (exits + 1), each
    exit's KL(full || exit) in nats (0 in the full model's column): the NLL increase the full model
    itself expects from leaving there, without knowing the next token."""
    L, dev = stack.num_layers, stack.device
    layers = sorted({int(e) for e in exits if 1 <= int(e) < L})
    check = _confidence_head(stack, vocab)
    confs, nlls, kls = [], [], []
    for ids, first in sequences:
        ids = _prompt(stack, ids)[0]
        T = ids.numel()
        if not 1 <= first < T:
            raise ValueError(f"score_from must be in 1..{T - 1}, got {first}")
        targets = ids[first:].view(-1, 1)
        cache, hidden, start = stack.new_cache(), stack.embed(ids[None]), 0
        conf, nll, states = [], [], []
        for layer in [*layers, L]:
            hidden = stack.layers(hidden, start, layer, cache, _positions(0, T, dev))
            start = layer
            h = hidden[0, first - 1:-1]
            logp = torch.log_softmax(stack.head(h, layer).float(), -1)
            nll.append(-logp.gather(1, targets)[:, 0])
            if layer < L:
                conf.append((logp.exp() if check is None else torch.softmax(check(h, layer).float(), -1)).amax(-1))
                if kl:
                    states.append((layer, h))
            elif kl:  # each exit's readout again, against the full model's distribution
                p = logp.exp()
                kls.append(torch.stack([(p * (logp - torch.log_softmax(stack.head(s, e).float(), -1))).sum(-1)
                                        for e, s in states] + [torch.zeros_like(nll[-1])], 1).clamp_min(0))
            del logp
        confs.append(torch.stack(conf, 1) if conf else torch.zeros(T - first, 0))
        nlls.append(torch.stack(nll, 1))
    if not nlls:
        raise ValueError("no sequences to profile")
    out = (torch.cat(confs).double().cpu(), torch.cat(nlls).double().cpu())
    return (*out, torch.cat(kls).double().cpu()) if kl else out


def _policy(confidence, nll, taus, layers_of, costs: ExitCosts, L: int):
    """(summed NLL, summed cost, exit index per position) of thresholds ``taus`` on a profile."""
    E = confidence.shape[1]
    fire = confidence >= taus
    idx = torch.where(fire.any(1), fire.double().argmax(1), torch.full_like(fire[:, 0], E, dtype=torch.long)) \
        if E else torch.zeros(nll.shape[0], dtype=torch.long)
    checked = (taus > 0) & (taus <= 1)
    checks = (checked[None, :] & (torch.arange(E)[None, :] <= idx[:, None])).sum(1) if E else idx
    layer = layers_of[idx]
    cost = costs.token(layer.double(), checks.double(), L)
    return float(nll.gather(1, idx[:, None]).sum()), float(cost.sum()), idx


def choose_thresholds(confidence: torch.Tensor, nll: torch.Tensor, exits: list[int], layers: int,
                      max_increase: float, costs: ExitCosts, sweeps: int = 4,
                      candidates: int = 100) -> dict[int, float]:
    """Per exit, the threshold that makes early exit cheapest (:class:`ExitCosts`: layers, checks,
    fills) while the perplexity on the profile (:func:`exit_profile`) stays within ``1 +
    max_increase`` of the full model's: coordinate descent from every exit off, deepest exit first,
    each exit's threshold taken from ``candidates`` quantiles of its own confidences (a threshold that
    is one of the observed confidences: the highest of those that let the same positions leave) or
    off; among equally cheap choices, off (an exit no position reaches is not checked), then the lowest
    threshold. An exit that saves less than its checks cost stays off (never checked). Returns ``{exit: threshold}`` of the exits turned on (``{}``: none
    pays, the full model answers)."""
    import math

    L, E = int(layers), len(exits)
    if not 0 < max_increase:
        raise ValueError(f"max_increase must be > 0, got {max_increase}")
    if confidence.shape[1] != E or nll.shape[1] != E + 1:
        raise ValueError("the profile's columns do not match the exits")
    budget = float(nll[:, -1].sum()) + math.log1p(max_increase) * nll.shape[0]
    layers_of = torch.tensor([*exits, L])
    OFF = 2.0
    taus = torch.full((E,), OFF, dtype=torch.float64)
    grid = []
    for j in range(E):
        q = torch.quantile(confidence[:, j], torch.linspace(0, 1, candidates + 1, dtype=torch.float64),
                           interpolation="lower")  # observed confidences only
        grid.append([OFF, *sorted({float(x) for x in q}, reverse=True)])
    unit = max(costs.full(L), 1e-30) * nll.shape[0]

    def key(c: float, t: float) -> tuple:  # cheapest (to 1e-9 of the full model's cost); ties: off, then lowest
        return round(c / unit, 9), t <= 1, t

    cost = _policy(confidence, nll, taus, layers_of, costs, L)[1]
    for _ in range(sweeps):
        changed = False
        for j in reversed(range(E)):
            now = float(taus[j])
            best, best_t = key(cost, now), now
            for t in grid[j]:
                trial = taus.clone()
                trial[j] = t
                s, c, _ = _policy(confidence, nll, trial, layers_of, costs, L)
                if s <= budget + 1e-9 and key(c, t) < best:
                    best, best_t = key(c, t), t
            if best_t != now:
                taus[j], changed = best_t, True
                cost = _policy(confidence, nll, taus, layers_of, costs, L)[1]
        if not changed:
            break
    return {e: float(t) for e, t in zip(exits, taus.tolist()) if t <= 1}


def oracle_cost(nll: torch.Tensor, exits: list[int], layers: int, max_increase: float, costs: ExitCosts) -> float:
    """A floor under early exit's cost on a profile (:func:`exit_profile`'s ``nll``, positions x (exits +
    1), the full model last): the lowest mean multiply-adds per token, over the full model's, of any
    choice of one exit per position (or the full model) whose perplexity stays within ``1 +
    max_increase`` of the full model's. It prices an oracle that knows every exit's NLL of the true next
    token and pays no confidence check; each position is still charged its layers, the head and the
    fills of the layers it skipped (:meth:`ExitCosts.token` with no checks). No threshold rule can cost
    less on these positions, so ``1 / oracle_cost`` bounds the speed-up in multiply-adds that early exit
    with these exits can reach at this perplexity. Computed as the Lagrangian dual of that choice (each
    position picks its exit minimizing cost + lambda x its NLL increase; lambda set by bisection where
    the picks' summed increase meets the allowance), which is a lower bound on the exact minimum.
    Given the profile's ``kl`` (full column 0) in place of ``nll``, the oracle knows what leaving
    costs in expectation under the full model's distribution but not the next token."""
    import math

    L, N = int(layers), int(nll.shape[0])
    if N == 0 or not exits:
        return 1.0
    if not 0 < max_increase:
        raise ValueError(f"max_increase must be > 0, got {max_increase}")
    if nll.shape[1] != len(exits) + 1:
        raise ValueError("the profile's columns do not match the exits")
    cost = costs.token(torch.tensor([*exits, L], dtype=torch.float64), 0, L)
    extra = (nll - nll[:, -1:]).double()  # each exit's NLL over the full model's; 0 in the full column
    allowance = math.log1p(max_increase) * N

    def dual(lam: float) -> tuple[float, float]:
        """(the dual function at lam, the summed NLL increase of the picks that attain it)"""
        value = cost[None, :] + lam * extra
        pick = value.argmin(1, keepdim=True)
        return float(value.gather(1, pick).sum()) - lam * allowance, float(extra.gather(1, pick).sum())

    value, spent = dual(0.0)
    if spent <= allowance:  # the cheapest exit everywhere already keeps the perplexity: exact
        return value / (N * costs.full(L))
    lo, hi = 0.0, 1.0
    while dual(hi)[1] > allowance:  # ends: the full model's column (increase 0) wins for a large lam
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dual(mid)[1] > allowance else (lo, mid)
    return min(1.0, max(dual(lo)[0], dual(hi)[0]) / (N * costs.full(L)))


def tune_thresholds(stack: Stack, sequences, exits: Iterable[int], max_increase: float, *, vocab=None,
                    costs: ExitCosts | None = None, tries: int = 3) -> dict:
    """Thresholds for :func:`early_exit` from data: profile ``sequences`` (``(ids, score_from)``
    pairs, :func:`exit_profile`), choose on the profile (:func:`choose_thresholds`), then measure the
    choice as decoding runs it (:func:`early_exit_nll`: earlier tokens that left early leave filled
    keys/values). If the measured perplexity increase is above ``max_increase``, choose again with a
    smaller allowance (up to ``tries`` choices), and fall back to no exit (the full model, increase 0).
    So the returned choice meets the bound on these sequences, as measured. Returns a dict:
    ``thresholds`` ({exit: threshold}), ``ppl_full`` (the full model's, from the profile pass),
    ``ppl_early_exit``, ``ppl_increase`` (ratio - 1), ``layer_passes`` (mean layers per token / L),
    ``cost`` (mean multiply-adds per token / the full model's, :class:`ExitCosts`), ``bound_cost``
    (:func:`oracle_cost` on the profile: what no threshold choice can undercut), ``bound_cost_label_free``
    (the same for an oracle that knows each exit's KL(full || exit) but not the next token: the NLL
    increase the full model expects, held to the same allowance), ``exits``
    ({layer: positions that left there}), ``tokens``, ``sequences``, ``tried`` (the choices measured)."""
    import math

    L = stack.num_layers
    sequences = [(list(map(int, ids)), int(first)) for ids, first in sequences]
    exits = sorted({int(e) for e in exits if 1 <= int(e) < L})
    costs = costs or exit_costs(stack, None if vocab is None else len(vocab))
    confidence, nll, kl = exit_profile(stack, sequences, exits, vocab, kl=True)
    full = float(nll[:, -1].mean())
    allowance, tried = float(max_increase), []

    def measured(thresholds):
        got, used = [], []
        for ids, first in sequences:
            n, layer = early_exit_nll(stack, ids, thresholds=thresholds, score_from=first, vocab=vocab)
            got += n
            used += layer
        return got, used

    chosen, got, used = {}, None, None
    for _ in range(tries):
        thresholds = choose_thresholds(confidence, nll, exits, L, allowance, costs) if exits else {}
        if not thresholds:
            break
        got, used = measured(thresholds)
        increase = math.exp(sum(got) / len(got) - full) - 1
        tried.append({"thresholds": thresholds, "allowance": allowance, "ppl_increase": increase})
        if increase <= max_increase:
            chosen = thresholds
            break
        allowance *= 0.5 * max_increase / increase  # aim well below what was measured over the bound
    if not chosen:
        got, used = nll[:, -1].tolist(), [L] * nll.shape[0]
    on = sorted(chosen)
    checks = [sum(1 for e in on if e <= layer and 0 < chosen[e]) for layer in used]
    spent = sum(costs.token(layer, c, L) for layer, c in zip(used, checks))
    counts: dict[int, int] = {}
    for layer in used:
        counts[layer] = counts.get(layer, 0) + 1
    mean = sum(got) / len(got)
    return {"thresholds": chosen, "max_ppl_increase": float(max_increase), "ppl_full": math.exp(full),
            "ppl_early_exit": math.exp(mean), "ppl_increase": math.exp(mean - full) - 1,
            "layer_passes": sum(used) / len(used) / L, "cost": spent / len(used) / costs.full(L),
            "bound_cost": oracle_cost(nll, exits, L, max_increase, costs),
            "bound_cost_label_free": oracle_cost(kl, exits, L, max_increase, costs),
            "exits": {int(k): v for k, v in sorted(counts.items())}, "tokens": len(got),
            "sequences": len(sequences), "tried": tried,
            "costs": {"layer": costs.layer, "head": costs.head, "check": costs.check, "fill": costs.fill}}
