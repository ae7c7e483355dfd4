"""A language model's exits: distinct sub-models only (heads levels that keep the same key/value
groups are one sub-model), the draft exit chosen from the trained exits and the eval's measurements,
and a draft that reads out through a frequency-ranked slice of the vocabulary."""

from __future__ import annotations

import pytest
import torch

from sortedcli.models import create
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, call, resolved, use

# 9 query heads in 3 key/value groups (SmolLM2-135M's proportions), head_dim 8.
NINE_THREE = {"hidden_size": 72, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 8, "max_position_embeddings": 128,
              "tie_word_embeddings": True}
HEADS = (0.25, 0.5, 0.75, 1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nine_three():
    torch.manual_seed(0)
    return create("llama", vocab_size=97, config=dict(NINE_THREE)).eval()


def _grid(model):
    return Grid((Dim("depth", COUNT, (1, 2, 3, 4)), Dim("heads", FRACTION, HEADS))).distinct(
        lambda sub: resolved(model, sub))


def test_heads_levels_keep_whole_kv_groups_and_equal_slices_are_one_submodel(nine_three):
    grid = _grid(nine_three)
    attn = nine_three.model.layers[0].self_attn
    kept = {}
    for level in HEADS:  # ceil(level x 3) key/value heads, each with its 3 query heads
        with use(nine_three, SubModel.of(depth=4, heads=level)):
            kept[level] = (attn.k_proj.out_size(24) // 8, attn.q_proj.out_size(72) // 8)
    assert kept == {0.25: (1, 3), 0.5: (2, 6), 0.75: (3, 9), 1.0: (3, 9)}
    assert len(grid) == 12 and len(grid.duplicates) == 4
    names = [s.name for s in grid]
    assert not any("heads0.75" in n for n in names) and grid.largest.name in names
    assert grid.duplicates_note() == "12 distinct sub-models (4 duplicates dropped: heads 0.75 = 1)"
    assert grid.parse("depth2-heads0.75").name == "depth2-heads1"
    # the dropped one really computes the same, and its neighbour does not
    ids = torch.randint(0, 97, (1, 7))
    out = {}
    for level in HEADS:
        with torch.no_grad(), use(nine_three, SubModel.of(depth=4, heads=level)):
            out[level] = call(nine_three, ids)
    assert torch.equal(out[0.75], out[1.0]) and not torch.allclose(out[0.5], out[1.0])
