import csv
import json

import pytest
from rich.console import Console

from sortedcli.errors import UsageError
from sortedcli.report import (
    human, load_results, pareto_front, plot_results, results_table, write_results,
)


def row(name, flops, acc, *, width=0.5, depth=12, full=False, metric="accuracy", latency=1.0):
    return {"name": name, "dims": {"width": width, "depth": depth}, metric: acc,
            f"rel_{metric}": None if acc is None else acc / 0.9, "flops": flops, "params": flops // 10,
            "latency_ms": latency, "full": full}


def fake_rows(n=12):
    rows = []
    for i in range(n):
        w, d = (i % 4 + 1) / 4, 6 + 2 * (i // 4)
        flops = int(4e9 * w * w * d / 12)
        rows.append(row(f"width{w}-depth{d}", flops, 60 + 30 * w + d, width=w, depth=d))
    rows[-1]["full"] = True
    return rows


def test_pareto_front_known_answer():
    rows = [
        row("a", 100, 50.0),   # cheapest: front
        row("b", 200, 60.0),   # front
        row("c", 200, 55.0),   # dominated by b (same flops, worse)
        row("d", 300, 60.0),   # dominated by b (more flops, equal metric)
        row("e", 400, 70.0),   # front
        row("f", 400, 70.0),   # exact tie with e: both stay
        row("g", 50, None),    # unmeasured: never on the front, dominates nothing
        row("h", 500, 65.0),   # dominated by e
    ]
    assert pareto_front(rows) == [True, True, False, False, True, True, False, False]


def test_pareto_front_lower_is_better():
    m = "perplexity"
    rows = [row("a", 100, 30.0, metric=m), row("b", 200, 20.0, metric=m), row("c", 300, 25.0, metric=m),
            row("d", 400, 20.0, metric=m), row("e", 500, 10.0, metric=m), row("f", 10, None, metric=m)]
    assert pareto_front(rows, metric=m, higher_is_better=False) == [True, True, False, False, True, False]
    # same numbers read as higher-is-better give the opposite picture
    assert pareto_front(rows, metric=m) == [True, False, False, False, False, False]


def test_pareto_front_empty():
    assert pareto_front([]) == []


@pytest.mark.parametrize("n, text", [
    (0, "0"), (12, "12"), (999, "999"), (12.5, "12.5"), (1234, "1.23 K"), (7800, "7.80 K"),
    (45.6e6, "45.6 M"), (11.2e6, "11.2 M"), (123.4e6, "123 M"), (2.5e9, "2.50 G"), (999_700, "1.00 M"),
    (4.1e12, "4.10 T"), (None, "-"),
])
def test_human(n, text):
    assert human(n) == text


def test_results_table_renders():
    rows = fake_rows()
    rows[3]["accuracy"] = None
    console = Console(record=True, width=200)
    console.print(results_table(rows, title="ResNet-50 sub-models"))
    text = console.export_text()
    assert rows[0]["name"] in text and rows[-1]["name"] in text
    assert "★" in text
    for header in ("sub-model", "width", "depth", "accuracy", "% of full", "FLOPs", "params", "pareto"):
        assert header in text
    assert human(rows[-1]["flops"]) in text


def test_write_results_and_round_trip(tmp_path):
    rows = fake_rows(40)
    rows[5]["latency_ms"] = None
    rows[6]["accuracy"] = None
    out = tmp_path / "nested" / "eval"
    paths = write_results(rows, out, title="test")
    assert set(paths) == {"csv", "json", "png"}
    assert all(p.exists() and p.parent == out for p in paths.values())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    with paths["csv"].open(newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {"name", "width", "depth", "accuracy", "rel_accuracy", "flops", "params", "latency_ms",
            "pareto"} <= set(table[0])
    assert table[0]["width"] == str(rows[0]["dims"]["width"])
    assert table[5]["latency_ms"] == "" and table[6]["accuracy"] == ""

    metric, back = load_results(paths["json"])
    assert metric == "accuracy"
    front = pareto_front(rows)
    assert back == [{**r, "pareto": p} for r, p in zip(rows, front)]
    assert json.loads(paths["json"].read_text())["higher_is_better"] is True

    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_write_results_perplexity_and_odd_dims(tmp_path):
    m = "perplexity"
    rows = [{"name": f"layers{k}-{att}", "dims": {"attention": att, "flops": k}, m: 30.0 - k + (att == "full"),
             f"rel_{m}": None, "flops": 1_000_000 * k, "params": 1000 * k, "latency_ms": None, "full": k == 8}
            for k in range(1, 9) for att in ("full", "linear")]
    paths = write_results(rows, tmp_path, metric=m, higher_is_better=False)
    with paths["csv"].open(newline="") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["name", "attention", "dim_flops"] and "perplexity" in header
    assert load_results(paths["json"])[0] == m
    assert paths["png"].read_bytes().startswith(b"\x89PNG")


def test_plot_with_nothing_measured(tmp_path):
    rows = [row("a", 100, None)]
    p = plot_results(rows, tmp_path / "p.png")
    assert p.read_bytes().startswith(b"\x89PNG")


def test_load_results_errors(tmp_path):
    with pytest.raises(UsageError):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(UsageError):
        load_results(bad)
