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
