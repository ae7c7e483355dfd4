"""Decoding speed of a LLaMA model: plain greedy, generation from an exit, self-speculative decoding,
transformers' ``assistant_early_exit`` and per-token early exit, in one process.

Usage::

    .venv/bin/python benchmarks/decoding.py [--model DIR] [--draft-exits 3,4,6] [--new-tokens 64]
                                            [--prompts 8] [--reps 3] [--device auto] [--out FILE.json]
    make bench-decoding [MODEL=DIR]

``--model DIR`` is a ``LlamaForCausalLM`` folder (``save_pretrained``; a tokenizer in it is used for the
prompts), or a run folder (its newest checkpoint, built as ``sortednet generate`` builds it: exits with
their own readouts, ``model.exits``, read through them). Without it the model is a random-init LLaMA sized so that the decoder layers, not the LM
head, dominate the cost (12 layers, hidden 512, 8 query / 4 key-value heads, FFN 1376, vocab 4096):
its speeds and the draft cost ``c`` are meaningful, its acceptance rate is not (a random model's
shallow exits rarely agree with its last one), so a speed-up needs a trained model.

Prompts: with a tokenizer, the Alpaca prompts of the held-out GSM8K questions (``sortedcli.data.lm``,
split seed 0); otherwise random token ids. Every method decodes the same prompts greedily for
``--new-tokens`` tokens (stopping at EOS when the tokenizer has one). Repetitions interleave the
methods (the order rotates per prompt) and each ratio is the median over repetitions of that
repetition's tokens/s over plain greedy (ours) in the same repetition.

Measured, beside tokens/s:

- ``identical``: prompts whose output equals plain greedy decoding (ours), for every method that must
  reproduce the full model (transformers' greedy, self-speculative, ``assistant_early_exit``);
- ``c``: the draft's relative cost, time per token of greedy generation from the draft exit alone over
  time per token of the full model (fixed length, no EOS); it counts the LM head that every exit pays;
- ``a``: acceptance rate, drafted tokens kept / drafted; ``tok/round``: tokens produced per
  draft-and-verify round; ``bound``: ``(1 - a^(k+1)) / (1 - a) / (k c + 1)`` with the mean draft
  length ``k``, the speed-up those a and c allow when verifying k+1 tokens costs one full pass;
- early exit: the speed-up, the mean fraction of layers a token used, and the perplexity on the
  held-out answers (teacher forced, ``sortedcli.decoding.early_exit_nll``) next to the full model's;
  with the given (or the paper's) thresholds, and with thresholds chosen on those same held-out
  answers for ``--max-ppl-increase`` (default 0.05; ``tune_thresholds``, candidates the thresholds'
  exits, confidence over the 4096 most frequent tokens where the vocabulary is 4x larger): its
  perplexity is the chooser's own measurement on the sequences it chose on.

First, what verifying costs: one full-model step (with a KV cache of 32 tokens) of 1, 2, k+1
tokens, against one token (``verify``; the sizes timed in turns, as eval's
:func:`sortedcli.draft.verify_ratios`). Where k+1 tokens cost about one token's time (bound by
reading the weights, as on a GPU), self-speculation can win; where they cost much more,
verification is not free and the bound over-promises (SmolLM2-135M on 2 quiet EPYC cores: 2 tokens
1.05x one, 5 tokens 1.55x, 9 tokens 1.9x). Then ``c`` per draft exit from a timed decoding step (head included), with the
full head and with the draft head restricted to the N most frequent tokens (``--draft-vocab``,
FR-Spec; counted on the GSM8K training split with the model's tokenizer, or on the prompts without
one); self-speculation runs with and without that subset (greedy output identical either way).
Progress is printed as it goes (a 135M model on a CPU takes minutes).

CUDA is used when present (``--device``), in float32 by default so that batched verification and
one-token-at-a-time decoding round alike (``--dtype bf16`` is faster but can flip near-tied argmaxes,
which the ``identical`` column then shows). Results go to ``benchmarks/results-decoding-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from sortedcli import decoding as D  # noqa: E402
from sortedcli import draft as drafting  # noqa: E402
from sortedcli.models.decoder import DecoderStack  # noqa: E402
from sortedcli.data import lm  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(args, device, dtype):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model and (Path(args.model) / "checkpoints" / "latest").is_file():
        # a run folder: its sorted model as generate builds it, the exits' own readouts (model.exits) included
        from sortedcli import runs
        from sortedcli.commands.generate import run_model

        run_dir, ckpt = runs.resolve_checkpoint(args.model, None)
        model, tokenizer, _ = run_model(run_dir, ckpt)
        model = model.to(dtype)
        what = f"{args.model} (the run's model, {ckpt.name})"
    elif args.model:
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
        tokenizer = None
        if (Path(args.model) / "tokenizer_config.json").is_file() or (Path(args.model) / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        what = f"{args.model}"
    else:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=12,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             attn_implementation=args.attn)
        model = LlamaForCausalLM(config).to(dtype)
        tokenizer = None
        what = "random-init LLaMA (12 x 512, GQA 8/4, FFN 1376, vocab 4096)"
    model = model.to(device).eval()
    model.generation_config.pad_token_id = model.config.pad_token_id or 0
    return model, tokenizer, what


def make_prompts(args, tokenizer, vocab: int):
    """(prompt id lists, [(ids, score_from)] held-out sequences for perplexity, description). The
    held-out GSM8K split is the recipes' (test fraction 0.05, seed 0); a tokenizer with a chat template
    (a chat model's, as SmolLM2-Instruct) gets the questions as the model was fine-tuned on them and
    as ``sortednet generate`` writes them: one user turn, the assistant's turn opened."""
    if tokenizer is not None:
        from sortedcli.data import lm

        chat = lm.has_chat_template(tokenizer)
        examples = lm.split(lm.read_gsm8k(lm.package_file("gsm8k")), 0.05, 0)[1]
        prompts, scored = [], []
        for ex in examples[: max(args.prompts, args.ppl_items)]:
            if chat:
                prompts.append(lm.chat_prompt_ids(tokenizer, ex.messages[0][1]))
                ex = lm.templated(tokenizer, ex)
            else:
                prompts.append(tokenizer(ex.segments[0][0]).input_ids)
            pair = lm.tokenize_example(tokenizer, ex, 512)
            if pair is not None:
                ids, labels = pair
                first = next(i for i, lab in enumerate(labels) if lab != lm.IGNORE)
                scored.append((ids, first))
        return prompts[: args.prompts], scored[: args.ppl_items], \
            "held-out GSM8K questions (" + ("the chat template" if chat else "Alpaca prompt") + ")"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (int(torch.randint(16, 33, (), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    scored = [(torch.randint(3, vocab, (96,), generator=g).tolist(), 32) for _ in range(args.ppl_items)]
    return prompts, scored, "random token ids (no tokenizer)"


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t


@torch.inference_mode()
def _subset_step_ms(stack, exit: int, vocab, context: int = 32, reps: int = 10) -> float:
    """Like :func:`sortedcli.draft.step_ms`, read out through the draft head over ``vocab`` only."""
    head = stack.vocab_head(vocab.to(stack.device))

    class Sub:  # the same stack, its head restricted
        def __getattr__(self, name):
            return getattr(stack, name)

        def head(self, hidden, layer=None):
            return head(hidden, layer)

    return drafting.step_ms(Sub(), exit, context, 3, reps)


def _ranked_vocab(tokenizer, prompts, vocab_size: int) -> torch.Tensor:
    """Token ids by frequency in the GSM8K training split (with a tokenizer; else in the prompts)."""
    if tokenizer is None:
        return D.frequent_tokens(prompts, vocab_size, vocab_size)
    train = lm.split(lm.read_gsm8k(lm.package_file("gsm8k")), 0.05, 0)[0]
    if lm.has_chat_template(tokenizer):  # the text as the model reads it (see make_prompts)
        train = [lm.templated(tokenizer, ex) for ex in train]
    texts = ("".join(text for text, _ in ex.segments) for ex in train)
    return D.frequent_tokens((tokenizer(t).input_ids for t in texts), vocab_size, vocab_size)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a LlamaForCausalLM folder or a run folder (default: a random-init 12-layer LLaMA)")
    ap.add_argument("--draft-exits", default="", help="comma-separated draft exits (default: L/4, L/3, L/2)")
    ap.add_argument("--thresholds", default="",
                    help="early exit 'layer:threshold,...' (default: the paper's, scaled to the model's depth)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--ppl-items", type=int, default=8, help="held-out sequences for the early-exit perplexity")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="first draft length of self-speculation (adapts)")
    ap.add_argument("--expected", type=float, default=None,
                    help="the speed-up predicted for the draft (sortednet eval's), as generate passes it: "
                         "below 1, self-speculation starts greedy and probes rarely (decoding.speculative)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--draft-vocab", default="8192",
                    help="comma-separated sizes N of the frequency-ranked draft vocabulary (0 or empty: none)")
    ap.add_argument("--max-ppl-increase", type=float, default=0.05,
                    help="early exit with thresholds chosen on the --ppl-items held-out sequences "
                         "(sortedcli.decoding.tune_thresholds) to keep perplexity within (1 + X) of the "
                         "full model's, candidates the --thresholds exits; 0: no such row")
    ap.add_argument("--ppl", action=argparse.BooleanOptionalAction, default=True,
                    help="early exit's teacher-forced perplexity (slow on a CPU)")
    ap.add_argument("--out", help="JSON file (default benchmarks/results-decoding-<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, tokenizer, what = load_model(args, device, DTYPES[args.dtype])
    stack = DecoderStack(model)
    L = stack.num_layers
    drafts = [int(e) for e in args.draft_exits.split(",") if e] or sorted({max(1, L // 4), max(1, L // 3), max(1, L // 2)})
    thresholds = ({int(a): float(b) for a, b in (p.split(":") for p in args.thresholds.split(",") if p)}
                  or D.scaled_thresholds(L))
    prompts, scored, prompt_source = make_prompts(args, tokenizer, model.config.vocab_size)
    # a chat model ends its answer with the template's end of turn, or its EOS (as generate stops)
    eos = None if tokenizer is None else sorted(lm.stop_tokens(tokenizer, lm.has_chat_template(tokenizer)))
    N = args.new_tokens
    clock = Clock(device)
    started = time.perf_counter()

    def note(msg):
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    # What verifying T tokens costs against one (full model, KV cache of 32 tokens, head on every row).
    # The sizes are timed in turns (sortedcli.draft.verify_ratios, as eval does): timed one size after
    # the other, a burst of load once made 2 tokens cost 1.6x one and 5 tokens 1.5x.
    from sortedcli.draft import verify_ratios

    verify = verify_ratios(stack, tuple(sorted({1, 2, args.k + 1, 2 * args.k + 1})), reps=7, ms=True)
    note("verify cost, full model step of T tokens: " + ", ".join(
        f"T={T}: {ms:.1f} ms ({ms / verify[1]:.2f}x)" for T, ms in verify.items()))
    # The draft vocabularies: token ids ranked by frequency in training text.
    sizes = [int(x) for x in args.draft_vocab.split(",") if x and int(x) > 0]
    ranked = _ranked_vocab(tokenizer, prompts, model.config.vocab_size) if sizes else None
    vocabs = {n: ranked[:n] for n in sizes if n < model.config.vocab_size}
    costs = {}
    for E in drafts:
        full = drafting.step_ms(stack, L)
        costs[E] = {"full_head": drafting.step_ms(stack, E) / full}
        for n, vocab in vocabs.items():
            costs[E][n] = _subset_step_ms(stack, E, vocab) / full
        note(f"c of exit {E}: " + ", ".join(f"{'full head' if n == 'full_head' else f'vocab {n}'} {c:.3f}"
                                            for n, c in costs[E].items()))

    def hf(prompt, **kw):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=N, eos_token_id=eos, **kw)
        return out[0, len(prompt):].tolist()

    methods = {"greedy (ours)": lambda p: D.generate(stack, p, max_new_tokens=N, eos=eos),
               "greedy (transformers)": lambda p: hf(p)}
    # what generate passes from eval's measurements, from this run's own: check the first draft alone
    # while cheaper (draft.check_first), give drafting up below the draft's break-even acceptance
    ratios = drafting.as_ratios(verify)
    first = drafting.check_first(ratios, args.k)
    tuned = {}
    for E in drafts:
        methods[f"exit {E} alone, no EOS (ours)"] = lambda p, E=E: D.generate(stack, p, exit=E, max_new_tokens=N)
        tuned[E, "full_head"] = drafting.give_up(costs[E]["full_head"], ratios)
        methods[f"speculative, draft exit {E} (ours)"] = \
            lambda p, E=E: D.speculative(stack, p, draft_exit=E, max_new_tokens=N, k=args.k, eos=eos,
                                         expected=args.expected, check_first=first, give_up=tuned[E, "full_head"])
        for n, vocab in vocabs.items():
            tuned[E, n] = drafting.give_up(costs[E][n], ratios)
            methods[f"speculative, draft exit {E}, vocab {n} (ours)"] = \
                lambda p, E=E, vocab=vocab, n=n: D.speculative(
                    stack, p, draft_exit=E, max_new_tokens=N, k=args.k, eos=eos, draft_vocab=vocab,
                    expected=args.expected, check_first=first, give_up=tuned[E, n])
    note(f"check_first {first:.2f}; give up below first-draft acceptance " + ", ".join(
        f"{E}{'' if n == 'full_head' else f'/{n}'}: {a:.2f}" for (E, n), a in tuned.items()))
    for E in drafts:
        if getattr(getattr(model, "sortednet", None), "exits", None) is None:  # (it would read the shared norm)
            methods[f"assistant_early_exit={E} (transformers)"] = lambda p, E=E: hf(p, assistant_early_exit=E)
    methods["early exit (ours)"] = lambda p: D.early_exit(stack, p, thresholds=thresholds, max_new_tokens=N, eos=eos)
    chosen = None
    if args.max_ppl_increase > 0 and scored:
        # thresholds chosen on the held-out sequences (the perplexity ones), the exits read through the
        # most frequent tokens where the vocabulary is 4x larger (what `generate --max-ppl-increase` does)
        V = model.config.vocab_size
        confidence = None
        if V >= 4 * D.CONFIDENCE_VOCAB:
            confidence = (ranked if ranked is not None else _ranked_vocab(tokenizer, prompts, V))[:D.CONFIDENCE_VOCAB]
        chosen = D.tune_thresholds(stack, scored, sorted(thresholds), args.max_ppl_increase, vocab=confidence)
        chosen_name = f"early exit, chosen for ppl +{100 * args.max_ppl_increase:g}% (ours)"
        note(f"early-exit thresholds chosen on {len(scored)} held-out sequences: "
             f"{ {k: round(v, 3) for k, v in chosen['thresholds'].items()} }, measured ppl +{100 * chosen['ppl_increase']:.1f}%, "
             f"{chosen['layer_passes']:.2f} of the layer passes, {chosen['cost']:.2f} of the multiply-adds "
             f"(an oracle's floor with these exits: {chosen['bound_cost']:.2f}, "
             f"{chosen['bound_cost_label_free']:.2f} not knowing the next token)")
        methods[chosen_name] = lambda p: D.early_exit(stack, p, thresholds=chosen["thresholds"], max_new_tokens=N,
                                                      eos=eos, vocab=confidence)
    methods["greedy full, no EOS (ours)"] = lambda p: D.generate(stack, p, max_new_tokens=N)
    names = list(methods)

    print(f"model: {what}; {L} layers; device {device}, {args.dtype}; prompts: {len(prompts)} {prompt_source}; "
          f"{N} new tokens; draft exits {drafts}; early-exit thresholds {thresholds}", flush=True)
    for p in prompts[:1]:  # warm-up
        for name, fn in methods.items():
            fn(p)
        note(f"warm-up done ({len(methods)} methods on one prompt)")

    reps = []  # per repetition: name -> {"time", "tokens"}
    outputs: dict[str, list] = {name: [None] * len(prompts) for name in names}
    stats: dict[str, list] = {name: [] for name in names}
    for r in range(args.reps):
        rep = {name: {"time": 0.0, "tokens": 0} for name in names}
        for i, p in enumerate(prompts):
            shift = (r * len(prompts) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                result, seconds = clock(lambda: methods[name](p))
                tokens = result if isinstance(result, list) else result.tokens
                rep[name]["time"] += seconds
                rep[name]["tokens"] += len(tokens)
                outputs[name][i] = tokens
                if r == 0 and not isinstance(result, list):
                    stats[name].append(result)
            note(f"repetition {r + 1}/{args.reps}, prompt {i + 1}/{len(prompts)} done")
        reps.append(rep)
        print(f"  repetition {r + 1}/{args.reps}: greedy (ours) "
              f"{rep['greedy (ours)']['tokens'] / rep['greedy (ours)']['time']:.1f} tok/s", flush=True)

    def tps(rep, name):
        return rep[name]["tokens"] / rep[name]["time"]

    def ratio(name, base="greedy (ours)"):
        return statistics.median(tps(rep, name) / tps(rep, base) for rep in reps)

    reference = outputs["greedy (ours)"]
    rows, results = [], {"model": what, "layers": L, "device": str(device), "dtype": args.dtype,
                         "torch": torch.__version__, "platform": platform.platform(),
                         "prompts": len(prompts), "prompt_source": prompt_source, "new_tokens": N,
                         "reps": args.reps, "draft_exits": drafts, "thresholds": thresholds,
                         "threads": torch.get_num_threads(), "verify_ms": verify,
                         "c_step": {str(E): {str(n): c for n, c in v.items()} for E, v in costs.items()},
                         "methods": {}}
    full_no_eos = "greedy full, no EOS (ours)"
    for name in names:
        entry = {"tokens_per_s": statistics.median(tps(rep, name) for rep in reps),
                 "ratio_vs_greedy_ours": ratio(name), "raw": [rep[name] for rep in reps]}
        if "no EOS" not in name and not name.startswith("early exit"):
            entry["identical"] = sum(o == ref for o, ref in zip(outputs[name], reference))
        if name.startswith("exit "):
            entry["c"] = 1 / ratio(name, full_no_eos)  # time per token of the exit / of the full model
        if name.startswith("speculative"):
            runs = stats[name]
            drafted, accepted = sum(s.drafted for s in runs), sum(s.accepted for s in runs)
            rounds, produced = sum(s.rounds for s in runs), sum(len(s.tokens) - 1 for s in runs)
            E = int(name.split("draft exit ")[1].split()[0].rstrip(","))
            n = int(name.split("vocab ")[1].split()[0]) if "vocab " in name else "full_head"
            c = costs[E][n] if E in costs else results["methods"][f"exit {E} alone, no EOS (ours)"]["c"]
            a = accepted / drafted if drafted else float("nan")
            k = drafted / rounds if rounds else float("nan")
            bound = ((1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1) / (k * c + 1)
            # what a round costs here: k drafts at c, plus verifying k+1 tokens at this device's price
            ideal = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
            entry.update(a=a, c=c, mean_k=k, tokens_per_round=produced / rounds if rounds else float("nan"),
                         bound=bound, loss_bound=1 / (1 + k * c), bound_ideal_tokens=ideal)
        if name.startswith("early exit"):
            runs = stats[name]
            used = sum(layer * n for s in runs for layer, n in s.exits.items())
            count = sum(n for s in runs for n in s.exits.values())
            entry["layers_used"] = used / count / L if count else float("nan")
            entry["exits"] = {str(k): sum(s.exits.get(k, 0) for s in runs) for k in sorted({e for s in runs for e in s.exits})}
        results["methods"][name] = entry

    # Early exit: the perplexity it costs on held-out sequences (teacher forced), and its speed-up.
    full_nll, early_nll, early_layers = [], [], []
    for ids, first in (scored if args.ppl else []):
        full_nll += D.early_exit_nll(stack, ids, thresholds={}, score_from=first)[0]
        nll, layers = D.early_exit_nll(stack, ids, thresholds=thresholds, score_from=first)
        early_nll += nll
        early_layers += layers
    if full_nll:
        ee = results["methods"]["early exit (ours)"]
        ee.update(ppl_full=math.exp(statistics.fmean(full_nll)), ppl_early_exit=math.exp(statistics.fmean(early_nll)),
                  ppl_tokens=len(full_nll), teacher_forced_layers_used=statistics.fmean(early_layers) / L)
    if chosen is not None:  # measured by the chooser on the same held-out sequences (in-sample)
        results["methods"][chosen_name].update(
            ppl_full=chosen["ppl_full"], ppl_early_exit=chosen["ppl_early_exit"], ppl_tokens=chosen["tokens"],
            teacher_forced_layers_used=chosen["layer_passes"], macs_used=chosen["cost"],
            macs_floor=chosen["bound_cost"], macs_floor_label_free=chosen["bound_cost_label_free"],
            chosen_thresholds=chosen["thresholds"], max_ppl_increase=args.max_ppl_increase)

    for name in names:
        e = results["methods"][name]
        extra = []
        if "identical" in e:
            extra.append(f"identical {e['identical']}/{len(prompts)}")
        if "c" in e and "a" not in e:
            extra.append(f"c={e['c']:.3f}")
        if "a" in e:
            extra.append(f"a={e['a']:.3f} c={e['c']:.3f} k={e['mean_k']:.1f} tok/round={e['tokens_per_round']:.2f} "
                         f"bound={e['bound']:.2f}x (worst case 1/(1+kc)={e['loss_bound']:.2f}x)")
        if "layers_used" in e:
            extra.append(f"layers used {e['layers_used']:.2f}")
            if "ppl_full" in e:
                extra.append(f"ppl {e['ppl_early_exit']:.2f} vs full {e['ppl_full']:.2f} ({e['ppl_tokens']} tokens)")
        rows.append(f"{name:<42} {e['tokens_per_s']:>9.1f} {e['ratio_vs_greedy_ours']:>7.3f}x  {'; '.join(extra)}")
    print(f"\n{'method':<42} {'tok/s':>9} {'ratio':>8}  detail")
    print("\n".join(rows))
    out = Path(args.out or Path(__file__).resolve().parent / f"results-decoding-{device.type}.json")
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {out}")
    mismatched = [n for n, e in results["methods"].items() if e.get("identical", len(prompts)) != len(prompts)]
    if mismatched:
        print(f"WARNING: outputs differ from plain greedy for: {', '.join(mismatched)}")
    return results


if __name__ == "__main__":
    main()
