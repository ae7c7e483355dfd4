"""Sampling schedules and the training step."""

import copy
import re

import pytest
import torch

from sortedcli.engine import Distill, EpochBatches, train_step
from sortedcli.models import create
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, extract, use
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
    assert set(SAMPLERS) == {"sortednet", "sandwich", "all", "full", "weighted", "lossaware", "progressive"}


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


def test_sortednet_largest_trains_the_largest_every_step_besides_the_same_draws():
    plain = create_sampler("sortednet", GRID, seed=4, g=2)
    with_largest = create_sampler("sortednet", GRID, seed=4, g=2, largest=True)
    for _ in range(20):
        drawn, steps = plain.step(), with_largest.step()
        assert steps == [GRID.largest, *drawn]  # the same generator draws the same g; the largest first
    assert len(create_sampler("sortednet", GRID, g=1).step()) == 1  # default: the paper's rule


def test_epoch_batches_are_seeded_and_resume_mid_epoch():
    whole = list(EpochBatches(100, 16, seed=3, epoch=2))
    assert len(whole) == 6 and all(len(b) == 16 for b in whole)
    assert list(EpochBatches(100, 16, seed=3, epoch=2, start=4)) == whole[4:]
    assert list(EpochBatches(100, 16, seed=3, epoch=3)) != whole


def _plain_name(name: str) -> str:
    """The full model's name of a cut-out model's parameter: a dropped ResNet block is replaced by its
    downsample path, which then sits at the block's own name (``layer2.0.0.0.weight`` is
    ``layer2.0.downsample.0.weight``)."""
    return re.sub(r"^(layer\d\.\d+)\.0\.", r"\1.downsample.", name)


def test_train_step_accumulates_the_mean_gradient_of_the_sampled_submodels():
    """The reference shares no code with the training step: each sub-model cut out as a plain torch
    model (``extract``), its own cross-entropy backpropagated, its gradients written into the leading
    corner of the full parameters they were cut from, averaged over the sub-models."""
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    subs = [SubModel.of(width=0.25, depth=1), SubModel.of(width=1.0, depth=4)]
    full = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in full.items()}
    for sub in subs:
        plain = extract(model, sub, x[:1]).train()  # batch statistics, as in training
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        for name, p in plain.named_parameters():
            corner = tuple(slice(0, k) for k in p.shape)
            expected[_plain_name(name)][corner] += p.grad / len(subs)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, IMAGES, subs, (x, y), opt, GRID.largest, Distill(), torch.device("cpu"), None)
    for n, p in full.items():
        assert expected[n].abs().sum() > 0, n  # the largest sub-model reaches every parameter
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)

    # the smallest sub-model alone leaves the channels it does not use, and the blocks it drops,
    # without gradient
    small = subs[0]
    kept = extract(model, small, x[:1]).fc.in_features
    assert 0 < kept < model.fc.in_features
    train_step(model, IMAGES, [small], (x, y), opt, GRID.largest, Distill(), torch.device("cpu"), None)
    assert model.fc.weight.grad[:, :kept].abs().sum() > 0
    assert not model.fc.weight.grad[:, kept:].any()
    dropped = model.layer2[0].conv1.weight.grad
    assert dropped is None or not dropped.any()


def _kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, mean over the batch, written out."""
    def log_softmax(z):
        z = z / temperature
        return z - z.exp().sum(-1, keepdim=True).log()
    lp_t, lp_s = log_softmax(teacher), log_softmax(student)
    return (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean()


def test_distillation_loss_is_zero_for_identical_outputs_and_scaled_like_cross_entropy():
    torch.manual_seed(0)
    logits, batch = torch.randn(4, 10), (None, torch.zeros(4, dtype=torch.long))
    assert IMAGES.distill(logits, logits, batch, 2.0).abs() < 1e-6
    other = torch.randn(4, 10)
    for T in (1.0, 2.0, 4.0):  # the KL at temperature T, times T^2
        torch.testing.assert_close(IMAGES.distill(other, logits, batch, T), _kl_by_hand(other, logits, T) * T * T)
    # the T^2 is what keeps its gradients at cross-entropy's scale: for large T the gradient on the
    # student's logits tends to (student - teacher) / (batch x classes), whatever T is
    grads = []
    for T in (32.0, 64.0):
        student = other.clone().requires_grad_()
        IMAGES.distill(student, logits, batch, T).backward()
        grads.append(student.grad)
    centred = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
    limit = (centred(other) - centred(logits)) / (4 * 10)
    for g in grads:
        torch.testing.assert_close(g, limit, rtol=0.1, atol=2e-3)

    # in the training step: the student's loss is alpha x that KL against the largest sub-model's
    # output (the teacher, run without gradient when not sampled) + (1 - alpha) x its cross-entropy
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        reference = copy.deepcopy(model)
        teacher = reference(x)  # the full model is the largest sub-model; batch statistics (train mode)
        student = extract(reference, GRID.smallest, x[:1]).train()(x)
    T, alpha = 2.0, 0.3
    want = (alpha * _kl_by_hand(student, teacher, T) * T * T
            + (1 - alpha) * torch.nn.functional.cross_entropy(student, y)).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = train_step(model, IMAGES, [GRID.smallest], (x, y), opt, GRID.largest,
                      Distill(enabled=True, temperature=T, alpha=alpha), torch.device("cpu"), None)
    assert loss == pytest.approx(want, rel=1e-4)
    off = train_step(copy.deepcopy(reference), IMAGES, [GRID.smallest], (x, y), opt, GRID.largest, Distill(),
                     torch.device("cpu"), None)
    assert abs(off - want) > 1e-3  # distillation changed the loss: the check above could fail


def _counts(sampler, steps: int) -> dict:
    out = {}
    for _ in range(steps):
        for sub in sampler.step():
            out[sub] = out.get(sub, 0) + 1
    return out


def test_weighted_sampler_draws_small_submodels_more_often_with_negative_power():
    counts = _counts(create_sampler("weighted", GRID, seed=1, g=4, power=-1.0), 500)
    assert counts[GRID.smallest] > 5 * counts.get(GRID.largest, 0)
    uniform = _counts(create_sampler("weighted", GRID, seed=1, g=4, power=0.0), 500)
    assert set(uniform) == set(GRID.submodels()) and max(uniform.values()) < 3 * min(uniform.values())
    with_largest = create_sampler("weighted", GRID, seed=1, g=2, largest=True).step()
    assert with_largest[0] == GRID.largest and len(with_largest) == 3


def test_lossaware_sampler_moves_toward_the_lagging_submodels_and_resumes_exactly():
    s = create_sampler("lossaware", GRID, seed=3, g=4, sharpness=2.0, floor=0.2)
    before = _counts(s, 200)  # nothing observed: uniform
    assert max(before.values()) < 3 * min(before.values())
    lagging = {GRID.smallest, GRID.submodels()[1]}
    for _ in range(50):  # a rigged loss: two sub-models lag far behind the others
        subs = s.step()
        s.observe(subs, [3.0 if sub in lagging else 0.3 for sub in subs])
    p = s.probabilities()
    idx = [GRID.submodels().index(sub) for sub in lagging]
    assert p[idx].sum() > 0.5 and abs(p.sum().item() - 1) < 1e-9
    after = _counts(s, 200)
    share = sum(after.get(sub, 0) for sub in lagging) / sum(after.values())
    assert share > 0.5 > sum(before.get(sub, 0) for sub in lagging) / sum(before.values())
    state = s.state_dict()
    rest = [s.step() for _ in range(5)]
    t = create_sampler("lossaware", GRID, seed=0, g=4)
    t.load_state_dict(state)
    assert [t.step() for _ in range(5)] == rest
    with pytest.raises(ValueError):
        create_sampler("lossaware", GRID, floor=2.0)


def test_progressive_sampler_opens_the_grid_from_the_largest_down_and_resumes_exactly():
    s = create_sampler("progressive", GRID, seed=0, g=2, warmup=0.2, ramp=0.6, largest=True)
    s.start(100)
    steps = [s.step() for _ in range(100)]
    assert all(subs == [GRID.largest] for subs in steps[:20])  # warmup: the largest alone
    early = {sub for subs in steps[20:30] for sub in subs}
    assert GRID.smallest not in early and GRID.largest in early
    assert all(subs[0] == GRID.largest and len(subs) == 3 for subs in steps[20:])
    late = {sub for subs in steps[60:] for sub in subs}
    assert GRID.smallest in late and len(late) > len(early)
    opened = []
    r = create_sampler("progressive", GRID, seed=0, g=2, warmup=0.2, ramp=0.6)
    r.start(100)
    for _ in range(100):
        opened.append(r.open())
        r.step()
    assert opened == sorted(opened) and opened[0] == 1 and opened[-1] == len(GRID)
    a = create_sampler("progressive", GRID, seed=5, g=2)
    a.start(50)
    [a.step() for _ in range(25)]
    state, rest = a.state_dict(), [a.step() for _ in range(10)]
    b = create_sampler("progressive", GRID, seed=5, g=2)
    b.start(50)
    b.load_state_dict(state)
    assert [b.step() for _ in range(10)] == rest
    with pytest.raises(ValueError):
        create_sampler("progressive", GRID, warmup=0.7, ramp=0.5)


def test_train_step_reports_each_submodels_label_loss_to_observe():
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    subs = [SubModel.of(width=0.25, depth=1), SubModel.of(width=1.0, depth=4)]
    expected = []
    for sub in subs:
        with torch.no_grad(), use(model, sub):
            expected.append(torch.nn.functional.cross_entropy(model(x), y).item())
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mean = train_step(model, IMAGES, subs, (x, y), opt, GRID.largest, Distill(enabled=True, alpha=0.5),
                      torch.device("cpu"), None, observe=lambda s, losses: seen.append((s, losses)))
    (got_subs, losses), = seen
    assert dict(zip(got_subs, losses)) == pytest.approx(dict(zip(subs, expected)), rel=1e-4)
    assert mean > 0


def test_precision_is_bf16_only_where_the_gpu_supports_it_and_the_choice_is_named():
    from sortedcli.engine import autocast_dtype, precision_label

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(cuda, "auto", bf16=True) is torch.bfloat16
    assert autocast_dtype(cuda, "auto", bf16=False) is None  # e.g. a V100 or T4: fp32, not bf16 emulation
    assert autocast_dtype(cuda, "fp32", bf16=True) is None and autocast_dtype(cpu, "auto") is None
    with pytest.raises(ValueError, match="no bf16 support"):
        autocast_dtype(cuda, "bf16", bf16=False)
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        autocast_dtype(cpu, "fp16")
    assert precision_label(cuda, "auto", torch.bfloat16) == "bfloat16 autocast"
    assert precision_label(cuda, "auto", None) == "fp32 (this GPU has no bf16)"
    assert precision_label(cpu, "auto", None) == "fp32"


def _fit_tiny(steps, epochs=1, max_steps=None, progress=None, state=None):
    """``fit`` of resnet_tiny on 40 random 8x8 images, batch 8 (5 steps an epoch): the weights, the
    learning rates of each step, the progress, the sampler, the epoch ends seen and the state."""
    from torch.utils.data import TensorDataset

    from sortedcli.engine import Progress, cosine_schedule, fit

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, 8, 8), torch.randint(0, 10, (40,)))
    model = create("resnet_tiny", num_classes=10, in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    length = steps if steps is not None else 5 * epochs
    sched = cosine_schedule(opt, length, warmup_steps=2)
    sampler = create_sampler("progressive", GRID, seed=1, g=1, warmup=0.2, ramp=0.6)
    progress = progress or Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"])
    lrs, ends = [], []
    fit(model, IMAGES, sampler, opt, sched, data, epochs=epochs, batch_size=8, seed=0, device=torch.device("cpu"),
        amp=None, distill=Distill(), progress=progress, max_steps=max_steps, steps=steps,
        on_step=lambda p, loss: lrs.append(sched.get_last_lr()[0]),
        on_epoch_end=lambda p: ends.append((p.epoch, p.step, p.batch)))
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
             "sched": sched.state_dict(), "sampler": sampler.state_dict(), "rng": torch.get_rng_state()}
    return lrs, progress, sampler, ends, state


def test_fit_with_steps_runs_exactly_that_many_over_as_many_epochs_as_it_takes():
    lrs, progress, sampler, ends, _ = _fit_tiny(steps=12, epochs=1)  # 5 steps an epoch; epochs is ignored
    assert len(lrs) == 12 and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at step 12
    assert sampler.total == 12 and sampler.progress == 1.0  # the sampler's schedule spans the same 12
    assert (progress.step, progress.epoch, progress.batch) == (12, 2, 2)
    assert ends == [(1, 5, 0), (2, 10, 0), (2, 12, 2)]  # two whole epochs, then the run's end mid-epoch
    lrs, progress, _, ends, _ = _fit_tiny(steps=10)  # a whole number of epochs: no extra end
    assert len(lrs) == 10 and ends == [(1, 5, 0), (2, 10, 0)] and progress.batch == 0


def test_fit_with_steps_stopped_by_max_steps_resumes_to_the_same_weights():
    from sortedcli.engine import Progress

    *_, whole = _fit_tiny(steps=12)
    _, progress, _, _, state = _fit_tiny(steps=12, max_steps=7)
    assert (progress.step, progress.epoch, progress.batch) == (7, 1, 2)
    lrs, progress, _, ends, resumed = _fit_tiny(steps=12, progress=Progress(**vars(progress)), state=state)
    assert len(lrs) == 5 and progress.step == 12 and ends == [(2, 10, 0), (2, 12, 2)]
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert whole["sampler"]["steps"] == resumed["sampler"]["steps"] == 12
