"""End to end for issue 5: MobileNetV2 runs, `compare`, TensorBoard, the new recipes and the new
one-line errors. CLI calls that do not depend on each other run concurrently (most of a call's time
is importing torch)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import TINY_EVAL, cli, explain, run_folders
from sortedcli.models import weights as pretrained
from test_data import write_cifar10, write_fashion

MNET = ["model=mobilenet_tiny", "data=digits", "trainer.epochs=1", "trainer.batch_size=64", "data.train_subset=256",
        "data.test_subset=64", *TINY_EVAL, "dims.width.levels=[0.5,1.0]"]
SMOKE = ["trainer.epochs=1", "trainer.max_steps=2", "trainer.batch_size=8", "data.train_subset=16",
         "data.test_subset=8", "trainer.epoch_eval=false", "eval.calib_batches=1", "eval.calib_batch_size=8",
         "eval.test_subset=8", "eval.batch_size=8"]


def one_line_error(p, *fragments):
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    for fragment in fragments:
        assert fragment in lines[0], explain(p)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Two mobilenet_tiny runs (sorted, and the unsorted baseline sampler=full) evaluated, a third
    trained but not evaluated, and a resnet_tiny run evaluated: runs/{sorted,full,noeval,resnet}."""
    home = tmp_path_factory.mktemp("mobilenet")
    jobs = {"sorted": [*MNET, "trainer.log_every=1"], "full": [*MNET, "sampler=full"], "noeval": [*MNET, "trainer.tensorboard=false"],
            "resnet": ["model=resnet_tiny", *MNET[1:]]}

    def train_and_eval(name):
        p = cli(["train", *jobs[name], f"hydra.run.dir=runs/{name}"], cwd=home)
        assert p.returncode == 0, explain(p)
        if name != "noeval":
            p = cli(["eval", "--all-submodels", "--ckpt", f"runs/{name}", *TINY_EVAL], cwd=home)
            assert p.returncode == 0, explain(p)
        return p

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(train_and_eval, jobs))
    return home


def test_mobilenet_run_trains_evaluates_and_exports(home):
    rows = json.loads((home / "runs/sorted/eval/results.json").read_text())["rows"]
    assert len(rows) == 2 * 3  # widths 0.5, 1 x depths 1..3 (the tiny variant's residual blocks)
    p = cli(["export", "--budget", "0.6", "--ckpt", "runs/sorted", *TINY_EVAL], cwd=home)
    assert p.returncode == 0, explain(p)
    program = torch.export.load(str(home / "runs/sorted/export/budget-0.6/model.pt2")).module()
    assert program(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_train_writes_tensorboard_events_unless_turned_off(home):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((home / "runs/sorted/tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/acc_largest", "eval/acc_smallest"} <= set(acc.Tags()["scalars"])
    assert not (home / "runs/noeval/tensorboard").exists()


def test_compare_writes_one_table_and_one_plot(home):
    p = cli(["compare", "runs/sorted", "runs/full", "out=cmp"], cwd=home)
    assert p.returncode == 0, explain(p)
    assert "width0.5-depth1" in p.stdout and "sorted" in p.stdout and "full" in p.stdout
    assert re.search(r"wrote cmp/", p.stdout)
    doc = json.loads((home / "cmp/compare.json").read_text())
    assert list(doc["runs"]) == ["sorted", "full"] and doc["runs"]["full"]["sampler"] == "full"
    lines = (home / "cmp/compare.csv").read_text().splitlines()
    assert lines[0] == "name,flops,sorted,full" and len(lines) == 1 + 6
    assert (home / "cmp/plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = cli(["compare", "runs/sorted", "runs/full"], cwd=home)  # default folder: runs/compare/<time>
    assert p.returncode == 0 and list((home / "runs/compare").iterdir()), explain(p)


def test_two_compares_in_the_same_second_get_folders_of_their_own(home, monkeypatch):
    """The default folder is named after the second (runs/compare/<time>): a second compare within that
    second writes <time>-2 (it was refused: "already exists ... pass out=NEW_DIR", for a name the user
    never chose)."""
    from sortedcli.cli import main
    from sortedcli.commands import compare

    monkeypatch.chdir(home)
    monkeypatch.setattr(compare.time, "strftime", lambda fmt, *when: "2030-01-01_12-00-00")
    assert [main(["compare", "runs/sorted", "runs/full"]) for _ in range(2)] == [0, 0]
    made = sorted(p.name for p in (home / "runs/compare").glob("2030-01-01_12-00-00*"))
    assert made == ["2030-01-01_12-00-00", "2030-01-01_12-00-00-2"]
    assert all((home / "runs/compare" / name / "compare.json").is_file() for name in made)


@pytest.mark.parametrize("args,fragments", [
    (["runs/sorted", "runs/noeval"], ["runs/noeval has no eval results",
                                      "sortednet eval --all-submodels --ckpt runs/noeval"]),
    (["runs/sorted", "runs/resnet"], ["mobilenet_tiny", "resnet_tiny", "same model"]),
    (["runs/sorted"], ["two or more run folders"]),
    (["runs/sorted", "runs/nope"], ["runs/nope is not a run folder"]),
    ([], ["runs is required"]),
])
def test_compare_mistakes_are_one_line_and_change_nothing(home, args, fragments):
    before = snapshot(home / "runs")
    p = cli(["compare", *args], cwd=home)
    one_line_error(p, *fragments)
    assert snapshot(home / "runs") == before


# ------------------------------------------------------------------------------ bad input (train)

def _weights_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pth")
    (folder / "hostname").write_text("my-host\n")
    return {"resnet": folder / "resnet18.pth", "text": folder / "hostname"}


BAD_TRAIN = {
    "batch-size-negative": (["trainer.batch_size=-1"], "trainer.batch_size must be an integer >= 1, got -1"),
    "epochs-negative": (["trainer.epochs=-3"], "trainer.epochs must be an integer >= 1, got -3"),
    "lr-not-a-number": (["optim.lr=abc"], "optim.lr must be a number > 0, got 'abc'"),
    "weights-not-a-state-dict": (["model.weights={text}"], "is not a weights file"),
    "weights-of-another-model": (["model.weights={resnet}"], "does not fit"),
    "depth-beyond-the-model": (["dims.depth.levels=[4]"], "integers in 1..3 for mobilenet_tiny"),
    "importance-unknown": (["model.importance=fisher"], "model.importance=fisher"),
    "augment-unknown": (["data.augment=[rotate]"], "data.augment must be"),
}


@pytest.fixture(scope="module")
def bad_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    files = _weights_files(root / "files")

    def attempt(case):
        home = root / case
        home.mkdir()
        extra = [a.format(**files) for a in BAD_TRAIN[case][0]]
        return cli(["train", *MNET, *extra], cwd=home), home

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(BAD_TRAIN, pool.map(attempt, BAD_TRAIN)))


@pytest.mark.parametrize("case", BAD_TRAIN)
def test_bad_train_input_is_one_line_exit_2_and_trains_nothing(bad_train, case):
    p, home = bad_train[case]
    one_line_error(p, BAD_TRAIN[case][1])
    assert run_folders(home / "runs") == [] and not list(home.glob("runs/*/config.yaml"))


# ---------------------------------------------------------------------------------------- recipes

@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """Each new recipe trained for 2 steps on a handful of images (the pretrained one with ImageNet
    weights when `make weights` installed them, else with a torchvision-format file of the same
    architecture), then `eval --all-submodels`. The images are tiny files in the real formats
    written here (Fashion-MNIST's gzip IDX, CIFAR-10's pickles): no installed dataset is needed."""
    root = tmp_path_factory.mktemp("recipes")
    cifar, fashion = root / "cifar", root / "fashion"
    write_cifar10(cifar, per_batch=4)
    write_fashion(fashion, n_train=20, n_test=8)  # 2 held out for validation, 16 train
    weights = []
    if pretrained.offline_file("mobilenet_v2-b0353104.pth") is None:
        torch.save(torchvision.models.mobilenet_v2().state_dict(), root / "mnv2.pth")
        weights = [f"model.weights={root / 'mnv2.pth'}"]
    extra = {"fmnist_mobilenet_v2_pretrained": [*weights, f"data.root={fashion}"],
             "fmnist_mobilenet_v2": ["dims.depth.levels=[1,10]", f"data.root={fashion}"],
             "cifar10_mobilenet_v2": [f"data.root={cifar}", "data.verify=false", "dims.width.levels=[0.25,1.0]"]}

    def attempt(name):
        home = root / name
        home.mkdir()
        p = cli(["train", "--recipe", name, *SMOKE, *extra[name]], cwd=home)
        if p.returncode != 0:
            return p, None
        return p, cli(["eval", "--all-submodels", *SMOKE[-4:]], cwd=home)

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(extra, pool.map(attempt, extra)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fmnist_mobilenet_v2_pretrained", "fmnist_mobilenet_v2", "cifar10_mobilenet_v2"])
def test_new_recipes_run_end_to_end(recipe_runs, name):
    train, evaluated = recipe_runs[name]
    assert train.returncode == 0, explain(train)
    assert "trained 2 steps" in train.stdout and "augmentation:" in train.stdout
    assert evaluated.returncode == 0, explain(evaluated)
    assert "sub-models" in evaluated.stdout
