"""``sortednet eval``: the task's metric (accuracy, F1, perplexity), FLOPs, parameters and latency of
each sub-model of a trained run."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..engine import autocast, calibration_batches, evaluate, latency_ms
from ..flops import measure
from ..nest import call, use
from ..report import pareto_front, results_table, write_results
from ..tasks import move
from .loaded import load_run


def run(cfg: DictConfig, console: Console | None = None) -> list[dict]:
    console = console or Console()
    r = load_run(cfg)
    subs = r.grid.submodels() if cfg.all_submodels else list(dict.fromkeys([r.grid.smallest, r.grid.largest]))
    e, data, task = cfg.eval, r.data, r.data.task
    calib = calibration_batches(r.model, task, data.calib, e.calib_batch_size, e.calib_batches, cfg.seed,
                                r.device, data.collate)
    test = torch.utils.data.DataLoader(data.test, batch_size=e.batch_size, num_workers=cfg.trainer.num_workers,
                                       collate_fn=data.collate)
    example = move(data.example(), r.device)
    timed = _repeat(example, e.latency.batch_size)
    console.print(f"[bold]sortednet eval[/] {r.run_dir} ({r.ckpt.name}): {len(subs)} of {len(r.grid)} sub-models "
                  f"on {len(data.test)} test examples ({task.metric}), "
                  + (f"BatchNorm recalibrated on {len(calib)} batches, " if calib else "")
                  + f"device={r.device.type}")

    rows, metric, higher = [], task.metric, task.higher_is_better
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        job = bar.add_task("evaluating", total=len(subs))
        for sub in subs:
            bar.update(job, description=f"evaluating {sub.name}")
            cost = measure(r.model, sub, example)
            value = evaluate(r.model, task, sub, calib, test, r.device, r.amp)
            with torch.no_grad(), use(r.model, sub), autocast(r.device, r.amp):
                ms = latency_ms(lambda: call(r.model, timed), r.device, e.latency.warmup, e.latency.reps)
            rows.append({"name": sub.name, "dims": sub.as_dict(), metric: value, "flops": cost.flops,
                         "params": cost.params, "latency_ms": ms, "full": sub == r.grid.largest})
            bar.advance(job)

    full = next((row[metric] for row in rows if row["full"]), None)
    if full is None:
        full = (max if higher else min)(row[metric] for row in rows)
    for row in rows:  # relative to the full model: higher is better either way (perplexity: full / sub)
        row[f"rel_{metric}"] = (100.0 * row[metric] / full if higher else 100.0 * full / row[metric]) \
            if full and row[metric] else None
    for row, on_front in zip(rows, pareto_front(rows, metric, higher)):
        row["pareto"] = on_front
    title = f"{r.cfg.model.name} on {data.name}: {len(rows)} sub-models, FLOPs per {data.unit}"
    console.print(results_table(rows, metric, title=title, higher_is_better=higher))
    # The whole grid goes to eval/ (what export chooses from); a partial evaluation never replaces it.
    out = r.run_dir / "eval" if cfg.all_submodels else r.run_dir / "eval" / "largest-smallest"
    paths = write_results(rows, out, metric, higher, title=title)
    worst = (min if higher else max)(rows, key=lambda row: row[metric])
    rel = worst[f"rel_{metric}"]
    relative = f" = {rel:.1f}% of full" if rel is not None else ""
    console.print(f"full model {metric} {full:.2f}; weakest sub-model {worst['name']} {worst[metric]:.2f}{relative}. "
                  f"FLOPs = 2 x multiply-adds per {data.unit}.")
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows


def _repeat(example, n: int):
    """``example`` (a batch of one) repeated to a batch of ``n``."""
    if isinstance(example, dict):
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in example.items()}
    return example.expand(n, *example.shape[1:]).contiguous()
