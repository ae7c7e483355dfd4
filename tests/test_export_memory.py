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
from pathlib import Path

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


# --- loading a checkpoint holds the model once -------------------------------------------------------
#
# eval, export and generate build the architecture and read the checkpoint into its own tensors, a
# tensor (or a DCP shard) at a time (loaded.restore). Reading a whole state_dict and then copying it into
# the model (runs.load_weights + load_state_dict, what they did before) holds the model twice. Each load
# runs in a fresh process and reports how much its resident memory grew at its peak.

BIG = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
       "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": True}

LOADER = r'''
import gc, json, sys
import torch
from omegaconf import OmegaConf
from sortedcli import distributed, runs
from sortedcli.build import build_model
from sortedcli.commands.loaded import restore

torch.set_num_threads(1)
how, ckpt, cfg_file, out = sys.argv[1:5]
cfg = OmegaConf.load(cfg_file)
args = {"vocab_size": 300}
ids = torch.arange(1, 12).unsqueeze(0)
# the imports and first-call costs (transformers' modules, DCP, safetensors) before measuring: a small
# model of the same family built, run and read from nothing
small = OmegaConf.merge(cfg, {"model": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2}}})
with torch.no_grad():
    build_model(small, args).eval()(input_ids=ids)
import torch.distributed.checkpoint  # noqa: F401,E402
runs.checkpoint_shapes(ckpt)
del small
gc.collect()
distributed.reset_peak_memory()
before = distributed.host_memory(peak=False)
if how == "restore":
    model = restore(ckpt, cfg, cfg, args)
else:  # the whole state_dict first, then copied into a freshly built model
    weights, _ = runs.load_weights(ckpt)
    model = build_model(cfg, args)
    model.load_state_dict(weights)
grown = distributed.host_memory(peak=True) - before
with torch.no_grad():
    logits = model.eval()(input_ids=ids).logits
json.dump({"grown": grown, "bytes": distributed.weight_bytes(model), "logits": logits[0, -1, :8].tolist()},
          open(out, "w"))
'''

SAVER = r'''
import sys
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from sortedcli import distributed, runs
from sortedcli.build import build_model

cfg = OmegaConf.load(sys.argv[1])
torch.manual_seed(0)
model = build_model(cfg, {"vocab_size": 300}).eval()
runs.save_checkpoint(sys.argv[2], 1, model, {}, cfg)  # one file (one process)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # DCP (trainer.strategy=fsdp)
tmp = runs.begin_checkpoint(sys.argv[3], 1)
weights, optimizer_state = distributed.sharded_state(model, torch.optim.AdamW(model.parameters()))
distributed.save_sharded(weights, optimizer_state, tmp)
runs.save_sharded_record(sys.argv[3], 1, cfg, 1)
runs.finish_checkpoint(sys.argv[3], 1, {})
distributed.shutdown()
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(1, 12).unsqueeze(0)).logits[0, -1, :8], sys.argv[4])
'''


def _python(script: Path, *args) -> None:
    import subprocess
    import sys

    from conftest import CLI_ENV

    p = subprocess.run([sys.executable, str(script), *map(str, args)], env=CLI_ENV, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr


def test_eval_export_and_generate_load_a_checkpoint_holding_the_model_once(tmp_path):
    from omegaconf import OmegaConf

    from sortedcli import runs

    cfg = OmegaConf.load("conf/model/llama_tiny.yaml")
    cfg.config = {**cfg.config, **BIG}
    (tmp_path / "cfg.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": cfg})))
    (tmp_path / "loader.py").write_text(LOADER)
    (tmp_path / "saver.py").write_text(SAVER)
    _python(tmp_path / "saver.py", tmp_path / "cfg.yaml", tmp_path / "one", tmp_path / "dcp", tmp_path / "want.pt")
    want = torch.load(tmp_path / "want.pt", weights_only=True).tolist()
    one, dcp = runs.latest_checkpoint(tmp_path / "one"), runs.latest_checkpoint(tmp_path / "dcp")
    assert (one / runs.MODEL_FILE).is_file() and runs.sharded(dcp)

    grown = {}
    for how, ckpt in (("restore", one), ("restore", dcp), ("state_dict", one)):
        _python(tmp_path / "loader.py", how, ckpt, tmp_path / "cfg.yaml", tmp_path / "out.json")
        r = json.loads((tmp_path / "out.json").read_text())
        assert r["logits"] == pytest.approx(want, abs=1e-6), (how, ckpt.parent.parent.name)  # the same weights
        grown[how, ckpt.parent.parent.name] = r["grown"] / r["bytes"]
    size = r["bytes"]
    assert size > 40 * 2**20  # large enough that a second copy stands out from the interpreter's noise
    print(f"\nmodel {size / 2**20:.1f} MiB; peak host memory growth while loading, in model sizes: "
          + ", ".join(f"{how} {fmt} {g:.2f}" for (how, fmt), g in grown.items()))
    assert grown["restore", "one"] < 1.35 and grown["restore", "dcp"] < 1.35, grown
    assert grown["state_dict", "one"] > 1.8, grown  # the whole state_dict beside the model
