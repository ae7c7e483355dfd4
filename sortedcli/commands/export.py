"""``sortednet export --budget B``: the best sub-model within B x the full model's FLOPs, cut out."""

from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console

from .. import export
from ..build import plain
from ..errors import UsageError
from ..engine import calibration_batches
from ..flops import measure
from ..nest import check_equal, extract, recalibrate
from ..report import load_results
from .loaded import load_run


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UsageError(f"--budget must be a fraction of the full model's FLOPs in (0, 1], got {budget!r}")
    return float(budget)


def run(cfg: DictConfig, console: Console | None = None):
    console = console or Console()
    budget = check_budget(cfg.budget)
    r = load_run(cfg)
    example = r.data.test[0][0].unsqueeze(0).to(r.device)
    with console.status(f"measuring the FLOPs of {len(r.grid)} sub-models"):
        costs = {sub: measure(r.model, sub, example) for sub in r.grid}
    full = costs[r.grid.largest].flops
    fits = [sub for sub in r.grid if costs[sub].flops <= budget * full]
    if not fits:
        smallest = min(c.flops for c in costs.values()) / full
        raise UsageError(f"--budget {budget:g} is below the smallest sub-model ({smallest:.4f} of the full "
                         f"model's FLOPs): pass --budget {smallest:.4f} or more")

    accuracy = {}
    results = r.run_dir / "eval" / "results.json"
    if results.is_file():
        _, rows = load_results(results)
        accuracy = {row["name"]: row["accuracy"] for row in rows if row.get("accuracy") is not None}
    scored = [sub for sub in fits if sub.name in accuracy]
    if scored:
        chosen = max(scored, key=lambda s: (accuracy[s.name], -costs[s].flops))
        why = (f"the most accurate of the {len(scored)} evaluated sub-models within the budget "
               f"({accuracy[chosen.name]:.2f}% top-1, from {results})")
    else:
        chosen = max(fits, key=lambda s: (costs[s].flops, s.levels))
        why = (f"no eval results for the sub-models within the budget, so the largest one that fits "
               f"(run `sortednet eval --all-submodels` first to choose by accuracy)")

    calib = calibration_batches(r.model, r.data.calib, cfg.eval.calib_batch_size, cfg.eval.calib_batches,
                                cfg.seed, r.device)
    if calib:  # on the run's device (fp32), then everything else on the CPU
        recalibrate(r.model, chosen, calib)
    check_input = calib[0][:64].cpu() if calib else example.cpu()
    model, example = r.model.cpu(), example.cpu()
    small = extract(model, chosen, example)
    diff = check_equal(model, chosen, small, check_input)
    cost = costs[chosen]
    config = {
        "model": plain(r.cfg.model), "num_classes": r.data.num_classes, "in_channels": r.data.in_channels,
        "image_size": r.data.image_size, "submodel": chosen.as_dict(), "name": chosen.name,
        "flops": cost.flops, "params": cost.params, "full_flops": full,
        "full_params": costs[r.grid.largest].params, "budget": budget,
        "accuracy": accuracy.get(chosen.name), "full_accuracy": accuracy.get(r.grid.largest.name),
        "data": r.data.name, "mean": list(r.data.mean), "std": list(r.data.std),
        "checkpoint": str(r.ckpt),
    }
    folder = export.write(r.run_dir / "export" / f"budget-{budget:g}", small, config, example)
    console.print(f"[bold]sortednet export[/] budget {budget:g} x {full / 1e6:.1f} MFLOPs = "
                  f"{budget * full / 1e6:.1f} MFLOPs: {len(fits)} of {len(r.grid)} sub-models fit.")
    console.print(f"chose {chosen.name}: {cost.flops / 1e6:.1f} MFLOPs ({cost.flops / full:.1%} of full), "
                  f"{cost.params / 1e6:.2f} M params ({cost.params / config['full_params']:.1%}) - {why}.")
    console.print(f"BatchNorm recalibrated; cut-out model equals the sub-model (max |diff| {diff:.1e}).")
    console.print(f"wrote {folder}/ (model.safetensors, config.json, model.pt2)")
    return folder
