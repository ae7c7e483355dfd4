"""``sortednet submodels``: the grid of a model, with parameters and FLOPs; no data, no training.

The model is the one ``train`` builds for the same config (:func:`~sortedcli.build.build_inputs`: the
data's classes and image size, a language model's vocabulary from its tokenizer, pretrained weights),
and FLOPs are counted on the input shape that ``eval`` and ``export`` count them on, so a budget read
off this table means what ``export --budget`` means. Without ``data=`` on the command line, a model
that does not read the default data (images) is sized for its registry entry's data set instead.
"""

from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table


def _default_data(cfg: DictConfig, overrides) -> DictConfig:
    """``cfg`` with the model's own data set when the command line chose none and the default data
    is not a task the model serves (``model=llama_tiny`` without ``data=``)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from .. import models
    from ..data import task_name

    entry = models.entry(cfg.model.name)
    chosen = any(o.lstrip("+~").split("=", 1)[0] == "data" for o in overrides)
    if chosen or task_name(cfg.data) in entry.tasks:
        return cfg
    return compose(HydraConfig.get().job.config_name, [*overrides, f"data={entry.data}"])


def run(cfg: DictConfig, console: Console | None = None, overrides=None) -> list[dict]:
    """The table of ``cfg``'s grid; ``overrides`` are the command line's (None: ``cfg`` as it is)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..build import build_grid, build_inputs, build_model
    from ..flops import measure_all
    from ..report import human

    console = console or Console()
    if overrides is not None:
        cfg = _default_data(cfg, overrides)
    model_args, example, unit = build_inputs(cfg)
    model = build_model(cfg, model_args)
    grid = build_grid(cfg, model)
    with Progress(TextColumn("counting FLOPs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        job = bar.add_task("flops", total=len(grid))
        costs = measure_all(model, grid, example, done=lambda n: bar.advance(job, n))
    rows = [{"name": sub.name, "dims": sub.as_dict(), "params": c.params, "flops": c.flops} for sub, c in costs.items()]
    full = next(row for row in rows if row["name"] == grid.largest.name)
    table = Table(title=f"{cfg.model.name}: {len(grid)} sub-models "
                        f"({' x '.join(f'{d.name} {len(d.levels)}' for d in grid.dims)}), per {unit}"
                        f" (data={cfg.data.name})")
    table.add_column("#", justify="right")
    table.add_column("sub-model")
    for d in grid.dims:
        table.add_column(d.name, justify="right")
    for col in ("params", "% params", "FLOPs", "% FLOPs"):
        table.add_column(col, justify="right")
    for i, row in enumerate(rows, 1):
        table.add_row(str(i), row["name"], *(f"{v:g}" for v in row["dims"].values()), human(row["params"]),
                      f"{100 * row['params'] / full['params']:.1f}", human(row["flops"]),
                      f"{100 * row['flops'] / full['flops']:.1f}")
    console.print(table)
    console.print(f"{grid.duplicates_note()}. FLOPs = 2 x multiply-adds per {unit}, counted on the sliced model.")
    return rows
