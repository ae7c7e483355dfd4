"""GGUF in, for every decoder architecture transformers reads from GGUF: a tiny random model of each
class is written as a GGUF file with PyPI's ``gguf`` writer (llama.cpp's tensor names and layout) and
loaded back through ``model.pretrained=FILE.gguf``; the sorted model it gives computes what the
original computed. An architecture transformers cannot read from GGUF is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sortedcli.errors import UsageError
from sortedcli.models import create

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from test_decoders import BASE, VOCAB  # noqa: E402

#: what each class adds to the tiny config, within what a GGUF file says (transformers' GGUF mapping
#: carries no soft-capping, attention scalar or per-layer types: those take the class's defaults)
EXTRA = {"qwen3": {"tie_word_embeddings": True}, "gemma2": {"sliding_window": 4, "tie_word_embeddings": True},
         "gemma3_text": {"sliding_window": 4}, "mistral": {"sliding_window": None}}
#: transformers' model_type -> llama.cpp's architecture name (mistral is written as llama, named so)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2"}
# Mistral is listed by transformers but its GGUF loader fails in 5.x ("Unknown gguf model_type: mistral"):
# such a file is refused in one line like OLMo 2's (below)
READABLE = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for LLaMA (interleaved rotary halves): what transformers undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, kind: str) -> None:
    """``model`` (a stock transformers causal LM) as a float32 GGUF file, the way llama.cpp's converter
    lays it out: metadata under the architecture's keys, tensors under their GGUF names."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    arch = GGUF_ARCH[kind]
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.name", kind)  # transformers reads a llama-architecture file named mistral as Mistral
    for key, attr in GGUF_CONFIG_MAPPING.get(arch, GGUF_CONFIG_MAPPING["llama"]).items():
        value = getattr(config, attr, None) if attr else None
        if isinstance(value, bool) or value is None:
            continue
        add = writer.add_uint32 if isinstance(value, int) else writer.add_float32
        add(f"{arch}.{key}", value)
    for key, attr in GGUF_CONFIG_MAPPING["tokenizer"].items():
        if getattr(config, attr, None) is not None:
            writer.add_uint32(f"tokenizer.{key}", int(getattr(config, attr)))
    names = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor(), arch).items()}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and (config.tie_word_embeddings or hf_name not in names):
            continue
        w = tensor.detach().float().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute(w, config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads)
        if arch in ("gemma2", "gemma3") and "norm.weight" in hf_name:
            w = w + 1  # llama.cpp stores Gemma's (1 + w) norms as plain scales
        writer.add_tensor(names[hf_name], np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def stock(kind: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in {**BASE, **EXTRA.get(kind, {}), **extra}.items() if k != "head_dim"}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **values), attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", READABLE)
def test_a_gguf_of_each_readable_architecture_loads_as_the_sorted_model_it_was_written_from(kind, tmp_path):
    model = stock(kind)
    write_gguf(model, tmp_path / "tiny.gguf", kind)
    loaded = create("causal_lm", vocab_size=VOCAB, pretrained=str(tmp_path / "tiny.gguf"),
                    attn_implementation="eager").eval()
    assert type(loaded) is type(model)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["olmo2", "mistral"])
def test_a_gguf_transformers_cannot_read_is_one_line(kind, tmp_path):
    write_gguf(stock(kind), tmp_path / "x.gguf", kind)
    with pytest.raises(UsageError) as e:
        create("causal_lm", vocab_size=VOCAB, pretrained=str(tmp_path / "x.gguf"))
    assert "\n" not in str(e.value) and kind in str(e.value) and "GGUF" in str(e.value)
