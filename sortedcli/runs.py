"""Run folders and checkpoints: data, not code, written atomically, resumable.

A run folder (one per ``sortednet train``) holds::

    config.yaml              the resolved config of the run
    metrics.jsonl            one JSON line per logged step / epoch
    checkpoints/latest       the name of the newest complete checkpoint
    checkpoints/step-00000120/
        model.safetensors    the sorted model's weights (torchvision/transformers state_dict keys),
                             with the resolved config in the file's metadata
        state.pt             optimizer, LR schedule, sampler generator and RNG states, step, epoch:
                             tensors and plain values only, read back with weights_only=True
    pretrained/              a pretrained model's config and tokenizer, copied at train start
                             (``model.pretrained`` may move or be a GGUF: nothing reads it again)
    eval/                    results of ``sortednet eval`` (CSV, JSON, PNG)
    export/                  models cut out by ``sortednet export``

A checkpoint is written into a temporary folder which is renamed into place once complete, then
``latest`` is replaced atomically: a run killed at any moment leaves its previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import UsageError

MODEL_FILE = "model.safetensors"
PRETRAINED_DIR = "pretrained"
STATE_FILE = "state.pt"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    tmp.chmod(0o644)
    os.replace(tmp, path)


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    write_atomic(Path(run_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def load_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no config.yaml: is it a sortednet run folder?")
    return OmegaConf.load(path)


def self_contained(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` with ``model.pretrained`` (and ``model.tokenizer``) pointing at the run's own copy of
    the pretrained config and tokenizer when it has one (``pretrained/``), so that a run keeps working
    after the pretrained folder moves; the weights come from the run's checkpoint."""
    folder = Path(run_dir) / PRETRAINED_DIR
    if not folder.is_dir() or cfg.get("model") is None or not cfg.model.get("pretrained"):
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.model.pretrained = str(folder)
    if "tokenizer" in out.model:
        out.model.tokenizer = str(folder)
    return out


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | dict, state: dict, cfg: DictConfig,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` (``model``: the module, or its state_dict) atomically and keep only the
    newest ``keep`` of them."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = model if isinstance(model, dict) else model.state_dict()
    weights, aliases = _one_copy({k: v.detach() for k, v in weights.items()})
    metadata = {"config": OmegaConf.to_yaml(cfg, resolve=True), "step": str(step)}
    if aliases:
        metadata["aliases"] = json.dumps(aliases)
    save_file(weights, str(tmp / MODEL_FILE), metadata=metadata)
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        f.chmod(0o644)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / "latest", final.name)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _one_copy(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``weights`` with every tensor stored once (CPU, contiguous) and ``{dropped key: kept key}`` for
    the keys that named the same tensor (tied embeddings: ``lm_head.weight`` is
    ``model.embed_tokens.weight``), which safetensors refuses to write twice."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, value in weights.items():
        same = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                tuple(value.stride()), value.dtype) if value.numel() else None
        if same is not None and same in first:
            aliases[key] = first[same]
            continue
        if same is not None:
            first[same] = key
        kept[key] = value.contiguous().cpu()
    return kept, aliases


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    ckpt = pointer.parent / pointer.read_text().strip()
    return ckpt if (ckpt / MODEL_FILE).is_file() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders of ``run_dir`` (``step-N`` holding the weights), newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if (p / MODEL_FILE).is_file()), key=lambda p: p.name,
                  reverse=True)


def roll_back(run_dir: Path, before: int) -> Path | None:
    """Point ``checkpoints/latest`` at the newest checkpoint of a step below ``before`` (the later ones
    stay on disk, no longer latest); with none, remove the pointer. Returns the new latest."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    earlier = [c for c in checkpoints(run_dir) if int(c.name.removeprefix("step-")) < before]
    if earlier:
        write_atomic(pointer, earlier[0].name)
        return earlier[0]
    pointer.unlink(missing_ok=True)
    return None


def is_checkpoint(path: Path) -> bool:
    """``path`` is a checkpoint folder of a run (``RUN/checkpoints/step-N/`` with its weights)."""
    path = Path(path)
    return (path / MODEL_FILE).is_file() and path.parent.name == "checkpoints"


def checkpoint_record(run_dir: Path, ckpt_dir: Path) -> dict:
    """What identifies a checkpoint in results measured on it: its step, its folder relative to the run
    folder and the sha256 of its weights file (read in 1 MiB pieces)."""
    path = Path(ckpt_dir) / MODEL_FILE
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    try:
        with safe_open(str(path), framework="pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
    except (SafetensorError, OSError, ValueError):
        step = -1
    if step < 0 and Path(ckpt_dir).name.startswith("step-"):
        step = int(Path(ckpt_dir).name.removeprefix("step-"))
    return {"step": step, "path": os.path.relpath(Path(ckpt_dir).resolve(), Path(run_dir).resolve()),
            "sha256": digest.hexdigest()}


def newest_run(runs_root: Path) -> Path:
    """The run folder under ``runs_root`` whose latest checkpoint was written last (runs of
    ``standalone=[...]``, inside another run's ``standalone/`` folder, are not candidates)."""
    runs_root = Path(runs_root)
    pointers = [p for p in runs_root.glob("**/checkpoints/latest")
                if p.is_file() and "standalone" not in p.relative_to(runs_root).parts[:-3]]
    if not pointers:
        raise UsageError(f"no trained run under {runs_root.resolve()}: train one with `sortednet train`, "
                         "or pass --ckpt RUN_DIR")
    return max(pointers, key=lambda p: p.stat().st_mtime).parent.parent


def resolve_checkpoint(ckpt: str | None, runs_root: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint_dir)`` from ``--ckpt`` (a run folder, a checkpoint folder or its
    model.safetensors) or, when ``ckpt`` is None, the newest run under ``runs_root``."""
    if ckpt is None:
        run_dir = newest_run(Path(runs_root))
        found = latest_checkpoint(run_dir)
    else:
        path = Path(ckpt)
        if not path.exists():
            raise UsageError(f"checkpoint {ckpt} does not exist: pass a run folder or a checkpoint folder")
        if path.is_file() and path.name != MODEL_FILE:
            raise UsageError(f"--ckpt {ckpt} is a file: pass a run folder or a checkpoint folder")
        if path.is_file():
            path = path.parent
        if (path / MODEL_FILE).is_file():
            found, run_dir = path, path.parent.parent
        else:
            run_dir, found = path, latest_checkpoint(path)
    if found is None:
        raise UsageError(f"{run_dir} holds no complete checkpoint (checkpoints/latest): train it first")
    return run_dir, found


def load_weights(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], DictConfig]:
    """The model state_dict and the run's resolved config stored with it."""
    path = Path(ckpt_dir) / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {path} is corrupt or unreadable ({e}): use an earlier checkpoint "
                         "or retrain") from None
    if "config" not in metadata:
        raise UsageError(f"checkpoint {path} carries no sortednet config: was it written by sortednet?")
    for key, kept in json.loads(metadata.get("aliases") or "{}").items():
        state[key] = state[kept]  # a tied tensor, stored once: both keys load into the one parameter
    return state, OmegaConf.create(metadata["config"])


def load_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise UsageError(f"trainer state {path} is corrupt or unreadable ({type(e).__name__}): "
                         "use an earlier checkpoint") from None
