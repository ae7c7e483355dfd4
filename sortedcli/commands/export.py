"""``sortednet export --budget B``: the best sub-model within B x the full model's FLOPs, cut out.

Importing this module is cheap (torch and the rest are imported by :func:`run`), so that the CLI
refuses a budget outside (0, 1] with :func:`check_budget` before the heavy imports.
"""

from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console

from pathlib import Path

from ..errors import UsageError


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UsageError(f"--budget must be a fraction of the full model's FLOPs in (0, 1], got {budget!r}")
    return float(budget)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_size(value) -> int | None:
    """``export.max_shard_size`` in bytes (``5GB``, ``500MB``, ``2GiB`` or a number of bytes; None: the
    format's own default): the largest weights file of a Hugging Face export (``save_pretrained``)."""
    import re

    if value is None:
        return None
    m = None if isinstance(value, bool) else re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(value), re.I)
    size = int(float(m[1]) * _SIZE_UNITS[(m[2] or "").upper()]) if m else 0
    if size < 1:
        raise UsageError(f"export.max_shard_size must be a size such as 5GB, 500MB or 2GiB (or a number of "
                         f"bytes), got {value!r}")
    return size


def check_fresh(results: Path, r) -> None:
    """Refuse eval results measured on another checkpoint than the one about to be cut (a run resumed
    since, or ``--ckpt`` naming an older one): they would choose on stale numbers."""
    import json

    from .. import runs
    from ..report import load_results

    try:
        measured = json.loads(results.read_text(encoding="utf-8")).get("checkpoint")
    except (ValueError, AttributeError):
        load_results(results)  # says in one line what is wrong with the file
        raise
    if isinstance(measured, dict) and measured.get("fingerprint") == r.record["fingerprint"]:
        return
    if isinstance(measured, dict) and "fingerprint" not in measured and "sha256" in measured \
            and runs.weights_sha256(r.ckpt) == measured["sha256"]:
        return  # results written before fingerprints: the whole weights file's sha256, read once here
    again = r.run_dir if r.ckpt == runs.latest_checkpoint(r.run_dir) else r.ckpt
    what = (f"measured step {measured.get('step')} (fingerprint {str(measured.get('fingerprint'))[:12]})"
            if isinstance(measured, dict) else "does not say which checkpoint it measured")
    raise UsageError(f"{results.parent.name}/{results.name} {what}, the checkpoint is step {r.record['step']} "
                     f"(fingerprint {r.record['fingerprint'][:12]}): run sortednet eval --all-submodels --ckpt {again}")


def run(cfg: DictConfig, console: Console | None = None):
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .. import export, models
    from ..build import plain
    from ..engine import autocast, calibration_batches
    from ..flops import measure_all
    from ..nest import call, check_equal, extract, recalibrate, use
    from ..report import check_out_dir, human, load_results, results_dir
    from ..tasks import move
    from .loaded import load_run

    console = console or Console()
    budget = check_budget(cfg.budget)
    max_shard = shard_size(cfg.get("export", {}).get("max_shard_size"))
    with console.status("loading the run"):
        r = load_run(cfg)
    # the results of the checkpoint being cut (eval/ for the latest, eval/step-N/ for another); an older
    # sortednet wrote every checkpoint's to eval/, which check_fresh accepts only if they measured this one
    results = results_dir(r.run_dir, r.ckpt) / "results.json"
    if not results.is_file():
        results = r.run_dir / "eval" / "results.json"
    if results.is_file():  # before any work: results of another checkpoint would choose on stale numbers
        check_fresh(results, r)
    target = check_out_dir(r.run_dir / "export" / f"budget-{budget:g}", "export")  # before any work too
    before = _exported(target)
    entry, data, task = models.entry(r.cfg.model.name), r.data, r.data.task
    example = move(data.example(), r.device)
    with Progress(TextColumn(f"counting the FLOPs of {len(r.grid)} sub-models"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        job = bar.add_task("flops", total=len(r.grid))
        costs = measure_all(r.model, r.grid, example, done=lambda n: bar.advance(job, n))
    full = costs[r.grid.largest].flops
    fits = [sub for sub in r.grid if costs[sub].flops <= budget * full]
    if not fits:
        smallest = min(c.flops for c in costs.values()) / full
        raise UsageError(f"--budget {budget:g} is below the smallest sub-model ({smallest:.4f} of the full "
                         f"model's FLOPs): pass --budget {smallest:.4f} or more")
    savable = [sub for sub in fits if entry.exportable(r.model, sub)]
    if not savable:
        raise UsageError(f"none of the {len(fits)} sub-models within --budget {budget:g} can be written as "
                         f"{entry.exports} ({entry.unexportable}): raise the budget")
    if len(savable) < len(fits):
        console.print(f"{len(fits) - len(savable)} of the {len(fits)} sub-models within the budget cannot be "
                      f"written as {entry.exports} ({entry.unexportable}); choosing among the other {len(savable)}.")
    fits = savable

    rows, metric, higher = [], task.metric, task.higher_is_better
    if results.is_file():
        metric, rows = load_results(results)
    tested = {row["name"]: row[metric] for row in rows if row.get(metric) is not None}
    validated = {row["name"]: row[f"val_{metric}"] for row in rows if row.get(f"val_{metric}") is not None}
    relative = {row["name"]: row.get(f"rel_{metric}") for row in rows}  # % of full, on the test set
    # choose on the validation split; only results without one (data.val_fraction=0, older runs) on the test set
    split, scores = ("validation", validated) if validated else ("test", tested)
    scored = [sub for sub in fits if sub.name in scores]
    if scored:
        sign = 1 if higher else -1
        chosen = max(scored, key=lambda s: (sign * scores[s.name], -costs[s].flops))
        test = tested.get(chosen.name)
        by = f" by {split} {metric} {scores[chosen.name]:.2f}" + (
            f" (test {test:.2f})" if split == "validation" and test is not None else "")
        why = f"the best of the {len(scored)} evaluated sub-models within the budget, from {results}"
        if split == "test":
            why += ("; these results have no validation numbers (data.val_fraction=0, or a run trained before "
                    "the validation split), so the choice was made on the test set and its test score is optimistic")
        rel, floor = relative.get(chosen.name), float(cfg.get("min_relative", 10))
        if rel is not None and rel < floor and not cfg.get("force"):
            raise UsageError(f"--budget {budget:g}: the best sub-model that fits, {chosen.name}, has {metric} "
                             f"{tested.get(chosen.name, scores[chosen.name]):.4g} = {rel:.1f}% of the full model's (below min_relative="
                             f"{floor:g}%): raise --budget, or pass force=true to export it anyway")
    else:
        split, by = None, ""
        chosen = max(fits, key=lambda s: (costs[s].flops, s.levels))
        why = (f"no eval results for the sub-models within the budget, so the largest one that fits "
               f"(run `sortednet eval --all-submodels` first to choose by {metric})")

    with console.status(f"recalibrating and cutting out {chosen.name}") as status:
        # BatchNorm calibrated as eval did for the numbers export chooses by (results.json's "measured":
        # batches, batch size, seed, precision), so that the weights written are those the numbers describe
        how = calibration_of(results, cfg, r.amp)
        amp = None if how["precision"] == "fp32" else getattr(torch, how["precision"])
        calib = calibration_batches(r.model, task, data.calib, how["calib_batch_size"], how["calib_batches"],
                                    how["seed"], r.device, data.collate)
        if calib:  # on the run's device, then everything else on the CPU
            with autocast(r.device, amp):
                recalibrate(r.model, chosen, calib)
        # checked on a few held-out inputs (several tokens, with padding, for text), not the one-input example
        check_input = move(task.check_input(data.test, data.collate), "cpu")
        model, example = r.model.cpu(), move(example, "cpu")
        with torch.no_grad(), use(model.eval(), chosen):
            if not torch.isfinite(call(model, check_input)).all():
                raise UsageError(f"{chosen.name} of {r.ckpt} computes NaN or infinite outputs: its weights have "
                                 "diverged; retrain the run (with a lower optim.lr) or pass --ckpt an earlier checkpoint")
        small = extract(model, chosen, example)
        diff = check_equal(model, chosen, small, check_input)
        status.update(f"scoring the cut-out {chosen.name}")
        scored = score_cut_out(small, data, cfg, r.device, amp, how)  # what the file written scores
        cost = costs[chosen]
        arch, init = models.architecture(plain(r.cfg.model))  # the folder needs no weights file but its own
        config = {
            "model": arch, "initial_weights": init, **data.describe(), "submodel": chosen.as_dict(),
            "name": chosen.name, "flops": cost.flops, "flops_per": data.unit, "params": cost.params,
            "full_flops": full, "full_params": costs[r.grid.largest].params, "budget": budget, "metric": metric,
            # the cut-out model's own scores (test set, validation split), measured here; eval's beside them
            metric: scored[metric], f"full_{metric}": tested.get(r.grid.largest.name),  # test set
            f"val_{metric}": scored.get(f"val_{metric}"), "chosen_on": split,  # "validation", "test" or None
            f"eval_{metric}": tested.get(chosen.name), f"eval_val_{metric}": validated.get(chosen.name),
            "measured": {"test_items": scored["test_items"], "val_items": scored.get("val_items"),
                         "calib_batches": len(calib), "calib_batch_size": int(how["calib_batch_size"]),
                         "seed": int(how["seed"]), "device": r.device.type, "precision": how["precision"],
                         "calibration_from": how["from"]},
            "checkpoint": {**r.record, "run": str(r.run_dir)},
        }
        status.update(f"writing {chosen.name} as {entry.exports}")
        folder = export.write(target, lambda tmp: entry.save(tmp, small, config, check_input, r.tokenizer,
                                                             max_shard_size=max_shard))
    console.print(f"[bold]sortednet export[/] budget {budget:g} x {human(full)} FLOPs = "
                  f"{human(budget * full)} FLOPs: {len(fits)} of {len(r.grid)} sub-models fit.")
    console.print(f"chose {chosen.name}{by}: {human(cost.flops)} FLOPs ({cost.flops / full:.1%} of full), "
                  f"{human(cost.params)} params ({cost.params / config['full_params']:.1%}) - {why}.")
    console.print((f"BatchNorm recalibrated as {how['from']} did ({len(calib)} batches of "
                   f"{how['calib_batch_size']}, seed {how['seed']}, {how['precision']}); " if calib else "")
                  + f"cut-out model equals the sub-model (max |diff| {diff:.1e}); it scores {metric} "
                  f"{scored[metric]:.4g} on {scored['test_items']} test examples"
                  + (f", {scored[f'val_{metric}']:.4g} on {scored['val_items']} validation examples"
                     if scored.get("val_items") else "") + ".")
    said = tested.get(chosen.name)
    if said is not None and abs(said - scored[metric]) > 1e-4 * max(1.0, abs(said)):
        console.print(f"[yellow]eval measured {metric} {said:.4g} for {chosen.name}, the cut-out model scores "
                      f"{scored[metric]:.4g} on {scored['test_items']} test examples: measured on other data or "
                      f"with another calibration (see config.json's \"measured\"); run sortednet eval "
                      f"--all-submodels again to compare like with like[/]")
    console.print(f"wrote {folder}/ ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    if before is not None:  # an export of this budget was there: say what it held, above all when it changed
        was = f"{before['name']} of step {before['step']}" if before.get("step") is not None else before["name"]
        now = f"{chosen.name} of step {r.record['step']}"
        other = before["name"] != chosen.name
        console.print(("[yellow]" if other else "") + f"replaced the earlier export in {folder}/: it held {was}, "
                      f"it now holds {now}" + (" (another sub-model)[/]" if other else ""))
    return folder


def _exported(folder: Path) -> dict | None:
    """``{"name", "step"}`` of the sub-model an existing export folder holds (its sortednet.json, or a
    vision export's config.json), ``{"name": "an export sortednet cannot read"}`` for a folder that says
    neither,
    None when there is no folder."""
    import json

    if not folder.is_dir():
        return None
    from ..models.hf import EXPORT_RECORD

    for meta in (EXPORT_RECORD, "config.json"):
        try:
            doc = json.loads((folder / meta).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("name"), str):
            ckpt = doc.get("checkpoint")
            return {"name": doc["name"], "step": ckpt.get("step") if isinstance(ckpt, dict) else None}
    return {"name": "an export sortednet cannot read"}


def calibration_of(results: Path, cfg: DictConfig, amp) -> dict:
    """How to recalibrate BatchNorm and score: as eval did for ``results`` (its ``measured`` record:
    batches, batch size, seed, precision, and how many test and validation items it scored), or,
    without one (no results, or written by an older sortednet), with this command's ``eval.calib_*``
    settings, the seed and the precision of ``trainer.precision``, on the items this command loads."""
    import json

    measured = None
    if results.is_file():
        try:
            measured = json.loads(results.read_text(encoding="utf-8")).get("measured")
        except (OSError, ValueError, AttributeError):
            measured = None
    keys = ("calib_batches", "calib_batch_size", "seed", "precision")
    if isinstance(measured, dict) and all(measured.get(k) is not None for k in keys):
        return {"calib_batches": max(1, int(measured["calib_batches"])),
                "calib_batch_size": int(measured["calib_batch_size"]), "seed": int(measured["seed"]),
                "precision": str(measured["precision"]), "from": "eval",
                "test_items": measured.get("test_items"), "val_items": measured.get("val_items")}
    return {"calib_batches": cfg.eval.calib_batches, "calib_batch_size": cfg.eval.calib_batch_size,
            "seed": cfg.seed, "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
            "from": "export"}


def score_cut_out(small, data, cfg: DictConfig, device, amp, how: dict) -> dict:
    """The cut-out model's metric on the test set and, when the run has one, the validation split, on
    ``device`` in ``amp``, with the number of examples of each: the first ``how["test_items"]`` and
    ``how["val_items"]`` of them where eval scored no more (``eval.test_subset``, ``eval.val_subset``
    take the first N), so that the numbers compare with eval's."""
    from torch.utils.data import DataLoader, Subset

    from ..engine import score

    task = data.task

    def loader(items, n):
        if isinstance(n, int) and 0 < n < len(items):
            items = Subset(items, range(n))
        return DataLoader(items, batch_size=cfg.eval.batch_size, num_workers=cfg.trainer.get("num_workers", 0),
                          collate_fn=data.collate)

    small.to(device)
    try:
        test = loader(data.test, how.get("test_items"))
        out = {task.metric: score(small, task, None, test, device, amp), "test_items": len(test.dataset)}
        if data.val is not None:
            val = loader(data.val, how.get("val_items"))
            out[f"val_{task.metric}"] = score(small, task, None, val, device, amp)
            out["val_items"] = len(val.dataset)
    finally:
        small.cpu()
    return out
