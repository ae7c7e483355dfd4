"""Start-up: how long a user waits for the first line of output, measured on whole processes.

Usage::

    .venv/bin/python benchmarks/startup.py [--reps N] [--out FILE.json]
    make bench                       # run.py, mobilenet.py, encoders.py, distributed.py, then this

Each measurement starts ``python -m sortedcli ...`` in a fresh interpreter (the user's environment,
thread settings untouched) with stdout and stderr on one pipe and takes the time from the start to
the first byte of output, and to the end of the process:

1. **a rejected flag** (target: first output < 2 s): ``sortednet export --budget 2`` in an empty folder,
   which must end with exit status 2 and ``sortednet: error: --budget ...``;
2. **train's first line** (target < 3 s): a 2-step ``train`` of ``resnet_tiny`` on the in-memory digits
   (the first line comes before torch is imported, so the model does not matter);
3. **submodels of ResNet-50** (reported: the whole command): ``sortednet submodels model=resnet50
   'dims=[width,depth]'``, the 160-member grid with parameters and FLOPs.

Each is repeated ``--reps`` times; the median is reported and every repetition is kept in the JSON,
beside the load average before and after (``os.getloadavg``): on a shared 2-core machine the same
command takes twice as long when another job runs.

``--quick`` (what the test suite runs, so that a change of the CLI cannot break the benchmark unseen):
each case once, ``submodels`` of ``resnet_tiny`` (40 sub-models) instead of ResNet-50's, results to
``--out`` only. A case checks the exit status, a fragment of the output and, for ``submodels``, the
number of sub-models read from the output (:func:`submodel_count`: "160 sub-models." became "160
distinct sub-models." and the benchmark, which wanted the old text, failed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SORTEDNET = [sys.executable, "-m", "sortedcli"]
CASES = {  # name: (args, expected exit status, text the output must hold or the number of sub-models
    #                  it must list, target for the first output)
    "rejected flag: export --budget 2": (["export", "--budget", "2"], 2, "sortednet: error: --budget", 2.0),
    "train: first line": (["train", "model=resnet_tiny", "data=digits", "trainer.max_steps=2", "trainer.batch_size=32",
                           "trainer.epoch_eval=false", "dims.width.levels=[0.5,1.0]"], 0, "sortednet: training", 3.0),
    "submodels resnet50 width x depth": (["submodels", "model=resnet50", "dims=[width,depth]"], 0, 160, None),
}
QUICK = {"submodels resnet50 width x depth": ("submodels resnet_tiny width x depth", (
    ["submodels", "model=resnet_tiny", "dims=[width,depth]"], 0, 40, None))}
SUBMODELS = re.compile(r"^\s*(\d+)\s+(?:[a-z]+\s+)?sub-models\b", re.MULTILINE)


def submodel_count(output: str) -> int | None:
    """The number of sub-models ``sortednet submodels`` says it listed ("160 sub-models." or "160
    distinct sub-models (8 duplicates dropped ...)"), or None when the output says none."""
    found = SUBMODELS.findall(output)
    return int(found[-1]) if found else None


def check(cmd: list[str], code: int, out: str, want_code: int, want: str | int) -> int | None:
    """Exit with the command's output unless it ended as the case expects; the sub-model count, if any."""
    count = submodel_count(out)
    ok = code == want_code and (count == want if isinstance(want, int) else want in out)
    if not ok:
        what = f"{want} sub-models" if isinstance(want, int) else repr(want)
        raise SystemExit(f"sortednet {' '.join(cmd)}: exit {code} (want {want_code}), output without {what} "
                         f"(read: {count}):\n{out[-2000:]}")
    return count


def timed(args: list[str], cwd: Path) -> tuple[float, float, int, str]:
    """``(seconds to the first byte of output, seconds to the end, exit status, output)``."""
    env = {**os.environ, "COLUMNS": "200"}
    start = time.perf_counter()
    p = subprocess.Popen([*SORTEDNET, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = p.stdout.read(1)
    first_at = time.perf_counter() - start
    rest = p.stdout.read()
    code = p.wait()
    return first_at, time.perf_counter() - start, code, (first + rest).decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-startup-cpu.json")
    parser.add_argument("--quick", action="store_true",
                        help="one repetition each, submodels of resnet_tiny instead of resnet50 (the test suite's run)")
    args = parser.parse_args()
    cases = dict(CASES)
    if args.quick:
        args.reps = 1
        cases = dict(QUICK.get(name, (name, case)) for name, case in CASES.items())
    load_before = os.getloadavg()
    results = {}
    for name, (cmd, want_code, want, target) in cases.items():
        reps = []
        for _ in range(args.reps):
            with tempfile.TemporaryDirectory(prefix="sortednet-startup-") as tmp:
                first, total, code, out = timed(cmd, Path(tmp))
            count = check(cmd, code, out, want_code, want)
            reps.append({"first_output_s": round(first, 3), "total_s": round(total, 3)})
        first = statistics.median(r["first_output_s"] for r in reps)
        total = statistics.median(r["total_s"] for r in reps)
        results[name] = {"command": "sortednet " + " ".join(cmd), "first_output_s": first, "total_s": total,
                         "target_first_output_s": target,
                         "pass": None if target is None else first < target, "reps": reps}
        if isinstance(want, int):
            results[name]["submodels"] = count
    load_after = os.getloadavg()
    print(f"{'what':<36} {'first output':>12} {'total':>8}  target")
    for name, r in results.items():
        target = "-" if r["target_first_output_s"] is None else (
            f"< {r['target_first_output_s']:g} s {'PASS' if r['pass'] else 'FAIL'}")
        print(f"{name:<36} {r['first_output_s']:>10.2f} s {r['total_s']:>6.2f} s  {target}")
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} CPUs")
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "reps": args.reps, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
