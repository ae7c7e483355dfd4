"""SoFT at the cost of SFT (issue 21, item 4): a language model's training step reads every exit (and the
full model) out at the places whose loss counts only, chunk by chunk, with the loss and gradients of
the whole readout at once (``engine.exit_losses``)."""

from __future__ import annotations

import copy

import pytest
import torch

from sortedcli import engine
from sortedcli.engine import Distill, checkpoint_activations, train_step
from sortedcli.models import create
from sortedcli.nest import COUNT, Dim, Grid, SubModel, run_exits, use
from sortedcli.tasks import CausalLM

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
VOCAB = 96
LM = CausalLM()
GRID = Grid((Dim("depth", COUNT, (1, 2, 3, 4)),))
SUBS = {"all": [*GRID.submodels()], "full": [GRID.largest],
        "sampled": [SubModel.of(depth=3), SubModel.of(depth=1), SubModel.of(depth=3)]}  # trunk 3, a repeat


def _llama(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return create("llama", vocab_size=VOCAB, config=dict(TINY)).to(dtype).train()


def _batch(n: int = 4, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    labels[2, 6:8] = -100  # a hole inside an answer
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, subs, batch) -> tuple[float, dict]:
    """Today's loss, unchunked and ungathered: every exit's logits at every place, cross-entropy over
    the counted ones, the mean over the sub-models, one backward."""
    model.zero_grad(set_to_none=True)
    inputs, total = LM.inputs(batch), 0.0
    for trunk in {max(s["depth"] for s in subs)}:
        with use(model, SubModel.of(depth=trunk)):
            logits = run_exits(model, inputs, sorted({s["depth"] for s in subs}))
            loss = sum(LM.loss(logits[s["depth"]], batch) for s in subs) / len(subs)
            loss.backward()
            total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, subs, batch) -> tuple[float, dict]:
    loss = train_step(model, LM, subs, batch, torch.optim.SGD(model.parameters(), lr=0.0), GRID.largest,
                      Distill(), torch.device("cpu"), None)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampler", sorted(SUBS))
def test_chunked_readout_has_the_loss_and_gradients_of_the_whole_one(monkeypatch, sampler, dtype):
    """Within 1e-6 in either dtype: the task's cross-entropy computes in float32 (``.float()``) both ways,
    so float64 differs only by the order of float32 sums."""
    tol = 1e-6
    monkeypatch.setattr(engine, "HEAD_CHUNK", 5)  # 31 counted places: 7 chunks, the last one short
    model, batch = _llama(dtype), _batch()
    want_loss, want = _reference(model, SUBS[sampler], batch)
    loss, got = _step(model, SUBS[sampler], batch)
    assert loss == pytest.approx(want_loss, abs=tol, rel=tol)
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=10 * tol, atol=tol, msg=name)


@pytest.mark.parametrize("sampler", ["all", "full"])
def test_no_head_sees_a_place_that_does_not_count_nor_more_than_a_chunk(monkeypatch, sampler):
    """Today's SoFT ran the full model's head at all 48 places (SFT too), and each exit's at all the
    31 counted ones at once; now every readout sees at most HEAD_CHUNK places, only counted ones."""
    monkeypatch.setattr(engine, "HEAD_CHUNK", 8)
    model, batch = _llama(), _batch()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    _step(model, SUBS[sampler], batch)
    counted = int(LM.counted(batch))
    assert max(seen) <= 8
    assert sum(seen) == counted * len(SUBS[sampler])  # each exit once, at the counted places only


def test_checkpointed_layers_and_accumulation_give_the_same_step(monkeypatch):
    """The trunk's forward pass stops after its deepest exit (no head): activation checkpointing
    recomputes the layers in the backward pass as before, and micro-batches add up to the batch."""
    monkeypatch.setattr(engine, "HEAD_CHUNK", 7)
    model, batch = _llama(torch.float64), _batch()
    want_loss, want = _reference(model, SUBS["all"], batch)
    ckpt = copy.deepcopy(model)
    checkpoint_activations(ckpt)
    loss, got = _step(ckpt, SUBS["all"], batch)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6, msg=name)
    loss = train_step(model, LM, SUBS["all"], batch, torch.optim.SGD(model.parameters(), lr=0.0), GRID.largest,
                      Distill(), torch.device("cpu"), None, accumulate=2)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6, msg=name)
