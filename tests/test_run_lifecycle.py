"""A run folder's lifecycle: one process trains into it at a time (its lock), a resume changes only what
does not change the model or its grid and records what it used, a divergence leaves nothing to resume
silently, checkpoints are ordered and pruned by step number, and a folder with no checkpoint, a garbled
config or a dangling ``latest`` is said in one line. Uses the session's ``trained_run`` (one tiny epoch)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, cli, explain
from sortedcli import runs
from sortedcli.errors import UsageError


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval", "export", "tensorboard"))
    return dest


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, explain(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    return lines[0]


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------ the lock

def test_a_resume_of_a_run_another_live_process_trains_is_refused_naming_it(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    runs.lock_run(run)  # this test process "trains" the run: its pid is alive
    try:
        before = files(run)
        line = one_error_line(cli(["train", "--resume", run, "trainer.epochs=2"], cwd=tmp_path))
        assert f"is being trained by process {os.getpid()}" in line, line
        assert files(run) == before  # nothing written: no second "step 5" in metrics.jsonl
        line = one_error_line(cli(["train", *TINY, f"hydra.run.dir={run}"], cwd=tmp_path))  # a new run into it
        assert f"is being trained by process {os.getpid()}" in line, line
        assert files(run) == before
    finally:
        runs.unlock_run(run)
    assert not (run / runs.LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_and_a_resume_records_what_it_used(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    pid = dead_pid()
    (run / runs.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    p = cli(["train", "--resume", run, "trainer.epochs=2", "trainer.max_steps=6"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert f"locked by process {pid}" in p.stdout and "lock taken over" in p.stdout, explain(p)
    # the run's own model and data, not the defaults' (it said "resuming resnet18 on fashion_mnist")
    assert "resuming resnet_tiny on digits" in p.stdout, explain(p)
    assert not (run / runs.LOCK_FILE).exists()  # released at exit
    saved = OmegaConf.load(run / "config.yaml")  # what the resumed run used (it kept epochs 1, max_steps null)
    assert saved.trainer.epochs == 2 and saved.trainer.max_steps == 6
    assert runs.latest_checkpoint(run).name == "step-00000006"


def test_the_lock_is_exclusive_and_released_only_by_its_holder(tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    runs.lock_run(run)
    runs.lock_run(run)  # the same process again (a standalone sub-run): fine
    holder = json.loads((run / runs.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    other = {**holder, "pid": os.getppid(), "ticks": runs._started(os.getppid())}  # a live process, not this one
    (run / runs.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(UsageError, match=f"process {os.getppid()}"):
        runs.lock_run(run)
    runs.unlock_run(run)  # not this process's lock: kept
    assert json.loads((run / runs.LOCK_FILE).read_text()) == other
    if other["ticks"] is not None:  # Linux: the same pid, started at another time, is another process
        (run / runs.LOCK_FILE).write_text(json.dumps({**other, "ticks": str(int(other["ticks"]) + 1)}))
        assert runs.lock_holder(run) is None
    (run / runs.LOCK_FILE).write_text("garbled")  # a lock no process can be read from: stale
    notes = []
    runs.lock_run(run, note=notes.append)
    assert notes and "unreadable lock" in notes[0]
    runs.unlock_run(run)
    assert sorted(p.name for p in run.iterdir()) == []


# --------------------------------------------------------------------------------- what a resume may change

@pytest.mark.parametrize("override", ["dims.width.levels=[0.5,1.0]", "model.small_stem=false", "optim.lr=0.5",
                                      "sampler.g=2", "trainer.batch_size=32"])
def test_a_resume_that_would_change_the_model_grid_or_optimizer_is_one_line(trained_run, tmp_path, override):
    run = copy_run(trained_run, tmp_path / "run")
    before = files(run)
    line = one_error_line(cli(["train", "--resume", run, "trainer.epochs=2", override], cwd=tmp_path))
    key = override.partition("=")[0]
    assert f"cannot change {key!r}" in line and "may change only trainer.*" in line, line
    assert files(run) == before


def test_a_resume_may_repeat_the_runs_own_grid(trained_run):
    cfg = runs.resumed_config(trained_run, ["dims.width.levels=[0.25,0.5,1.0]", "trainer.max_steps=9",
                                            "resume=x", "hydra.run.dir=y"])
    assert cfg.trainer.max_steps == 9 and list(cfg.dims.width.levels) == [0.25, 0.5, 1.0]


# ----------------------------------------------------------------------------- checkpoints: order, pruning

def _save(run: Path, step: int, keep: int = 100) -> Path:
    cfg = OmegaConf.create({"model": {"name": "m"}, "data": {"name": "d"}})
    return runs.save_checkpoint(run, step, {"w": torch.full((2,), float(step))}, {"step": step}, cfg, keep=keep)


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    for name in ("step-9", "step-10"):  # unpadded names: "step-10" < "step-9" as strings
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / runs.MODEL_FILE).write_bytes(b"")
    assert [c.name for c in runs.checkpoints(tmp_path)] == ["step-10", "step-9"]


def test_keep_checkpoints_1_never_deletes_the_checkpoint_latest_names(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    final = _save(tmp_path, 2, keep=1)  # a resume from step-1 writes step 2 again; steps 3, 4 are later on disk
    assert runs.latest_checkpoint(tmp_path) == final and (final / runs.MODEL_FILE).is_file()
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()


def test_a_rewind_sets_the_diverged_checkpoints_aside_so_new_ones_outrank_nothing_stale(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    assert runs.roll_back(tmp_path, before=3).name == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / runs.DIVERGED_DIR).iterdir()) == \
        ["step-00000003", "step-00000004"]
    _save(tmp_path, 3, keep=2)  # trained again from step 2
    assert [c.name for c in runs.checkpoints(tmp_path)] == ["step-00000003", "step-00000002"]
    assert runs.latest_checkpoint(tmp_path).name == "step-00000003"


def test_a_divergence_before_the_first_good_checkpoint_leaves_nothing_to_resume(tmp_path):
    from rich.console import Console

    from sortedcli.commands.train import resume_from

    _save(tmp_path, 2)
    assert runs.roll_back(tmp_path, before=1) is None  # step 1's weights gave the non-finite loss
    with pytest.raises(UsageError, match="no good checkpoint to resume from: its training diverged"):
        resume_from(tmp_path, Console(quiet=True))  # it took the diverged step-2
    with pytest.raises(UsageError, match="diverged"):
        runs.resolve_checkpoint(str(tmp_path), tmp_path)


# -------------------------------------------------------------------------- what a run folder says of itself

def test_a_latest_naming_a_missing_step_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    _save(tmp_path, 3)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000005")  # its folder was lost
    run_dir, ckpt = runs.resolve_checkpoint(str(tmp_path), tmp_path)  # was: "train it first"
    assert ckpt.name == "step-00000003"
    assert "names step-00000005, which is not a complete checkpoint: using step-00000003" in capsys.readouterr().err


def test_a_garbled_run_config_is_one_line_for_eval_and_resume(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "config.yaml").write_text("model: [unclosed\n  data: {\n")
    for args in (["eval", "--ckpt", run], ["train", "--resume", run, "trainer.epochs=2"]):
        line = one_error_line(cli(args, cwd=tmp_path))
        assert f"{run / 'config.yaml'} is not a readable run config" in line, line


def test_training_again_into_a_folder_left_before_its_first_checkpoint_does_not_advise_resume(tmp_path):
    from sortedcli.cli import _after_interrupt

    run = tmp_path / "stopped"
    (run / ".hydra").mkdir(parents=True)  # what a Ctrl-C before the first checkpoint leaves
    (run / "config.yaml").write_text("model: {name: resnet_tiny}\n")
    line = one_error_line(cli(["train", *TINY, f"hydra.run.dir={run}"], cwd=tmp_path))
    assert "before its first checkpoint" in line and "--resume" not in line, line
    said = _after_interrupt("train", OmegaConf.create({"resume": str(run)}))
    assert "nothing to resume" in said and "--resume" not in said


def test_a_sweep_checks_every_job_before_training_any(tmp_path):
    p = cli(["train", "-m", *TINY, "seed=0,abc", "paths.runs=sweep"], cwd=tmp_path)
    line = one_error_line(p)
    assert "job #1 of the sweep (seed=abc)" in line and "seed must be an integer" in line, line
    assert not (tmp_path / "sweep").exists()  # job 0 was not trained first


def test_a_resume_reads_the_weights_into_the_model_itself_tied_ones_once(tmp_path):
    """A resumed one-file checkpoint is read into the built model's own tensors (no state_dict of it
    held beside the model for the run's length); a tied weight stored once fills both of its names."""
    from rich.console import Console
    from torch import nn

    from sortedcli.commands.train import load_resumed, resume_from

    def tied():
        m = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
        m[1].weight = m[0].weight
        return m

    torch.manual_seed(0)
    saved = tied()
    cfg = OmegaConf.create({"model": {"name": "m"}, "data": {"name": "d"}})
    runs.save_checkpoint(tmp_path, 3, saved, {"step": 3}, cfg)
    run_dir, ckpt, state = resume_from(tmp_path, Console(quiet=True))
    assert (run_dir, ckpt.name, state) == (tmp_path, "step-00000003", {"step": 3})
    model = tied()
    where = {k: v.data_ptr() for k, v in model.state_dict().items()}
    load_resumed(model, ckpt, "m")
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == where  # its own storage
    assert model[0].weight.equal(saved[0].weight) and model[1].weight is model[0].weight
    with pytest.raises(UsageError, match="does not fit m: of its tensors 1 of another shape"):
        load_resumed(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 7, bias=False)), ckpt, "m")
