"""Calibration, BatchNorm and self-contained vision runs (issue 23, the defects found by reading the code):

- the epoch-end evaluation recalibrates BatchNorm of the model being trained: the checkpoint written
  after it must hold the training statistics (the same weights as a run without epoch evaluation);
- a vision run does not need its initial ``model.weights`` file once it has a checkpoint;
- an export's BatchNorm is folded into its convolutions, the folded model checked equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, cli, explain, run_folders
from sortedcli import runs


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(runs.latest_checkpoint(run_dir) / runs.MODEL_FILE))


def test_epoch_evaluation_leaves_the_checkpointed_batchnorm_statistics_as_training_made_them(trained_run, tmp_path):
    """``trained_run`` evaluated the largest and the smallest sub-model at the end of its epoch (the
    default ``trainer.epoch_eval=true``), recalibrating the shared BatchNorm each time, and was
    checkpointed right after: its weights and BatchNorm buffers must be those of the same run trained
    without that evaluation (on main they were the smallest sub-model's recalibrated statistics, and
    the full model loaded into stock torchvision was broken)."""
    p = cli(["train", *TINY, "trainer.epoch_eval=false"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    (plain_run,) = run_folders(tmp_path / "runs")
    want, got = checkpoint_weights(plain_run), checkpoint_weights(trained_run)
    assert sorted(got) == sorted(want)
    assert any("running_var" in k for k in got)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_batchnorm_kept_restores_statistics_and_modes():
    from torch import nn

    from sortedcli.nest import batchnorm_kept

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    model(torch.randn(4, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with batchnorm_kept(model):
        model[1].reset_running_stats()
        model(torch.randn(4, 3, 8, 8) + 3)
        model.eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", ["mobilenet_tiny", "resnet_tiny"])
def test_fold_batchnorm_folds_every_batchnorm_of_a_cut_out_model_and_computes_the_same(name):
    """Conv2d -> BatchNorm2d pairs in nn.Sequential (MobileNetV2's Conv2dNormActivation, a ResNet's
    downsample) and torchvision blocks' conv1/bn1 attributes alike, found from one traced call."""
    import copy

    from torch import nn

    from sortedcli import models
    from sortedcli.nest import SubModel, extract, fold_batchnorm, recalibrate

    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=1)
    sub = SubModel.of(width=0.5)
    recalibrate(model, sub, [torch.randn(16, 1, 8, 8) * 2 + 1 for _ in range(2)])
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_()
    x = torch.randn(5, 1, 8, 8)
    plain = extract(model, sub, x[:1])
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    folded = copy.deepcopy(plain)
    assert fold_batchnorm(folded, x[:1]) == batchnorms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), atol=1e-5, rtol=1e-5)


def test_export_writes_the_model_with_batchnorm_folded(trained_run, tmp_path):
    import json
    import shutil

    from torch import nn

    from conftest import TINY_EVAL
    from sortedcli import export

    run = shutil.copytree(trained_run, tmp_path / "run")
    p = cli(["export", "--budget", "0.5", "--ckpt", run, *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    folder = run / "export" / "budget-0.5"
    config = json.loads((folder / "config.json").read_text())
    plain = export.load(folder)
    assert config["batchnorm_folded"] > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == config["folded_params"]
    program = torch.export.load(str(folder / "model.pt2"))
    assert "batch_norm" not in str(program.graph)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), plain(x), atol=1e-5, rtol=1e-5)


def test_a_vision_run_needs_its_initial_weights_file_no_more_once_trained(tmp_path):
    """``model.weights=FILE``: eval (with the sub-models trained alone too), export and ``--resume``
    build the architecture without reading FILE (the checkpoint overwrites every weight); on main eval
    read FILE, importance-sorted it and overwrote it, and failed once FILE had moved."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import TINY_EVAL
    from sortedcli.models.mobilenet import tiny_mobilenet

    torch.manual_seed(0)
    weights = tmp_path / "init.pth"
    torch.save(tiny_mobilenet().state_dict(), weights)
    args = ["model=mobilenet_tiny", f"model.weights={weights}", "data=digits", "trainer.epochs=1",
            "trainer.batch_size=64", "data.train_subset=128", "data.test_subset=32", *TINY_EVAL,
            "dims.width.levels=[0.5,1.0]", "trainer.epoch_eval=false"]
    with ThreadPoolExecutor(2) as pool:  # the sorted run, and one of its sub-models trained alone
        done = list(pool.map(lambda extra: cli(["train", *args, *extra], cwd=tmp_path),
                             [["hydra.run.dir=runs/r"], ["standalone=[width0.5-depth1]", "hydra.run.dir=alone"]]))
    for p in done:
        assert p.returncode == 0, explain(p)
    weights.rename(tmp_path / "moved.pth")
    p = cli(["eval", "--ckpt", "runs/r", "standalone=alone", *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "standalone width0.5-depth1" in p.stdout
    p = cli(["export", "--budget", "0.6", "--ckpt", "runs/r", *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert (tmp_path / "runs/r/export/budget-0.6/model.pt2").is_file()
    p = cli(["train", "--resume", "runs/r", "trainer.epochs=2"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)


def test_a_missing_weights_file_is_named_as_missing(tmp_path):
    from sortedcli.errors import UsageError
    from sortedcli.models import weights as pretrained

    with pytest.raises(UsageError, match="no such file"):
        pretrained.read_state_dict(tmp_path / "gone.pth", "model.weights")


def test_export_recalibrates_as_eval_did_and_scores_the_cut_out_model(trained_run, tmp_path):
    """eval calibrated BatchNorm with 2 batches of 64 (TINY_EVAL); an export given other calibration
    settings on its command line still writes the weights eval measured (on main it recalibrated with
    its own settings, in fp32, and the accuracy copied into config.json described other weights), and
    scores the cut-out model itself: the same number as eval's for that sub-model, on as many items."""
    import json
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from conftest import TINY_EVAL

    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "export", ignore_errors=True)
    p = cli(["eval", "--all-submodels", "--ckpt", run, *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    results = json.loads((run / "eval" / "results.json").read_text())
    calibrated = results["measured"]
    assert (calibrated["calib_batches"], calibrated["calib_batch_size"], calibrated["seed"]) == (2, 64, 0)
    other = shutil.copytree(run, tmp_path / "other")
    jobs = [(run, TINY_EVAL), (other, ["eval.calib_batches=1", "eval.calib_batch_size=16", "eval.test_subset=64"])]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda job: cli(["export", "--budget", "0.5", "--ckpt", job[0], *job[1]], cwd=tmp_path),
                             jobs))
    for p in done:
        assert p.returncode == 0, explain(p)
    configs = [json.loads((r / "export" / "budget-0.5" / "config.json").read_text()) for r, _ in jobs]
    row = {r["name"]: r for r in results["rows"]}[configs[0]["name"]]
    for config in configs:
        m = config["measured"]
        assert m["calibration_from"] == "eval"
        assert (m["calib_batches"], m["calib_batch_size"], m["seed"], m["precision"]) == \
            (calibrated["calib_batches"], calibrated["calib_batch_size"], calibrated["seed"], calibrated["precision"])
        assert m["test_items"] == calibrated["test_items"] and m["val_items"] == calibrated["val_items"]
        assert config["name"] == row["name"]
        assert abs(config["accuracy"] - row["accuracy"]) <= 1e-6 and config["eval_accuracy"] == row["accuracy"]
        assert abs(config["val_accuracy"] - row["val_accuracy"]) <= 1e-6
    programs = [torch.export.load(str(r / "export" / "budget-0.5" / "model.pt2")).module() for r, _ in jobs]
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(programs[1](x), programs[0](x), atol=1e-6, rtol=1e-6)
