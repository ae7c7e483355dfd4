"""``sortednet submodels``: the grid of a model, with parameters and FLOPs; no data, no training."""

from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from ..build import build_grid, build_model
from ..data import input_spec
from ..flops import measure
from ..report import human


def run(cfg: DictConfig, console: Console | None = None) -> list[dict]:
    console = console or Console()
    model_args, example, unit = input_spec(cfg.data)
    model = build_model(cfg, model_args)
    grid = build_grid(cfg, model)
    rows = []
    for sub in grid:
        cost = measure(model, sub, example)
        rows.append({"name": sub.name, "dims": sub.as_dict(), "params": cost.params, "flops": cost.flops})
    full = next(row for row in rows if row["name"] == grid.largest.name)
    table = Table(title=f"{cfg.model.name}: {len(grid)} sub-models "
                        f"({' x '.join(f'{d.name} {len(d.levels)}' for d in grid.dims)}), per {unit}")
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
