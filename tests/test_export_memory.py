"""Export without holding the model twice (issue 22, item 4).

``extract`` copies only what the sub-model keeps: the bytes it allocates (every tensor storage created
while it runs, counted at torch's dispatcher, frees not subtracted: an upper bound of its peak) are
about the sub-model's parameter bytes, not the full model's, on a tiny LLaMA and on ResNet-18 at half
depth, and at half depth with narrower widths. The cut-out model is still the sub-model
(``check_equal``), owns its weights (no tensor shared with the trained model) and keeps tied
embeddings tied. A Hugging Face export writes sharded safetensors at ``export.max_shard_size`` with
their index, which the stock ``AutoModelForCausalLM`` loads; a size that is not one is refused in one
line before any work.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import cli
from sortedcli.models import create, entry
from sortedcli.nest import SubModel, check_equal, extract, use

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


def test_a_transformers_export_is_sharded_at_max_shard_size_and_the_stock_class_loads_it(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    sub = SubModel.of(depth=4)
    example = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    small = extract(llama, sub, example)
    assert param_bytes(small) > 2_000_000
    entry("causal_lm").save(tmp_path, small, {"name": sub.name}, example, max_shard_size=1_000_000)  # reload-checked
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert all((tmp_path / s).stat().st_size <= 1_010_000 for s in shards)  # + each file's small header
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad(), use(llama, sub):
        torch.testing.assert_close(back(IDS).logits, llama(IDS).logits, rtol=1e-5, atol=1e-5)


def test_shard_sizes_are_read_as_transformers_reads_them():
    from sortedcli.commands.export import shard_size
    from sortedcli.errors import UsageError

    assert shard_size(None) is None
    assert shard_size("50GB") == 50 * 10**9 and shard_size("2GiB") == 2 * 2**30 and shard_size(" 500 mb") == 5 * 10**8
    assert shard_size(1234) == 1234 and shard_size("1.5KB") == 1500
    for bad in ("abc", 0, "-5GB", "5 parsecs", True, "0.1B"):
        with pytest.raises(UsageError, match="export.max_shard_size must be a size such as 5GB"):
            shard_size(bad)


def test_a_max_shard_size_that_is_not_a_size_is_one_line_before_any_work(tmp_path):
    p = cli(["export", "--budget", "0.5", "export.max_shard_size=5 parsecs"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: export.max_shard_size must be a size"), p.stderr
    assert "Traceback" not in p.stderr and list(tmp_path.iterdir()) == []


def test_export_passes_its_max_shard_size_to_the_familys_writer(trained_run, tmp_path, monkeypatch):
    """``export.max_shard_size=2KiB`` reaches the family's ``save`` as bytes (a vision export ignores it:
    torchvision models are one file)."""
    import io
    import shutil

    from hydra import compose, initialize_config_dir
    from rich.console import Console

    from conftest import TINY_EVAL
    from sortedcli.cli import CONF_DIR
    from sortedcli.commands import export
    from sortedcli.models.vision import VisionFamily

    run = shutil.copytree(trained_run, tmp_path / "runs" / trained_run.name,
                          ignore=shutil.ignore_patterns("eval", "export"))
    seen = []
    save = VisionFamily.save
    monkeypatch.setattr(VisionFamily, "save", lambda self, *a, max_shard_size=None, **k: (
        seen.append(max_shard_size), save(self, *a, max_shard_size=max_shard_size, **k))[1])
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"ckpt={run}", "budget=1", "export.max_shard_size=2KiB",
                                                       "trainer.device=cpu", *TINY_EVAL])
    folder = export.run(cfg, Console(file=io.StringIO()))
    assert seen == [2048] and (folder / "model.safetensors").is_file()
