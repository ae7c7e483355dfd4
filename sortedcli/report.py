"""Report sub-model results: Pareto front, a rich table, CSV/JSON files and a metric-vs-FLOPs plot.

A result row is a plain dict::

    {"name": "width0.5-depth12", "dims": {"width": 0.5, "depth": 12},
     "accuracy": 91.23, "rel_accuracy": 98.1, "flops": 123456789, "params": 1234567,
     "latency_ms": 1.23, "full": False}

The metric key is a parameter (``"accuracy"``, ``"perplexity"``, ...), its relative value lives under
``"rel_<metric>"``; ``None`` means "not measured". Dims are arbitrary names: nothing here assumes a CNN.
``"<metric>"`` is measured on the test set; ``"val_<metric>"``, when a row has it, on the validation
split (what export chooses by): the table then labels the columns "val" and "test", the plot "test".
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from rich.table import Table

from sortedcli.errors import UsageError

STAR = "★"
_UNITS = ["", " K", " M", " G", " T", " P"]


def human(n: float) -> str:
    """Three significant digits with a K/M/G/T/P suffix: 1234 -> "1.23 K", 2.5e9 -> "2.50 G", 12 -> "12"."""
    if n is None:
        return "-"
    if abs(n) < 1000:
        return str(int(n)) if float(n).is_integer() else f"{n:.3g}"
    i = 0
    while abs(n) >= 999.5 and i < len(_UNITS) - 1:  # 999.5 so 999_600 becomes "1.00 M", not "1000 K"
        n, i = n / 1000, i + 1
    decimals = 2 if abs(n) < 9.995 else 1 if abs(n) < 99.95 else 0
    return f"{n:.{decimals}f}{_UNITS[i]}"


def pareto_front(rows, metric="accuracy", higher_is_better=True) -> list[bool]:
    """Per row: True unless another row has <= FLOPs and a better-or-equal metric, one of them strictly.

    Rows whose metric is None are never on the front (nor do they dominate anything); exact ties are all kept.
    """
    def better(a, b):
        return a > b if higher_is_better else a < b

    measured = [(r["flops"], r[metric]) for r in rows if r.get(metric) is not None]
    front = []
    for r in rows:
        m, f = r.get(metric), r["flops"]
        front.append(m is not None and not any(
            fo <= f and not better(m, mo) and (fo < f or better(mo, m)) for fo, mo in measured))
    return front


def _dim_names(rows) -> list[str]:
    return list(rows[0]["dims"]) if rows else []


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _fmt_dim(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def results_table(rows, metric="accuracy", title=None, *, higher_is_better=True) -> Table:
    """A rich Table of the rows in the order given; the full model in bold, Pareto-optimal rows starred."""
    dims = _dim_names(rows)
    table = Table(title=title)
    table.add_column("#", justify="right", style="dim")
    table.add_column("sub-model")
    for d in dims:
        table.add_column(d, justify="right")
    alone = any(r.get("standalone") is not None for r in rows)
    exits = any(r.get("agreement") is not None for r in rows)
    val = any(r.get(f"val_{metric}") is not None for r in rows)  # then the metric column is the test set's
    for name in (*((f"val {metric}", f"test {metric}") if val else (metric,)), "% of full",
                 *(("alone", "% of alone") if alone else ()), "FLOPs", "params", "latency ms",
                 *(("agree", "cost c", "spec x", "k") if exits else ())):
        table.add_column(name, justify="right")
    table.add_column("pareto", justify="center", style="yellow")
    for i, (r, on_front) in enumerate(zip(rows, pareto_front(rows, metric, higher_is_better)), 1):
        table.add_row(
            str(i), r["name"], *(_fmt_dim(r["dims"].get(d, "-")) for d in dims),
            *((_fmt(r.get(f"val_{metric}")),) if val else ()), _fmt(r.get(metric)), _fmt(r.get(f"rel_{metric}")),
            *((_fmt(r.get("standalone")), _fmt(r.get("rel_standalone"))) if alone else ()), human(r.get("flops")),
            human(r.get("params")), _fmt(r.get("latency_ms")),
            *((_fmt(r.get("agreement"), ".3f"), _fmt(r.get("cost_ratio")), _fmt(r.get("speedup")),
               str(r.get("best_k") or "-")) if exits else ()),
            STAR if on_front else "",
            style="bold" if r.get("full") else None)
    return table


@contextlib.contextmanager
def _atomic(path: Path, mode="w"):
    """Yield a temp file next to ``path``; on success it replaces ``path`` (no half-written results)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"newline": "", "encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def results_dir(run_dir, ckpt, partial: bool = False) -> Path:
    """Where ``sortednet eval`` writes the results of checkpoint folder ``ckpt`` of ``run_dir`` (and
    where ``export`` reads them): ``eval/`` for the run's latest checkpoint, ``eval/<its folder name>/``
    (``eval/step-00000003/``) for any other, so that measuring an older checkpoint never replaces the
    latest's results; a partial evaluation (largest and smallest only) in ``largest-smallest/`` below."""
    from . import runs

    run_dir, ckpt = Path(run_dir), Path(ckpt)
    latest = runs.latest_checkpoint(run_dir)
    out = run_dir / "eval"
    if latest is None or ckpt.resolve() != latest.resolve():
        out = out / ckpt.name
    return out / "largest-smallest" if partial else out


def unused_path(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... if it exists: the default folders named after the time
    (a run, a comparison) stay apart when two commands start in the same second."""
    candidate, n = path, 1
    while Path(candidate).exists():
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def check_out_dir(path, what: str) -> Path:
    """Refuse at once, before any work, an output folder that cannot be made or written into: a file
    standing where it or one of its parents should be, or a parent without write permission."""
    path = Path(path)
    for p in (path, *path.parents):
        if not p.exists() and not p.is_symlink():
            continue
        if not p.is_dir():
            raise UsageError(f"{what}: {p} is a file (or a broken link), not a folder, so {path}/ cannot be "
                             "written: move it away, or write elsewhere")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{what}: {p} is not writable (permission denied), so {path}/ cannot be written: "
                             "fix its permissions, or write elsewhere")
        return path
    return path


def write_results(rows, out_dir, metric="accuracy", higher_is_better=True, title=None,
                  checkpoint: dict | None = None, draft: dict | None = None,
                  measured: dict | None = None) -> dict[str, Path]:
    """Write results.csv, results.json and plot.png into ``out_dir`` (created); return their paths.
    ``checkpoint`` (``{"step", "path", "fingerprint"}``: what was measured) goes into results.json, and so
    does ``measured`` (what it was measured on: test items, calibration, seed, device, precision: see
    :func:`measured_differently`); ``draft``: a causal LM's chosen draft exit (:mod:`sortedcli.draft`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front(rows, metric, higher_is_better)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "png": out / "plot.png"}

    dims = list(dict.fromkeys(d for r in rows for d in r["dims"]))  # == rows[0]'s dims, unless rows differ
    fixed = ["name", metric, f"rel_{metric}", "flops", "params", "latency_ms", "full", "pareto"]
    alone = ["standalone", "rel_standalone"] if any(r.get("standalone") is not None for r in rows) else []
    val = [f"val_{metric}"] if any(r.get(f"val_{metric}") is not None for r in rows) else []
    dim_cols = {d: (f"dim_{d}" if d in fixed else d) for d in dims}  # a dim called "flops" must not clash
    with _atomic(paths["csv"]) as f:
        w = csv.writer(f)
        w.writerow(["name", *dim_cols.values(), *fixed[1:], *val, *alone])
        for r, p in zip(rows, front):
            vals = [r.get(metric), r.get(f"rel_{metric}"), r.get("flops"), r.get("params"), r.get("latency_ms")]
            w.writerow([r["name"], *(r["dims"].get(d, "") for d in dims),
                        *("" if v is None else v for v in vals), bool(r.get("full")), p,
                        *("" if r.get(k) is None else r[k] for k in (*val, *alone))])

    doc = {"metric": metric, "higher_is_better": higher_is_better,
           **({"checkpoint": checkpoint} if checkpoint is not None else {}),
           **({"measured": measured} if measured is not None else {}),
           "rows": [{**r, "pareto": p} for r, p in zip(rows, front)]}
    if draft is not None:
        doc["draft"] = draft
    with _atomic(paths["json"]) as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    plot_results(rows, paths["png"], metric, higher_is_better, title)
    return paths


# what a result depends on besides the weights, as results.json's "measured" records it (the device and
# the latency settings change only the latency, which compare does not set side by side)
MEASURED_ALIKE = {"test_items": "test items", "val_items": "validation items", "calib_batches": "calibration batches",
                  "calib_items": "calibration items", "seed": "seed", "precision": "precision"}


def measured_differently(records: dict[str, dict | None]) -> str | None:
    """One line saying how the results of several runs (``{label: the "measured" of its results.json, or
    None}``) were measured differently (50 vs 297 test images), or None when alike; a results.json
    written before sortednet recorded it is "not recorded"."""
    known = {label: m for label, m in records.items() if isinstance(m, dict)}
    unknown = [label for label, m in records.items() if not isinstance(m, dict)]
    parts = []
    for key, words in MEASURED_ALIKE.items():
        values = {label: m.get(key) for label, m in known.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            parts.append(f"{words} " + " vs ".join(f"{'none' if v is None else v} ({label})"
                                                   for label, v in values.items()))
    if unknown:
        parts.append("what " + ", ".join(unknown) + " measured on is not recorded (evaluated by an older sortednet)")
    if not parts:
        return None
    return ("the runs' results may not be comparable: " + "; ".join(parts)
            + ". Re-run `sortednet eval --all-submodels` on them with the same eval.* settings and seed")


def load_results(path) -> tuple[str, list[dict]]:
    """Read a results.json written by :func:`write_results` back: ``(metric, rows)``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return doc["metric"], doc["rows"]
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; run `sortednet eval --all-submodels` first.") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a sortednet results.json ({e}).") from None


def _tick(v, pos=None) -> str:
    return re.sub(r"\.0+ ", " ", human(v))  # "2 G" rather than "2.00 G" on an axis


def _mantissa(v) -> float:
    return round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0


def plot_results(rows, path, metric="accuracy", higher_is_better=True, title=None) -> Path:
    """Scatter metric vs FLOPs (log x), coloured by the first dim, with the Pareto front and the full model."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # don't switch (and close) the backend of a running pyplot session
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    front = pareto_front(rows, metric, higher_is_better)
    pts = [(r, p) for r, p in zip(rows, front) if r.get(metric) is not None and (r.get("flops") or 0) > 0]
    fig = Figure(figsize=(8, 5.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.set_xlabel("FLOPs per sample (2 x multiply-adds)")
    test = "test " if any(r.get(f"val_{metric}") is not None for r in rows) else ""
    ax.set_ylabel(f"{test}{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or f"{metric} vs FLOPs ({len(pts)} sub-models)")

    if pts:
        x = [r["flops"] for r, _ in pts]
        y = [r[metric] for r, _ in pts]
        dims = _dim_names(rows)
        if dims:
            vals = [r["dims"].get(dims[0]) for r, _ in pts]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
            cats = None if numeric else sorted({str(v) for v in vals})
            c = vals if numeric else [cats.index(str(v)) for v in vals]
            sc = ax.scatter(x, y, c=c, cmap="viridis", s=28, alpha=0.85, edgecolors="none", zorder=2)
            cb = fig.colorbar(sc, ax=ax, pad=0.02)
            cb.set_label(dims[0])
            if cats:
                cb.set_ticks(range(len(cats)), labels=cats)
        else:
            ax.scatter(x, y, s=28, alpha=0.85, zorder=2)
        fp = sorted((r["flops"], r[metric]) for r, p in pts if p)
        ax.plot([a for a, _ in fp], [b for _, b in fp], "-o", color="tab:red", lw=1.5, ms=4,
                mfc="none", zorder=3, label=f"Pareto front ({len(fp)})")
        for r in [r for r, _ in pts if r.get("full")][:1]:
            ax.scatter([r["flops"]], [r[metric]], marker="*", s=220, color="gold", edgecolors="black",
                       linewidths=0.8, zorder=4, label="full model")
            # above-left (below-left for lower-is-better): the front reaches the full model from the other side
            ax.annotate(f"full model: {r[metric]:.2f}", (r["flops"], r[metric]), fontsize=9, zorder=5,
                        xytext=(-6, 12 if higher_is_better else -12), textcoords="offset points",
                        ha="right", va="bottom" if higher_is_better else "top",
                        bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.6", "alpha": 0.9})
    return _finish(fig, ax, [r["flops"] for r, _ in pts], path, metric, y_margin=0.1, fontsize=9)  # y room for the full model's label


def plot_compare(series: dict[str, list[dict]], path, metric="accuracy", higher_is_better=True, title=None) -> Path:
    """Metric vs FLOPs (log x) for several runs: one colour per run, its points and its Pareto front."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(8, 5.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.set_xlabel("FLOPs per sample (2 x multiply-adds)")
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or f"{metric} vs FLOPs", fontsize=10)
    markers = "osD^vP*X"
    xs = []
    for i, (label, rows) in enumerate(series.items()):
        pts = [r for r in rows if r.get(metric) is not None and (r.get("flops") or 0) > 0]
        if not pts:
            continue
        color = f"C{i}"
        front = pareto_front(pts, metric, higher_is_better)
        ax.scatter([r["flops"] for r in pts], [r[metric] for r in pts], s=22, alpha=0.55, color=color,
                   marker=markers[i % len(markers)], edgecolors="none", zorder=2)
        fp = sorted((r["flops"], r[metric]) for r, p in zip(pts, front) if p)
        ax.plot([a for a, _ in fp], [b for _, b in fp], "-", color=color, lw=1.6, zorder=3,
                marker=markers[i % len(markers)], ms=5, label=f"{label} (Pareto front: {len(fp)})")
        xs += [r["flops"] for r in pts]
    return _finish(fig, ax, xs, path, metric, y_margin=0.08, fontsize=8)


def _finish(fig, ax, xs, path, metric, y_margin, fontsize) -> Path:
    """Log FLOPs axis with readable ticks and the legend (or a note when nothing was measured); the
    PNG written atomically. Minor 2x/3x/5x ticks are labelled only when the FLOPs span under two
    decades (else they crowd)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if xs:
        ax.set_xscale("log")
        ax.margins(x=0.06, y=y_margin)
        ax.xaxis.set_major_formatter(FuncFormatter(_tick))
        if math.log10(max(xs) / min(xs)) < 2:
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, pos: _tick(v) if _mantissa(v) in (2, 3, 5) else ""))
        else:
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(loc="best", fontsize=fontsize, framealpha=0.9)
    else:
        ax.text(0.5, 0.5, f"no measured {metric}", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with _atomic(path, "wb") as f:
        fig.savefig(f, format="png")
    return path
