"""Results tied to what they measured (issue 14): each CLI test makes the mistake or accident a user
makes (resume after eval, a foreign weights file, a diverging learning rate, an existing run folder, a
corrupt checkpoint, a standalone sub-run, the same run compared twice, Ctrl-C) and checks that the
files stay true and the message is one line that says what to do."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import CLI_ENV, TINY, TINY_EVAL, TINY_STEPS, cli, explain

ROOT = Path(__file__).resolve().parent.parent


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of ``run`` (without its eval/ and export/ results) at ``dest``."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval", "export", "tensorboard"))
    return dest


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The single ``sortednet: error: ...`` line of a refused command (exit 2, no traceback)."""
    assert p.returncode == 2, explain(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory) -> Path:
    """A copy of the shared tiny run with ``eval --all-submodels`` results of its one checkpoint."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("evaluated") / "run")
    p = cli(["eval", "--all-submodels", "--ckpt", run, *TINY_EVAL], cwd=run.parent)
    assert p.returncode == 0, explain(p)
    return run


def test_eval_results_name_the_checkpoint_they_measured(evaluated):
    doc = json.loads((evaluated / "eval" / "results.json").read_text())
    ckpt = latest(evaluated)
    from sortedcli.runs import fingerprint

    assert doc["checkpoint"] == {"step": TINY_STEPS, "path": f"checkpoints/step-{TINY_STEPS:08d}",
                                 "fingerprint": fingerprint(ckpt)}


def test_export_refuses_results_of_an_earlier_checkpoint_and_resume_counts_its_own_steps(evaluated, tmp_path):
    run = copy_run(evaluated, tmp_path / "run")
    shutil.copytree(evaluated / "eval", run / "eval")
    p = cli(["train", "--resume", run, "trainer.epochs=2"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert f"trained {TINY_STEPS} steps (steps {TINY_STEPS + 1}-{2 * TINY_STEPS})" in p.stdout, p.stdout
    p = cli(["export", "--budget", "0.5", "--ckpt", run, *TINY_EVAL], cwd=tmp_path)
    line = one_error_line(p)
    from sortedcli.runs import fingerprint

    old = json.loads((run / "eval" / "results.json").read_text())["checkpoint"]["fingerprint"]
    new = fingerprint(latest(run))
    assert (f"eval/results.json measured step {TINY_STEPS} (fingerprint {old[:12]}), the checkpoint is step "
            f"{2 * TINY_STEPS} (fingerprint {new[:12]}): run sortednet eval --all-submodels --ckpt {run}") in line
    assert not (run / "export").exists()


def test_resuming_a_finished_run_says_there_is_nothing_to_train(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    before = sha256(latest(run) / "model.safetensors")
    p = cli(["train", "--resume", run], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert f"nothing to train: {run} is at step {TINY_STEPS}, epoch 1" in p.stdout, p.stdout
    assert "trainer.epochs=2" in p.stdout and "trained" not in p.stdout
    assert latest(run).name == f"step-{TINY_STEPS:08d}" and sha256(latest(run) / "model.safetensors") == before


def _llama_file(folder: Path) -> Path:
    """A real LLaMA checkpoint, as a llama_tiny run of sortednet writes it."""
    from sortedcli import models, runs

    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "llama_tiny.yaml")
    cfg = OmegaConf.create({"model": model_cfg, "data": {"name": "alpaca"},
                            "dims": OmegaConf.load(ROOT / "conf" / "dims" / "depth.yaml")})
    model = models.create("llama", vocab_size=64, config=OmegaConf.to_container(model_cfg.config))
    return runs.save_checkpoint(folder, 1, model, {}, cfg) / "model.safetensors"


def _reshaped_file(run: Path, folder: Path) -> Path:
    """The run's own checkpoint with one tensor cut to half its rows (same config in its metadata)."""
    from safetensors import safe_open

    path = latest(run) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = weights[name][: weights[name].shape[0] // 2].contiguous()
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"), metadata=metadata)
    return folder / "model.safetensors"


@pytest.mark.parametrize("foreign, says", [(_llama_file, "another model (llama_tiny)"),
                                           (_reshaped_file, "1 of another shape")])
def test_eval_refuses_weights_that_are_not_the_runs_before_writing(evaluated, tmp_path, foreign, says):
    run = copy_run(evaluated, tmp_path / "run")
    shutil.copytree(evaluated / "eval", run / "eval")
    results = (run / "eval" / "results.json").read_bytes()
    src = foreign(tmp_path / "other") if foreign is _llama_file else foreign(run, tmp_path / "other")
    shutil.copy(src, latest(run) / "model.safetensors")
    p = cli(["eval", "--all-submodels", "--ckpt", run, *TINY_EVAL], cwd=tmp_path)
    line = one_error_line(p)
    assert says in line and "pass --ckpt the run" in line, line
    assert (run / "eval" / "results.json").read_bytes() == results
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["plot.png", "results.csv", "results.json"]


def test_a_non_finite_loss_stops_training_with_latest_on_the_last_good_checkpoint(tmp_path):
    p = cli(["train", *TINY, "optim.lr=1e9", "trainer.ckpt_every=1", "hydra.run.dir=runs/nan"], cwd=tmp_path)
    line = one_error_line(p)
    assert "the loss is nan at step " in line and "lower optim.lr (now 1000000000.0)" in line, line
    step = int(line.split("at step ")[1].split(":")[0])
    run = tmp_path / "runs" / "nan"
    kept = latest(run)
    # the weights of step - 1 gave the non-finite loss: latest is the newest checkpoint before them
    assert int(kept.name.removeprefix("step-")) == step - 2 and f"checkpoints/latest is {kept.name}" in line
    assert all(v.isfinite().all() for v in load_file(str(kept / "model.safetensors")).values())
    p = cli(["export", "--budget", "0.5", "--ckpt", run, *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)


def test_training_into_an_existing_run_folder_is_refused_before_hydra_rewrites_it(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    hydra = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in (run / ".hydra").iterdir()}
    assert hydra, "the shared run has Hydra's files"
    p = cli(["train", *TINY, f"hydra.run.dir={run}"], cwd=tmp_path)
    line = one_error_line(p)
    assert f"hydra.run.dir={run} already holds a run" in line and f"--resume {run}" in line, line
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in (run / ".hydra").iterdir()} == hydra


@pytest.mark.parametrize("where", ["default", "given"])
def test_a_validation_error_leaves_no_run_folder_behind(tmp_path, where):
    given = ["hydra.run.dir=runs/mine"] if where == "given" else []
    p = cli(["train", *TINY, "trainer.batch_size=0", *given], cwd=tmp_path)
    line = one_error_line(p)
    assert "trainer.batch_size must be" in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_folder_that_existed_is_not_removed_after_a_validation_error(tmp_path):
    (tmp_path / "mine").mkdir()
    p = cli(["train", *TINY, "trainer.batch_size=0", "hydra.run.dir=mine"], cwd=tmp_path)
    one_error_line(p)
    assert (tmp_path / "mine").is_dir()


def test_resume_takes_a_checkpoint_folder_and_falls_back_past_a_corrupt_latest(tmp_path):
    p = cli(["train", *TINY, "trainer.ckpt_every=2", "hydra.run.dir=runs/base"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    base = tmp_path / "runs" / "base"
    assert [c.name for c in sorted((base / "checkpoints").glob("step-*"))] == ["step-00000002", "step-00000004"]
    straight = load_file(str(base / "checkpoints" / "step-00000004" / "model.safetensors"))

    chosen = copy_run(base, tmp_path / "chosen")
    p = cli(["train", "--resume", chosen / "checkpoints" / "step-00000002"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "from step-00000002 (epoch 0, step 2)" in p.stdout and "trained 2 steps (steps 3-4)" in p.stdout, p.stdout

    corrupt = copy_run(base, tmp_path / "corrupt")
    weights = corrupt / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    p = cli(["train", "--resume", corrupt], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "resuming from step-00000002 instead, the newest readable checkpoint" in p.stdout, p.stdout
    assert "trained 2 steps (steps 3-4)" in p.stdout
    # both resumed from step 2 exactly: the same step-4 weights as the run that never stopped
    for run in (chosen, corrupt):
        assert latest(run).name == "step-00000004"
        weights = load_file(str(latest(run) / "model.safetensors"))
        assert weights.keys() == straight.keys() and all(weights[k].equal(straight[k]) for k in straight)


def test_eval_without_ckpt_does_not_pick_a_standalone_sub_run(trained_run, tmp_path):
    sorted_run = copy_run(trained_run, tmp_path / "runs" / "sorted")
    alone = copy_run(trained_run, tmp_path / "runs" / "baselines" / "standalone" / "width1-depth4")
    newer = (sorted_run / "checkpoints" / "latest").stat().st_mtime + 60
    os.utime(alone / "checkpoints" / "latest", (newer, newer))
    p = cli(["eval", *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert (sorted_run / "eval" / "largest-smallest" / "results.json").is_file()
    assert not (alone / "eval").exists()


def test_compare_refuses_a_run_given_twice_and_stores_paths_relative_to_its_folder(evaluated, tmp_path):
    for name in ("a", "b"):
        copy_run(evaluated, tmp_path / "runs" / name)
        shutil.copytree(evaluated / "eval", tmp_path / "runs" / name / "eval")
    p = cli(["compare", "runs/a", tmp_path / "runs" / "a"], cwd=tmp_path)
    line = one_error_line(p)
    assert f"{tmp_path / 'runs' / 'a'} is given twice (also as runs/a)" in line, line
    p = cli(["compare", tmp_path / "runs" / "a", tmp_path / "runs" / "b", "out=runs/cmp"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    doc = json.loads((tmp_path / "runs" / "cmp" / "compare.json").read_text())
    assert {label: s["run"] for label, s in doc["runs"].items()} == {"a": "../a", "b": "../b"}
    assert [e["run"] for e in doc["summary"]] == ["a", "b"]


def test_ctrl_c_during_eval_says_that_nothing_was_written(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "sortedcli.cli", "eval", "--all-submodels", "--ckpt", str(run),
                             *TINY_EVAL, "eval.latency.reps=5000"], cwd=tmp_path, env={**CLI_ENV, "COLUMNS": "1000"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for out in proc.stdout:  # one wide line each: a wrapped header must not hide the start of the work
            seen.append(out)
            if "sortednet eval" in out:
                break
        assert proc.poll() is None, f"eval ended before it was interrupted: {''.join(seen)}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == ("sortednet: interrupted; no results were written (eval writes them when every "
                           "sub-model is measured)"), err
    assert not (run / "eval").exists()
