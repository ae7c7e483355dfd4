"""Sharded checkpoints and checkpoint fingerprints.

A run sharded with ``trainer.strategy=fsdp`` writes each checkpoint with torch.distributed.checkpoint:
every rank its own shards of the weights and the optimizer state, in the same atomic ``step-N`` scheme;
it resumes on another number of processes and eval reads it in one process. The fingerprint that
results name their checkpoint by is cheap (sizes, times, small files, samples), not a whole-file sha256.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sortedcli import runs
from sortedcli.errors import UsageError

from conftest import cli, explain
from test_distributed import llama_args  # noqa: F401  (the module fixture: tiny LLaMA on a tiny Alpaca)

STEPS = 3


def _step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step-{n:08d}"


def _one_error_line(p) -> str:
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    return lines[0]


def _back_to(run: Path, n: int) -> None:
    """``run`` as it was after step ``n``'s checkpoint: the later ones removed, ``latest`` naming it."""
    for c in runs.checkpoints(run):
        if runs.step_of(c) > n:
            shutil.rmtree(c)
    runs.write_atomic(run / "checkpoints" / "latest", _step(run, n).name)


@pytest.fixture(scope="module")
def sharded(llama_args, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny LLaMA trained 3 steps by 2 gloo processes with FSDP2, a checkpoint after every step."""
    home = tmp_path_factory.mktemp("dcp")
    p = cli(["train", *llama_args, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=1", "trainer.keep_checkpoints=3",
             "trainer.devices=2", "trainer.strategy=fsdp", "hydra.run.dir=sharded"], cwd=home)
    assert p.returncode == 0, explain(p)
    assert "x 2 processes (FSDP)" in p.stdout
    return home / "sharded"


def test_each_rank_writes_its_own_shards_and_one_process_reads_them_whole(sharded, tmp_path):
    ckpt = _step(sharded, STEPS)
    assert runs.latest_checkpoint(sharded) == ckpt and runs.sharded(ckpt)
    assert [runs.step_of(c) for c in runs.checkpoints(sharded)] == [3, 2, 1]
    assert not (ckpt / runs.MODEL_FILE).exists()  # no whole copy of the weights anywhere
    for part in (runs.DCP_MODEL, runs.DCP_OPTIM):
        assert sorted(p.name for p in (ckpt / part).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    record = json.loads((ckpt / runs.META_FILE).read_text())
    assert record["step"] == STEPS and record["world"] == 2 and "llama_tiny" in record["config"]
    state = runs.load_state(ckpt)
    assert "optimizer" not in state and len(state["rng_ranks"]) == 2 and state["progress"]["step"] == STEPS
    assert not list((sharded / "checkpoints").glob(".*tmp"))

    weights, cfg = runs.load_weights(ckpt)  # consolidated in this one process
    assert cfg.model.name == "llama_tiny"
    assert weights["model.embed_tokens.weight"].shape[1] == 64 and len(weights) > 10
    assert all(torch.isfinite(v).all() for v in weights.values())

    p = cli(["eval", "--ckpt", sharded, "eval.batch_size=8"], cwd=tmp_path)  # eval reads it like any checkpoint
    assert p.returncode == 0, explain(p)
    doc = json.loads(next((sharded / "eval").rglob("results.json")).read_text())
    assert doc["checkpoint"]["step"] == STEPS and doc["checkpoint"]["fingerprint"] == runs.fingerprint(ckpt)


def test_a_killed_save_leaves_the_previous_checkpoint_and_two_processes_continue_it_exactly(sharded, tmp_path):
    """Step 3's save was killed (its temporary folder holds one rank's shards, no record; ``latest``
    still names step 2): the run resumes from step 2 on 2 processes and writes the same step 3 as the
    run that was never interrupted."""
    run = Path(shutil.copytree(sharded, tmp_path / "run", ignore=shutil.ignore_patterns("eval")))
    _back_to(run, 2)
    partial = run / "checkpoints" / ".step-00000003.tmp" / runs.DCP_MODEL
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes((_step(sharded, 3) / runs.DCP_MODEL / "__0_0.distcp").read_bytes()[:100])
    assert runs.latest_checkpoint(run) == _step(run, 2) and [runs.step_of(c) for c in runs.checkpoints(run)] == [2, 1]

    p = cli(["train", "--resume", run, f"trainer.max_steps={STEPS}", "trainer.devices=2", "trainer.strategy=fsdp"],
            cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "resuming" in p.stdout and "with 2 processes" in p.stdout, p.stdout
    assert runs.sharded(_step(run, 3)) and not (run / "checkpoints" / ".step-00000003.tmp").exists()
    again, _ = runs.load_weights(_step(run, 3))
    first, _ = runs.load_weights(_step(sharded, 3))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_a_two_process_checkpoint_resumes_in_one_process_and_back_on_two(sharded, tmp_path):
    """2 -> 1 (from the step-2 checkpoint folder named on the command line): the same step 3 as the
    2-process run; then 1 -> 2: the one-file checkpoint resumes sharded and writes shards again."""
    run = Path(shutil.copytree(sharded, tmp_path / "run", ignore=shutil.ignore_patterns("eval")))
    p = cli(["train", "--resume", _step(run, 2), f"trainer.max_steps={STEPS}", "trainer.devices=1",
             "trainer.strategy=ddp"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "resuming" in p.stdout and "processes" not in p.stdout, p.stdout
    one = runs.latest_checkpoint(run)
    assert one == _step(run, 3) and (one / runs.MODEL_FILE).is_file()  # one process: the one-file format
    alone, _ = runs.load_weights(one)
    first, _ = runs.load_weights(_step(sharded, 3))
    worst = max((alone[k] - first[k]).abs().max().item() for k in first)
    assert alone.keys() == first.keys() and worst <= 1e-6, worst

    solo = Path(shutil.copytree(run, tmp_path / "solo"))  # the same step in one process: the reference
    longer = ["trainer.epochs=2", f"trainer.max_steps={STEPS + 1}"]
    p = cli(["train", "--resume", run, *longer, "trainer.devices=2", "trainer.strategy=fsdp"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "resuming" in p.stdout and "with 2 processes" in p.stdout, p.stdout
    assert runs.latest_checkpoint(run) == _step(run, STEPS + 1) and runs.sharded(_step(run, STEPS + 1))
    after, _ = runs.load_weights(_step(run, STEPS + 1))
    assert after.keys() == first.keys() and all(torch.isfinite(v).all() for v in after.values())
    # the one-file checkpoint went through the sharded load, a step (at the longer schedule's learning
    # rate: the weights move) and the sharded save as one process takes that step
    q = cli(["train", "--resume", solo, *longer, "trainer.devices=1", "trainer.strategy=ddp"], cwd=tmp_path)
    assert q.returncode == 0, explain(q)
    ref, _ = runs.load_weights(runs.latest_checkpoint(solo))
    assert "trained 1 step (steps 4-4)" in p.stdout and any(not torch.equal(after[k], alone[k]) for k in first)
    worst = max((after[k] - ref[k]).abs().max().item() for k in first)
    assert worst <= 1e-6, worst


def test_four_processes_continue_a_two_process_checkpoint_and_two_and_one_continue_theirs(sharded, tmp_path):
    """2 -> 4 -> 2 and 4 -> 1: step 1 of the 2-process run resumed on 4 processes writes 4 ranks' shards
    of the same step 2 as the 2-process run (the batch is split 4 ways, the step is the global batch's);
    that 4-rank checkpoint resumes on 2 processes and on 1, each writing the 2-process run's step 3. The
    schedule is the run's own (max_steps only stops it earlier), so every step is comparable."""
    run = Path(shutil.copytree(sharded, tmp_path / "run", ignore=shutil.ignore_patterns("eval")))
    _back_to(run, 1)
    p = cli(["train", "--resume", run, "trainer.max_steps=2", "trainer.devices=4", "trainer.strategy=fsdp"],
            cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "resuming" in p.stdout and "with 4 processes" in p.stdout, p.stdout
    four = _step(run, 2)
    assert json.loads((four / runs.META_FILE).read_text())["world"] == 4
    assert sorted(f.name for f in (four / runs.DCP_MODEL).glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]

    def same(ckpt, step):
        got, _ = runs.load_weights(ckpt)
        want, _ = runs.load_weights(_step(sharded, step))
        assert got.keys() == want.keys()
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        assert worst <= 1e-6, (ckpt, worst)
        assert any(not torch.equal(want[k], runs.load_weights(_step(sharded, step - 1))[0][k]) for k in want)

    same(four, 2)
    for devices, strategy in ((2, "fsdp"), (1, "ddp")):
        again = Path(shutil.copytree(run, tmp_path / f"on{devices}"))
        p = cli(["train", "--resume", again, f"trainer.max_steps={STEPS}", f"trainer.devices={devices}",
                 f"trainer.strategy={strategy}"], cwd=tmp_path)
        assert p.returncode == 0, explain(p)
        assert "resuming" in p.stdout and "step 2" in p.stdout, p.stdout
        assert runs.sharded(_step(again, STEPS)) == (devices > 1)
        same(_step(again, STEPS), STEPS)


def test_a_sharded_checkpoint_of_another_model_is_refused_in_one_line(sharded, trained_run, tmp_path):
    run = Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "export")))
    shutil.copytree(_step(sharded, STEPS), _step(run, 99))
    runs.write_atomic(run / "checkpoints" / "latest", _step(run, 99).name)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    p = cli(["train", "--resume", run, "trainer.max_steps=200"], cwd=tmp_path)
    line = _one_error_line(p)
    assert f"sharded checkpoint {_step(run, 99)} holds another model than this run's" in line, line
    assert "resume it with the run (config) that wrote it, or start a new run" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_load_sharded_refuses_other_shapes_before_reading(sharded):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sortedcli.distributed import load_sharded

    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match=r"holds another model than this run's \(\d+ tensor\(s\) differ, e\.g\. "):
        load_sharded(model, optimizer, _step(sharded, STEPS))


# --- the fingerprint -------------------------------------------------------------------------------

def _big_checkpoint(folder: Path) -> Path:
    """A checkpoint folder whose weights file (3 MiB) is above the size hashed whole."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"a": torch.randn(512, 1024), "b": torch.randn(256, 1024)}, str(folder / runs.MODEL_FILE),
              metadata={"config": "model: {name: x}\n", "step": "7"})
    torch.save({"progress": {"step": 7}}, folder / runs.STATE_FILE)
    return folder


def test_the_fingerprint_survives_a_copy_that_keeps_times_and_catches_a_rewrite_of_the_same_size(tmp_path):
    ckpt = _big_checkpoint(tmp_path / "checkpoints" / "step-00000007")
    weights = ckpt / runs.MODEL_FILE
    assert weights.stat().st_size > runs.SMALL
    record = runs.checkpoint_record(tmp_path, ckpt)
    assert record["step"] == 7 and record["path"] == "checkpoints/step-00000007"
    assert runs.fingerprint(shutil.copytree(ckpt, tmp_path / "copy")) == record["fingerprint"]

    data = bytearray(weights.read_bytes())
    st = weights.stat()
    # one sampled piece changed, the size and even the modification time kept
    at = (len(data) - runs.PIECE) * 9 // (runs.SAMPLES - 1)
    data[at] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert runs.fingerprint(ckpt) != record["fingerprint"]
    # a byte no sample reads, rewritten: caught by the modification time
    data[at] ^= 0xFF
    data[at + runs.PIECE + 10] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert runs.fingerprint(ckpt) != record["fingerprint"]


def test_the_fingerprint_of_a_sharded_checkpoint_covers_every_ranks_shards(sharded, tmp_path):
    ckpt = Path(shutil.copytree(_step(sharded, STEPS), tmp_path / "step-00000003"))
    before = runs.fingerprint(ckpt)
    assert before == runs.fingerprint(_step(sharded, STEPS))
    shard = ckpt / runs.DCP_MODEL / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # small shards are hashed whole
    shard.write_bytes(bytes(data))
    assert runs.fingerprint(ckpt) != before
