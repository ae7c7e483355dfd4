"""``sortednet eval``: accuracy, FLOPs, parameters and latency of each sub-model of a trained run."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..engine import autocast, calibration_batches, evaluate, latency_ms
from ..flops import measure
from ..nest import use
from ..report import pareto_front, results_table, write_results
from .loaded import load_run


def run(cfg: DictConfig, console: Console | None = None) -> list[dict]:
    console = console or Console()
    r = load_run(cfg)
    subs = r.grid.submodels() if cfg.all_submodels else list(dict.fromkeys([r.grid.smallest, r.grid.largest]))
    e = cfg.eval
    calib = calibration_batches(r.model, r.data.calib, cfg.eval.calib_batch_size, cfg.eval.calib_batches,
                                cfg.seed, r.device)
    test = torch.utils.data.DataLoader(r.data.test, batch_size=e.batch_size, num_workers=cfg.trainer.num_workers)
    example = r.data.test[0][0].unsqueeze(0).to(r.device)
    timed = example.expand(e.latency.batch_size, *example.shape[1:]).contiguous()
    console.print(f"[bold]sortednet eval[/] {r.run_dir} ({r.ckpt.name}): {len(subs)} of {len(r.grid)} sub-models "
                  f"on {len(r.data.test)} test images, BatchNorm recalibrated on {len(calib)} batches, "
                  f"device={r.device.type}")

    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("evaluating", total=len(subs))
        for sub in subs:
            bar.update(task, description=f"evaluating {sub.name}")
            cost = measure(r.model, sub, example)
            acc = evaluate(r.model, sub, calib, test, r.device, r.amp)
            with torch.no_grad(), use(r.model, sub), autocast(r.device, r.amp):
                ms = latency_ms(lambda: r.model(timed), r.device, e.latency.warmup, e.latency.reps)
            rows.append({"name": sub.name, "dims": sub.as_dict(), "accuracy": acc, "flops": cost.flops,
                         "params": cost.params, "latency_ms": ms, "full": sub == r.grid.largest})
            bar.advance(task)

    full = next((row["accuracy"] for row in rows if row["full"]), max(row["accuracy"] for row in rows))
    for row in rows:
        row["rel_accuracy"] = 100.0 * row["accuracy"] / full if full else None
    for row, on_front in zip(rows, pareto_front(rows)):
        row["pareto"] = on_front
    title = f"{r.cfg.model.name} on {r.data.name}: {len(rows)} sub-models"
    console.print(results_table(rows, title=title))
    # The whole grid goes to eval/ (what export chooses from); a partial evaluation never replaces it.
    out = r.run_dir / "eval" if cfg.all_submodels else r.run_dir / "eval" / "largest-smallest"
    paths = write_results(rows, out, title=title)
    worst = min(rows, key=lambda row: row["accuracy"])
    relative = f" = {worst['rel_accuracy']:.1f}% of full" if worst["rel_accuracy"] is not None else ""
    console.print(f"full model {full:.2f}%; lowest sub-model {worst['name']} {worst['accuracy']:.2f}%{relative}. "
                  "FLOPs = 2 x multiply-adds per sample.")
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows
