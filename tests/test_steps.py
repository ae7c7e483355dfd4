"""``trainer.steps``: a run's length in optimizer steps instead of epochs (equal-time ablations give each
method its own number of steps), through the CLI: the LR schedule spans exactly ``steps``, the data goes
round more epochs than one (the last partial), a run stopped early by ``trainer.max_steps`` and resumed
ends at the weights of one that went through, and a nonsense value is one line. The engine side
(``fit(steps=...)``: the sampler's schedule, epoch ends) is in test_engine.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, TINY_STEPS, cli, explain, run_folders

STEPS = 6  # TINY has 4 steps an epoch: one whole epoch, then 2 steps of the second


def _latest(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_trainer_steps_is_the_run_length_and_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    over = [*TINY, f"trainer.steps={STEPS}", "trainer.ckpt_every=1", "trainer.log_every=1",
            "trainer.tensorboard=false"]
    whole = cli(["train", *over, "paths.runs=whole"], cwd=tmp_path)
    assert whole.returncode == 0, explain(whole)
    (ref,) = run_folders(tmp_path / "whole")
    assert f"trained {STEPS} steps" in whole.stdout and "end (epoch 1 + 2/4 batches)" in whole.stdout
    records = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert len(lrs) == STEPS and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine spans exactly STEPS
    ends = [(r["epoch"], r["step"], r.get("batch")) for r in records if "acc_largest" in r]
    assert ends == [(1, TINY_STEPS, None), (1, STEPS, 2)]  # epoch 1's end, then the run's end mid-epoch 2
    state = torch.load(_latest(ref) / "state.pt", weights_only=True)
    seconds = state["progress"].pop("seconds")
    assert state["progress"] == {"step": STEPS, "epoch": 1, "batch": 2} and state["sampler"]["steps"] == STEPS
    assert 0 < seconds < 600

    stopped = cli(["train", *over, "trainer.max_steps=3", "paths.runs=stopped"], cwd=tmp_path)
    assert stopped.returncode == 0, explain(stopped)
    (run,) = run_folders(tmp_path / "stopped")
    resumed = cli(["train", "--resume", run, "trainer.max_steps=null"], cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    assert _latest(run).name == _latest(ref).name == f"step-{STEPS:08d}"
    a, b = load_file(str(_latest(run) / "model.safetensors")), load_file(str(_latest(ref) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # trainer.max_minutes: a budget of 60 microseconds is spent by the first step, so the run stops after
    # it (asked before each step) and checkpoints; resumed with the same budget there is nothing to train,
    # without one it goes on to the weights of the run that went through
    timed = cli(["train", *over, "trainer.max_minutes=1e-6", "paths.runs=timed"], cwd=tmp_path)
    assert timed.returncode == 0, explain(timed)
    (run,) = run_folders(tmp_path / "timed")
    assert "trained 1 step " in timed.stdout and "stopped at trainer.max_minutes=1e-06" in timed.stdout, timed.stdout
    assert _latest(run).name == "step-00000001"
    spent = torch.load(_latest(run) / "state.pt", weights_only=True)["progress"]["seconds"]
    same = cli(["train", "--resume", run], cwd=tmp_path)
    assert same.returncode == 0 and "nothing to train" in same.stdout and "trainer.max_minutes=2e-06" in same.stdout
    on = cli(["train", "--resume", run, "trainer.max_minutes=null"], cwd=tmp_path)
    assert on.returncode == 0, explain(on)
    a = load_file(str(_latest(run) / "model.safetensors"))
    assert _latest(run).name == f"step-{STEPS:08d}" and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(_latest(run) / "state.pt", weights_only=True)["progress"]["seconds"] > spent  # added up

    again = cli(["train", "--resume", ref], cwd=tmp_path)  # finished: says which key to raise
    assert again.returncode == 0, explain(again)
    assert "nothing to train" in again.stdout and f"trainer.steps={STEPS}" in again.stdout
    assert f"trainer.steps={2 * STEPS}" in again.stdout
    # resumed with a longer schedule, its first new step learns (it took the saved learning rate: 0 at
    # the end of the old cosine, so step 7 left every weight as step 6 had it)
    longer = cli(["train", "--resume", ref, f"trainer.steps={2 * STEPS}", f"trainer.max_steps={STEPS + 1}"],
                 cwd=tmp_path)
    assert longer.returncode == 0, explain(longer)
    before = load_file(str(ref / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))
    after = load_file(str(_latest(ref) / "model.safetensors"))
    assert _latest(ref).name == f"step-{STEPS + 1:08d}" and any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("key,value", [("steps", "0"), ("steps", "-3"), ("steps", "abc"), ("max_minutes", "0"),
                                       ("max_minutes", "soon")])
def test_a_nonsense_trainer_steps_is_one_line_and_writes_nothing(tmp_path, key, value):
    p = cli(["train", *TINY, f"trainer.{key}={value}"], cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, explain(p)
    said = {"steps": "null or an integer >= 1", "max_minutes": "null or a number of minutes > 0"}[key]
    assert f"trainer.{key} must be {said}" in lines[0], explain(p)
    assert not (tmp_path / "runs").exists()
