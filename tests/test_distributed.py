"""Data parallelism with torch.distributed on the CPU (gloo, 2 processes).

The engine-level test spawns two gloo processes that run ``fit`` on tiny in-memory data and checks
them against one process on the same global batch. The CLI tests run ``sortednet train|eval
trainer.devices=2`` end to end (torch's elastic launch starts the processes), kill a 2-process run
and resume it with one process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from sortedcli.distributed import Dist, shutdown
from sortedcli.engine import Distill, EpochBatches, Progress, cosine_schedule, fit
from sortedcli.models import create
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, synchronize
from sortedcli.sampling import create_sampler
from sortedcli.tasks import ImageClassification

from conftest import CLI_ENV, TINY, TINY_EVAL, cli, explain, run_folders, wait_for_checkpoint

GRID = Grid((Dim("width", FRACTION, (0.25, 0.5, 1.0)), Dim("depth", COUNT, (1, 2, 3, 4))))
GLOBAL_BATCH = 16
STEPS = 6


def test_each_rank_takes_an_equal_slice_of_every_global_batch():
    whole = list(EpochBatches(100, 16, seed=3, epoch=2))
    ranks = [list(EpochBatches(100, 16, seed=3, epoch=2, rank=r, world=4)) for r in range(4)]
    assert all(len(batches) == len(whole) for batches in ranks)
    for b, batch in enumerate(whole):
        assert sum((ranks[r][b] for r in range(4)), []) == batch  # rank order = the global batch's order
    resumed = list(EpochBatches(100, 16, seed=3, epoch=2, start=2, rank=1, world=2))
    assert resumed == [batch[8:] for batch in whole[2:]]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        EpochBatches(100, 10, seed=0, epoch=0, rank=0, world=4)


def test_a_single_process_dist_is_a_no_op():
    d = Dist()
    t = torch.ones(3)
    assert d.sum(t) is t and d.mean(t) is t and d.gather(5) == [5] and d.broadcast("x") == "x"


def test_launched_ranks_leave_their_mistake_to_the_launcher_which_says_each_once(tmp_path, monkeypatch, capsys):
    from sortedcli import distributed

    monkeypatch.delenv(distributed.ERRORS, raising=False)
    assert not distributed.leave_error("x")  # not launched by us: the rank prints it itself
    monkeypatch.setenv(distributed.ERRORS, str(tmp_path))
    for rank, message in ((1, "data.root not found"), (0, "data.root not found"), (10, "another")):
        monkeypatch.setenv("RANK", str(rank))
        assert distributed.leave_error(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1", "rank10"]
    assert distributed.relay_errors(str(tmp_path))
    assert capsys.readouterr().err.splitlines() == ["sortednet: error: data.root not found", "sortednet: error: another"]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(GLOBAL_BATCH * STEPS // 2, 3, 12, 12, generator=g)
    return TensorDataset(x, torch.randint(0, 10, (len(x),), generator=g))


def _train(d: Dist, draws: list) -> torch.nn.Module:
    """``STEPS`` steps of the lossaware sampler (its draws depend on the observed losses) with g=2 sub-models
    per step (depth-dropped blocks get no gradient), SGD with momentum, 2 epochs."""
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3)
    if d.enabled:
        synchronize(model)
    sampler = create_sampler("lossaware", GRID, seed=5, g=2)
    step = sampler.step

    def recorded():
        subs = step()
        draws.append([s.name for s in subs])
        return subs

    sampler.step = recorded
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fit(model, ImageClassification(), sampler, opt, cosine_schedule(opt, STEPS), _data(), epochs=2,
        batch_size=GLOBAL_BATCH, seed=1, device=torch.device("cpu"), amp=None, distill=Distill(),
        progress=Progress(), dist=d)
    return model


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        draws: list = []
        model = _train(Dist(rank=rank, world=2), draws)
        torch.save({"state": model.state_dict(), "draws": draws}, f"{out}/rank{rank}.pt")
    finally:
        shutdown(clean=sys.exc_info()[0] is None)  # the peers wait for each other after a clean finish


def test_two_gloo_processes_draw_the_same_submodels_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["draws"] == r1["draws"] and len(r0["draws"]) == STEPS
    assert len({tuple(d) for d in r0["draws"]}) > 1  # the sampler did move
    alone: list = []
    reference = _train(Dist(), alone).state_dict()
    assert alone == r0["draws"]  # the losses the ranks observed are the global batch's
    for key, value in reference.items():
        torch.testing.assert_close(r0["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        assert torch.equal(r0["state"][key], r1["state"][key]), key  # the replicas never drift


# --- the CLI ---------------------------------------------------------------------------------------

def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_train_with_two_devices_matches_the_one_process_run(trained_run, tmp_path):
    p = cli(["train", *TINY, "trainer.devices=2", "trainer.sync_batchnorm=true"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    (run,) = run_folders(tmp_path / "runs")
    assert "x 2 processes (global batch 64)" in p.stdout
    assert p.stdout.count("trained 4 steps") == 1  # rank 0 prints; the other rank is quiet
    _assert_close(_weights(run), _weights(trained_run))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((trained_run / "metrics.jsonl").read_text().splitlines())  # written once
    trained_files = sorted(p.name for p in trained_run.iterdir() if p.name not in ("eval", "export"))
    assert sorted(p.name for p in run.iterdir()) == trained_files  # (other tests evaluate trained_run)


def test_eval_across_two_ranks_gives_the_one_process_table(trained_run, tmp_path):
    run = Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval")))
    tables = []
    for devices in (1, 2):
        p = cli(["eval", "--all-submodels", "--ckpt", run, *TINY_EVAL, f"trainer.devices={devices}"], cwd=tmp_path)
        assert p.returncode == 0, explain(p)
        assert p.stdout.count("full model accuracy") == 1
        tables.append(json.loads((run / "eval" / "results.json").read_text())["rows"])
    one, two = tables
    keep = ("name", "dims", "accuracy", "rel_accuracy", "flops", "params", "full", "pareto")
    assert [{k: r[k] for k in keep} for r in two] == [{k: r[k] for k in keep} for r in one]
    assert len(one) == 12


@pytest.mark.slow
def test_a_multirun_sweep_launches_each_job_as_its_own_processes(tmp_path):
    """``-m seed=0,1 trainer.devices=2``: two jobs, each run by 2 processes with that job's overrides."""
    p = cli(["train", "-m", *TINY, "trainer.devices=2", "seed=0,1"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    runs = run_folders(tmp_path / "runs" / "multirun")
    assert len(runs) == 2 and p.stdout.count("launching 2 processes") == 2
    assert sorted(OmegaConf.load(r / "config.yaml").seed for r in runs) == [0, 1]


@pytest.mark.parametrize("args, message", [
    ([*TINY, "trainer.devices=3"], "multiple of trainer.devices=3"),
    ([*TINY, "trainer.devices=0"], "trainer.devices must be an integer >= 1"),
    # found by the launched processes: each fails, the error is said once
    (["data.root=/nonexistent", "trainer.devices=2"], "Fashion-MNIST not found"),
])
def test_bad_input_with_several_processes_exits_2_with_one_line(args, message, tmp_path):
    p = cli(["train", *args], cwd=tmp_path)
    assert p.returncode == 2, explain(p)
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not run_folders(tmp_path / "runs")


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_one_process(tmp_path):
    """SIGKILL the whole 2-process job once its first checkpoint is there; resume it as one process;
    it ends where a 1-process run that went through ends. (At the recipe's lr 0.1 this tiny model is
    chaotic: float rounding alone, 1 thread against 2, moves weights by 0.25 over these 48 steps; at
    lr 0.01 runs that differ only in rounding stay within 1e-7.)"""
    over = [*TINY, "data.train_subset=512", "trainer.epochs=6", "trainer.ckpt_every=1", "optim.lr=0.01"]
    job = subprocess.Popen([sys.executable, "-m", "sortedcli", "train", *over, "trainer.devices=2",
                            "trainer.sync_batchnorm=true", "paths.runs=killed"], cwd=tmp_path, env=CLI_ENV,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(tmp_path, "killed/*/checkpoints/latest", job)
        os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks
        status = job.wait(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    total = 512 // 64 * 6
    assert status == -signal.SIGKILL, job.stderr.read()
    (run,) = run_folders(tmp_path / "killed")
    stopped = (run / "checkpoints" / "latest").read_text().strip()
    assert f"step-{1:08d}" <= stopped < f"step-{total:08d}", "the run ended before it was killed"
    resumed = cli(["train", "--resume", run], cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{total:08d}"
    whole = cli(["train", *over, "paths.runs=whole"], cwd=tmp_path)
    assert whole.returncode == 0, explain(whole)
    _assert_close(_weights(run), _weights(run_folders(tmp_path / "whole")[0]), atol=1e-4)


@pytest.mark.slow
def test_a_two_process_resume_restores_every_ranks_random_stream(tmp_path):
    """With augmentation each rank draws its own crops from its own random stream: a 2-process run
    stopped after 2 steps and resumed with 2 processes ends where the uninterrupted run ends, as
    every rank's stream is saved (not only rank 0's, with the others re-derived on resume)."""
    over = [*TINY, "data.augment=[crop]", "optim.lr=0.01", "trainer.devices=2"]
    whole = cli(["train", *over, "paths.runs=whole"], cwd=tmp_path)
    assert whole.returncode == 0, explain(whole)
    first = cli(["train", *over, "trainer.max_steps=2", "paths.runs=stopped"], cwd=tmp_path)
    assert first.returncode == 0, explain(first)
    (run,) = run_folders(tmp_path / "stopped")
    from sortedcli import runs

    state = runs.load_state(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    assert len(state["rng_ranks"]) == 2 and not torch.equal(*state["rng_ranks"])
    resumed = cli(["train", "--resume", run, "trainer.max_steps=4", "trainer.devices=2"], cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{4:08d}"
    _assert_close(_weights(run), _weights(run_folders(tmp_path / "whole")[0]), atol=1e-6)


# --- FSDP2 on a tiny LLaMA -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_args(tmp_path_factory):
    from sortedcli.data import lm
    from test_llama import CORPUS, QA

    home = tmp_path_factory.mktemp("fsdp")
    lm.train_tokenizer(CORPUS, 300, home / "tok")
    (home / "qa.json").write_text(json.dumps(QA))
    return ["model=llama_tiny", f"model.tokenizer={home / 'tok'}", "data=alpaca", f"data.path={home / 'qa.json'}",
            "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "optim=sgd", "trainer.batch_size=4",
            "eval.batch_size=8"]


#: the exits' own readouts on a frozen trunk, self-distilled (the study's exit_readouts arm): the readouts
#: are modules outside the decoder layers (FSDP's units), trained alone, and the teacher is the same step's
#: full model, detached
READOUTS = ["model.exits.readout=affine", "model.exits.trunk=frozen", "distill.enabled=true",
            "distill.teacher=self", "distill.alpha=1.0"]


@pytest.mark.parametrize("extra", [[], READOUTS], ids=["soft", "exit-readouts"])
def test_fsdp_llama_matches_one_process_and_its_checkpoint_resumes_as_one(llama_args, extra, tmp_path):
    """SoFT (every exit's loss) with FSDP2 over 2 gloo ranks: the prompt-masked token losses are weighted
    by each rank's share of the counted tokens, so the step is the global batch's; the full checkpoint it
    writes resumes in a single process (the optimizer state by parameter name). The same with the exits'
    own readouts trained on a frozen trunk."""
    alone = cli(["train", *llama_args, *extra, "trainer.max_steps=3", "hydra.run.dir=alone"], cwd=tmp_path)
    assert alone.returncode == 0, explain(alone)
    sharded = cli(["train", *llama_args, *extra, "trainer.max_steps=2", "trainer.devices=2", "trainer.strategy=fsdp",
                   "hydra.run.dir=sharded"], cwd=tmp_path)
    assert sharded.returncode == 0, explain(sharded)
    assert "x 2 processes (FSDP)" in sharded.stdout
    resumed = cli(["train", "--resume", tmp_path / "sharded", "trainer.max_steps=3"], cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming" in resumed.stdout
    _assert_close(_weights(tmp_path / "sharded"), _weights(tmp_path / "alone"), atol=1e-6)


def test_unknown_strategy_exits_2(llama_args, tmp_path):
    p = cli(["train", *llama_args, "trainer.strategy=zero3"], cwd=tmp_path)
    assert p.returncode == 2 and "trainer.strategy must be ddp" in p.stderr, explain(p)
    p = cli(["train", *llama_args, "trainer.accumulate=3"], cwd=tmp_path)  # batch 4
    assert p.returncode == 2 and "multiple of the 1 process(es) x trainer.accumulate=3" in p.stderr, explain(p)
