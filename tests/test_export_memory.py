"""Export without holding the model twice (issue 22, item 4).

``extract`` copies only what the sub-model keeps: the bytes it allocates (every tensor storage created
while it runs, counted at torch's dispatcher, frees not subtracted: an upper bound of its peak) are
about the sub-model's parameter bytes, not the full model's, on a tiny LLaMA and on ResNet-18 at half
depth, and at half depth with narrower widths. The cut-out model is still the sub-model
(``check_equal``), owns its weights (no tensor shared with the trained model) and keeps tied
embeddings tied.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sortedcli.models import create
from sortedcli.nest import SubModel, check_equal, extract

LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, vocab_size=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, model_type="llama")
IDS = torch.tensor([[1, 5, 9, 2]])


def allocated_bytes(fn):
    """``(fn(), the bytes of every CPU tensor storage created inside fn)``: each aten op's outputs whose
    storage is none of its inputs' (views and in-place ops allocate nothing; meta tensors hold no memory).
    Frees are not subtracted, so this bounds the peak from above."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def real(t):
        return isinstance(t, torch.Tensor) and t.device.type != "meta"

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if real(t)}
            for t in filter(real, tree_leaves(out)):
                if t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    Count.total += t.untyped_storage().nbytes()
            return out

    with Count():
        out = fn()
    return out, Count.total


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied parameters once


def storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return create("causal_lm", config={**LLAMA, "tie_word_embeddings": True}, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return create("resnet18", num_classes=7, in_channels=1, small_stem=True).eval()


def check_cut_out(model, sub, example, small, allocated):
    assert check_equal(model, sub, small, example) < 1e-5
    assert not any(t.is_meta for t in [*small.parameters(), *small.buffers()])
    assert not storages(small) & storages(model)  # copies: training the original further leaves it as cut
    assert allocated <= 1.2 * param_bytes(small), (allocated, param_bytes(small), param_bytes(model))


@pytest.mark.parametrize("levels", [{"depth": 4}, {"depth": 4, "heads": 0.5, "ffn": 0.5}],
                         ids=["depth0.5", "depth0.5-heads0.5-ffn0.5"])
def test_extract_allocates_about_the_llama_submodels_size_not_the_full_models(llama, levels):
    sub = SubModel.of(**levels)
    example = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    small, allocated = allocated_bytes(lambda: extract(llama, sub, example))
    assert param_bytes(llama) > 1.6 * param_bytes(small)  # the old deep copy alone would break the bound
    check_cut_out(llama, sub, example, small, allocated)
    assert small.lm_head.weight is small.model.embed_tokens.weight  # tied embeddings stay one tensor
    assert small.config.num_hidden_layers == 4 and len(small.model.layers) == 4


@pytest.mark.parametrize("levels", [{"depth": 4}, {"depth": 4, "width": 0.5}], ids=["depth0.5", "depth0.5-width0.5"])
def test_extract_allocates_about_the_resnet18_submodels_size_not_the_full_models(resnet18, levels):
    sub = SubModel.of(**levels)
    example = torch.randn(1, 1, 16, 16)
    small, allocated = allocated_bytes(lambda: extract(resnet18, sub, example))
    assert param_bytes(resnet18) > 1.6 * param_bytes(small)
    check_cut_out(resnet18, sub, example, small, allocated)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small.modules()) > 0
    assert not any(type(m).__module__.startswith("sortedcli") for m in small.modules())
