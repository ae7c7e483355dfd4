"""FLOPs of a whole grid from two counted passes per width (``flops.measure_all``) equal the counter's
total on each sliced sub-model, for every member of small grids of each family."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sortedcli.flops import measure, measure_all
from sortedcli.models import create
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, call, nesting, use

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
BERT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
        "vocab_size": 120, "max_position_embeddings": 64}
TOKENS = {"input_ids": torch.arange(8).unsqueeze(0) + 3, "attention_mask": torch.ones(1, 8, dtype=torch.long)}


def _resnet_tiny():
    return create("resnet_tiny", num_classes=10, in_channels=1), torch.randn(1, 1, 16, 16), {"width": FRACTION}


def _mobilenet_tiny():
    return create("mobilenet_tiny", num_classes=10, in_channels=3), torch.randn(1, 3, 32, 32), {"width": FRACTION}


def _llama_tiny():  # eager attention: its matmuls are counted too (sdpa counts 0 on the CPU)
    return (create("llama", vocab_size=97, config=dict(LLAMA), attn_implementation="eager"), TOKENS,
            {"heads": FRACTION, "ffn": FRACTION})


def _bert_tiny():
    return (create("bert", num_classes=3, config=dict(BERT), attn_implementation="eager"), TOKENS,
            {"heads": FRACTION, "ffn": FRACTION})


MODELS = {"resnet_tiny": _resnet_tiny, "mobilenet_tiny": _mobilenet_tiny, "llama_tiny": _llama_tiny,
          "bert_tiny": _bert_tiny}


def counted(model, sub, example) -> int:
    """The counter's total for one forward of the sliced sub-model: the reference."""
    with torch.no_grad(), use(model, sub), FlopCounterMode(display=False) as counter:
        call(model.eval(), example)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", MODELS)
def test_grid_counts_equal_one_counted_pass_per_submodel(name):
    torch.manual_seed(0)
    model, example, fractions = MODELS[name]()
    depth = nesting(model).depth
    grid = Grid((*(Dim(d, kind, (0.25, 0.5, 1.0)) for d, kind in fractions.items()),
                 Dim("depth", COUNT, tuple(range(1, depth + 1)))))
    told, passes = [], []
    hook = model.register_forward_pre_hook(lambda m, args: passes.append(1))
    costs = measure_all(model, grid, example, done=told.append)
    hook.remove()
    assert list(costs) == list(grid) and sum(told) == len(grid)
    assert len(passes) == 2 * len(grid) // depth  # all kept, only the first kept: per setting of the others
    for sub in grid:
        assert costs[sub].flops == counted(model, sub, example), sub
        assert costs[sub].params == measure(model, sub, example).params, sub
    # depth changes the count: a grid where the units cost nothing would prove nothing
    assert costs[grid.smallest].flops < costs[grid.make({"depth": 1})].flops < costs[grid.largest].flops
