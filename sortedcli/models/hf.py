"""Hugging Face transformers models in and out: what every transformer adapter shares.

- :func:`load`: a library model from ``pretrained`` (a local folder, or a hub id where there is
  internet) or from a config dict (random init: tiny models for tests, small ones for recipes);
  or a GGUF file (llama.cpp's format; :mod:`sortedcli.models.gguf` converts it to fp32), or a run's own
  copy of the pretrained config (:func:`snapshot`: the weights then come from the run's checkpoint);
- :func:`tokenizer`: the model's own tokenizer (``model.tokenizer`` or the pretrained folder / GGUF);
- :func:`snapshot`: the pretrained config and tokenizer copied into a run folder at train start, so
  that eval/export/generate (and resume) never need ``model.pretrained`` again;
- :func:`prefix_layers`: the first k layers of a ``ModuleList`` stack as depth units whose skip is the
  identity, and the ``finish`` that drops the skipped layers from a cut-out model;
- :func:`save`: an export folder that the stock ``Auto*`` class loads (``save_pretrained``: the
  reduced config and safetensors weights, sharded at ``max_shard_size`` with their index, plus the
  tokenizer), checked by loading it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import UsageError
from ..nest import DepthUnit, SubModel, call


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights were newly initialized": expected for a new head
    logging.disable_progress_bar()  # per-file loading bars: our commands show their own progress


SNAPSHOT_MARK = "sortednet-pretrained.json"  # in a run's copy of the pretrained config and tokenizer
EXPORT_RECORD = "sortednet.json"  # in an export folder: what it was cut from and what it scores


#: the files that make a folder a model with weights (transformers' single and sharded names, a GGUF); not
#: any ``*.safetensors``: a run's ``pretrained/`` keeps the starting weights a teacher needs
#: (``initial.safetensors``) and is still only a config and tokenizer to transformers
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "*.gguf")


def is_snapshot(folder) -> bool:
    """A run's copy of a pretrained model's config and tokenizer (:func:`snapshot`): marked, and without
    weights. A marked folder that holds weights (a run's ``pretrained/`` with a checkpoint's weights put
    beside it, as a full model is handed to transformers) is a model like any other: its weights are read."""
    folder = Path(folder)
    return (folder / SNAPSHOT_MARK).is_file() and not any(next(folder.glob(p), None) for p in WEIGHT_FILES)


def snapshot(model: nn.Module, tok, folder: Path, source: str) -> None:
    """Write ``model``'s config (as built: after any GGUF conversion or new head) and ``tok`` into
    ``folder`` (through a temporary folder renamed into place): what :func:`load` and
    :func:`tokenizer` read back instead of ``source`` for a run's eval/export/generate/resume."""
    def write(tmp: Path) -> None:
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        mark = {"pretrained": source, **({"revision": rev} if (rev := hub_revision(source)) else {})}
        (tmp / SNAPSHOT_MARK).write_text(json.dumps(mark, indent=2) + "\n")

    _write_folder(Path(folder), write)


def keep_tokenizer(tok, folder: Path) -> None:
    """A run's own copy of ``model.tokenizer`` (a model with no ``model.pretrained``, whose
    :func:`snapshot` would keep it): a tokenizer trained again in place under the same path would
    otherwise change what the run's eval and generate read without a word."""
    _write_folder(Path(folder), lambda tmp: tok.save_pretrained(str(tmp)))


def _write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary folder beside ``folder``, then renamed into its place: never half a folder."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hub_revision(source: str) -> str | None:
    """The commit of hub id ``source`` that the Hugging Face cache serves now (its ``main``: what loading
    ``source`` just read); None for a local folder or file, or a hub id not in the cache."""
    if Path(source).expanduser().exists():
        return None
    found = _cached(source, "config.json", None)
    return Path(found).parent.name if found else None


def hub_folder(source: str, revision: str) -> Path | None:
    """The Hugging Face cache's folder of hub id ``source`` at commit ``revision``; None once it is gone."""
    found = _cached(source, "config.json", revision)
    return Path(found).parent if found else None


def _cached(repo: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, revision=revision)
    except ValueError:  # not a hub id at all (HFValidationError)
        return None
    return found if isinstance(found, str) else None


def snapshot_mark(folder) -> dict:
    """What :func:`snapshot` recorded of a run's pretrained model (``pretrained``, ``revision``); {} if none."""
    return _record(Path(folder) / SNAPSHOT_MARK)


def export_record(folder) -> dict:
    """What :func:`save` recorded of an export folder's run (its data, ``kind``, chat ``template``, the
    sub-model); {} for any other model folder or file."""
    return _record(Path(folder) / EXPORT_RECORD)


def _record(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def load(auto_class, pretrained: str | None, config: dict | None, config_class, weights: bool = True,
         **kwargs) -> nn.Module:
    """``auto_class.from_pretrained(pretrained, **kwargs)`` (a folder, a hub id, or a GGUF file / a
    folder holding one), a model of a run's :func:`snapshot` config (its weights come from the run's
    checkpoint), or a random-init model of ``config_class(**config)``. Offline, a hub id fails with one
    line that says so. ``weights=False``: a local folder's model is built from its config (and generation
    config) alone, its weights not read (a sharded run builds it on the meta device and streams them)."""
    from . import gguf

    _quiet()
    if pretrained:
        local = Path(pretrained).expanduser()
        if not local.exists() and pretrained.startswith(("/", ".", "~", "<")):
            raise UsageError(f"model.pretrained={pretrained}: no such folder")
        if local.exists() and (is_snapshot(local) or not weights):
            from transformers import AutoConfig, GenerationConfig

            cfg = AutoConfig.from_pretrained(str(local))
            model = auto_class.from_config(cfg, dtype=torch.float32,
                                           **{k: v for k, v in kwargs.items() if k == "attn_implementation"})
            if not weights and (local / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(str(local))
            return model
        found = gguf.find(local) if local.exists() else None
        if found is not None:
            return gguf.load(auto_class, found, attn_implementation=kwargs.get("attn_implementation"))
        offline = not local.exists() and hub_offline()
        if offline:  # the local cache only: no minute of retries
            kwargs["local_files_only"] = True
        # fp32 master weights whatever the checkpoint's dtype ("auto" would keep a bf16/fp16 one):
        # training runs bf16 autocast on a GPU, fp32 on the CPU
        kwargs.setdefault("dtype", torch.float32)
        try:
            return auto_class.from_pretrained(str(local) if local.exists() else pretrained, **kwargs)
        except (OSError, ValueError) as e:
            if offline:
                raise UsageError(offline_message("model.pretrained", pretrained)) from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"model.pretrained={pretrained} could not be loaded ({first[:200]}): pass a local "
                             "folder with config.json and weights, or a hub id (needs internet)") from None
    if not config:
        raise UsageError("pass model.pretrained=DIR_OR_HUB_ID, or model.config={...} for a randomly initialized model")
    attn = kwargs.pop("attn_implementation", None)
    try:
        cfg = config_class(**config, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"model.config is not a valid {config_class.__name__}: {e}") from None
    if attn:
        cfg._attn_implementation = attn
    return auto_class.from_config(cfg)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is out of reach: ``HF_HUB_OFFLINE`` is set, or one connection to the
    host of ``HF_ENDPOINT`` (default huggingface.co) fails within 2 s. Without this, transformers retries a
    hub id for about a minute before it gives up."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=2).close()
    except (OSError, ValueError):
        return True
    return False


def offline_message(key: str, value: str) -> str:
    return (f"{key}={value} is a hub id, the Hugging Face hub is not reachable (offline or HF_HUB_OFFLINE) and it is "
            f"not in the local cache: pass {key}=LOCAL_DIR, a folder with config.json and the weights or tokenizer")


def tokenizer(options: dict):
    """The tokenizer named by ``model.tokenizer``, else the one in ``model.pretrained``."""
    from transformers import AutoTokenizer

    where = options.get("tokenizer") or options.get("pretrained")
    if not where:
        raise UsageError("this model needs a tokenizer: pass model.tokenizer=DIR (or model.pretrained=DIR "
                         "holding one)")
    from . import gguf

    _quiet()
    local = Path(where).expanduser()
    key = "model.tokenizer" if options.get("tokenizer") else "model.pretrained"
    if not local.exists() and str(where).startswith(("/", ".", "~", "<")):
        raise UsageError(f"{key}={where}: no such folder")
    offline = not local.exists() and hub_offline()
    found = gguf.find(local) if local.exists() else None
    try:
        if found is not None:
            return AutoTokenizer.from_pretrained(str(found.parent), gguf_file=found.name)
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else where, local_files_only=offline)
    except (OSError, ValueError, TypeError) as e:
        if offline:
            raise UsageError(offline_message(key, where)) from None
        raise UsageError(f"no tokenizer could be loaded from {where} ({str(e).strip()[:200]})") from None


def prefix_layers(model: nn.Module, path: str, config_key: str = "num_hidden_layers"
                  ) -> tuple[list[DepthUnit], Callable]:
    """Depth units for the stack of layers at ``path`` (``"bert.encoder.layer"``), kept as a prefix: a
    dropped layer passes its hidden state on unchanged. Also the ``finish(plain, sub)`` that removes
    the dropped layers from a cut-out model and writes the new count into its config."""
    def skip(layer, hidden_states, *args, **kwargs):
        return hidden_states

    units = [DepthUnit(layer, skip, lambda m: nn.Identity()) for layer in model.get_submodule(path)]

    def finish(plain: nn.Module, sub: SubModel | None) -> None:
        depth = None if sub is None else sub.get("depth")
        if depth is None:
            return
        parent, _, leaf = path.rpartition(".")
        owner = plain.get_submodule(parent)
        setattr(owner, leaf, nn.ModuleList(list(getattr(owner, leaf))[:depth]))
        setattr(plain.config, config_key, depth)

    return units, finish


@torch.no_grad()
def save(folder: Path, plain: nn.Module, meta: dict, check_inputs, want: torch.Tensor, auto_class,
         tok=None, max_shard_size: int | str | None = None) -> None:
    """Write ``plain`` as a Hugging Face folder (``save_pretrained``: config.json + model.safetensors,
    or, above ``max_shard_size`` bytes (None: transformers' default), model-0000k-of-0000n.safetensors
    files and their index model.safetensors.index.json, written one shard at a time), its tokenizer and
    ``sortednet.json`` (what it was cut from and what it scores), then load it back with the stock
    ``auto_class`` and check that it gives ``want`` on ``check_inputs``."""
    folder = Path(folder)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    plain.save_pretrained(str(folder), safe_serialization=True, **shards)
    if tok is not None:
        tok.save_pretrained(str(folder))
    (folder / EXPORT_RECORD).write_text(json.dumps(meta, indent=2) + "\n")
    _quiet()
    reloaded = auto_class.from_pretrained(str(folder), attn_implementation="eager").eval()
    got = call(reloaded, check_inputs)
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise RuntimeError(f"the saved Hugging Face folder does not reproduce the sub-model (max |diff| {diff:.3g})")
