"""End to end: `sortednet train|eval|export|submodels` in subprocesses, checked on the files they write.

One tiny run (``trained_run`` in conftest.py: resnet_tiny on 8x8 digits, 4 steps, a 12 sub-model
grid) is trained once, evaluated and exported once, and reused; tests that must not disturb it work
on copies.

Most of the time of a CLI call is its start (importing torch), so the independent calls are run
concurrently: each such test names its *scenario* (``@uses("name")``), a function that runs the
CLI in a fresh folder and returns what the test asserts on. The ``batch`` fixture starts the
scenarios of all selected tests at once (those that need the shared run as soon as it is there);
a test then waits only for its own.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import CLI_ENV, TINY, TINY_EVAL, TINY_GRID, TINY_STEPS, cli, explain, run_folders, wait_for_checkpoint

WIDTHS = (0.25, 0.5, 1.0)
DEPTHS = (1, 2, 3, 4)
GRID_NAMES = {f"width{w:g}-depth{d}" for w in WIDTHS for d in DEPTHS}
FULL = "width1-depth4"
SMALLEST = "width0.25-depth1"
WORKERS = (os.cpu_count() or 2) + 1


# ----------------------------------------------------------------------------------------- helpers

def home_of(run: Path) -> Path:
    """The folder `sortednet` ran in: the run is home/runs/<run>."""
    return run.parent.parent


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest(run) / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def copy_run(run: Path, home: Path, name: str | None = None, results: bool = True) -> Path:
    """A copy of ``run`` at home/runs/<name> (with or without its eval/ and export/ folders)."""
    ignore = None if results else shutil.ignore_patterns("eval", "export")
    return Path(shutil.copytree(run, home / "runs" / (name or run.name), ignore=ignore))


def assert_usage_error(p: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one non-empty stderr line `sortednet: error: ...`, no traceback."""
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, explain(p)
    assert lines[0].startswith("sortednet: error: "), explain(p)
    for fragment in fragments:
        assert fragment in lines[0], explain(p)


def results(folder: Path) -> list[dict]:
    doc = json.loads((folder / "results.json").read_text())
    assert doc["metric"] == "accuracy" and doc["higher_is_better"] is True
    return doc["rows"]


# -------------------------------------------------------------------- the shared run, evaluated

@pytest.fixture(scope="module")
def evaluated(trained_run):
    """`sortednet eval --all-submodels` in the folder of the trained run: the newest run by default."""
    p = cli(["eval", "--all-submodels", *TINY_EVAL], cwd=home_of(trained_run))
    assert p.returncode == 0, explain(p)
    return p


@pytest.fixture(scope="module")
def exported(trained_run, evaluated):
    """`sortednet export --budget 0.5` of the trained (and evaluated) run: the export folder."""
    p = cli(["export", "--budget", "0.5", *TINY_EVAL], cwd=home_of(trained_run))
    assert p.returncode == 0, explain(p)
    return trained_run / "export" / "budget-0.5"


# ---------------------------------------------------------------------- concurrent CLI scenarios

SCENARIOS: dict = {}  # name -> (function, name of the test parameter it takes, whether it takes the run)


def scenario(param: str | None = None, run: bool = True):
    """Register ``fn(home[, run][, value of the test's parameter param])`` as a scenario: ``home`` is
    a fresh folder; ``run`` (when ``run=True``) the trained, evaluated and exported run, to copy
    and not to change. Scenarios without the run start before it is trained."""
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, param, run)
        return fn
    return register


def uses(name: str):
    """Mark a test as asserting on scenario ``name`` (so ``batch`` starts it early)."""
    def mark(fn):
        fn.scenario = name
        return fn
    return mark


def scenario_key(item) -> str | None:
    name = getattr(getattr(item, "function", None), "scenario", None)
    if name is None:
        return None
    param = SCENARIOS[name][1]
    return name if param is None else f"{name}[{item.callspec.params[param]}]"


class Batch:
    """Scenarios running in a thread pool, each in its own folder."""

    def __init__(self, factory):
        self.factory, self.futures = factory, {}
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)
        self.run: Path | None = None
        self.run_error: Exception | None = None

    @staticmethod
    def takes_run(key: str) -> bool:
        return SCENARIOS[key.partition("[")[0]][2]

    def submit(self, keys) -> None:
        for key in keys:
            if key not in self.futures:
                home = self.factory.mktemp(re.sub(r"\W+", "_", key))
                self.futures[key] = self.pool.submit(self._run, key, home)

    def _run(self, key: str, home: Path):
        name, _, value = key.partition("[")
        fn, param, takes_run = SCENARIOS[name]
        args = [home] + ([self.run] if takes_run else []) + ([value[:-1]] if param else [])
        return fn(*args)

    def __getitem__(self, key: str):
        if self.takes_run(key) and self.run is None:
            raise RuntimeError("the shared trained run is not there") from self.run_error
        self.submit([key])  # a scenario nobody asked for up front starts now
        return self.futures[key].result()


@pytest.fixture(scope="module", autouse=True)
def batch(request, tmp_path_factory):
    """Start the scenarios of the selected tests: those without the shared run at once, the others
    as soon as the run is trained, evaluated and exported (meanwhile the first ones run)."""
    keys = list(dict.fromkeys(k for k in map(scenario_key, request.session.items) if k is not None))
    b = Batch(tmp_path_factory)
    b.submit([k for k in keys if not b.takes_run(k)])
    later = [k for k in keys if b.takes_run(k)]
    if later:
        try:
            request.getfixturevalue("exported")
            b.run = request.getfixturevalue("trained_run")
        except Exception as e:  # reported by the tests that use the run
            b.run_error = e
        else:
            b.submit(later)
    yield b
    b.pool.shutdown(wait=True, cancel_futures=True)


def of(batch, request):
    """This test's scenario result."""
    return batch[scenario_key(request.node)]


# ------------------------------------------------------------------------------------------- help

def test_top_level_help_lists_the_verbs_and_flags(tmp_path):
    for args in (["--help"], ["-h"]):
        p = cli(args, cwd=tmp_path)
        assert p.returncode == 0, explain(p)
        assert p.stderr == ""
        for word in ("train", "eval", "export", "submodels", "compare", "--all-submodels", "--budget", "--help"):
            assert word in p.stdout
    assert list(tmp_path.iterdir()) == []


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "sortednet"
    assert script.is_file()
    p = subprocess.run([str(script), "--help"], cwd=tmp_path, env=CLI_ENV, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "usage: sortednet" in p.stdout, explain(p)


def _options(group: str) -> str:
    """The line Hydra's help prints for a config group: its options, sorted."""
    from sortedcli.cli import CONF_DIR

    return f"{group}: " + ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


VERB_HELP = {
    "train": ["sortednet train", "--recipe", "--resume", "-m", "--cfg job",
              _options("model"), "data:", _options("dims"),
              "sampler:", "optim: adamw, sgd", "trainer:", "digits", "fashion_mnist"],
    "eval": ["sortednet eval", "--all-submodels", "--ckpt", "calib_batches", "all_submodels: false"],
    "export": ["sortednet export", "--budget B", "--ckpt", "budget: ???", "model.pt2"],
    "submodels": ["sortednet submodels", "model=", "dims=", _options("model"), _options("dims")],
    "compare": ["sortednet compare RUN_A RUN_B", "runs: ???", "compare.csv", "plot.png"],
}


@pytest.mark.parametrize("verb", VERB_HELP)
def test_verb_help(verb, tmp_path):
    p = cli([verb, "--help"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    for text in VERB_HELP[verb]:
        assert text in p.stdout, f"{text!r} not in `sortednet {verb} --help`:\n{p.stdout}"
    assert not (tmp_path / "runs").exists()


def test_export_help_names_the_folder_export_writes(tmp_path):
    p = cli(["export", "--help"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "export/budget-" in p.stdout


# ------------------------------------------------------------------------------------------ train

def test_train_writes_config_metrics_and_a_checkpoint(trained_run):
    run = trained_run
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-resnet_tiny-weighted", run.name)
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.name == "resnet_tiny" and cfg.data.name == "digits"
    assert cfg.data.train_subset == 256 and cfg.trainer.batch_size == 64 and cfg.seed == 0
    assert list(cfg.dims.width.levels) == list(WIDTHS)
    assert "hydra" not in cfg

    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{TINY_STEPS:08d}"
    ckpt = latest(run)
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "state.pt"]
    assert not list((run / "checkpoints").glob(".*")), "a temporary checkpoint folder was left behind"

    # model.safetensors: torchvision state_dict keys, the resolved config in the metadata
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["step"] == str(TINY_STEPS)
    assert OmegaConf.create(meta["config"]) == cfg
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "fc.weight", "fc.bias"} <= keys

    from sortedcli.build import build_model

    model = build_model(cfg, {"num_classes": 10, "in_channels": 1})
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    assert sum(p.numel() for p in model.parameters()) == 77_858  # "78k parameters"

    # state.pt: plain tensors and values only
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    assert {"optimizer", "scheduler", "sampler", "rng", "progress"} <= set(state)
    assert state["progress"].pop("seconds") > 0  # training time (trainer.max_minutes)
    assert state["progress"] == {"step": TINY_STEPS, "epoch": 1, "batch": 0}
    assert isinstance(state["rng"], torch.Tensor)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    end = [r for r in records if "acc_largest" in r]
    assert len(end) == 1 and end[0]["epoch"] == 1 and end[0]["step"] == TINY_STEPS
    assert 0 <= end[0]["acc_largest"] <= 100 and 0 <= end[0]["acc_smallest"] <= 100


# ------------------------------------------------------------------------------------------- eval

def test_eval_all_submodels_of_the_newest_run(trained_run, evaluated):
    out = trained_run / "eval"
    assert {"results.csv", "results.json", "plot.png"} <= {p.name for p in out.iterdir()}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = results(out)
    assert len(rows) == TINY_GRID and {r["name"] for r in rows} == GRID_NAMES
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == TINY_GRID and [r["name"] for r in table] == [r["name"] for r in rows]

    full = [r for r in rows if r["full"]]
    assert len(full) == 1 and full[0]["name"] == FULL
    assert full[0]["rel_accuracy"] == pytest.approx(100.0)
    for r in rows:
        assert r["dims"] == {"width": float(r["dims"]["width"]), "depth": r["dims"]["depth"]}
        assert 0 <= r["accuracy"] <= 100 and r["latency_ms"] > 0
        assert r["rel_accuracy"] == pytest.approx(100 * r["accuracy"] / full[0]["accuracy"])
    # nested sub-models: FLOPs and parameters grow with every dim, the full model is the biggest
    by = {(r["dims"]["width"], r["dims"]["depth"]): r for r in rows}
    for (w, d), r in by.items():
        for (w2, d2), r2 in by.items():
            if w <= w2 and d <= d2 and (w, d) != (w2, d2):
                assert r["flops"] < r2["flops"] and r["params"] <= r2["params"], (r["name"], r2["name"])
    assert max(rows, key=lambda r: r["flops"])["name"] == FULL
    assert any(r["pareto"] for r in rows)

    # the table went to stdout
    text = evaluated.stdout
    assert f"resnet_tiny on digits: {TINY_GRID} sub-models" in text
    assert "% of full" in text and all(name in text for name in GRID_NAMES)
    assert str(trained_run.relative_to(home_of(trained_run))) in text  # the newest run was picked


@scenario()
def eval_ckpt_elsewhere(home, run):
    run = Path(shutil.copytree(run, home / "my runs" / "bob's run", ignore=shutil.ignore_patterns("eval", "export")))
    cwd = home / "cwd"
    cwd.mkdir()
    return cli(["eval", "--all-submodels", "--ckpt", str(run), *TINY_EVAL], cwd=cwd), run, cwd


@uses("eval_ckpt_elsewhere")
def test_eval_with_ckpt_run_dir_elsewhere(trained_run, batch, request):
    """--ckpt RUN_DIR from another folder (no runs/ there), through a path with a space and a quote;
    the same checkpoint measures the same accuracies."""
    p, run, cwd = of(batch, request)
    assert p.returncode == 0, explain(p)
    rows = results(run / "eval")
    assert len(rows) == TINY_GRID and {r["name"] for r in rows} == GRID_NAMES
    reference = {r["name"]: r["accuracy"] for r in results(trained_run / "eval")}
    assert {r["name"]: r["accuracy"] for r in rows} == reference
    assert not (cwd / "runs").exists()


@scenario()
def plain_eval(home, run):
    run = copy_run(run, home)  # evaluated (--all-submodels) and exported
    older = copy_run(run, home, "zzz-older-run")  # sorts last by name, but its checkpoint is older
    stamp = (run / "checkpoints" / "latest").stat().st_mtime - 3600
    os.utime(older / "checkpoints" / "latest", (stamp, stamp))
    out = run / "eval"
    before = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns)
              for n in ("results.csv", "results.json", "plot.png")}
    p = cli(["eval", *TINY_EVAL], cwd=home)
    after = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in before}
    return p, run, older, before, after


@uses("plain_eval")
def test_plain_eval_measures_largest_and_smallest_and_keeps_the_full_results(batch, request):
    """`eval` without --all-submodels on the newest run (by checkpoint time, not by name) writes
    eval/largest-smallest/ and leaves the whole grid's eval/results.* alone."""
    p, run, older, before, after = of(batch, request)
    assert p.returncode == 0, explain(p)
    assert after == before
    rows = results(run / "eval" / "largest-smallest")
    assert sorted(r["name"] for r in rows) == sorted([FULL, SMALLEST])
    assert "resnet_tiny on digits: 2 sub-models" in p.stdout
    assert not (older / "eval" / "largest-smallest").exists()


@scenario()
def eval_full_scores_zero(home, run):
    from sortedcli.data import build_vision_data

    run = copy_run(run, home, results=False)
    f = latest(run) / "model.safetensors"
    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata()
    state = load_file(str(f))
    label = build_vision_data({"name": "digits", "test_subset": 1}).test[0][1]
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    state["fc.bias"] = torch.full_like(state["fc.bias"], -1.0)
    state["fc.bias"][(label + 1) % 10] = 1.0  # every sub-model predicts a wrong class
    save_file(state, str(f), metadata=meta)
    return cli(["eval", "--all-submodels", "eval.calib_batches=2", "eval.calib_batch_size=64",
                "eval.test_subset=1"], cwd=home), run


@uses("eval_full_scores_zero")
def test_eval_when_the_full_model_scores_zero(batch, request):
    p, run = of(batch, request)
    assert p.returncode == 0, explain(p)
    rows = results(run / "eval")
    assert len(rows) == TINY_GRID and all(r["accuracy"] == 0 for r in rows)


# ----------------------------------------------------------------------------------------- export

def test_export_budget_writes_the_most_accurate_fitting_submodel(trained_run, exported):
    folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt2", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "sortednet-export/1" and config["budget"] == 0.5
    assert config["flops"] <= 0.5 * config["full_flops"]
    assert (config["num_classes"], config["in_channels"], config["image_size"]) == (10, 1, 8)
    assert config["model"]["name"] == "resnet_tiny" and config["data"] == "digits"

    # the choice: the evaluated sub-model within the budget most accurate on the validation split (ties:
    # fewer FLOPs); config.json's accuracy is its test accuracy (tests/test_validation_split.py)
    rows = {r["name"]: r for r in results(trained_run / "eval")}
    assert config["full_flops"] == rows[FULL]["flops"] and config["full_accuracy"] == rows[FULL]["accuracy"]
    fits = [r for r in rows.values() if r["flops"] <= 0.5 * rows[FULL]["flops"]]
    best = max(fits, key=lambda r: (r["val_accuracy"], -r["flops"]))
    assert config["name"] == best["name"], (config["name"], best["name"])
    assert config["accuracy"] == best["accuracy"] and config["flops"] == best["flops"]
    assert config["params"] == best["params"]
    assert config["submodel"] == best["dims"]


def test_exported_model_is_plain_and_matches_its_pt2_program(exported):
    from sortedcli import export

    plain = export.load(exported)
    modules = {type(m).__module__ for m in plain.modules()}
    assert not [m for m in modules if m.startswith("sortedcli")], modules
    assert type(plain).__module__ == "torchvision.models.resnet" and type(plain).__name__ == "ResNet"
    config = json.loads((exported / "config.json").read_text())
    # BatchNorm folded into the convolutions: BN weight and bias gone, a conv bias in their place
    assert sum(p.numel() for p in plain.parameters()) == config["folded_params"] < config["params"]

    program = torch.export.load(str(exported / "model.pt2")).module()
    torch.manual_seed(0)
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        want, got = plain(x), program(x)
    assert want.shape == (7, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the state_dict on disk is the plain model's, with torchvision keys
    state = load_file(str(exported / "model.safetensors"))
    assert state.keys() == plain.state_dict().keys() and "fc.weight" in state


@scenario()
def pt2_without_sortedcli(home, run):
    code = (
        "import sys\n"
        "sys.modules['sortedcli'] = None  # any import of sortedcli now fails\n"
        "import torch\n"
        f"m = torch.export.load({str(run / 'export' / 'budget-0.5' / 'model.pt2')!r}).module()\n"
        "y = m(torch.randn(3, 1, 8, 8))\n"
        "assert not [k for k, v in sys.modules.items() if k.startswith('sortedcli') and v is not None]\n"
        "print(tuple(y.shape))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=home, env=CLI_ENV, capture_output=True, text=True,
                          timeout=300)


@uses("pt2_without_sortedcli")
def test_pt2_runs_with_plain_torch_without_sortedcli(batch, request):
    p = of(batch, request)
    assert p.returncode == 0, explain(p)
    assert p.stdout.strip().splitlines()[-1] == "(3, 10)"


def test_export_config_records_the_input_normalization(exported):
    from sortedcli.data.vision import DEFAULT_STATS

    config = json.loads((exported / "config.json").read_text())
    mean, std = DEFAULT_STATS["digits"]
    assert config["mean"] == pytest.approx(mean) and config["std"] == pytest.approx(std)


@scenario()
def export_without_eval(home, run):
    run = copy_run(run, home, "fresh", results=False)  # a run nobody evaluated
    return cli(["export", "--budget", "0.5", *TINY_EVAL], cwd=home), run


@uses("export_without_eval")
def test_export_without_eval_results_takes_the_largest_fitting_submodel(trained_run, batch, request):
    p, run = of(batch, request)
    assert p.returncode == 0, explain(p)
    assert "no eval results" in p.stdout and "largest one that fits" in p.stdout
    config = json.loads((run / "export" / "budget-0.5" / "config.json").read_text())
    # no eval numbers, but the cut-out model's own, measured by export on the test set
    assert config["eval_accuracy"] is None and config["full_accuracy"] is None
    assert 0 <= config["accuracy"] <= 100 and config["measured"]["calibration_from"] == "export"
    # FLOPs as eval measured them on the same checkpoint
    flops = {r["name"]: r["flops"] for r in results(trained_run / "eval")}
    fitting = [f for f in flops.values() if f <= 0.5 * flops[FULL]]
    assert config["flops"] == max(fitting) == flops[config["name"]]
    assert f"chose {config['name']}" in p.stdout
    assert not (run / "eval").exists()


# ------------------------------------------------------------------------------------- submodels

@scenario(param="model", run=False)
def submodels(home, model):
    return cli(["submodels", f"model={model}", "dims=[width,depth]"], cwd=home), home


@uses("submodels")
@pytest.mark.parametrize("model,count", [("resnet50", 160), ("resnet18", 80)])
def test_submodels_counts_the_grid(model, count, batch, request):
    p, home = of(batch, request)
    assert p.returncode == 0, explain(p)
    assert re.search(rf"^{count} distinct sub-models\.", p.stdout, re.M), p.stdout[-500:]  # none dropped
    assert f"{model}: {count} sub-models (width 10 x depth {count // 10})" in p.stdout
    assert not (home / "runs").exists()


# ---------------------------------------------------------------------------------- Hydra features

def test_cfg_job_prints_the_config_and_trains_nothing(tmp_path):
    p = cli(["train", *TINY, "--cfg", "job"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    cfg = yaml.safe_load(p.stdout)
    assert cfg["model"]["name"] == "resnet_tiny" and cfg["data"]["name"] == "digits"
    assert cfg["trainer"]["epochs"] == 1 and cfg["dims"]["width"]["levels"] == list(WIDTHS)
    assert "hydra" not in cfg
    assert list(tmp_path.iterdir()) == []


@scenario(run=False)
def multirun(home):
    return cli(["train", "-m", *TINY, "seed=0,1"], cwd=home), home


@uses("multirun")
def test_multirun_makes_one_run_per_value(batch, request):
    p, home = of(batch, request)
    assert p.returncode == 0, explain(p)
    runs = run_folders(home / "runs")
    assert len(runs) == 2, runs
    assert all("multirun" in r.parts for r in runs)
    assert sorted(OmegaConf.load(r / "config.yaml").seed for r in runs) == [0, 1]
    assert all(latest(r).name == f"step-{TINY_STEPS:08d}" for r in runs)
    a, b = (weights(r) for r in runs)
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])  # different seeds, different runs


# -------------------------------------------------------------------------------------- bad input
# Each case runs in its own folder; "run" cases hold a copy of the trained, evaluated and exported
# run in runs/ (the newest run by default), "corrupt" the same with a truncated model.safetensors.

BAD = {  # id: (args, setup, kind, fragment of the message)
    "unknown-model": (["train", *TINY, "model=nope"], "run", "usage", "unknown model 'nope'"),
    "unknown-dim": (["train", *TINY, "dims=[width,kernel]"], "run", "usage", "unknown dims 'kernel'"),
    "dim-the-model-lacks": (["train", *TINY, "dims=[width,heads]"], "run", "usage", "cannot be sorted along 'heads'"),
    "typo-key": (["train", *TINY, "trainer.epoch=3"], "run", "usage", "trainer.epoch (did you mean trainer.epochs?)"),
    "budget-0": (["export", "--budget", "0", *TINY_EVAL], "run", "usage", "(0, 1]"),
    "budget-1.5": (["export", "--budget", "1.5", *TINY_EVAL], "run", "usage", "got 1.5"),
    "budget-abc": (["export", "--budget=abc", *TINY_EVAL], "run", "usage", "got 'abc'"),
    "budget-below-smallest": (["export", "--budget", "1e-6", *TINY_EVAL], "run", "usage",
                              "below the smallest sub-model"),
    "budget-missing": (["export", *TINY_EVAL], "run", "usage", "--budget B"),
    "budget-without-value": (["export", "--budget"], "run", "usage", "--budget needs a value"),
    "ckpt-missing": (["eval", "--all-submodels", "--ckpt", "no/such/run", *TINY_EVAL], "run", "usage",
                     "no/such/run does not exist"),
    "corrupt-checkpoint": (["eval", "--all-submodels", *TINY_EVAL], "corrupt", "usage", "corrupt"),
    "no-runs": (["eval", *TINY_EVAL], "empty", "usage", "no trained run"),
    "missing-data": (["train", *TINY, "data=fashion_mnist", "data.root=/nonexistent/fmnist"], "run", "usage",
                     "Fashion-MNIST not found"),
    "unknown-verb": (["frobnicate", "--budget", "0.5"], "run", "usage", "unknown command 'frobnicate'"),
    "budget-given-to-eval": (["eval", "--budget", "0.5"], "run", "usage", "does not take --budget"),
    "all-submodels-given-to-export": (["export", "--all-submodels", "--budget", "0.5"], "run", "usage",
                                      "does not take --all-submodels"),
    "unknown-recipe": (["train", "--recipe", "nope"], "run", "usage", "unknown recipe 'nope'"),
    "resume-changes-model": (["train", "--resume", "{run}", "model=resnet18"], "run", "usage",
                             "cannot change 'model'"),
    "resume-missing-folder": (["train", "--resume", "no/such/run"], "run", "usage", "no checkpoint there"),
}


@scenario(param="case")
def bad_input(home, run, case):
    args, setup, _, _ = BAD[case]
    copy = None
    if setup in ("run", "corrupt"):
        copy = copy_run(run, home)
        if setup == "corrupt":
            f = latest(copy) / "model.safetensors"
            os.truncate(f, f.stat().st_size // 2)
    before = snapshot(home)
    p = cli([a.replace("{run}", str(copy)) for a in args], cwd=home)
    return p, home, copy, before


@uses("bad_input")
@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(case, batch, request):
    p = of(batch, request)[0]
    _, _, kind, fragment = BAD[case]
    if kind == "hydra":  # Hydra's own composition error: its message, status 2, no traceback
        assert p.returncode == 2, explain(p)
        assert "Traceback" not in p.stderr and fragment in p.stderr, explain(p)
    else:
        assert_usage_error(p, fragment)


@uses("bad_input")
@pytest.mark.parametrize("case", BAD)
def test_bad_input_changes_nothing(case, batch, request):
    p, home, run, before = of(batch, request)
    after = snapshot(home)
    changed = [f for f in before if after.get(f) != before[f]]
    assert not changed, f"changed or removed: {changed}"
    new = sorted(set(after) - set(before))
    if run is not None:
        inside = [f for f in new if Path(home, f).is_relative_to(run)]
        assert not inside, f"new files in the existing run: {inside}"
    # allowed: Hydra's log file in the working folder, and for `train` Hydra's new (empty) run folder
    stray = [f for f in new if not re.fullmatch(r"(train|eval|export|submodels)\.log", f)
             and not (BAD[case][0][0] == "train" and f.startswith("runs/"))]
    assert not stray, f"new files: {stray}"
    assert run_folders(home / "runs") == ([run] if run else [])  # no new (partial) run with a checkpoint
    assert [p.parent for p in home.glob("runs/*/config.yaml")] == ([run] if run else [])


@uses("bad_input")
@pytest.mark.parametrize("case", ["no-runs"])
def test_eval_leaves_no_files_in_the_working_folder(case, batch, request):
    p, home, _, _ = of(batch, request)
    assert p.returncode == 2, explain(p)
    assert sorted(p.name for p in home.iterdir()) == []


@scenario()
def same_second(home, run):
    """A train whose clock reads the second in which an existing run (a copy of the trained one) started."""
    stamp = "2030-01-01_12-00-00"
    existing = copy_run(run, home, f"{stamp}-resnet_tiny-weighted", results=False)
    frozen = ("import sys, datetime as d\n"
              "import hydra.core.utils as u\n"
              "class Frozen(d.datetime):\n"
              "    @classmethod\n"
              "    def now(cls, tz=None):\n"
              "        return cls(2030, 1, 1, 12, 0, 0)\n"
              "u.datetime = Frozen  # Hydra's ${now:...} resolver: this train starts in the same second\n"
              "from sortedcli.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    before = snapshot(existing)
    p = subprocess.run([sys.executable, "-c", frozen, "train", *TINY, "seed=1"], cwd=home, env=CLI_ENV,
                       capture_output=True, text=True, timeout=300)
    return p, existing, before, snapshot(existing)


@uses("same_second")
def test_a_train_started_in_the_same_second_leaves_the_other_run_alone(batch, request):
    p, existing, before, after = of(batch, request)
    assert OmegaConf.load(existing / "config.yaml").seed == 0
    assert p.returncode in (0, 2), explain(p)  # a new folder, or a refusal: either way
    assert {f: v for f, v in after.items() if f in before} == before


# ----------------------------------------------------------------------------------------- resume

@scenario(run=False)
def resume_after_max_steps(home):
    over = [*TINY, "trainer.ckpt_every=1"]
    stopped = cli(["train", *over, "trainer.max_steps=3", "paths.runs=stopped"], cwd=home)
    runs = run_folders(home / "stopped")
    stopped_at = latest(runs[0]).name if runs else None
    resumed = cli(["train", "--resume", runs[0], "trainer.max_steps=null"], cwd=home) if runs else None
    if resumed is None or resumed.returncode != 0:
        return stopped, stopped_at, resumed, None, runs, []
    whole = cli(["train", *over, "paths.runs=whole"], cwd=home)
    return stopped, stopped_at, resumed, whole, runs, run_folders(home / "whole")


@uses("resume_after_max_steps")
def test_resume_after_max_steps_matches_an_uninterrupted_run(batch, request):
    stopped, stopped_at, resumed, whole, runs, wholes = of(batch, request)
    assert stopped.returncode == 0, explain(stopped)
    assert stopped_at == "step-00000003"
    assert resumed.returncode == 0, explain(resumed)
    assert whole.returncode == 0 and len(wholes) == 1, explain(whole)
    assert latest(runs[0]).name == f"step-{TINY_STEPS:08d}"
    assert_bitwise_equal(weights(runs[0]), weights(wholes[0]))


def test_eval_follows_the_runs_own_eval_settings_unless_given_on_its_command_line(tmp_path):
    """A recipe's eval: section (SmolLM2's eval.batch_size: 8; news' eval.test_subset) sizes the run's
    evaluation: eval 512 sequences of a 49k-token head at once ran a 24 GB machine out of memory."""
    p = cli(["train", *TINY, "trainer.max_steps=1", "eval.test_subset=40", "eval.batch_size=16"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    (run,) = run_folders(tmp_path / "runs")
    p = cli(["eval", "--ckpt", run], cwd=tmp_path)
    assert p.returncode == 0 and "on 40 test examples" in p.stdout, explain(p)
    p = cli(["eval", "--ckpt", run, "eval.test_subset=24"], cwd=tmp_path)
    assert p.returncode == 0 and "on 24 test examples" in p.stdout, explain(p)


def test_max_steps_zero_keeps_the_starting_model_as_a_checkpoint_and_resumes_from_it(tmp_path):
    """trainer.max_steps=0: the untouched starting model becomes step-00000000 (the baseline a
    fine-tuning is compared with); resuming it trains exactly as a run that never stopped."""
    zero = cli(["train", *TINY, "trainer.max_steps=0", "paths.runs=zero"], cwd=tmp_path)
    assert zero.returncode == 0 and "trained 0 steps" in zero.stdout, explain(zero)
    (run,) = run_folders(tmp_path / "zero")
    assert latest(run).name == "step-00000000"
    p = cli(["eval", "--all-submodels", *TINY_EVAL, "--ckpt", run], cwd=tmp_path)
    assert p.returncode == 0 and (run / "eval" / "results.json").is_file(), explain(p)
    resumed = cli(["train", "--resume", run, "trainer.max_steps=null"], cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    whole = cli(["train", *TINY, "paths.runs=whole"], cwd=tmp_path)
    assert whole.returncode == 0, explain(whole)
    assert latest(run).name == f"step-{TINY_STEPS:08d}"
    assert_bitwise_equal(weights(run), weights(run_folders(tmp_path / "whole")[0]))


@scenario(run=False)
def resume_from_earlier_checkpoint(home):
    over = [*TINY, "trainer.epochs=2", "trainer.ckpt_every=1", "trainer.keep_checkpoints=100"]
    p = cli(["train", *over], cwd=home)
    assert p.returncode == 0, explain(p)
    (whole,) = run_folders(home / "runs")
    steps = sorted(c.name for c in (whole / "checkpoints").glob("step-*"))
    cut = Path(shutil.copytree(whole, home / "cut"))
    for name in steps[3:]:
        shutil.rmtree(cut / "checkpoints" / name)
    (cut / "checkpoints" / "latest").write_text("step-00000003")
    return cli(["train", "--resume", cut], cwd=home), home, whole, cut, steps


@uses("resume_from_earlier_checkpoint")
def test_resume_from_an_earlier_checkpoint_is_bitwise_exact(batch, request):
    """A run cut back to its step-3 checkpoint (mid first epoch, as a run killed there leaves it) and
    resumed ends with exactly the weights and optimizer state of the run that went through."""
    p, home, whole, cut, steps = of(batch, request)
    assert steps == [f"step-{s:08d}" for s in range(1, 2 * TINY_STEPS + 1)]
    assert p.returncode == 0, explain(p)
    assert "resuming" in p.stdout and "step 3" in p.stdout
    assert latest(cut).name == steps[-1]
    assert_bitwise_equal(weights(cut), weights(whole))
    a = torch.load(latest(cut) / "state.pt", weights_only=True)
    b = torch.load(latest(whole) / "state.pt", weights_only=True)
    a["progress"].pop("seconds"), b["progress"].pop("seconds")  # wall time: the one thing that differs
    assert a["progress"] == b["progress"] and torch.equal(a["rng"], b["rng"])
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert run_folders(home / "runs") == [whole]  # resuming made no new run folder


@scenario(run=False)
def resume_after_sigkill(home):
    """Train 48 steps with a checkpoint after each; SIGKILL it once the first one is there, resume it;
    meanwhile train the same run through."""
    over = [*TINY, "data.train_subset=512", "trainer.epochs=6", "trainer.ckpt_every=1"]
    argv = [sys.executable, "-m", "sortedcli.cli", "train", *over]
    killed = subprocess.Popen([*argv, "paths.runs=killed"], cwd=home, env=CLI_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    whole = subprocess.Popen([*argv, "paths.runs=whole"], cwd=home, env=CLI_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(home, "killed/*/checkpoints/latest", killed)
        killed.send_signal(signal.SIGKILL)
        killed_status = killed.wait(timeout=30)
        whole_status = whole.wait(timeout=300)
    finally:
        for proc in (killed, whole):  # on a failure above: stop what is still running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (run,) = run_folders(home / "killed")
    stopped_at = latest(run).name
    resumed = cli(["train", "--resume", run], cwd=home)
    return killed_status, stopped_at, resumed, run, whole_status, whole.stderr.read(), run_folders(home / "whole")


@uses("resume_after_sigkill")
@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(batch, request):
    killed_status, stopped_at, resumed, run, whole_status, whole_stderr, wholes = of(batch, request)
    total = 512 // 64 * 6
    assert killed_status == -signal.SIGKILL, "the run ended before it was killed"
    assert f"step-{1:08d}" <= stopped_at < f"step-{total:08d}"
    assert whole_status == 0, whole_stderr
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming" in resumed.stdout
    assert latest(run).name == f"step-{total:08d}"
    (ref,) = wholes
    assert latest(ref).name == f"step-{total:08d}"
    assert_bitwise_equal(weights(run), weights(ref))
