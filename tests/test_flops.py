"""FLOPs of a whole grid from two counted passes per width (``flops.measure_all``) equal the counter's
total on each sliced sub-model, for every member of small grids of each family."""

from __future__ import annotations

import math

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


def _ceil_units(full: int, fraction: float) -> int:
    """How many of ``full`` units a fraction level keeps: ceil, at least one (written out here, not
    imported: the hand counts below must not share code with what they check)."""
    return max(1, math.ceil(fraction * full - 1e-9))


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product: one multiply and one add per term."""
    return 2 * m * k * n


def _llama_by_hand(sub) -> int:
    """LlamaForCausalLM (eager attention) on T tokens, written out from the architecture: per kept layer
    the q/k/v/o projections, Q K^T and A V of every kept query head, the gate/up/down projections; once
    the LM head on every position (the rotary angles are an elementwise product: no FLOPs counted).
    Heads keep whole key/value groups (2 query heads each)."""
    t, d, hd, vocab = TOKENS["input_ids"].shape[1], LLAMA["hidden_size"], 8, 97
    kv = _ceil_units(LLAMA["num_key_value_heads"], sub["heads"])
    q = kv * LLAMA["num_attention_heads"] // LLAMA["num_key_value_heads"]
    ffn = _ceil_units(LLAMA["intermediate_size"], sub["ffn"])
    layer = (_mm(t, d, q * hd) + 2 * _mm(t, d, kv * hd) + _mm(t, q * hd, d)  # q, k, v, o
             + q * (_mm(t, hd, t) + _mm(t, t, hd))  # Q K^T, A V per query head
             + 2 * _mm(t, d, ffn) + _mm(t, ffn, d))  # gate, up, down
    return sub["depth"] * layer + _mm(t, d, vocab)


def _bert_by_hand(sub) -> int:
    """BertForSequenceClassification (eager attention) on T tokens: per kept layer the q/k/v/o
    projections, Q K^T and A V of every kept head, the two FFN projections; once the pooler's dense
    layer and the classifier on the first token."""
    t, d, hd, classes = TOKENS["input_ids"].shape[1], BERT["hidden_size"], 8, 3
    heads = _ceil_units(BERT["num_attention_heads"], sub["heads"])
    ffn = _ceil_units(BERT["intermediate_size"], sub["ffn"])
    layer = (3 * _mm(t, d, heads * hd) + _mm(t, heads * hd, d)
             + heads * (_mm(t, hd, t) + _mm(t, t, hd))
             + _mm(t, d, ffn) + _mm(t, ffn, d))
    return sub["depth"] * layer + _mm(1, d, d) + _mm(1, d, classes)


BY_HAND = {"llama_tiny": _llama_by_hand, "bert_tiny": _bert_by_hand}


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
        if name in BY_HAND:  # a count that shares nothing with the counter: the architecture, by hand
            assert costs[sub].flops == BY_HAND[name](sub), sub
        assert costs[sub].params == measure(model, sub, example).params, sub
    # depth changes the count: a grid where the units cost nothing would prove nothing
    assert costs[grid.smallest].flops < costs[grid.make({"depth": 1})].flops < costs[grid.largest].flops
