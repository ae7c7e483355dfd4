"""Gradient clipping by global norm (``optim.clip_grad_norm``) and activation checkpointing per depth
unit (``trainer.activation_checkpointing``): one process, FSDP2 shards on 2 gloo processes, the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import cli, explain
from sortedcli.distributed import Dist, shard, shutdown
from sortedcli.engine import Distill, checkpoint_activations, clip_gradients, train_step
from sortedcli.models import create
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel
from sortedcli.tasks import CausalLM

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
VOCAB = 96
LM = CausalLM()


def _llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("llama", vocab_size=VOCAB, config=dict(TINY)).train()


def _batch(seed: int = 1, n: int = 4, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, subs, grid, clip=None, stats=None, lr=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return train_step(model, LM, subs, _batch(), opt, grid.largest, Distill(), torch.device("cpu"), None,
                      clip_grad_norm=clip, stats=stats)


SOFT = Grid((Dim("depth", COUNT, (1, 2, 3, 4)),))
WIDE = Grid((Dim("heads", FRACTION, (0.5, 1.0)), Dim("ffn", FRACTION, (0.5, 1.0)), Dim("depth", COUNT, (2, 4))))
# every exit of the full width (one trunk), and narrow sub-models (heads and FFN sliced): the recomputation
# in the backward pass must run the same slices as the forward pass did
SUBS = [*SOFT.submodels()], [SubModel.of(heads=0.5, ffn=0.5, depth=4), SubModel.of(heads=1.0, ffn=0.5, depth=2)]


def test_clipping_scales_the_gradients_to_the_global_norm_and_reports_the_norm_before():
    model = _llama()
    _step(model, SUBS[0], SOFT)
    grads = _grads(model)
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()])).item()
    assert norm > 0.5
    model.zero_grad()
    stats: dict = {}
    _step(model, SUBS[0], SOFT, clip=0.5, stats=stats)
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, grads[name] * (0.5 / (norm + 1e-6)), rtol=1e-5, atol=1e-8, msg=name)
    model.zero_grad()  # a bound above the norm changes nothing
    stats = {}
    _step(model, SUBS[0], SOFT, clip=100.0, stats=stats)
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, grads[name], rtol=1e-6, atol=0, msg=name)
    stats = {}
    _step(model, SUBS[0], SOFT, clip=None, stats=stats)  # off: nothing computed, nothing reported
    assert stats == {}
    assert clip_gradients(torch.nn.Linear(2, 2), 1.0) == 0.0  # no gradient at all: nothing to clip


@pytest.mark.parametrize("which", [0, 1], ids=["every-exit", "sliced-heads-ffn"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(which):
    grid = SOFT if which == 0 else WIDE
    results = []
    for checkpointed in (False, True):
        model = _llama()
        if checkpointed:
            assert checkpoint_activations(model) == 4  # one per decoder layer
        keys = set(model.state_dict())
        loss = _step(model, SUBS[which], grid)
        results.append((loss, _grads(model)))
        assert set(model.state_dict()) == keys  # names unchanged: checkpoints load either way
    (loss0, grads0), (loss1, grads1) = results
    assert loss1 == loss0
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        assert torch.equal(grads1[name], grads0[name]), name


def test_activation_checkpointing_of_residual_blocks_gives_the_same_loss_and_gradients():
    """A model without checkpointing of its own (torchvision's ResNet): torch's composable checkpoint on
    each residual block, width-sliced and depth-dropped sub-models."""
    from sortedcli.tasks import ImageClassification

    grid = Grid((Dim("width", FRACTION, (0.25, 0.5, 1.0)), Dim("depth", COUNT, (1, 2, 3, 4))))
    subs = [grid.largest, SubModel.of(width=0.25, depth=2), SubModel.of(width=0.5, depth=4)]
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = create("resnet_tiny", num_classes=10, in_channels=3).train()
        keys = set(model.state_dict())
        if checkpointed:
            assert checkpoint_activations(model) == 4
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(model, ImageClassification(), subs, batch, opt, grid.largest, Distill(),
                          torch.device("cpu"), None)
        results.append((loss, _grads(model)))
        assert set(model.state_dict()) == keys
    (loss0, grads0), (loss1, grads1) = results
    assert loss1 == loss0 and grads1.keys() == grads0.keys()
    for name in grads0:
        assert torch.equal(grads1[name], grads0[name]), name


def test_activation_checkpointing_keeps_fewer_activations():
    """Tensors saved for the backward pass, counted with saved-tensor hooks: with checkpointing each
    layer keeps its inputs only."""
    sizes = []
    for checkpointed in (False, True):
        model = _llama()
        if checkpointed:
            checkpoint_activations(model)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=_batch(length=48)["input_ids"]).logits
        out.float().mean().backward()
        sizes.append(sum(saved))
    assert sizes[1] < 0.7 * sizes[0], sizes


# --- FSDP2: the global norm over DTensor shards ----------------------------------------------------

def _fsdp_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = _llama()
        checkpoint_activations(model)  # and with checkpointed layers under fully_shard
        shard(model)
        stats: dict = {}
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        # every rank the whole batch: FSDP2's averaged gradient is the one-process gradient
        loss = train_step(model, LM, SUBS[0], _batch(), opt, SOFT.largest, Distill(), torch.device("cpu"), None,
                          dist=Dist(rank=rank, world=2, sharded=True), clip_grad_norm=0.5, stats=stats)
        kinds = {type(p.grad).__name__ for p in model.parameters() if p.grad is not None}
        full = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"norm": stats["grad_norm"], "loss": loss, "grads": full, "kinds": kinds}, f"{out}/rank{rank}.pt")
    finally:
        shutdown(clean=sys.exc_info()[0] is None)  # the peers wait for each other after a clean finish


def test_fsdp_clipping_uses_the_global_norm_over_the_shards(tmp_path):
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["kinds"] == {"DTensor"}
    model = _llama()
    stats: dict = {}
    loss = _step(model, SUBS[0], SOFT, clip=0.5, stats=stats)
    assert r0["norm"] == r1["norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)  # not a shard's norm
    assert r0["loss"] == pytest.approx(loss, rel=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


# --- the CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_args(tmp_path_factory):
    from sortedcli.data import lm
    from test_llama import CORPUS, QA

    home = tmp_path_factory.mktemp("clip")
    lm.train_tokenizer(CORPUS, 300, home / "tok")
    (home / "qa.json").write_text(json.dumps(QA))
    return ["model=llama_tiny", f"model.tokenizer={home / 'tok'}", "data=alpaca", f"data.path={home / 'qa.json'}",
            "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "optim=adamw", "trainer.batch_size=4",
            "trainer.log_every=1", "trainer.epoch_eval=false", "trainer.tensorboard=false"]


def test_train_clips_by_default_with_adamw_logs_the_norm_and_checkpoints_activations(llama_args, tmp_path):
    p = cli(["train", *llama_args, "trainer.max_steps=2", "trainer.activation_checkpointing=true",
             "hydra.run.dir=run"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if "loss" in r]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    p = cli(["train", *llama_args, "trainer.max_steps=1", "optim=sgd", "hydra.run.dir=sgd"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    records = [json.loads(line) for line in (tmp_path / "sgd" / "metrics.jsonl").read_text().splitlines()]
    assert not any("grad_norm" in r for r in records)  # SGD's default: no clipping


@pytest.mark.parametrize("override, message", [
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm must be null or a number >= 0"),
    ("optim.clip_grad_norm=abc", "optim.clip_grad_norm must be null or a number >= 0"),
    ("trainer.activation_checkpointing=maybe", "trainer.activation_checkpointing must be true or false"),
])
def test_bad_clip_or_checkpointing_settings_exit_2_with_one_line(llama_args, override, message, tmp_path):
    p = cli(["train", *llama_args, override], cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, explain(p)


def _bf16_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = _llama()
        shard(model, param_dtype=torch.bfloat16)  # what train does where autocast is bf16 (a GPU with it)
        stats: dict = {}
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(model, LM, SUBS[0], _batch(), opt, SOFT.largest, Distill(), torch.device("cpu"),
                          torch.bfloat16, dist=Dist(rank=rank, world=2, sharded=True), clip_grad_norm=1e9, stats=stats)
        dtypes = {p.dtype for p in model.parameters()} | {p.grad.dtype for p in model.parameters() if p.grad is not None}
        full = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"norm": stats["grad_norm"], "loss": loss, "grads": full, "dtypes": dtypes}, f"{out}/rank{rank}.pt")
    finally:
        shutdown(clean=sys.exc_info()[0] is None)  # the peers wait for each other after a clean finish


def test_fsdp_mixed_precision_keeps_fp32_shards_and_gradients(tmp_path):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on 2 gloo ranks: the sharded
    weights and their gradients stay fp32, and the step's gradient is the fp32 one within bf16's precision."""
    mp.spawn(_bf16_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert r0["dtypes"] == {torch.float32}
    model = _llama()
    stats: dict = {}
    loss = _step(model, SUBS[0], SOFT, clip=1e9, stats=stats)
    assert r0["loss"] == pytest.approx(loss, rel=1e-2) and r0["norm"] == pytest.approx(stats["grad_norm"], rel=2e-2)
    for name, g in _grads(model).items():
        assert (r0["grads"][name] - g).norm() <= 0.03 * g.norm(), name
