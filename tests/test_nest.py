"""The nesting mechanism: slicing, nestedness, extraction, BatchNorm recalibration, FLOPs."""

import itertools

import pytest
import torch
import torchvision
from torch import nn

from sortedcli.flops import measure
from sortedcli.models import create
from sortedcli.models.resnet import block_order
from sortedcli.nest import (COUNT, FRACTION, Dim, Grid, SubModel, check_equal, extract, nesting,
                            recalibrate, sorted_size, trace, use)
from sortedcli.nest.convert import _DepthUnitMixin
from sortedcli.nest.layers import SortedLayer


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3).eval()
    randomize_bn(model)
    return model


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = create("resnet18", num_classes=7, in_channels=1, small_stem=True).eval()
    randomize_bn(model)
    return model


def grid_of(model, widths=(0.25, 0.5, 0.75, 1.0)):
    return Grid((Dim("width", FRACTION, tuple(widths)),
                 Dim("depth", COUNT, tuple(range(1, nesting(model).depth + 1)))))


def test_sorted_size_is_monotone_and_at_least_one_unit():
    for full, unit in [(64, 1), (3, 1), (2048, 1), (768, 64)]:
        sizes = [sorted_size(full, f / 100, unit) for f in range(1, 101)]
        assert sizes == sorted(sizes) and sizes[0] >= unit and sizes[-1] == full
        assert all(s % unit == 0 for s in sizes)
    assert sorted_size(64, 0.5) == 32 and sorted_size(64, 0.1) == 7


def test_submodel_is_a_value_with_a_stable_name():
    grid = Grid((Dim("width", FRACTION, (0.5, 1.0)), Dim("depth", COUNT, (1, 2, 3))))
    subs = grid.submodels()
    assert len(subs) == len(grid) == 6 and len(set(subs)) == 6
    assert subs[0].name == "width0.5-depth1" and grid.largest.name == "width1-depth3"
    assert all(grid.parse(s.name) == s for s in subs)
    assert SubModel.of(width=0.5, depth=1).within(grid.largest)
    assert not grid.largest.within(grid.smallest)
    with pytest.raises(ValueError):
        Dim("width", FRACTION, (0.5, 0.25))
    with pytest.raises(ValueError):
        Dim("depth", COUNT, (0, 1))


def test_state_dict_keys_stay_torchvision_keys():
    """The sorted model's state dict is torchvision's: the same keys in the same order, each tensor of
    the same shape and dtype, and a strict load either way carries every value over unchanged."""
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=7)
    randomize_bn(plain)
    sorted_model = create("resnet18", num_classes=7, in_channels=3)
    theirs, ours = plain.state_dict(), sorted_model.state_dict()
    assert list(ours) == list(theirs)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    result = sorted_model.load_state_dict(theirs)  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in sorted_model.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    back = torchvision.models.resnet18(num_classes=7)
    result = back.load_state_dict(sorted_model.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in back.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_full_model_outside_use_equals_plain_torchvision():
    torch.manual_seed(1)
    plain = torchvision.models.resnet18(num_classes=7).eval()
    model = create("resnet18", num_classes=7, in_channels=3).eval()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
        with use(model, SubModel.of(width=1.0, depth=8)):
            torch.testing.assert_close(model(x), plain(x))


@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_extracted_model_equals_the_submodel_inside_the_full_model(name, request):
    model = request.getfixturevalue(name)
    channels = next(model.modules()).conv1.in_channels
    x = torch.randn(3, channels, 32, 32)
    grid = grid_of(model)
    for sub in [grid.smallest, grid.largest, *grid.submodels()[1::5]]:
        plain = extract(model, sub, x[:1])
        assert not any(isinstance(m, (SortedLayer, _DepthUnitMixin)) for m in plain.modules())
        assert all(not type(m).__module__.startswith("sortedcli") for m in plain.modules())
        assert check_equal(model, sub, plain, x, atol=1e-5, rtol=1e-5) <= 1e-5
        # physically smaller: parameter count equals what flops.measure counts for the sub-model
        assert sum(p.numel() for p in plain.parameters()) == measure(model, sub, x[:1]).params


def test_submodels_are_nested_prefixes(resnet18):
    """A smaller sub-model runs a subset of the layers of a larger one, each on a leading slice no
    larger than the larger one's, and its cut-out weights are exactly those leading slices."""
    x = torch.randn(1, 1, 32, 32)
    grid = grid_of(resnet18)
    chain = [SubModel.of(width=w, depth=d) for w, d in [(0.25, 2), (0.5, 4), (0.75, 6), (1.0, 8)]]
    assert all(a.within(b) for a, b in itertools.pairwise(chain)) and chain[-1] == grid.largest
    traces = [trace(resnet18, sub, x) for sub in chain]
    for small, big in itertools.pairwise(traces):
        assert set(small) <= set(big)
        for layer, (n_in, n_out) in small.items():
            assert n_in <= big[layer][0] and n_out <= big[layer][1], layer
    full = resnet18.state_dict()
    for sub in chain[:-1]:
        for key, t in extract(resnet18, sub, x).state_dict().items():
            # a dropped block's stand-in is Sequential(downsample, ReLU): same weights, other key
            key = key.replace(".0.0.", ".0.downsample.") if key not in full else key
            if key.endswith("num_batches_tracked"):
                continue
            prefix = full[key][tuple(slice(0, n) for n in t.shape)]
            torch.testing.assert_close(t, prefix, rtol=0, atol=0)


def test_dropped_blocks_keep_their_projection_shortcut(resnet18):
    order = block_order(resnet18)
    assert order[:4] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    plain = extract(resnet18, SubModel.of(width=1.0, depth=1), torch.randn(1, 1, 32, 32))
    assert isinstance(plain.layer1[0], torchvision.models.resnet.BasicBlock)
    assert isinstance(plain.layer1[1], nn.Identity)
    projection = plain.layer2[0]
    assert isinstance(projection, nn.Sequential) and isinstance(projection[0], nn.Sequential)
    assert projection[0][0].stride == (2, 2)  # the shortcut conv still halves the resolution


def test_flops_grow_along_every_dimension(resnet18):
    x = torch.randn(1, 1, 32, 32)
    grid = grid_of(resnet18)
    flops = {sub: measure(resnet18, sub, x).flops for sub in grid}
    for sub in grid:
        for dim in grid.dims:
            levels = list(dim.levels)
            i = levels.index(sub[dim.name])
            if i + 1 < len(levels):
                bigger = grid.make({**sub.as_dict(), dim.name: levels[i + 1]})
                assert flops[bigger] > flops[sub], (sub, bigger)
    # the full sub-model's FLOPs are torchvision's: conv + linear multiply-adds x 2
    assert flops[grid.largest] == measure(resnet18, None, x).flops


def test_flops_of_resnet50_match_the_known_count():
    """ResNet-50 at 224x224 is 4.09 G multiply-adds (torchvision's docs): 8.18 GFLOPs."""
    model = create("resnet50", num_classes=1000, in_channels=3)
    cost = measure(model, None, torch.zeros(1, 3, 224, 224))
    assert abs(cost.flops / 2 - 4.09e9) / 4.09e9 < 0.01
    assert cost.params == sum(p.numel() for p in torchvision.models.resnet50().parameters())


def test_resnet50_width_by_depth_grid_has_160_submodels():
    model = create("resnet50", num_classes=10, in_channels=1, small_stem=True)
    assert nesting(model).depth == 16
    grid = grid_of(model, widths=tuple(round(0.1 * i, 1) for i in range(1, 11)))
    assert len(grid) == 160 == len(set(grid.submodels()))


def test_use_restores_the_previous_submodel_and_checks_depth(tiny):
    scope = nesting(tiny).scope
    a, b = SubModel.of(width=0.5, depth=2), SubModel.of(width=0.25, depth=1)
    with use(tiny, a):
        with use(tiny, b):
            assert scope.sub == b
        assert scope.sub == a
    assert scope.sub is None
    with pytest.raises(ValueError):
        with use(tiny, SubModel.of(depth=99)):
            pass
    assert scope.sub is None


def test_recalibrated_statistics_equal_the_calibration_data_statistics():
    """After recalibration, each BatchNorm's running mean / variance are the per-channel mean and
    (unbiased) variance of what that BatchNorm saw from the calibration data, for the sub-model."""
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3)
    randomize_bn(model)
    sub = SubModel.of(width=0.5, depth=3)
    bn = model.layer2[0].bn1
    seen = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    batches = [torch.randn(16, 3, 16, 16) + i for i in range(3)]
    recalibrate(model, sub, batches)
    hook.remove()
    assert not model.training and bn.momentum == 0.1  # mode and momentum restored
    c = seen[0].shape[1]
    assert c == sorted_size(bn.num_features, 0.5)
    means = torch.stack([s.mean((0, 2, 3)) for s in seen])
    vars_ = torch.stack([s.var((0, 2, 3), unbiased=True) for s in seen])
    # momentum=None: a cumulative average over the batches, each weighted equally
    torch.testing.assert_close(bn.running_mean[:c], means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var[:c], vars_.mean(0), rtol=1e-4, atol=1e-5)
    assert int(bn.num_batches_tracked) == 3
    # one batch: exactly that batch's per-channel statistics
    seen.clear()
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    recalibrate(model, sub, batches[:1])
    hook.remove()
    torch.testing.assert_close(bn.running_mean[:c], seen[0].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var[:c], seen[0].var((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_recalibration_fixes_the_statistics_a_submodel_would_otherwise_use():
    """The statistics left by the full model are wrong for a thin sub-model; recalibration makes its
    eval-mode output match a train-mode (batch-statistics) forward on the same data."""
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3)
    x = torch.randn(64, 3, 16, 16) * 3 + 1
    sub = SubModel.of(width=0.25, depth=4)
    recalibrate(model, None, [x])  # statistics of the full model
    with torch.no_grad():
        model.train()
        with use(model, sub):
            batch_stats = model(x)
        model.eval()
        with use(model, sub):
            stale = model(x)
        recalibrate(model, sub, [x])
        with use(model, sub):
            fresh = model(x)
    # (not exactly equal: running_var is the unbiased variance, the batch forward uses the biased one)
    fresh_err, stale_err = (fresh - batch_stats).abs().max(), (stale - batch_stats).abs().max()
    assert fresh_err < 5e-3 and fresh_err < 0.05 * stale_err, (fresh_err, stale_err)


def test_unsupported_layers_are_refused():
    from sortedcli.nest import sortify

    grouped = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match="grouped"):
        sortify(grouped, out_dim=lambda n, m: ("width", 1))
    twice = create("resnet_tiny", num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match="already sorted"):
        sortify(twice, out_dim=lambda n, m: None)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_submodel_on_cuda_with_bf16_autocast_matches_extracted(device):
    """Under bf16 autocast (CPU autocast too, so that the test runs everywhere) the sub-model inside the
    full model computes what the extracted plain model computes under the same autocast, and both stay
    within bf16 rounding of the fp32 result."""
    torch.manual_seed(0)
    model = create("resnet_tiny", num_classes=10, in_channels=3).to(device).eval()
    randomize_bn(model)
    x = torch.randn(4, 3, 32, 32, device=device)
    sub = SubModel.of(width=0.5, depth=2)
    plain = extract(model, sub, x[:1])
    check_equal(model, sub, plain, x)
    with torch.no_grad():
        with use(model, sub):
            exact = model(x).float()
        with torch.autocast(device, dtype=torch.bfloat16):
            with use(model, sub):
                inside = model(x)
            cut = plain(x)
    assert inside.dtype == cut.dtype == torch.bfloat16
    scale = exact.abs().max().item()
    assert scale > 0.01  # outputs big enough for a tolerance relative to them to mean something
    # the same bf16 kernels on the same slices: equal up to a few bf16 ulps (2^-8 relative)
    torch.testing.assert_close(inside.float(), cut.float(), atol=4 * 2 ** -8 * scale, rtol=0)
    # and bf16 rounding of the fp32 sub-model (0.3% of the scale here), not another model: the full
    # model's output, which a sub-model that ignored its scope under autocast would give, is far off
    torch.testing.assert_close(inside.float(), exact, atol=0.02 * scale, rtol=0)
    with torch.no_grad():
        full = model(x).float()
    assert (full - exact).abs().max().item() > 0.1 * scale


def test_plain_class_of_a_subclass_of_a_sorted_layer_is_the_torch_layer():
    """A family's own subclass of a sorted layer (the encoders' fused q/k/v projection) cuts back to
    the torch layer it was converted from; it raised StopIteration."""
    from torch import nn

    from sortedcli.nest.convert import plain_class
    from sortedcli.nest.layers import SortedLinear

    class Fused(SortedLinear):
        pass

    layer = nn.Linear(4, 6)
    layer.__class__ = Fused
    assert plain_class(layer) is nn.Linear
    layer.__class__ = SortedLinear
    assert plain_class(layer) is nn.Linear
