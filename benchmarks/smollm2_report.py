"""The SmolLM2-135M-Instruct quality report: per exit, SoFT vs SFT vs the untouched pretrained model.

Usage::

    .venv/bin/python benchmarks/smollm2_report.py --runs RUNS [--decoding FILE.json] [--out DIR]

``RUNS`` holds three evaluated runs (``sortednet eval --all-submodels`` wrote their
``eval/results.json``): ``soft`` (``--recipe smollm2_soft``), ``sft`` (``--recipe smollm2_sft``) and
``pretrained`` (``--recipe smollm2_soft trainer.max_steps=0``: the untouched model's step-0
checkpoint, measured by the same eval). ``--decoding`` is ``benchmarks/decoding.py``'s JSON on the
SoFT model's export. ``make smollm2-table`` runs it all. Writes into ``--out``
(default ``docs/results/smollm2``):

- ``table.md``: per exit, held-out perplexity, agreement a with the run's own full model (the
  acceptance rate of a greedy draft from that exit), the measured cost c of a decoding step (head
  included; the best of the full head and the frequency-ranked draft heads), eval's predicted
  self-speculative speed-up (verification priced as measured), and the measured decoding rows;
  then three held-out questions answered from every exit of every run (eval's samples);
- ``<run>/results.json`` / ``results.csv`` / ``plot.png``: each run's eval output, copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RUNS = ("pretrained", "sft", "soft")
TITLES = {"pretrained": "untouched", "sft": "SFT", "soft": "SoFT"}


def load(run: Path) -> dict:
    path = run / "eval" / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `sortednet eval --all-submodels --ckpt {run}` first")
    return json.loads(path.read_text())


def best_draft(row: dict) -> tuple[float, float, float, str]:
    """(agreement, cost, predicted speed-up, head) of the exit's best draft head."""
    heads = [("full", row.get("agreement"), row.get("cost_ratio"), row.get("speedup"))]
    heads += [(k[5:], v["agreement"], v["cost_ratio"], v["speedup"]) for k, v in row.items() if k.startswith("vocab")]
    name, a, c, s = max(heads, key=lambda h: h[3] if h[3] is not None else -1)
    return a, c, s, name


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--decoding", help="benchmarks/decoding.py's JSON on the SoFT export")
    ap.add_argument("--out", default="docs/results/smollm2")
    args = ap.parse_args(argv)
    root, out = Path(args.runs), Path(args.out)
    docs = {name: load(root / name) for name in RUNS}
    out.mkdir(parents=True, exist_ok=True)
    for name in RUNS:
        (out / name).mkdir(exist_ok=True)
        for f in ("results.json", "results.csv", "plot.png"):
            if (root / name / "eval" / f).is_file():
                shutil.copy2(root / name / "eval" / f, out / name / f)
    rows = {name: {r["dims"]["depth"]: r for r in doc["rows"]} for name, doc in docs.items()}
    depths = sorted(rows["soft"])
    L = max(depths)
    lines = ["# SmolLM2-135M-Instruct: SoFT vs SFT vs the untouched model, per exit", "",
             "Held-out GSM8K answers (66 chats, the recipes' seeded split), CPU fp32. a: top-1 agreement "
             "with the same run's full model at the counted positions (what a greedy draft from that exit "
             "gets accepted); c: a decoding step of the exit over the full model's (head included; the best "
             "of the full head and the 4k/8k/16k frequency-ranked draft heads, named); spec x: eval's "
             "predicted self-speculative speed-up at its best k, verification priced as measured on this "
             "CPU.", "",
             "| exit | ppl untouched | ppl SFT | ppl SoFT | a untouched | a SFT | a SoFT | c SoFT (head) "
             "| spec x untouched | spec x SFT | spec x SoFT |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in depths:
        cells = [str(d)] + [fmt(rows[n][d]["perplexity"]) for n in RUNS]
        drafts = {n: best_draft(rows[n][d]) if d < L else (None, None, None, "") for n in RUNS}
        cells += [fmt(drafts[n][0], ".3f") for n in RUNS]
        a, c, s, head = drafts["soft"]
        cells.append("-" if c is None else f"{c:.2f} ({head})")
        cells += [fmt(drafts[n][2]) + ("x" if drafts[n][2] is not None else "") for n in RUNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in RUNS:
        ch = docs[n].get("draft") or {}
        if ch:
            lines.append(f"- {TITLES[n]}: eval's draft for `--speculative` is exit {ch['exit']} "
                         f"({'full head' if ch['vocab'] is None else str(ch['vocab']) + ' most frequent tokens'}), "
                         f"k={ch['k']}, a={ch['agreement']:.3f}, c={ch['cost_ratio']:.2f}, predicted "
                         f"{ch['speedup']:.2f}x; verification v(T) = "
                         + ", ".join(f"{t}: {v:.2f}" for t, v in ch.get("verify", {}).items() if t != "1"))
    if args.decoding:
        dec = json.loads(Path(args.decoding).read_text())
        lines += ["", "## Measured decoding on the SoFT model (benchmarks/decoding.py)", "",
                  f"{dec.get('prompts')} prompts ({dec.get('prompt_source')}), {dec.get('new_tokens')} new tokens, "
                  f"{dec.get('threads')} threads, {dec.get('device')} {dec.get('dtype')}; verify ms per T tokens: "
                  + ", ".join(f"{t}: {v:.0f}" for t, v in dec.get("verify_ms", {}).items()), "",
                  "| method | tok/s | x greedy | identical | a | c | tok/round | bound |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in dec.get("methods", {}).items():
            lines.append(f"| {name} | {fmt(m.get('tokens_per_s'), '.1f')} | {fmt(m.get('ratio_vs_greedy_ours'))} | "
                         f"{m.get('identical', '-')} | {fmt(m.get('a'), '.3f')} | {fmt(m.get('c'))} | "
                         f"{fmt(m.get('tokens_per_round'))} | {fmt(m.get('bound'))} |")
    lines += ["", "## Samples: held-out questions answered greedily from each exit (eval's samples, 16 tokens)", ""]
    for n in RUNS:
        samples = (docs[n].get("draft") or {}).get("samples") or {}
        if not samples:
            continue
        lines += [f"### {TITLES[n]}", ""]
        if not any("assistant" in t for ts in samples.values() for t in ts):
            lines += ["(this run's eval predates eval continuing the held-out question: its samples continue the "
                      "first 8 tokens of each chat, the system prompt; `sortednet eval --all-submodels --ckpt RUN` "
                      "again gives question samples)", ""]
        for x in sorted(samples, key=int):
            lines.append(f"- exit {x}: " + " / ".join(repr(s[-160:]) for s in samples[x]))
        lines.append("")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'}")


if __name__ == "__main__":
    main()
