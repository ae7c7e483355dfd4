"""Speed of the SortedNet mechanism on MobileNetV2 (torchvision's class), in one process.

Usage::

    .venv/bin/python benchmarks/mobilenet.py [--device auto|cpu|cuda] [--quick] [--out FILE.json]
                                             [--only export]
    make bench                       # benchmarks/run.py (ResNet-50), then this
    .venv/bin/python benchmarks/mobilenet.py --quick --model mobilenet_tiny --out FILE.json   # smoke test

Model: ``models.create("mobilenet_v2", 10, 1)`` (standard stem), inputs 1x64x64 (Fashion-MNIST
upsampled, as the pretrained recipe does), batch 32 on the CPU (fp32) / 256 on CUDA (bf16), the same
interleaved, noise-filtered timing as ``benchmarks/run.py`` (its ``Bench`` and ``Timings``).

1. **Nesting overhead** (target <= 1.05x): a training step of the sorted model's full sub-model over
   the same step of the plain torchvision MobileNetV2 with identical weights.
2. **Width 0.5** (reported, no target): step-time ratio over the FLOPs ratio (depth 10), with where
   the time goes: forward / backward / optimizer, and the forward time of depthwise convolutions,
   1x1 (pointwise) convolutions and BatchNorm (+ activations) against their share of the FLOPs.
   Depthwise convolutions do 9 multiply-adds per output value: they are bound by memory traffic,
   not arithmetic, so their time shrinks with the activations' size, not with the FLOPs.
3. **Exported budget-0.5 model** (target <= 0.6x): the largest sub-model of a width (0.25..1) x
   depth (1..10) grid within half the FLOPs, cut out and its BatchNorm folded into the convolutions
   (as ``sortednet export`` writes it), inference latency vs the plain full model with its BatchNorm
   folded too (deployed vs deployed; the check) at batch 1 and 32; reported beside it: vs the full
   model as trained (BatchNorm unfolded), and the cut-out model unfolded (what exports were before).
   ``--only export`` measures only this part and replaces it in the results file, keeping 1. and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import Bench, print_checks, step_fn  # noqa: E402
from sortedcli import models  # noqa: E402
from sortedcli.engine import autocast, pick_device  # noqa: E402
from sortedcli.flops import measure  # noqa: E402
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, extract, fold_batchnorm, nesting  # noqa: E402
from sortedcli.nest.convert import use  # noqa: E402

SIZE = 64
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        return "depthwise conv" if m.groups > 1 else ("1x1 conv" if m.kernel_size == (1, 1) else "3x3 conv (stem)")
    if isinstance(m, nn.BatchNorm2d):
        return "batchnorm"
    if isinstance(m, nn.Linear):
        return "classifier"
    return None


@torch.no_grad()
def forward_split(bench, model, sub, x, reps=5) -> dict[str, float]:
    """Forward seconds per layer kind (pre/post hooks around each leaf; the fastest of ``reps``)."""
    best: dict[str, float] = {}
    for _ in range(reps):
        spent, start = defaultdict(float), {}
        hooks = []
        for m in model.modules():
            k = kind(m)
            if k is None:
                continue
            hooks.append(m.register_forward_pre_hook(lambda mod, a: start.__setitem__(id(mod), time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, k=k: spent.__setitem__(k, spent[k] + time.perf_counter() - start[id(mod)])))
        try:
            t0 = time.perf_counter()
            with use(model, sub), autocast(bench.device, bench.amp):
                model(x)
            total = time.perf_counter() - t0
        finally:
            for h in hooks:
                h.remove()
        spent["other (ReLU6, adds, pooling, Python)"] = total - sum(spent.values())
        spent["total"] = total
        if not best or total < best["total"]:
            best = dict(spent)
    return best


def flops_split(model, sub, x) -> dict[str, float]:
    """FLOPs per layer kind, from one counted forward (FlopCounterMode's per-module counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), use(model, sub), counter:
        model(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out: dict[str, float] = {}
    for name, m in model.named_modules():
        k = kind(m)
        if k is None or k == "batchnorm":
            continue
        out[k] = out.get(k, 0) + sum(counts.get(f"{root}.{name}", {}).values())
    return out


def exported_latency(bench, model, grid, costs, full, out: dict, checks: list) -> None:
    """Part 3: the budget-0.5 sub-model cut out with its BatchNorm folded, as ``sortednet export`` writes
    it, vs the full model folded (the check), unfolded, and the cut-out model unfolded (reported)."""
    import copy

    device = bench.device
    fits = [s for s in grid if costs[s].flops <= 0.5 * full.flops]
    chosen = max(fits, key=lambda s: (costs[s].flops, s.levels))
    model.eval()
    small, big = extract(model, chosen, bench.example), extract(model, None, bench.example)
    small_folded, big_folded = copy.deepcopy(small), copy.deepcopy(big)
    folded = fold_batchnorm(small_folded, bench.example), fold_batchnorm(big_folded, bench.example)
    res = out["exported_latency"] = {"submodel": chosen.name, "flops_fraction": costs[chosen].flops / full.flops,
                                     "batchnorm_folded": {"exported": folded[0], "full": folded[1]}}
    print(f"budget 0.5: chose {chosen} ({costs[chosen].flops / full.flops:.3f} of the FLOPs); BatchNorm folded: "
          f"{folded[0]} layers of the exported model, {folded[1]} of the full one")
    for batch in (1, 32):
        xb = torch.randn(batch, 1, SIZE, SIZE, device=device)
        calls = 20 if batch == 1 or bench.cuda else 3

        def infer(m):
            def run():
                with torch.inference_mode(), autocast(bench.device, bench.amp):
                    for _ in range(calls):
                        m(xb)
            return run

        t = bench.interleaved({"exported": infer(small_folded), "full folded": infer(big_folded),
                               "full": infer(big), "exported unfolded": infer(small)}, max(bench.reps, 5))
        res[f"batch{batch}"] = {"ratio": t.ratio("exported", "full folded"),
                                "ratio_vs_full_unfolded": t.ratio("exported", "full"),
                                "ratio_unfolded_vs_full_unfolded": t.ratio("exported unfolded", "full"),
                                **t.as_json("exported", "full folded")}
        ms = {n: 1e3 * t.seconds(n) / calls for n in t.times}
        checks.append((f"3. exported budget-0.5 / full, both BatchNorm-folded, batch {batch}",
                       t.ratio("exported", "full folded"), 0.6,
                       f"{ms['exported']:.2f} vs {ms['full folded']:.2f} ms; {t.spread('exported', 'full folded')}"))
        checks.append((f"3. exported budget-0.5 (folded) / full as trained (unfolded), batch {batch} (report)",
                       t.ratio("exported", "full"), None,
                       f"{ms['exported']:.2f} vs {ms['full']:.2f} ms; unfolded exported / unfolded full "
                       f"{t.ratio('exported unfolded', 'full'):.3f} ({ms['exported unfolded']:.2f} ms)"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", choices=["export"], help="measure only part 3 and update it in the results file")
    ap.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "mobilenet_tiny"],
                    help="mobilenet_tiny: a smoke test (needs --out), what tests/test_benchmarks.py runs")
    args = ap.parse_args(argv)
    if args.model != "mobilenet_v2" and not args.out:
        ap.error("--model mobilenet_tiny is a smoke test: pass --out FILE, so the results stay")
    device = pick_device(args.device)
    bench = Bench(device, args.quick)
    if args.model != "mobilenet_v2":
        bench.batch, bench.extend_s = 4, 0  # a smoke test: the code paths, not the timings (no noise retries)
    bench.example = torch.zeros(1, 1, SIZE, SIZE, device=device)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if bench.cuda else (platform.processor() or platform.machine())
    print(f"MobileNetV2 {SIZE}x{SIZE}: device {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {bench.batch}, amp {bench.amp}")
    torch.manual_seed(0)
    tiny = {} if args.model == "mobilenet_v2" else {"small_stem": False}  # smoke test: the stride-2 stem, small maps
    model = models.create(args.model, num_classes=10, in_channels=1, **tiny).to(device).train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(bench.batch, 1, SIZE, SIZE, generator=g).to(device),
                torch.randint(0, 10, (bench.batch,), generator=g).to(device)) for _ in range(4)]
    depth = nesting(model).depth
    grid = Grid((Dim("width", FRACTION, WIDTHS), Dim("depth", COUNT, tuple(range(1, depth + 1)))))
    costs = {s: measure(model, s, bench.example) for s in grid}
    full = costs[grid.largest]
    out, checks = {}, []
    path = args.out or Path(__file__).resolve().parent / f"results-mobilenet-{device.type}.json"
    if args.only:
        exported_latency(bench, model, grid, costs, full, out, checks)
        old = json.loads(path.read_text()) if path.is_file() else {}
        print_checks(checks)
        old["checks"] = [c for c in old.get("checks", []) if not c["what"].startswith("3.")] + [
            {"what": w, "measured": v, "target": tgt, "pass": None if tgt is None else v <= tgt, "detail": d}
            for w, v, tgt, d in checks]
        old["exported_latency"] = {**out["exported_latency"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
                                   "elapsed_s": time.perf_counter() - started}
        path.write_text(json.dumps(old, indent=2) + "\n")
        print(f"\nwrote part 3 into {path} ({time.perf_counter() - started:.0f}s)")
        return 0

    # 1. nesting overhead
    plain = extract(model, None, bench.example).train()
    t = bench.interleaved({"sorted": step_fn(bench, model, grid.largest, batches)[0],
                           "plain": step_fn(bench, plain, False, batches)[0]}, bench.reps)
    k = bench.steps_per_rep
    out["nesting_overhead"] = {"ratio": t.ratio("sorted", "plain"), "sorted_step_s": t.seconds("sorted") / k,
                               "plain_step_s": t.seconds("plain") / k, **t.as_json("sorted", "plain")}
    checks.append(("1. full sorted / plain, train step", t.ratio("sorted", "plain"), 1.05,
                   f"{t.seconds('sorted') / k * 1e3:.1f} vs {t.seconds('plain') / k * 1e3:.1f} ms; "
                   f"{t.spread('sorted', 'plain')}"))

    # 2. width 0.5: time ratio vs FLOPs ratio, and where the time goes
    half = SubModel.of(width=0.5, depth=depth)
    flops_ratio = costs[half].flops / full.flops
    t = bench.interleaved({"full": step_fn(bench, model, grid.largest, batches)[0],
                           "w0.5": step_fn(bench, model, half, batches)[0]}, bench.reps)
    time_ratio = t.ratio("w0.5", "full")
    split = {}
    for n, s in (("full", grid.largest), ("w0.5", half)):
        phases = []
        run, _ = step_fn(bench, model, s, batches, phases)
        for _ in range(4):
            run()
        split[n] = [min(p[i] for p in phases[1:]) for i in range(3)]
    model.eval()
    x = batches[0][0]
    fwd = {n: forward_split(bench, model, s, x) for n, s in (("full", grid.largest), ("w0.5", half))}
    fl = {n: flops_split(model, s, x[:1]) for n, s in (("full", grid.largest), ("w0.5", half))}
    model.train()
    out["width_0.5"] = {"flops_ratio": flops_ratio, "time_ratio": time_ratio,
                        "time_over_flops": time_ratio / flops_ratio, "fwd_bwd_opt_s": split,
                        "forward_s_by_kind": fwd, "flops_by_kind": fl, **t.as_json("w0.5", "full")}
    checks.append(("2. w0.5: time ratio / FLOPs ratio (report)", time_ratio / flops_ratio, None,
                   f"time {time_ratio:.3f}, FLOPs {flops_ratio:.3f}; {t.spread('w0.5', 'full')}"))
    print("where the time goes (forward / backward / optimizer, ms per step): " + "; ".join(
        f"{n} {f * 1e3:.1f} / {b * 1e3:.1f} / {o * 1e3:.1f}" for n, (f, b, o) in split.items()))
    for n in fwd:
        tot_t, tot_f = fwd[n]["total"], sum(fl[n].values())
        print(f"forward of {n} by layer kind (share of time | share of FLOPs): " + "; ".join(
            f"{k} {v / tot_t:.0%} | {fl[n].get(k, 0) / tot_f:.0%}" for k, v in fwd[n].items() if k != "total"))

    # 3. exported budget-0.5 model
    exported_latency(bench, model, grid, costs, full, out, checks)

    print_checks(checks)
    report = {"model": args.model, "input": [1, SIZE, SIZE], "device": str(device), "device_name": name,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": bench.batch,
              "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "elapsed_s": time.perf_counter() - started,
              "checks": [{"what": w, "measured": v, "target": tgt, "pass": None if tgt is None else v <= tgt,
                          "detail": d} for w, v, tgt, d in checks], **out}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path} ({report['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
