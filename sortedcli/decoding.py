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
  and its speculative rounds (seconds per emitted token, on this device, for this prompt), and while a
  round costs more per token than a greedy step it decodes greedily instead, probing with one
  speculative round after 8 greedy tokens, then 16, 32, ... up to 128 while probes keep losing (back to
  8 when one wins). Output is unchanged: a greedy step is the full model's own step.
- :func:`early_exit`: per token, run the exits from the smallest up and stop at the first whose top
  probability reaches its threshold (Sorted LLaMA's "instance-aware dynamic inference"); the
  deepest layer always answers. The layers the token skipped get keys/values computed from the
  hidden state it exited with (CALM's propagation, :meth:`Stack.fill`), so later tokens can attend.

Decoding is for one sequence (batch size 1). Each function returns a :class:`Decoded` with the new
tokens and counters (drafted/accepted, exits taken, forward passes) that the benchmark reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch

# Sorted LLaMA's thresholds for LLaMA-2 13B (40 layers): exit layer -> top-probability threshold.
PAPER_THRESHOLDS = {12: 0.95, 16: 0.95, 20: 0.9, 24: 0.9, 28: 0.8, 32: 0.8, 36: 0.7}


class Stack(Protocol):
    """What decoding needs from a model (batch size 1, positions of one sequence).

    ``layers`` runs layers ``[start, stop)`` and appends their keys/values to ``cache``; all layers in
    that range hold the same number of cached tokens when it is called. ``fill`` appends keys/values
    for layers ``[start, stop)`` computed from a hidden state without running them. ``head`` is the
    final norm + LM head, applied to any layer's hidden state; ``vocab_head(vocab)`` is the same
    readout restricted to the token ids ``vocab`` (its logits are ``head(h)[..., vocab]``, computed
    from those rows of the head only).
    """

    num_layers: int
    device: torch.device

    def new_cache(self): ...
    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...
    def layers(self, hidden: torch.Tensor, start: int, stop: int, cache, positions: torch.Tensor) -> torch.Tensor: ...
    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def vocab_head(self, vocab: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]: ...
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
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from (last dim), after temperature and top-p."""
        p = torch.softmax(logits.float() / self.temperature, dim=-1)
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
        lambda cache, x, pos: stack.head(stack.layers(x, 0, exit, cache, pos)[:, -1])[0])
    while not emitter.done:
        x = torch.tensor([[token]], device=stack.device)
        hidden = stack.layers(stack.embed(x), 0, exit, cache, _positions(n, 1, stack.device))
        out.layer_passes += exit
        n += 1
        token = sampling.pick(stack.head(hidden[:, -1])[0])
        emitter.emit(token)
    return out


@torch.inference_mode()
def speculative(stack: Stack, prompt, *, draft_exit: int, max_new_tokens: int = 64, k: int = 4,
                adaptive: bool = True, max_k: int = 16, sampling: Sampling | None = None,
                eos: Iterable[int] | int | None = None, on_token: Callable[[int], None] | None = None,
                draft_vocab=None, check_first: float = 0.5, fallback: bool = True,
                clock: Callable[[], float] = time.perf_counter) -> Decoded:
    """The full model's output, drafted by its own first ``draft_exit`` layers (see module doc).

    ``k`` is the first draft length; with ``adaptive`` it grows by 2 (up to ``max_k``) after a round
    whose drafts were all accepted and shrinks by 1 (down to 1) after a rejection. ``draft_vocab``
    (token ids) restricts the draft's readout to those rows of the head. ``check_first``: while the
    first draft of a round has been accepted less often than this (a running estimate, starting at
    1/2), the full model checks that position alone before verifying the rest in one pass (cheap
    rejections where verifying several tokens costs more than one, as on a CPU; 0 never splits,
    the choice for a device where k+1 tokens cost one token's time). ``fallback``: decode greedily
    while speculative rounds are measured (``clock``) to cost more per token than greedy steps (see
    the module doc); False drafts every round."""
    L = stack.num_layers
    if not 1 <= draft_exit < L:
        raise ValueError(f"draft_exit must be in 1..{L - 1} (below the full model's {L} layers), got {draft_exit}")
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
    # seconds per emitted token of a greedy step and of a speculative round (running means), and how
    # many greedy tokens to decode before the next speculative probe (fallback)
    step_cost: float | None = None
    round_cost: float | None = None
    greedy_left, backoff = (2 if fallback else 0), 8  # 2 greedy steps first: what a round must beat
    # Invariant at the top of a round: every layer caches positions [0, n); `token` sits at n, uncached.
    while not emitter.done:
        if greedy_left > 0:  # the full model's own step: what greedy decoding does
            t0 = clock()
            x = torch.tensor([[token]], device=dev)
            hidden = stack.layers(stack.embed(x), 0, L, cache, _positions(n, 1, dev))
            token = sampling.pick(stack.head(hidden[:, -1])[0])
            cost = clock() - t0
            step_cost = cost if step_cost is None else 0.7 * step_cost + 0.3 * cost
            out.layer_passes += L
            out.greedy_tokens += 1
            n += 1
            greedy_left -= 1
            emitter.emit(token)
            continue
        t0 = clock()
        kk = min(k, emitter.left - 1)  # a round yields at most kk + 1 tokens
        drafts: list[int] = []
        draft_probs: list[torch.Tensor] = []  # over the draft's vocabulary
        saved: list[torch.Tensor] = []  # layer-E hidden states of positions n .. n + kk - 1
        x = token
        for j in range(kk):
            h = stack.layers(stack.embed(torch.tensor([[x]], device=dev)), 0, E, cache, _positions(n + j, 1, dev))
            saved.append(h)
            logits = draft_head(h[:, -1])[0]
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

        if kk and (first_hits + 1) / (first_tries + 2) < check_first:  # check position n alone
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
        if fallback and step_cost is not None:
            cost = (clock() - t0) / len(new)
            round_cost = cost if round_cost is None else 0.7 * round_cost + 0.3 * cost
            if round_cost > step_cost:  # drafting loses here: greedy for a while, then probe again
                greedy_left, backoff, round_cost = backoff, min(2 * backoff, 128), None
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
    L = stack.num_layers
    exits = sorted((int(e), float(t)) for e, t in thresholds.items() if int(e) != L)
    for e, _ in exits:
        if not 1 <= e < L:
            raise ValueError(f"early-exit layers must be in 1..{L}, got {e}")
    return exits + [(L, float("-inf"))]  # the full model always answers


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


def _early_step(stack: Stack, exits, cache, hidden, pos, fill: bool):
    """Run the exits in order from layer 0 on ``hidden``; return (logits of the last position at the
    exit that answers, that exit's layer). With ``fill`` the layers after it get keys/values from its
    hidden state (:meth:`Stack.fill`); without, they run anyway (a prompt needs every layer's cache)."""
    L, start, chosen = stack.num_layers, 0, None
    for layer, threshold in exits:
        hidden = stack.layers(hidden, start, layer, cache, pos)
        start = layer
        if chosen is None:
            logits = stack.head(hidden[:, -1])[0]
            if layer == L or torch.softmax(logits.float(), -1).max() >= threshold:
                chosen = (logits, layer)
                if fill:
                    stack.fill(hidden, layer, L, cache, pos)
                    return chosen
    return chosen


@torch.inference_mode()
def early_exit(stack: Stack, prompt, *, thresholds: dict[int, float], max_new_tokens: int = 64,
               sampling: Sampling | None = None, eos: Iterable[int] | int | None = None,
               on_token: Callable[[int], None] | None = None) -> Decoded:
    """Per-token dynamic depth: each token leaves at the first exit (smallest first) whose top
    probability (softmax of the logits, temperature 1) is >= its threshold in ``thresholds``
    (exit layer -> threshold); the full model answers when none does. The prompt runs through all
    layers; its last position picks its exit the same way."""
    exits = _exits(stack, thresholds)
    dev = stack.device
    sampling, out, emitter, cache, n, token = _prefill(
        stack, prompt, sampling, max_new_tokens, eos, on_token,
        lambda cache, x, pos: _early_step(stack, exits, cache, x, pos, fill=False)[0])
    while not emitter.done:
        x = stack.embed(torch.tensor([[token]], device=dev))
        logits, layer = _early_step(stack, exits, cache, x, _positions(n, 1, dev), fill=True)
        out.exits[layer] = out.exits.get(layer, 0) + 1
        out.layer_passes += layer
        n += 1
        token = sampling.pick(logits)
        emitter.emit(token)
    return out


@torch.inference_mode()
def early_exit_nll(stack: Stack, ids, *, thresholds: dict[int, float], score_from: int = 1) -> tuple[list[float], list[int]]:
    """Teacher-forced early exit over a given sequence ``ids``: the tokens before ``score_from`` run
    as a prompt (all layers); from there on each next token is predicted one position at a time by
    the exit the rule picks, as :func:`early_exit` would, and its negative log-likelihood is recorded.
    Returns (NLL of tokens ``score_from..``, exit layer of each). The perplexity cost of early exit is
    exp(mean NLL) against the same with ``thresholds={}`` (the full model)."""
    exits = _exits(stack, thresholds)
    dev = stack.device
    ids = _prompt(stack, ids)[0]
    if not 1 <= score_from < ids.numel():
        raise ValueError(f"score_from must be in 1..{ids.numel() - 1}, got {score_from}")
    cache = stack.new_cache()
    logits, layer = _early_step(stack, exits, cache, stack.embed(ids[None, :score_from]),
                                _positions(0, score_from, dev), fill=False)
    nll, layers = [], []
    for n in range(score_from, ids.numel()):
        nll.append(float(-torch.log_softmax(logits.float(), -1)[ids[n]]))
        layers.append(layer)
        if n + 1 < ids.numel():
            logits, layer = _early_step(stack, exits, cache, stack.embed(ids[None, n:n + 1]),
                                        _positions(n, 1, dev), fill=True)
    return nll, layers
