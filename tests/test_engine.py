"""Sampling schedules and the training step."""

import pytest
import torch

from sortedcli.engine import Distill, EpochBatches, train_step
from sortedcli.models import create
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, use
from sortedcli.sampling import SAMPLERS, create_sampler
from sortedcli.tasks import ImageClassification

IMAGES = ImageClassification()

GRID = Grid((Dim("width", FRACTION, (0.25, 0.5, 1.0)), Dim("depth", COUNT, (1, 2, 3, 4))))


def test_samplers_draw_what_their_rule_says():
    assert create_sampler("full", GRID).step() == [GRID.largest]
    assert create_sampler("all", GRID).step() == GRID.submodels()
    sandwich = create_sampler("sandwich", GRID, n=3).step()
    assert sandwich[:2] == [GRID.largest, GRID.smallest] and len(sandwich) == 5
    drawn = [s for _ in range(400) for s in create_sampler("sortednet", GRID, seed=_, g=2).step()]
    assert set(drawn) == set(GRID.submodels())  # uniform over the whole grid: every member appears
    assert set(SAMPLERS) == {"sortednet", "sandwich", "all", "full"}


def test_sampler_owns_a_seeded_generator_and_resumes_exactly():
    a = create_sampler("sortednet", GRID, seed=7, g=3)
    first = [a.step() for _ in range(5)]
    state = a.state_dict()
    rest = [a.step() for _ in range(5)]
    torch.manual_seed(123)  # the global RNG plays no part
    b = create_sampler("sortednet", GRID, seed=7, g=3)
    assert [b.step() for _ in range(5)] == first
    c = create_sampler("sortednet", GRID, seed=0, g=3)
    c.load_state_dict(state)
    assert [c.step() for _ in range(5)] == rest
    with pytest.raises(ValueError):
        create_sampler("sortednet", GRID, g=0)


def test_epoch_batches_are_seeded_and_resume_mid_epoch():
    whole = list(EpochBatches(100, 16, seed=3, epoch=2))
    assert len(whole) == 6 and all(len(b) == 16 for b in whole)
    assert list(EpochBatches(100, 16, seed=3, epoch=2, start=4)) == whole[4:]
    assert list(EpochBatches(100, 16, seed=3, epoch=3)) != whole


def test_train_step_accumulates_the_mean_gradient_of_the_sampled_submodels():
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    subs = [SubModel.of(width=0.25, depth=1), SubModel.of(width=1.0, depth=4)]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for sub in subs:
        model.zero_grad()
        with use(model, sub):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad / len(subs)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, IMAGES, subs, (x, y), opt, GRID.largest, Distill(), torch.device("cpu"), None)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), expected[n],
                                   rtol=1e-4, atol=1e-6)
    # the smallest sub-model leaves the channels it does not use without gradient
    assert model.fc.weight.grad.abs().sum() > 0


def test_distillation_loss_is_zero_for_identical_outputs_and_scaled_like_cross_entropy():
    logits, batch = torch.randn(4, 10), (None, torch.zeros(4, dtype=torch.long))
    assert IMAGES.distill(logits, logits, batch, 2.0).abs() < 1e-6
    other = torch.randn(4, 10)
    assert IMAGES.distill(other, logits, batch, 4.0) > 0
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = train_step(model, IMAGES, [GRID.smallest], (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))), opt,
                      GRID.largest, Distill(enabled=True, temperature=2.0, alpha=0.5), torch.device("cpu"), None)
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
