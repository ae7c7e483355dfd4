"""Issue 14: a seeded validation split of the training data that training never sees, eval reporting
validation and test numbers, export choosing by validation, and export folders that need nothing else.

The CLI runs are tiny (``TINY``: resnet_tiny on 256 digits; one mobilenet_tiny run started from a
weights file that the test writes); the data checks build every data kind from small files made here.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CLI_ENV, TINY, TINY_EVAL, cli, explain, run_folders
from sortedcli.data import lm
from sortedcli.data.text_classification import build_text_data
from sortedcli.data.validation import hold_out
from sortedcli.data.vision import build_vision_data
from sortedcli.errors import UsageError

DIGITS_TRAIN = 1500  # sortedcli.data.vision._digits: 1500 train / 297 test


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter with the CLI tests' environment."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=CLI_ENV, capture_output=True, text=True,
                          timeout=300)


def rows_of(run: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((run / "eval" / "results.json").read_text())["rows"]}


# ------------------------------------------------------------------------------------ the split

def test_hold_out_is_seeded_disjoint_and_the_same_in_another_process(tmp_path):
    cfg = {"val_fraction": 0.1, "val_seed": 3}
    train, val = hold_out(DIGITS_TRAIN, cfg)
    assert len(val) == 150 and len(train) == DIGITS_TRAIN - 150
    assert not set(train) & set(val) and sorted(train + val) == list(range(DIGITS_TRAIN))
    assert train == sorted(train)  # the kept items stay in their order: train_subset takes the first ones
    assert hold_out(DIGITS_TRAIN, cfg) == (train, val)
    assert hold_out(DIGITS_TRAIN, {**cfg, "val_seed": 4})[1] != val
    assert val != list(range(DIGITS_TRAIN - 150, DIGITS_TRAIN))  # a shuffle, not the tail
    # another interpreter (another rank, a resumed run) draws the same items, whatever the global RNG
    p = python("import torch, json; torch.manual_seed(123); from sortedcli.data.validation import hold_out; "
               "print(json.dumps(hold_out(1500, {'val_fraction': 0.1, 'val_seed': 3})[1]))", tmp_path)
    assert p.returncode == 0, explain(p)
    assert json.loads(p.stdout) == val
    # off, and an older run's config without the key: every item trains
    assert hold_out(10, {"val_fraction": 0}) == (list(range(10)), [])
    assert hold_out(10, {}) == (list(range(10)), [])
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(UsageError, match="val_fraction"):
            hold_out(10, {"val_fraction": bad})
    with pytest.raises(UsageError, match="leaves none to train on"):
        hold_out(1, {"val_fraction": 0.5})


def test_images_held_out_are_never_training_or_calibration_items():
    full = build_vision_data({"name": "digits", "val_fraction": 0})
    cfg = {"name": "digits", "val_fraction": 0.1, "val_seed": 0}
    keep, held = hold_out(DIGITS_TRAIN, cfg)
    data = build_vision_data({**cfg, "train_subset": 256})
    assert len(data.val) == 150 and len(data.train) == len(data.calib) == 256
    images = full.calib.images
    assert torch.equal(data.val.images, images[held])
    assert torch.equal(data.train.images, images[keep[:256]]) and torch.equal(data.calib.images, images[keep[:256]])
    # the same validation items with any train_subset; the test set untouched
    assert torch.equal(build_vision_data(cfg).val.images, data.val.images)
    assert torch.equal(data.test.images, full.test.images)
    assert len(build_vision_data({**cfg, "val_subset": 20}).val) == 20
    assert build_vision_data({"name": "digits"}).val is None  # a config from before the split


def test_text_and_language_data_hold_out_whole_examples_and_documents(tmp_path):
    words = [f"w{i}" for i in range(40)]
    tok = lm.train_tokenizer([" ".join(words)] * 4, 300, tmp_path / "tok")
    rows = [{"text": f"{words[i]} {words[(i * 7) % 40]}", "label": ["a", "b"][i % 2]} for i in range(40)]
    for name, part in (("train", rows), ("test", rows[:6])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["text", "label"])
            w.writeheader()
            w.writerows(part)
    cfg = {"name": "text", "train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv"),
           "val_fraction": 0.25, "val_seed": 0, "max_length": 16}
    text = build_text_data(cfg, tok)
    keep, held = hold_out(40, cfg)
    seqs = lambda ds: [tuple(ds[i]["input_ids"]) for i in range(len(ds))]  # noqa: E731
    assert len(text.val) == 10 and len(text.train) == 30 and text.calib is text.train
    assert seqs(text.val) == [tuple(tok(rows[i]["text"], truncation=True, max_length=16).input_ids) for i in held]
    assert not set(seqs(text.val)) & set(seqs(text.train))

    docs = [f"document {i} " + " ".join(words[i % 40] for _ in range(30)) for i in range(20)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs), encoding="utf-8")
    cfg = {"name": "corpus", "path": str(corpus), "doc_chars": 10, "block_size": 16, "test_fraction": 0.1,
           "split_seed": 0, "val_fraction": 0.2, "val_seed": 0}
    data = lm.build_lm_data(cfg, tok)
    train, _ = lm.split(docs, 0.1, 0)
    keep, held = hold_out(len(train), cfg)
    assert data.info["val_items"] == len(held) == 4 and data.info["train_items"] == len(keep) == 14
    # whole documents: each split is packed from its own documents, so no block holds text of both
    assert torch.equal(data.val.blocks, lm.pack(tok, [train[i] for i in held], 16))
    assert torch.equal(data.train.blocks, lm.pack(tok, [train[i] for i in keep], 16))


# ------------------------------------------------------------------------------- eval and export

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """runs/val: TINY (val_fraction 0.1 by default) trained and evaluated; runs/noval: the same with
    data.val_fraction=0; both with `eval --all-submodels` (validation scored on 64 items)."""
    home = tmp_path_factory.mktemp("valsplit")
    for name, extra in (("val", []), ("noval", ["data.val_fraction=0"])):
        p = cli(["train", *TINY, *extra, f"hydra.run.dir=runs/{name}"], cwd=home)
        assert p.returncode == 0, explain(p)
        p = cli(["eval", "--all-submodels", "--ckpt", f"runs/{name}", *TINY_EVAL, "eval.val_subset=64"], cwd=home)
        assert p.returncode == 0, explain(p)
        (home / f"eval-{name}.out").write_text(p.stdout)
    return home


def test_training_holds_out_the_validation_items_it_never_sees(home):
    run = home / "runs" / "val"
    config = (run / "config.yaml").read_text()
    assert "val_fraction: 0.1" in config and "val_seed: 0" in config
    # the run trained on 256 of the 1350 kept images (4 steps of 64), as without the split
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s.get("step", 0) for s in steps) == 4
    # from the checkpoint's own config, in another process: the same held-out items, none in training
    code = ("from sortedcli import runs; from sortedcli.build import build_data; import torch, json\n"
            f"_, cfg = runs.load_weights(runs.latest_checkpoint({str(run)!r}))\n"
            "d, _ = build_data(cfg)\n"
            "val = {tuple(x.flatten().tolist()) for x in d.val.images}\n"
            "train = {tuple(x.flatten().tolist()) for x in d.train.images}\n"
            "print(json.dumps([len(d.val), len(val & train), float(d.val.images.sum())]))\n")
    p = python(code, home)
    assert p.returncode == 0, explain(p)
    n, shared, total = json.loads(p.stdout)
    held = build_vision_data({"name": "digits", "val_fraction": 0.1, "val_seed": 0}).val.images
    assert n == 150 and shared == 0 and total == pytest.approx(float(held.sum()))


def test_eval_reports_validation_and_test_in_json_csv_and_table(home):
    run, out = home / "runs" / "val", (home / "eval-val.out").read_text()
    assert "64 test examples" in out and "64 validation examples" in out
    assert "val accuracy" in out and "test accuracy" in out
    assert "validation accuracy (64 held-out training examples" in out
    rows = rows_of(run)
    assert len(rows) == 12
    for r in rows.values():
        assert 0 <= r["val_accuracy"] <= 100 and 0 <= r["accuracy"] <= 100
    assert len({r["val_accuracy"] for r in rows.values()}) > 1
    with open(run / "eval" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(t["val_accuracy"]) for t in table] == [r["val_accuracy"] for r in rows.values()]

    noval, out = home / "runs" / "noval", (home / "eval-noval.out").read_text()
    assert "no validation split" in out and "val accuracy" not in out
    assert all("val_accuracy" not in r for r in rows_of(noval).values())
    assert "val_accuracy" not in (noval / "eval" / "results.csv").read_text()


def fits(rows: dict, budget=0.5) -> list[dict]:
    full = next(r for r in rows.values() if r["full"])
    return [r for r in rows.values() if r["flops"] <= budget * full["flops"]]


def export(home: Path, run: Path) -> tuple[subprocess.CompletedProcess, dict]:
    p = cli(["export", "--budget", "0.5", "--ckpt", run, *TINY_EVAL], cwd=home)
    assert p.returncode == 0, explain(p)
    return p, json.loads((run / "export" / "budget-0.5" / "config.json").read_text())


def test_export_chooses_by_validation_and_reports_both(home, tmp_path):
    run = Path(shutil.copytree(home / "runs" / "val", tmp_path / "runs" / "val"))
    p, config = export(tmp_path, run)
    best = max(fits(rows_of(run)), key=lambda r: (r["val_accuracy"], -r["flops"]))
    assert config["name"] == best["name"] and config["chosen_on"] == "validation"
    assert config["val_accuracy"] == best["val_accuracy"] and config["accuracy"] == best["accuracy"]
    assert f"chose {best['name']} by validation accuracy {best['val_accuracy']:.2f} (test {best['accuracy']:.2f})" \
        in " ".join(p.stdout.split())

    # validation and test disagree: the validation numbers decide (results are data: rank them backwards)
    doc = json.loads((run / "eval" / "results.json").read_text())
    for r in doc["rows"]:
        r["val_accuracy"] = 100.0 - r["accuracy"]
    (run / "eval" / "results.json").write_text(json.dumps(doc))
    p, config = export(tmp_path, run)
    worst_test = max(fits(rows_of(run)), key=lambda r: (100.0 - r["accuracy"], -r["flops"]))
    best_test = max(fits(rows_of(run)), key=lambda r: (r["accuracy"], -r["flops"]))
    assert worst_test["accuracy"] < best_test["accuracy"]  # the tiny run's sub-models differ
    assert config["name"] == worst_test["name"] != best_test["name"]


def test_export_without_validation_numbers_chooses_on_the_test_set_and_says_so(home, tmp_path):
    for name in ("noval", "old"):
        run = Path(shutil.copytree(home / "runs" / ("noval" if name == "noval" else "val"), tmp_path / "runs" / name))
        if name == "old":  # results written before the split: no val_ keys
            doc = json.loads((run / "eval" / "results.json").read_text())
            doc["rows"] = [{k: v for k, v in r.items() if k != "val_accuracy"} for r in doc["rows"]]
            (run / "eval" / "results.json").write_text(json.dumps(doc))
        p, config = export(tmp_path, run)
        best = max(fits(rows_of(run)), key=lambda r: (r["accuracy"], -r["flops"]))
        out = " ".join(p.stdout.split())
        assert config["name"] == best["name"] and config["chosen_on"] == "test"
        # the cut-out model's own validation score, measured by export where the run has the split
        assert (config["val_accuracy"] is None) == (name == "noval")
        assert f"chose {best['name']} by test accuracy {best['accuracy']:.2f}" in out
        assert "no validation numbers" in out and "made on the test set" in out


def test_bad_val_fraction_is_one_line(tmp_path):
    p = cli(["train", *TINY, "data.val_fraction=1.5"], cwd=tmp_path)
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: ") and "data.val_fraction" in lines[0]
    assert not (tmp_path / "runs").exists() or not run_folders(tmp_path / "runs")


# ---------------------------------------------------------------------------- a self-contained export

@pytest.mark.slow
def test_export_folder_loads_with_the_run_and_its_initial_weights_gone(tmp_path):
    from sortedcli.models.mobilenet import tiny_mobilenet

    weights = tmp_path / "start.pth"
    torch.manual_seed(0)
    torch.save(tiny_mobilenet(num_classes=10).state_dict(), weights)
    over = ["model=mobilenet_tiny", f"model.weights={weights}", "data=digits", "trainer.epochs=1",
            "trainer.batch_size=64", "data.train_subset=128", "data.test_subset=32", *TINY_EVAL,
            "dims.width.levels=[0.5,1.0]", "trainer.epoch_eval=false", "hydra.run.dir=runs/mnet"]
    p = cli(["train", *over], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    p = cli(["export", "--budget", "0.6", "--ckpt", "runs/mnet", *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    folder = tmp_path / "runs" / "mnet" / "export" / "budget-0.6"
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["weights"] is None and config["initial_weights"] == {"weights": str(weights)}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = Path(shutil.copytree(folder, elsewhere / "model"))
    shutil.rmtree(tmp_path / "runs")
    weights.unlink()
    x = "torch.manual_seed(0); x = torch.randn(5, 1, 8, 8)\n"
    p = python("import torch\nfrom sortedcli import export\n" + x
               + "m = export.load('model')\np = torch.export.load('model/model.pt2').module()\n"
               "with torch.no_grad(): a, b = m(x), p(x)\n"
               "torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)\nprint(tuple(a.shape))\n", elsewhere)
    assert p.returncode == 0, explain(p)
    assert p.stdout.strip().splitlines()[-1] == "(5, 10)"
    p = python("import sys\nsys.modules['sortedcli'] = None\nimport torch\n" + x
               + "print(tuple(torch.export.load('model/model.pt2').module()(x).shape))\n", elsewhere)
    assert p.returncode == 0, explain(p)
    assert p.stdout.strip().splitlines()[-1] == "(5, 10)"
    assert copy.is_dir()
