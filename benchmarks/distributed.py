"""Data parallelism on the CPU: 2 processes against 1, through the CLI a user runs.

Usage::

    .venv/bin/python benchmarks/distributed.py [--quick] [--out FILE.json] [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/distributed.py --smoke --out FILE.json --set model=resnet_tiny data=digits ...

``--smoke`` runs each kind of command once, with 2 processes only (no speed-up: nothing to compare),
so that a change of the CLI's output cannot break the benchmark unseen; with a tiny model on the
bundled digits (``--set``) it is what the test suite runs (``tests/test_benchmarks.py``).
    make bench                       # benchmarks/run.py, mobilenet.py, encoders.py, then this

Workload: the ``default`` recipe (ResNet-18, small stem, Fashion-MNIST, 80 width x depth sub-models).
On a machine with C cores, ``trainer.devices=1`` is one process with C threads and
``trainer.devices=2`` two processes of C/2 threads each (gloo), so both use the whole CPU.

1. **eval --all-submodels** (target >= 1.5x): the 80 sub-models split across the 2 ranks (BatchNorm
   recalibration, test accuracy, FLOPs, batch-1 latency each), one table. Reported: the speed-up of
   the evaluation itself (the time ``eval`` prints) and of the whole command (with start-up). As a
   control, the same single-process eval with 1 thread: 1 thread / C threads is how much parallel
   speed the machine gives one process (on a shared machine it can be far below C).
2. **One training epoch** at the same global batch (reported, no target): ``sampler=sortednet``
   (g=1), per-rank BatchNorm statistics (the default, as with DDP; ``trainer.sync_batchnorm=true``
   syncs them), epoch-end evaluation off; the time ``train`` prints.

Repetitions alternate 1 and 2 processes; the median of each is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SORTEDNET = [sys.executable, "-m", "sortedcli"]


def run(args: list[str], cwd: Path, threads: int | None = None) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["COLUMNS"] = "200"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    p = subprocess.run([*SORTEDNET, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"sortednet {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return wall, p.stdout


def seconds(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise SystemExit(f"no {pattern!r} in the output:\n{text[-2000:]}")
    return float(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer test images, steps and repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="each command once, 2 processes only (needs --out)")
    ap.add_argument("--out", type=Path, help="JSON file (default benchmarks/results-distributed-cpu.json)")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="overrides for every train (the test suite: a tiny model on data=digits)")
    args = ap.parse_args(argv)
    if args.smoke and not args.out:
        ap.error("--smoke measures nothing: pass --out FILE, so the results stay")
    args.out = args.out or ROOT / "benchmarks" / "results-distributed-cpu.json"
    reps = 1 if args.smoke else args.reps or (1 if args.quick else 2)
    test_subset, train_subset = (256, 1024) if args.quick or args.smoke else (1000, 4096)
    cores = os.cpu_count()
    print(f"data parallel on the CPU: {cores} cores, {platform.processor() or platform.machine()}, "
          f"{reps} repetitions each")
    home = Path(tempfile.mkdtemp(prefix="sortednet-bench-dist-"))
    try:
        return measure(args, reps, test_subset, train_subset, cores, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def measure(args, reps: int, test_subset: int, train_subset: int, cores: int | None, home: Path) -> int:
    base = ["train", "--recipe", "default", f"paths.runs={home / 'runs'}", "trainer.epoch_eval=false",
            "trainer.tensorboard=false", *args.overrides]
    run([*base, "trainer.max_steps=1", f"hydra.run.dir={home / 'trained'}"], home)
    evaluate = ["eval", "--all-submodels", "--ckpt", str(home / "trained"), f"eval.test_subset={test_subset}",
                "eval.calib_batches=2"]  # the model and data are the run's
    out: dict = {"cores": cores, "platform": platform.platform(), "reps": reps, "overrides": args.overrides,
                 "eval": {"test_subset": test_subset, "runs": {1: [], 2: [], "1 thread": []}},
                 "train_epoch": {"train_subset": train_subset, "runs": {1: [], 2: []}}}
    procs = (2,) if args.smoke else (1, 2)
    for rep in range(reps):
        for n in procs:
            wall, text = run([*evaluate, f"trainer.devices={n}"], home)
            inner = seconds(r"evaluated \d+ sub-models in ([\d.]+)s", text)
            out["eval"]["submodels"] = int(seconds(r"evaluated (\d+) sub-models in", text))
            out["eval"]["runs"][n].append({"wall_s": wall, "eval_s": inner})
            print(f"eval --all-submodels, {n} process(es): {inner:.1f}s evaluating, {wall:.1f}s in all")
        if not args.smoke:
            wall, text = run([*evaluate, "trainer.devices=1"], home, threads=1)
            inner = seconds(r"evaluated \d+ sub-models in ([\d.]+)s", text)
            out["eval"]["runs"]["1 thread"].append({"wall_s": wall, "eval_s": inner})
            print(f"eval --all-submodels, 1 process with 1 thread (control): {inner:.1f}s evaluating")
        for n in procs:
            wall, text = run([*base, f"data.train_subset={train_subset}", "trainer.epochs=1",
                              f"trainer.devices={n}", f"hydra.run.dir={home / f'epoch-{n}-{rep}'}"], home)
            inner = seconds(r"trained \d+ steps in ([\d.]+)s", text)
            out["train_epoch"]["runs"][n].append({"wall_s": wall, "train_s": inner})
            print(f"one epoch ({train_subset} images), {n} process(es): {inner:.1f}s training, "
                  f"{wall:.1f}s in all")
    if args.smoke:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out} (smoke run: no speed-ups)")
        return 0

    def speedup(part: str, key: str, slow=1, fast=2) -> float:
        return (statistics.median(r[key] for r in out[part]["runs"][slow])
                / statistics.median(r[key] for r in out[part]["runs"][fast]))

    out["eval"]["speedup"] = speedup("eval", "eval_s")
    out["eval"]["speedup_wall"] = speedup("eval", "wall_s")
    out["eval"]["threads_speedup"] = speedup("eval", "eval_s", "1 thread", 1)
    out["train_epoch"]["speedup"] = speedup("train_epoch", "train_s")
    out["train_epoch"]["speedup_wall"] = speedup("train_epoch", "wall_s")
    print("\n| | target | 2 processes vs 1 (speed-up) | whole command |\n|---|---|---|---|")
    ok = out["eval"]["speedup"] >= 1.5
    print(f"| eval --all-submodels ({out['eval']['submodels']} sub-models) | >= 1.5x | {out['eval']['speedup']:.2f}x "
          f"{'PASS' if ok else 'FAIL'} | {out['eval']['speedup_wall']:.2f}x |")
    print(f"| one training epoch, same global batch | reported | {out['train_epoch']['speedup']:.2f}x | "
          f"{out['train_epoch']['speedup_wall']:.2f}x |")
    print(f"\ncontrol: one eval process with {cores} threads is {out['eval']['threads_speedup']:.2f}x faster than "
          f"with 1 thread (the parallel speed this machine gives)")
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
