"""``sortednet compare RUN_A RUN_B [...]``: the eval results of several runs side by side.

Reads each run's ``eval/results.json`` (written by ``sortednet eval --all-submodels``) and writes,
into a new folder it prints (``compare.out``, default ``<paths.runs>/compare/<time>``):

- ``compare.csv`` / ``compare.json``: per sub-model, the FLOPs and each run's metric (compare.json
  names each run's folder relative to the compare folder);
- ``plot.png``: metric vs FLOPs, one series per run, each run's Pareto front drawn as a line.

Runs of different models, data or image sizes are refused (their sub-models are not the same
networks); a run without eval results gets a one-line error naming the command that makes them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from .. import runs
from ..errors import UsageError
from ..report import (STAR, _atomic, check_out_dir, human, load_results, measured_differently, pareto_front, plot_compare,
                      unused_path)


def _label(paths: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell the runs apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(q) for q in parts) + 1):
        labels = ["/".join(q[-depth:]) for q in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def load(run: str) -> tuple[Path, DictConfig, str, list[dict], bool]:
    path = Path(run)
    if not path.is_dir():
        raise UsageError(f"compare: {run} is not a run folder")
    cfg = runs.load_config(path)
    results = path / "eval" / "results.json"
    if not results.is_file():
        raise UsageError(f"compare: {run} has no eval results: run `sortednet eval --all-submodels --ckpt {run}` "
                         "first")
    metric, rows = load_results(results)
    return path, cfg, metric, rows, bool(json.loads(results.read_text()).get("higher_is_better", True))


def _measured(run: Path) -> dict | None:
    """What ``run``'s eval results were measured on (results.json's "measured"; None: not recorded)."""
    try:
        m = json.loads((run / "eval" / "results.json").read_text(encoding="utf-8")).get("measured")
    except (OSError, ValueError, AttributeError):
        return None
    return m if isinstance(m, dict) else None


def _train_seconds(run: Path) -> float | None:
    """Training wall time of ``run`` as its metrics.jsonl last recorded it (None if it has none)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    times = [json.loads(line).get("time") for line in lines if line.strip()]
    times = [t for t in times if t is not None]
    return times[-1] if times else None


def _what(cfg: DictConfig) -> str:
    size = cfg.data.get("image_size")
    return f"{cfg.model.name} on {cfg.data.name}" + (f" at {size} px" if size else "")


def run(cfg: DictConfig, console: Console | None = None) -> Path:
    console = console or Console()
    given = list(cfg.runs or [])
    if len(given) < 2:
        raise UsageError("compare needs two or more run folders: sortednet compare RUN_A RUN_B [RUN_C ...]")
    seen: dict[Path, str] = {}
    for r in map(str, given):
        key = Path(r).resolve()
        if key in seen:
            raise UsageError(f"compare: {r} is given twice (also as {seen[key]}): name each run once")
        seen[key] = r
    # checked before anything is read or printed: a refusal after the whole table is noise
    # the default folder is named after the second: another compare in the same second gets <time>-2
    out = Path(cfg.out) if cfg.get("out") else \
        Path(unused_path(str(Path(cfg.paths.runs) / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S"))))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"compare: {out} already exists and is not an empty folder: pass out=NEW_DIR")
    check_out_dir(out, "compare")  # a file where a parent folder should be, a read-only parent
    loaded = [load(str(r)) for r in given]
    first_path, first_cfg, metric, _, higher = loaded[0]
    for path, run_cfg, m, _, _ in loaded[1:]:
        if _what(run_cfg) != _what(first_cfg):
            raise UsageError(f"compare: {path} is {_what(run_cfg)} but {first_path} is {_what(first_cfg)}: "
                             "only runs of the same model and data can be compared")
        if m != metric:
            raise UsageError(f"compare: {path} measured {m} but {first_path} measured {metric}")
    labels = _label([p for p, *_ in loaded])
    series = {}
    for label, (path, run_cfg, _, rows, _) in zip(labels, loaded):
        # relative to the compare folder, so the runs and their comparison can move together
        series[label] = {"run": os.path.relpath(path.resolve(), out.resolve()), "sampler": run_cfg.sampler.name,
                         "measured": _measured(path),
                         "rows": [{**r, "pareto": p} for r, p in zip(rows, pareto_front(rows, metric, higher))]}

    names = list(dict.fromkeys(r["name"] for s in series.values() for r in s["rows"]))
    by_name = {label: {r["name"]: r for r in s["rows"]} for label, s in series.items()}
    flops = {n: next(by_name[lab][n]["flops"] for lab in labels if n in by_name[lab]) for n in names}

    title = f"{metric} of each sub-model: {_what(first_cfg)}, {len(labels)} runs"
    table = Table(title=title)
    table.add_column("sub-model")
    table.add_column("FLOPs", justify="right")
    for label in labels:
        table.add_column(f"{label}\n({series[label]['sampler']})", justify="right")
    for n in names:
        cells = []
        measured = [by_name[lab][n].get(metric) for lab in labels if n in by_name[lab]]
        best = (max if higher else min)((v for v in measured if v is not None), default=None)
        for lab in labels:
            r = by_name[lab].get(n)
            v = None if r is None else r.get(metric)
            text = "-" if v is None else f"{v:.2f}" + (f" {STAR}" if r.get("pareto") else "")
            cells.append(f"[bold]{text}[/]" if v is not None and v == best and len(labels) > 1 else text)
        table.add_row(n, human(flops[n]), *cells)
    console.print(table)
    summary = []
    for label, (path, *_) in zip(labels, loaded):
        rows = [r for r in series[label]["rows"] if r.get(metric) is not None]
        full = next((r for r in rows if r.get("full")), max(rows, key=lambda r: r["flops"]))
        def relative(v):  # % of the full model, higher is better either way (perplexity: full / sub)
            if not full[metric] or not v:
                return float("nan")
            return 100 * v / full[metric] if higher else 100 * full[metric] / v

        worst = min(rows, key=lambda r: relative(r[metric]))
        rel = relative(worst[metric])
        entry = {"run": label, "full": full[metric], "lowest": worst["name"], "lowest_value": worst[metric],
                 "lowest_rel": rel, "submodels": len(rows),
                 "at_96": sum(1 for r in rows if relative(r[metric]) >= 96),
                 "train_seconds": _train_seconds(path)}
        alone = [r for r in rows if r.get("rel_standalone") is not None]
        if alone:  # eval ... standalone=DIR: each sub-model as % of itself trained alone
            low = min(alone, key=lambda r: r["rel_standalone"])
            entry |= {"lowest_vs_standalone": low["name"], "lowest_rel_standalone": low["rel_standalone"],
                      "standalone_measured": len(alone)}
        summary.append(entry)
        console.print(f"{label}: full model {full[metric]:.2f}; lowest {worst['name']} {worst[metric]:.2f} = "
                      f"{rel:.1f}% of full; {entry['at_96']} of {len(rows)} at >= 96% of full"
                      + (f"; lowest vs trained alone {low['name']} {low['rel_standalone']:.1f}%" if alone else ""))
    plain_runs = [e for e, lab in zip(summary, labels) if series[lab]["sampler"] == "full"]
    if plain_runs:  # a plain-training run among them: the full model and the training time against it
        ref = plain_runs[0]
        for e in summary:
            e["full_vs_plain"] = e["full"] - ref["full"]
            if e["train_seconds"] and ref["train_seconds"]:
                e["time_vs_plain"] = e["train_seconds"] / ref["train_seconds"]
        console.print(f"against plain training ({ref['run']}): " + "; ".join(
            f"{e['run']} full {e['full_vs_plain']:+.2f}" + (" points" if higher else f" {metric}")
            + (f", {e['time_vs_plain']:.2f}x time" if e.get("time_vs_plain") else "") for e in summary))
    console.print(f"{STAR} = on that run's Pareto front ({metric} vs FLOPs); bold = the best run for that sub-model.")
    differ = measured_differently({label: s["measured"] for label, s in series.items()})
    if differ:  # 68.00 beside 58.92 for the same weights on 50 and 297 test images said nothing
        console.print(f"[yellow]warning: {differ}[/]", soft_wrap=True)

    out.mkdir(parents=True, exist_ok=True)
    with _atomic(out / "compare.csv") as f:
        f.write(",".join(["name", "flops", *labels]) + "\n")
        for n in names:
            vals = [by_name[lab].get(n, {}).get(metric) for lab in labels]
            f.write(",".join([n, str(flops[n]), *("" if v is None else f"{v}" for v in vals)]) + "\n")
    with _atomic(out / "compare.json") as f:
        json.dump({"metric": metric, "higher_is_better": higher, "runs": series, "summary": summary,
                   "measured_differently": differ}, f, indent=2)
        f.write("\n")
    plot_compare({lab: s["rows"] for lab, s in series.items()}, out / "plot.png", metric, higher, title)
    console.print(f"wrote {out}/ (compare.csv, compare.json, plot.png)")
    return out
