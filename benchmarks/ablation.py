"""The training-method ablation at equal wall time: each method gets the same seconds of training, so a
method that trains 4 sub-models a step gets fewer steps than one that trains 1.

Usage::

    .venv/bin/python benchmarks/ablation.py [--recipe default] [--seeds 0 1] [--budget 258] [--budget-x 1 2]
        [--methods NAME ...] [--runs DIR] [--out DIR] [--eval-subset N] [--no-standalone]
        [--calibration FILE] [--dry-run] [--set KEY=VALUE ...]
    make ablation [SEEDS="0 1"] [BUDGET_X="1 2"] [METHODS="full sortednet lossaware"]

Everything goes through the CLI a user runs (``python -m sortedcli``), one process per step, each
one's output appended to ``RUNS/logs/<step>.log``; this script prints one line per step, so it suits
``nohup make ablation > ablation.log &``. It is resumable: run it again and it skips every run whose
``eval/results.json`` exists, resumes a training that was cut off (``train --resume``), evaluates one
that finished, and rewrites the table. ``--set key=value ...`` overrides go to every ``train`` (the
tests shrink the recipe with them).

1. **Calibration** (per method, cached in ``RUNS/calibration.json``): a short run of the recipe with
   the method's overrides, ``trainer.steps=--calib-steps`` (100), ``trainer.log_every=10``, no
   epoch-end evaluation; its seconds per optimizer step are read from ``metrics.jsonl`` (``time`` and
   ``step``) between the first logged line (after 10 warm-up steps) and the last. 100 steps rather
   than 40 because a g=1 method's step costs what its random draw costs (width 0.1 or 1.0): the mean
   of 90 draws is within ~10% of the grid's. A cached method is measured again when its overrides
   change; delete the file to measure all again (the numbers are this machine's, at its load).
   ``--calibration FILE`` takes the seconds per step from FILE instead (nothing is timed): the same
   format, ``{"steps_per_epoch": 421, "methods": {"full": {"sec_per_step": 0.2}, ...}}``, or
   ``{"methods": {"full": 0.2, ...}}``.
2. **Standalone corners** (``--standalone``, the default): the recipe's corner sub-models trained
   alone (``standalone=[...]``, plain training of that architecture) at the recipe's own length
   (``trainer.epochs``: equal steps to the recipe, not equal time), once per seed, into
   ``RUNS/alone-seedS/standalone/NAME``, each then evaluated once (``eval/results.json``, the same test
   images and eval settings as the sorted runs). They are the yardstick: each sorted run's corners as %
   of the same seed's standalone accuracy (a run evaluated before its corners existed takes them from
   those evals).
3. **Each method x budget multiple x seed**: ``trainer.steps = round(budget x multiple / sec_per_step)``,
   ``seed=S``, no epoch-end evaluation, into ``RUNS/<x>x-seed<S>/<method>``; then ``sortednet eval
   --all-submodels --ckpt RUN standalone=RUNS/alone-seedS`` on the first ``--eval-subset`` test images
   (BatchNorm recalibrated on 5 x 128 training images per sub-model, as ``make ablation-tiny``).
4. **Report** into ``--out``: ``table.md`` (per method and budget: mean +- spread over the seeds of the
   full model, the weakest sub-model and its % of full, the mean over the grid, the corners' % of
   standalone, steps, epochs, measured training seconds; the gap to plain training, ``full``, at the
   same budget), ``results.json`` (every raw number) and ``compare/<x>x/`` (``sortednet compare`` of
   the first seed's run of every method: table and plot). Spread = half the range over the seeds
   (with 2 seeds: half their difference); a difference is marked ``*`` only when it exceeds the sum of
   the two spreads (the seeds' ranges do not overlap); with one seed nothing is marked.

Methods (``--methods``): full, sortednet (the paper's rule, g=1: the ``default`` recipe until this study),
sortednet-largest (g=1 + the largest every step), sandwich, sandwich-distill, weighted, weighted-distill,
lossaware, lossaware-distill (weighted and lossaware: g=3 + the largest). ``progressive`` is left out: its step
trains only the largest for the first 10% of the schedule, so a short calibration run does not
measure what its steps cost over a whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SORTEDNET = [sys.executable, "-m", "sortedcli"]

#: name: the overrides that make the method from the recipe (README, Training methods)
METHODS = {
    "full": ["sampler=full"],
    "sortednet": ["sampler=sortednet"],
    "sortednet-largest": ["sampler=sortednet", "sampler.largest=true"],
    "sandwich": ["sampler=sandwich"],
    "sandwich-distill": ["sampler=sandwich", "distill.enabled=true"],
    "weighted": ["sampler=weighted", "sampler.g=3", "sampler.largest=true"],
    "weighted-distill": ["sampler=weighted", "sampler.g=3", "sampler.largest=true", "distill.enabled=true"],
    "lossaware": ["sampler=lossaware", "sampler.g=3", "sampler.largest=true"],
    "lossaware-distill": ["sampler=lossaware", "sampler.g=3", "sampler.largest=true", "distill.enabled=true"],
}
#: sub-models one step trains, for the table
PER_STEP = {"full": "1", "sortednet": "1", "sortednet-largest": "2", "sandwich": "4", "sandwich-distill": "4",
            "weighted": "4", "weighted-distill": "4", "lossaware": "4", "lossaware-distill": "4"}
#: the corners of each recipe's grid trained alone (the smallest, the widest shallow, the narrowest deep,
#: two in the middle, the full model)
CORNERS = {
    "default": ["width0.1-depth1", "width1-depth1", "width0.1-depth8", "width0.5-depth4", "width0.3-depth3",
                "width1-depth8"],
    "ablation_tiny": ["width0.1-depth1", "width1-depth1", "width0.1-depth4", "width0.5-depth2", "width0.3-depth3",
                      "width1-depth4"],
}
BUDGET_S = 258.0  # training seconds of `make run` when the study began (g=1, 8 epochs: 258 s on 54k images, 2 CPU cores)
#: every training run of the study (calibration too): no epoch-end evaluation, the same logging
TRAIN_FLAGS = ["trainer.epoch_eval=false", "trainer.log_every=10", "trainer.tensorboard=false"]
EVAL_FLAGS = ["eval.calib_batches=5", "eval.calib_batch_size=128", "eval.latency.reps=1", "eval.latency.warmup=0"]
WARMUP_STEPS = 10  # calibration: the first logged line (step 10) is where the clock starts


class Study:
    def __init__(self, args):
        self.args, self.recipe, self.runs, self.out = args, args.recipe, Path(args.runs), Path(args.out)
        self.dry = args.dry_run
        self.logs = self.runs / "logs"
        self.done = 0

    # --- processes ---------------------------------------------------------------------------------

    def sortednet(self, args: list[str], log: str) -> str:
        """Run ``sortednet ARGS`` (printed; appended with its output to ``RUNS/logs/LOG.log``); its stdout.
        A failure stops the study with the log's tail."""
        line = "sortednet " + " ".join(shlex.quote(str(a)) for a in args)
        if self.dry:
            print(f"  $ {line}")
            return ""
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "COLUMNS": "200",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        path = self.logs / f"{log}.log"
        with open(path, "ab") as f:  # the output goes straight to the log: `tail -f` it while a run trains
            f.write(f"\n$ {line}\n".encode())
            f.flush()
            start = f.tell()
            p = subprocess.run([*SORTEDNET, *map(str, args)], cwd=Path.cwd(), env=env, stdout=f,
                               stderr=subprocess.STDOUT)
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {line}\n{text[-3000:]}\n(log: {path})")
        return text

    def train_args(self, method: str | None, run_dir: Path, *extra: str) -> list[str]:
        return ["train", "--recipe", self.recipe, f"hydra.run.dir={run_dir}", *TRAIN_FLAGS,
                *(METHODS[method] if method else []), *extra, *self.args.overrides]

    # --- 1. calibration ----------------------------------------------------------------------------

    def calibration(self) -> dict:
        """``{"steps_per_epoch": N or None, "methods": {name: {"sec_per_step": s, ...}}}``: injected,
        cached, or measured now (the missing or changed methods)."""
        if self.args.calibration:
            doc = json.loads(Path(self.args.calibration).read_text())
            methods = {m: v if isinstance(v, dict) else {"sec_per_step": float(v)}
                       for m, v in doc.get("methods", {}).items()}
            missing = [m for m in self.args.methods if m not in methods]
            if missing:
                raise SystemExit(f"--calibration {self.args.calibration} has no seconds per step for "
                                 f"{', '.join(missing)}")
            print(f"calibration: from {self.args.calibration} (nothing timed)")
            return {"steps_per_epoch": doc.get("steps_per_epoch"), "methods": methods, "source": "injected"}
        path = self.runs / "calibration.json"
        doc = json.loads(path.read_text()) if path.is_file() else {"methods": {}}
        doc.setdefault("methods", {})
        steps = self.args.calib_steps
        for m in self.args.methods:
            overrides = [*METHODS[m], *self.args.overrides]
            known = doc["methods"].get(m)
            if known and known.get("recipe") == self.recipe and known.get("overrides") == overrides \
                    and known.get("steps") == steps:
                print(f"calibration {m}: {known['sec_per_step']:.4f} s/step (cached in {path})")
                continue
            run_dir = self.runs / "calibration" / m
            print(f"calibration {m}: {steps} steps" + ("" if self.dry else " ..."), flush=True)
            if self.dry:
                self.sortednet(self.train_args(m, run_dir, "seed=0", f"trainer.steps={steps}"), f"calibration-{m}")
                continue
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an earlier, cut-off or outdated calibration: timed again whole
            text = self.sortednet(self.train_args(m, run_dir, "seed=0", f"trainer.steps={steps}"),
                                  f"calibration-{m}")
            records = [r for r in read_metrics(run_dir) if "loss" in r]
            start = next((r for r in records if r["step"] >= WARMUP_STEPS), None)
            if start is None or records[-1]["step"] <= start["step"]:
                raise SystemExit(f"calibration {m}: too few logged steps in {run_dir}/metrics.jsonl "
                                 f"(--calib-steps {steps} must exceed {WARMUP_STEPS + 10})")
            end = records[-1]
            sec = (end["time"] - start["time"]) / (end["step"] - start["step"])
            examples = re.search(r"\((\d+) examples\)", text)
            batch = read_config(run_dir)["trainer"]["batch_size"]
            if examples:
                doc["steps_per_epoch"] = int(examples.group(1)) // int(batch)
            doc["methods"][m] = {"sec_per_step": sec, "from_step": start["step"], "to_step": end["step"],
                                 "seconds": end["time"] - start["time"], "steps": steps, "recipe": self.recipe,
                                 "overrides": overrides, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "load_average": os.getloadavg()[0]}
            self.runs.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"calibration {m}: {sec:.4f} s/step (steps {start['step']}-{end['step']})", flush=True)
        doc["source"] = str(path)
        return doc

    # --- 2. standalone corners ---------------------------------------------------------------------

    def standalone(self, seed: int) -> Path:
        alone = self.runs / f"alone-seed{seed}"
        corners = self.args.corners
        todo = []
        for name in corners:
            run = alone / "standalone" / name
            state = run_state(run)
            if state == "trained" or (self.dry and run.exists()):
                continue
            if state == "partial":
                print(f"standalone {name} seed {seed}: resuming {run}", flush=True)
                self.sortednet(["train", "--resume", run], f"alone-seed{seed}-{name}")
            else:
                if run.exists() and not self.dry:
                    shutil.rmtree(run)  # started but no checkpoint yet: trained again from the start
                todo.append(name)
        if todo:
            print(f"standalone seed {seed}: {', '.join(todo)} trained alone at the recipe's length", flush=True)
            # hydra.output_subdir=null: the folder holds only standalone/, so a later call can add to it
            self.sortednet(self.train_args(None, alone, f"seed={seed}", f"standalone=[{','.join(todo)}]",
                                           "hydra.output_subdir=null"), f"alone-seed{seed}")
        elif not self.dry:
            print(f"standalone seed {seed}: all {len(corners)} trained (skipped)")
        for name in corners:  # each alone evaluated once, as the sorted runs are (the same test images)
            run = alone / "standalone" / name
            if not (run / "eval" / "results.json").is_file():
                self.sortednet(["eval", "--all-submodels", "--ckpt", run, *self.eval_args()], f"alone-seed{seed}-{name}")
        return alone

    def eval_args(self) -> list[str]:
        return [f"eval.test_subset={self.args.eval_subset}", f"eval.val_subset={self.args.val_subset}", *EVAL_FLAGS]

    # --- 3. the runs -------------------------------------------------------------------------------

    def plan(self, cal: dict) -> list[dict]:
        out = []
        for x in self.args.budget_x:
            for seed in self.args.seeds:
                for m in self.args.methods:
                    sec = cal["methods"].get(m, {}).get("sec_per_step")
                    budget = self.args.budget * x
                    steps = max(1, round(budget / sec)) if sec else None
                    per = cal.get("steps_per_epoch")
                    out.append({"method": m, "seed": seed, "budget_x": x, "budget_s": budget, "steps": steps,
                                "sec_per_step": sec, "epochs": steps / per if steps and per else None,
                                "run": self.runs / f"{x:g}x-seed{seed}" / m})
        return out

    def train_and_eval(self, r: dict, alone: Path | None, total: int) -> None:
        self.done += 1
        run, label = r["run"], f"{r['budget_x']:g}x-seed{r['seed']}-{r['method']}"
        epochs = f" ({r['epochs']:.2f} epochs)" if r["epochs"] else ""
        head = f"[{self.done}/{total}] {r['method']} {r['budget_x']:g}x seed {r['seed']}: "
        if (run / "eval" / "results.json").is_file():
            print(head + "evaluated (skipped)")
            return
        if r["steps"] is None:
            print(head + f"trainer.steps = round({r['budget_s']:g} s / s per step), calibrated first")
            return
        state = run_state(run)
        if state == "partial":
            print(head + f"resuming the training of {run}", flush=True)
            self.sortednet(["train", "--resume", run], label)
        elif state != "trained":
            if run.exists() and not self.dry:
                shutil.rmtree(run)  # started but no checkpoint: trained again from the start
            print(head + f"{r['steps']} steps{epochs} in {r['budget_s']:g} s at {r['sec_per_step']:.4f} s/step",
                  flush=True)
            self.sortednet(self.train_args(r["method"], run, f"seed={r['seed']}", f"trainer.steps={r['steps']}"),
                           label)
        self.sortednet(["eval", "--all-submodels", "--ckpt", run, *self.eval_args(),
                        *([f"standalone={alone}"] if alone else [])], label)
        if not self.dry:
            print(head + f"trained in {train_seconds(run)[0]:.1f} s, evaluated", flush=True)

    def run(self) -> int:
        a = self.args
        print(f"ablation at equal time: recipe {self.recipe}, methods {' '.join(a.methods)}, seeds "
              f"{' '.join(map(str, a.seeds))}, budget {a.budget:g} s x {' '.join(f'{x:g}' for x in a.budget_x)}, "
              f"runs {self.runs}, out {self.out}" + (" (dry run: commands only)" if self.dry else ""), flush=True)
        cal = self.calibration()
        plan = self.plan(cal)
        print("plan: method, budget, seconds per step, trainer.steps, epochs")
        for r in plan:
            if r["seed"] == a.seeds[0]:
                sec = "calibrated first" if r["sec_per_step"] is None else f"{r['sec_per_step']:.4f} s/step"
                print(f"  {r['method']:<18} {r['budget_x']:g}x = {r['budget_s']:g} s  {sec:>16}  "
                      f"{r['steps'] or '-':>6} steps  " + (f"{r['epochs']:.2f} epochs" if r["epochs"] else ""))
        print(f"  (the same for every seed: {', '.join(map(str, a.seeds))})", flush=True)
        alone = {s: self.standalone(s) if a.standalone else None for s in a.seeds}
        for r in plan:
            self.train_and_eval(r, alone[r["seed"]], len(plan))
        if self.dry:
            for x in a.budget_x:
                runs = [str(r["run"]) for r in plan if r["budget_x"] == x and r["seed"] == a.seeds[0]]
                if len(runs) > 1:
                    self.sortednet(["compare", *runs, f"out={self.out / 'compare' / f'{x:g}x'}"], "compare")
            print(f"then: {self.out}/table.md and results.json")
            return 0
        self.report(plan, cal, alone)
        return 0

    # --- 4. report ---------------------------------------------------------------------------------

    def report(self, plan: list[dict], cal: dict, alone: dict) -> None:
        a = self.args
        records = []
        for r in plan:
            results = r["run"] / "eval" / "results.json"
            if not results.is_file():
                continue
            seconds, segments = train_seconds(r["run"])
            numbers = summarize(json.loads(results.read_text()), a.corners)
            if alone.get(r["seed"]):
                fill_standalone(numbers, alone[r["seed"]])
            records.append({**{k: v for k, v in r.items() if k != "run"}, "run": str(r["run"]),
                            "train_seconds": seconds, "train_segments": segments,
                            "time_vs_budget": seconds / r["budget_s"] if seconds else None, **numbers})
        groups = {}
        for rec in records:
            groups.setdefault((rec["method"], rec["budget_x"]), []).append(rec)
        summary = add_gaps([aggregate(m, x, recs, a.corners) for (m, x), recs in groups.items()])
        standalone = {}
        if a.standalone:
            for rec in records:
                for name, c in rec["corners"].items():
                    if c.get("standalone") is not None:
                        standalone.setdefault(name, {})[rec["seed"]] = c["standalone"]
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"recipe": self.recipe, "budget_s": a.budget, "budget_x": a.budget_x, "seeds": a.seeds,
               "methods": a.methods, "overrides": a.overrides, "eval_subset": a.eval_subset,
               "corners": a.corners if a.standalone else [], "standalone_length": "the recipe's trainer.epochs",
               "standalone": standalone, "calibration": cal, "spread": "half the range over the seeds",
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary, "runs": records}
        (self.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (self.out / "table.md").write_text(table_md(doc))
        print(f"wrote {self.out / 'table.md'} and {self.out / 'results.json'} ({len(records)} of {len(plan)} runs)")
        for x in a.budget_x:
            runs = [r["run"] for r in plan if r["budget_x"] == x and r["seed"] == a.seeds[0]
                    and (r["run"] / "eval" / "results.json").is_file()]
            if len(runs) < 2:
                continue
            out = self.out / "compare" / f"{x:g}x"
            if out.exists():
                shutil.rmtree(out)  # this script's own output, made again from the runs
            self.sortednet(["compare", *runs, f"out={out}"], "compare")
            print(f"wrote {out}/ (sortednet compare, seed {a.seeds[0]})")


# --- reading runs --------------------------------------------------------------------------------

def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_config(run: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))


def run_state(run: Path) -> str:
    """``new`` (no folder), ``broken`` (a folder without a checkpoint), ``partial`` (a checkpoint short of
    the run's length: ``trainer.steps``, or ``trainer.epochs`` ended) or ``trained``."""
    if not run.exists():
        return "new"
    latest = run / "checkpoints" / "latest"
    if not latest.is_file() or not (run / "config.yaml").is_file():
        return "broken"
    step = int(latest.read_text().strip().rpartition("-")[2])
    trainer = read_config(run)["trainer"]
    if trainer.get("steps"):
        return "trained" if step >= trainer["steps"] else "partial"
    ends = [r for r in read_metrics(run) if "loss" not in r and "epoch" in r and r.get("step") == step]
    return "trained" if any(r["epoch"] >= trainer["epochs"] for r in ends) else "partial"


def train_seconds(run: Path) -> tuple[float | None, int]:
    """Training wall time from ``metrics.jsonl`` (each process's clock starts at 0: a resumed run's time
    is the sum of its segments, steps trained again after a cut counted twice) and the segments."""
    total, last, segments = 0.0, None, 0
    for r in read_metrics(run):
        t = r.get("time")
        if t is None:
            continue
        if last is None or t < last:
            segments += 1
            total += last or 0.0
        last = t
    return (total + last if last is not None else None), segments


def summarize(doc: dict, corners: list[str]) -> dict:
    """The numbers of one eval's results.json: full model, weakest, mean over the grid, corners."""
    metric, rows = doc["metric"], doc["rows"]
    full = next(r for r in rows if r.get("full"))
    weakest = min(rows, key=lambda r: r[metric])
    by = {r["name"]: r for r in rows}
    return {"metric": metric, "submodels": len(rows), "full": full[metric], "weakest": weakest[metric],
            "weakest_name": weakest["name"],
            "weakest_rel": 100 * weakest[metric] / full[metric] if full[metric] else None,
            "mean": sum(r[metric] for r in rows) / len(rows),
            "corners": {n: {"value": by[n][metric], "standalone": by[n].get("standalone"),
                            "rel_standalone": by[n].get("rel_standalone")} for n in corners if n in by}}


def fill_standalone(numbers: dict, alone: Path) -> None:
    """A run evaluated before its seed's corners were trained alone: each corner's standalone accuracy
    from the corner's own eval (``ALONE/standalone/NAME/eval/results.json``, the same test images and
    BatchNorm recalibration as ``eval standalone=ALONE`` uses), and the corner as % of it."""
    for name, c in numbers["corners"].items():
        if c.get("standalone") is not None:
            continue
        path = alone / "standalone" / name / "eval" / "results.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        value = next(r for r in doc["rows"] if r.get("full"))[doc["metric"]]
        c["standalone"] = value
        c["rel_standalone"] = 100 * c["value"] / value if value else None


def stat(values: list[float]) -> dict:
    """Mean and spread (half the range) over the seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "spread": None, "values": []}
    return {"mean": sum(values) / len(values), "spread": (max(values) - min(values)) / 2, "values": values}


def aggregate(method: str, x: float, recs: list[dict], corners: list[str]) -> dict:
    rel = {n: stat([r["corners"].get(n, {}).get("rel_standalone") for r in recs]) for n in corners}
    measured = [[c["rel_standalone"] for c in r["corners"].values() if c.get("rel_standalone") is not None]
                for r in recs]  # per seed: its corners' % of standalone
    per_seed_corner_mean = [sum(v) / len(v) for v in measured if v]
    per_seed_corner_min = [min(v) for v in measured if v]
    return {"method": method, "budget_x": x, "seeds": [r["seed"] for r in recs],
            "full": stat([r["full"] for r in recs]), "weakest": stat([r["weakest"] for r in recs]),
            "weakest_names": sorted({r["weakest_name"] for r in recs}),
            "weakest_rel": stat([r["weakest_rel"] for r in recs]), "mean": stat([r["mean"] for r in recs]),
            "corners_rel_standalone": rel, "corners_mean_rel": stat(per_seed_corner_mean),
            "corners_min_rel": stat(per_seed_corner_min), "steps": stat([r["steps"] for r in recs]),
            "epochs": stat([r["epochs"] for r in recs]), "train_seconds": stat([r["train_seconds"] for r in recs])}


def add_gaps(summary: list[dict]) -> list[dict]:
    """Each entry's gaps at the same budget: full model vs plain training (``full``), mean and weakest
    vs the paper's rule (``sortednet``); ``beyond_spread`` when the difference exceeds the sum of the
    two spreads (never with fewer than 2 seeds on either side)."""
    by = {(s["method"], s["budget_x"]): s for s in summary}
    for s in summary:
        for key, ref, field in (("vs_plain", "full", "full"), ("mean_vs_sortednet", "sortednet", "mean"),
                                ("weakest_vs_sortednet", "sortednet", "weakest")):
            other = by.get((ref, s["budget_x"]))
            if other is None or s[field]["mean"] is None or other[field]["mean"] is None:
                s[key] = None
                continue
            diff = s[field]["mean"] - other[field]["mean"]
            s[key] = {"diff": diff, "beyond_spread": len(s[field]["values"]) > 1 and len(other[field]["values"]) > 1
                      and abs(diff) > s[field]["spread"] + other[field]["spread"]}
    return summary


def pm(s: dict, digits: int = 2, exact: bool = False) -> str:
    """``mean ± spread``; ``exact`` (steps, epochs: set, not measured): no ``± 0``."""
    if s["mean"] is None:
        return "-"
    same = exact and s["spread"] == 0
    return f"{s['mean']:.{digits}f}" + (f" ± {s['spread']:.{digits}f}" if len(s["values"]) > 1 and not same else "")


def gap(g: dict | None) -> str:
    if g is None:
        return "-"
    return f"{g['diff']:+.2f}" + (" *" if g["beyond_spread"] else "")


def table_md(doc: dict) -> str:
    seeds, corners = doc["seeds"], doc["corners"]
    one = len(seeds) < 2
    lines = [f"# Training methods at equal wall time: recipe `{doc['recipe']}`", "",
             f"Budget {doc['budget_s']:g} s of training x {', '.join(f'{x:g}' for x in doc['budget_x'])}; seeds "
             f"{', '.join(map(str, seeds))}; eval on the first {doc['eval_subset']} test images. "
             "Each method's `trainer.steps` = budget / its calibrated seconds per step "
             f"(calibration: {doc['calibration'].get('source')}). Values: mean ± spread over the seeds, spread = "
             "half the range (with 2 seeds, half their difference). "
             + ("One seed: no spread, so no difference is marked." if one else
                "`*`: the difference exceeds the sum of the two spreads (the seeds' ranges do not overlap); an "
                "unmarked difference is within the seeds' noise."), ""]
    lines += ["| method | sub-models / step | budget | steps | epochs | train s | full model % | full vs plain "
              "(`full`), points | weakest % (sub-model) | weakest, % of full | weakest vs `sortednet`, points | "
              "mean of the grid % | mean vs `sortednet`, points | corners, % of standalone: mean / lowest |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in doc["summary"]:
        secs = pm(s["train_seconds"], 1 if (s["train_seconds"]["mean"] or 0) < 100 else 0)
        lines.append(
            f"| `{s['method']}` | {PER_STEP.get(s['method'], '?')} | {s['budget_x']:g}x | {pm(s['steps'], 0, True)} | "
            f"{pm(s['epochs'], 2, True)} | {secs} | {pm(s['full'])} | {gap(s['vs_plain'])} | "
            f"{pm(s['weakest'])} ({', '.join(s['weakest_names'])}) | {pm(s['weakest_rel'], 1)} | "
            f"{gap(s['weakest_vs_sortednet'])} | {pm(s['mean'])} | {gap(s['mean_vs_sortednet'])} | "
            + (f"{pm(s['corners_mean_rel'], 1)} / {pm(s['corners_min_rel'], 1)} |" if corners else "- |"))
    if corners:
        lines += ["", "Each corner as % of itself trained alone (same seed; standalone runs at the recipe's own "
                  "length, `trainer.epochs`: equal steps to the recipe, not equal time):", "",
                  "| method | budget | " + " | ".join(f"`{c}`" for c in corners) + " |",
                  "|---|---|" + "---|" * len(corners)]
        for s in doc["summary"]:
            lines.append(f"| `{s['method']}` | {s['budget_x']:g}x | "
                         + " | ".join(pm(s["corners_rel_standalone"][c], 1) for c in corners) + " |")
        lines += ["", "Standalone accuracy (%), per seed: " + "; ".join(
            f"`{c}` " + ", ".join(f"{v:.2f}" for _, v in sorted(doc["standalone"].get(c, {}).items()))
            for c in corners) + "."]
    lines += ["", "Steps: `trainer.steps` of the run; epochs: steps / steps per epoch; train s: the run's measured "
              "training wall time (`metrics.jsonl`), to set beside the budget. Weakest / mean: over every "
              "sub-model of the grid; the plain run's sub-models are its weights sliced after training.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="training seconds (default: make run's when the study began)")
    ap.add_argument("--budget-x", type=float, nargs="+", default=[1.0, 2.0], help="multiples of --budget")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME")
    ap.add_argument("--runs", type=Path, help="run folders (default runs/ablation-RECIPE)")
    ap.add_argument("--out", type=Path, help="table, JSON, plots (default docs/results/ablation-RECIPE)")
    ap.add_argument("--eval-subset", type=int, default=10000, help="test images per eval (10000: all)")
    ap.add_argument("--val-subset", type=int, default=1000, help="validation images per eval (unused here)")
    ap.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=True,
                    help="train the corners alone and show each run's corners as %% of them")
    ap.add_argument("--corners", nargs="+", help="sub-models trained alone (default: the recipe's six)")
    ap.add_argument("--calibration", type=Path, help="seconds per step from this JSON file (nothing timed)")
    ap.add_argument("--calib-steps", type=int, default=100, help="optimizer steps of each calibration run")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and step counts only")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="overrides for every train (calibration, standalone and method runs)")
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"--set takes key=value overrides, got: {' '.join(bad)}")
    args.runs = args.runs or Path("runs") / f"ablation-{args.recipe}"
    args.out = args.out or Path("docs/results") / f"ablation-{args.recipe}"
    if args.standalone and not args.corners:
        if args.recipe not in CORNERS:
            ap.error(f"no corners known for recipe {args.recipe}: pass --corners NAME ... or --no-standalone")
        args.corners = CORNERS[args.recipe]
    args.corners = args.corners or []
    if args.calib_steps <= WARMUP_STEPS + 10:
        ap.error(f"--calib-steps must exceed {WARMUP_STEPS + 10}")
    return Study(args).run()


if __name__ == "__main__":
    sys.exit(main())
