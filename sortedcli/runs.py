"""Run folders and checkpoints: data, not code, written atomically, resumable.

A run folder (one per ``sortednet train``) holds::

    config.yaml              the resolved config of the run (a resume rewrites it with what it changed)
    .lock                    pid, host and start time of the process training into the folder (while it does)
    metrics.jsonl            one JSON line per logged step / epoch
    checkpoints/latest       the name of the newest complete checkpoint
    checkpoints/step-00000120/
        model.safetensors    the sorted model's weights (torchvision/transformers state_dict keys),
                             with the resolved config in the file's metadata
        state.pt             optimizer, LR schedule, sampler generator and RNG states, step, epoch:
                             tensors and plain values only, read back with weights_only=True
    checkpoints/step-00000120/   (a run sharded with trainer.strategy=fsdp: torch.distributed.checkpoint)
        checkpoint.json      format, step, number of processes and the resolved config
        model/  optim/       the weights and the optimizer state as DCP folders (``.metadata`` + one
                             ``__RANK_0.distcp`` file of shards per process that wrote it): each rank writes
                             its own shards, any number of processes reads them back (resharded)
        state.pt             as above, less the optimizer: LR schedule, sampler, every rank's RNG, step
    checkpoints/diverged/    checkpoints set aside after a non-finite loss: never resumed, evaluated or pruned
    pretrained/              a pretrained model's config and tokenizer, copied at train start
                             (``model.pretrained`` may move or be a GGUF: nothing reads it again)
    eval/                    results of ``sortednet eval`` (CSV, JSON, PNG)
    export/                  models cut out by ``sortednet export``

A checkpoint is written into a temporary folder which is renamed into place once complete, then
``latest`` is replaced atomically: a run killed at any moment leaves its previous checkpoint intact.
Single-process and DDP runs keep the one-file format (rank 0 holds the whole model anyway, and any
tool reads safetensors); only sharded runs write DCP folders, which eval, export and generate read
by consolidating them in one process. On several machines every rank writes its shards into the run
folder: it must be on storage they all see (as torchrun's own checkpointing needs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

# torch (and safetensors.torch) are imported where tensors are read or written: the CLI reads a run's
# config and lock before torch is imported, to refuse a mistake in a second
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open

from .errors import UsageError

MODEL_FILE = "model.safetensors"
PRETRAINED_DIR = "pretrained"
TOKENIZER_DIR = "tokenizer"  # a run's copy of model.tokenizer where it has no pretrained/ to keep it
STATE_FILE = "state.pt"
META_FILE = "checkpoint.json"  # a sharded (DCP) checkpoint's own record; its folders:
DCP_MODEL, DCP_OPTIM = "model", "optim"
LOCK_FILE = ".lock"
DIVERGED_DIR = "diverged"


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
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # YAML syntax, a bad interpolation, bytes that are not text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable run config ({first}): restore it (each checkpoint's "
                         "model.safetensors carries a copy in its metadata) or retrain") from None
    if not isinstance(cfg, DictConfig) or cfg.get("model") is None or cfg.get("data") is None:
        raise UsageError(f"{path} is not a sortednet run config (no model and data sections): restore it (each "
                         "checkpoint's model.safetensors carries a copy in its metadata) or retrain")
    return cfg


# What a resume may change: how the run goes on, never what it trains. The model, its grid and sampler,
# the data, the optimizer's settings (its saved state would overwrite them: lr, momentum, ...), the
# seed and distillation stay the run's own; a resume to another of those is a new run.
RESUMABLE = ("trainer.", "eval.", "paths.", "plan.", "optim.warmup_steps", "optim.clip_grad_norm", "data.root",
             "data.path", "data.download")
NOT_RESUMABLE = ("trainer.batch_size",)  # what a step is: the saved position (epoch, batch) counts in it
RESUMABLE_TEXT = ("trainer.* (but trainer.batch_size), eval.*, paths.*, optim.warmup_steps, optim.clip_grad_norm "
                  "and data.root/data.path/data.download")


def run_of(path: Path) -> Path:
    """The run folder of ``path``: a run folder, one of its checkpoint folders or their weights file."""
    path = Path(path)
    if path.name == MODEL_FILE:
        path = path.parent
    return path.parent.parent if is_checkpoint(path) else path


def resumed_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The saved config of ``run_dir`` with the ``key=value`` overrides of a resume applied: only keys the
    run has and :data:`RESUMABLE` names may change (a value equal to the run's own is no change);
    anything else is refused in one line that names what may change."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    cfg = load_config(run_dir)
    parser = OverridesParser.create()
    for item in overrides:
        key = item.lstrip("+~").partition("=")[0]
        if key in ("resume", "hydra.run.dir") or key.startswith("hydra"):
            continue
        try:
            override = parser.parse_overrides([item])[0]
            value = None if override.is_delete() else override.value()
        except HydraException as e:
            raise UsageError(f"{item}: {e}") from None
        current = OmegaConf.select(cfg, key, default="<missing>")
        missing = isinstance(current, str) and current == "<missing>"
        plain_current = OmegaConf.to_container(current, resolve=True) if OmegaConf.is_config(current) else current
        if not missing and not isinstance(current, DictConfig) and plain_current == value \
                and not override.is_delete():
            continue  # the run's own value: nothing changes
        allowed = (key.startswith(RESUMABLE) or key in RESUMABLE) and not key.startswith(NOT_RESUMABLE)
        if missing or isinstance(current, DictConfig) or not allowed or override.is_delete():
            was = "the run has no such setting" if missing else "a whole section" if isinstance(current, DictConfig) \
                else f"the run's is {plain_current!r}"
            raise UsageError(f"cannot change {key!r} when resuming {run_dir} ({was}): a resume continues the same "
                             f"model, grid, data and optimizer, and may change only {RESUMABLE_TEXT} (e.g. "
                             "trainer.epochs=30); start a new run for anything else")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def self_contained(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` with ``model.pretrained`` (and ``model.tokenizer``) pointing at the run's own copy of
    the pretrained config and tokenizer when it has one (``pretrained/``), so that a run keeps working
    after the pretrained folder moves; the weights come from the run's checkpoint. A run of a random
    init with ``model.tokenizer=DIR`` reads its own copy of that tokenizer (``tokenizer/``) the same way."""
    if cfg.get("model") is None:
        return cfg
    pretrained, own_tokenizer = Path(run_dir) / PRETRAINED_DIR, Path(run_dir) / TOKENIZER_DIR
    if pretrained.is_dir() and cfg.model.get("pretrained"):
        tokenizer = pretrained
    elif own_tokenizer.is_dir() and cfg.model.get("tokenizer"):
        pretrained, tokenizer = None, own_tokenizer
    else:
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if pretrained is not None:
        out.model.pretrained = str(pretrained)
    if "tokenizer" in out.model:
        out.model.tokenizer = str(tokenizer)
    return out


def _stat(pid: int) -> list[str]:
    """The fields of Linux's ``/proc/PID/stat`` after the command name (state first); [] elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _started(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (None without /proc): a pid reused by
    another process (a restarted container counts from 1 again) has another start."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


def _alive(holder: dict) -> bool:
    """The process that wrote lock ``holder`` (on this host) is still running."""
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    except (OverflowError, ValueError):
        return False
    if _zombie(pid):  # killed, not yet reaped (a container's pid 1 may never reap it): gone
        return False
    return holder.get("ticks") is None or _started(pid) in (None, holder["ticks"])


def _zombie(pid: int) -> bool:
    """Process ``pid`` has ended and only waits to be reaped (state Z or X in Linux's /proc)."""
    return _stat(pid)[:1] in (["Z"], ["X"])


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def lock_holder(run_dir: Path) -> dict | None:
    """``{"pid", "host", "started"}`` of the live process that holds ``run_dir``'s lock (one on another
    host counts as live: it cannot be checked from here); None when it is free or stale."""
    holder = _read_lock(Path(run_dir) / LOCK_FILE)
    if holder is None or (holder.get("host") == socket.gethostname() and not _alive(holder)):
        return None
    return holder


def lock_run(run_dir: Path, note=None) -> Path:
    """Take ``run_dir``'s lock (``.lock``: this process's pid, host and start time) for as long as this
    process trains into the folder, or refuse in one line when a live process holds it. A lock left by a
    process that is gone (its pid is not alive on this host; a garbled lock file) is taken over and
    ``note`` (a callable, e.g. ``print``) is told. The file appears complete or not at all: it is written
    aside, then hard-linked into place, which fails when another process got there first."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "ticks": _started(os.getpid())}
    tmp = run_dir / f".lock.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                pass
            holder = _read_lock(path)
            if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == host:
                return path  # this process holds it already (standalone runs, a second call)
            if holder is not None and (holder.get("host") != host or _alive(holder)):
                where = "" if holder.get("host") == host else f" on {holder.get('host')}"
                raise UsageError(f"{run_dir} is being trained by process {holder['pid']}{where} (since "
                                 f"{holder.get('started', '?')}): wait for it to end or stop it, then run this "
                                 f"again (if that process is gone, remove {path})")
            try:
                os.replace(path, run_dir / f".lock.stale-{os.getpid()}")  # one taker wins the rename
            except FileNotFoundError:
                continue
            (run_dir / f".lock.stale-{os.getpid()}").unlink(missing_ok=True)
            if note is not None:
                who = (f"process {holder['pid']} (since {holder.get('started', '?')})" if holder
                       else "an unreadable lock")
                note(f"{run_dir} was locked by {who}, which is no longer running: lock taken over")
        raise UsageError(f"{run_dir}: could not take its lock {path} (another process keeps taking it)")
    finally:
        tmp.unlink(missing_ok=True)


def unlock_run(run_dir: Path) -> None:
    """Release ``run_dir``'s lock if this process holds it."""
    path = Path(run_dir) / LOCK_FILE
    holder = _read_lock(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | dict, state: dict, cfg: DictConfig,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` (``model``: the module, or its state_dict) atomically and keep only the
    newest ``keep`` of them."""
    from safetensors.torch import save_file

    tmp = begin_checkpoint(run_dir, step)
    weights = model if isinstance(model, dict) else model.state_dict()
    weights, aliases = _one_copy({k: v.detach() for k, v in weights.items()})
    metadata = {"config": OmegaConf.to_yaml(cfg, resolve=True), "step": str(step)}
    if aliases:
        metadata["aliases"] = json.dumps(aliases)
    save_file(weights, str(tmp / MODEL_FILE), metadata=metadata)
    return finish_checkpoint(run_dir, step, state, keep)


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """The empty temporary folder that checkpoint ``step`` is written into (a leftover of a save that
    was killed is removed first); :func:`finish_checkpoint` renames it into place."""
    tmp = Path(run_dir) / "checkpoints" / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_sharded_record(run_dir: Path, step: int, cfg: DictConfig, world: int) -> None:
    """The record of a sharded checkpoint (:data:`META_FILE`), into its temporary folder: written after
    every rank's shards, so a folder that has it is complete."""
    tmp = Path(run_dir) / "checkpoints" / f".step-{step:08d}.tmp"
    write_atomic(tmp / META_FILE, json.dumps({"format": "torch.distributed.checkpoint", "step": step,
                                              "world": world, "config": OmegaConf.to_yaml(cfg, resolve=True)}))


def finish_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` (state.pt) into checkpoint ``step``'s temporary folder, rename it into place,
    point ``latest`` at it and keep only the newest ``keep`` checkpoints."""
    import torch

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / "latest", final.name)
    # keep the newest `keep` by step number, `latest` (this one) always among them; checkpoints of
    # higher steps (left by a resume from an earlier one) are another history: neither kept nor counted
    done = [c for c in checkpoints(run_dir) if step_of(c) <= step and c != final]
    for old in done[max(keep - 1, 0):] if keep > 0 else []:
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


def step_of(ckpt: Path) -> int:
    """The step of a checkpoint folder ``step-N`` (-1 for another name)."""
    digits = Path(ckpt).name.removeprefix("step-")
    return int(digits) if digits.isdigit() else -1


def latest_checkpoint(run_dir: Path, note=None) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names. When that folder is gone or incomplete (or the
    pointer is missing while complete checkpoints are there), the newest complete checkpoint, and
    ``note`` (a callable) is told; None when there is none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    named = None
    if pointer.is_file():
        try:
            named = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = "?"
        ckpt = pointer.parent / named
        if named and "/" not in named and complete(ckpt):
            return ckpt
    found = checkpoints(run_dir)
    if not found:
        return None
    if note is not None:
        said = f"names {named}, which is not a complete checkpoint" if named is not None else "is missing"
        note(f"{pointer} {said}: using {found[0].name}, the newest complete checkpoint")
    return found[0]


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders of ``run_dir`` (``step-N`` holding the weights), newest (highest
    step) first; those set aside after a divergence are not among them."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if step_of(p) >= 0 and complete(p)),
                  key=step_of, reverse=True)


def complete(ckpt: Path) -> bool:
    """``ckpt`` holds a checkpoint: its weights file, or a sharded checkpoint's record."""
    return (Path(ckpt) / MODEL_FILE).is_file() or sharded(ckpt)


def sharded(ckpt: Path) -> bool:
    """``ckpt`` is a sharded checkpoint (torch.distributed.checkpoint folders, :data:`META_FILE`)."""
    return (Path(ckpt) / META_FILE).is_file() and not (Path(ckpt) / MODEL_FILE).is_file()


def roll_back(run_dir: Path, before: int) -> Path | None:
    """Training diverged: the checkpoints of step ``before`` and later move to ``checkpoints/diverged/``
    (kept to look at; never resumed, evaluated or counted again) and ``checkpoints/latest`` names the
    newest checkpoint below ``before``; with none, the pointer is removed. Returns the new latest."""
    root = Path(run_dir) / "checkpoints"
    aside = root / DIVERGED_DIR
    for c in checkpoints(run_dir):
        if step_of(c) >= before:
            aside.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(aside / c.name, ignore_errors=True)
            os.replace(c, aside / c.name)
    earlier = checkpoints(run_dir)
    if earlier:
        write_atomic(root / "latest", earlier[0].name)
        return earlier[0]
    (root / "latest").unlink(missing_ok=True)
    return None


def no_checkpoint(run_dir: Path, what: str) -> str:
    """The one line for a run folder with no complete checkpoint to ``what`` (evaluate, resume, ...)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoints").is_dir():
        # not a run at all (a tokenizer folder, a run's eval/): "remove the folder" would be bad advice
        return (f"{run_dir} is not a run folder (no config.yaml, no checkpoints/): pass a run folder, one of its "
                "checkpoints, or a model folder with config.json and weights")
    diverged = run_dir / "checkpoints" / DIVERGED_DIR
    if diverged.is_dir() and any(diverged.iterdir()):
        return (f"{run_dir} holds no good checkpoint to {what}: its training diverged before the first one (set "
                f"aside in {diverged}); train it again, with a lower optim.lr or optim.warmup_steps")
    return (f"{run_dir} holds no complete checkpoint to {what} (it stopped before its first): train it again "
            f"(remove the folder, or train into another one)")


def _note(message: str) -> None:
    print(f"sortednet: note: {message}", file=sys.stderr, flush=True)


def is_checkpoint(path: Path) -> bool:
    """``path`` is a checkpoint folder of a run (``RUN/checkpoints/step-N/`` with its weights)."""
    path = Path(path)
    return complete(path) and path.parent.name == "checkpoints"


SMALL = 1 << 20  # files up to this size are hashed whole in a fingerprint; larger ones are sampled
SAMPLES, PIECE = 16, 4096  # pieces of a large file hashed, evenly spread (the first and last among them)


def fingerprint(ckpt_dir: Path) -> str:
    """A cheap identity of checkpoint ``ckpt_dir`` (sha256 of what follows, hex): for every file in it
    (sharded checkpoints: every rank's shards and the metadata), its path in the folder, its size and its
    modification time (ns); the small files (state of a tiny run, DCP ``.metadata``, checkpoint.json) whole;
    of a large file its safetensors header (names, shapes, offsets, the config) and 16 pieces of 4 KiB.
    A few hundred KiB read whatever the model's size, against minutes for a 26 GB sha256; a rewritten
    file (a resume, a retrain: same size) has another time and other bytes. A copy that keeps times
    (``cp -p``, ``shutil.copytree``, a move) keeps the fingerprint; one that does not (plain ``cp``) reads
    as another checkpoint, whose results are measured again: stale-safe."""
    folder = Path(ckpt_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as f:
            if st.st_size <= SMALL:
                digest.update(f.read())
                continue
            if path.suffix == ".safetensors":
                head = f.read(8)
                digest.update(head + f.read(min(int.from_bytes(head, "little"), SMALL)))
            for i in range(SAMPLES):
                f.seek((st.st_size - PIECE) * i // (SAMPLES - 1))
                digest.update(f.read(PIECE))
    return digest.hexdigest()


def weights_sha256(ckpt_dir: Path) -> str | None:
    """The sha256 of a one-file checkpoint's weights (read in 1 MiB pieces): what results written
    before :func:`fingerprint` recorded; None for a sharded checkpoint or an unreadable file."""
    digest = hashlib.sha256()
    try:
        with open(Path(ckpt_dir) / MODEL_FILE, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
    except OSError:
        return None
    return digest.hexdigest()


def checkpoint_record(run_dir: Path, ckpt_dir: Path) -> dict:
    """What identifies a checkpoint in results measured on it: its step, its folder relative to the run
    folder and its :func:`fingerprint`."""
    ckpt_dir = Path(ckpt_dir)
    step = -1
    try:
        if sharded(ckpt_dir):
            step = int(read_record(ckpt_dir).get("step", -1))
        else:
            with safe_open(str(ckpt_dir / MODEL_FILE), framework="pt") as f:
                step = int((f.metadata() or {}).get("step", -1))
    except (SafetensorError, OSError, ValueError, UsageError):
        step = -1
    if step < 0 and ckpt_dir.name.startswith("step-"):
        step = int(ckpt_dir.name.removeprefix("step-"))
    return {"step": step, "path": os.path.relpath(ckpt_dir.resolve(), Path(run_dir).resolve()),
            "fingerprint": fingerprint(ckpt_dir)}


def read_record(ckpt_dir: Path) -> dict:
    """A sharded checkpoint's :data:`META_FILE` (format, step, world, config), or one line saying it is
    unreadable."""
    path = Path(ckpt_dir) / META_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"checkpoint record {path} is corrupt or unreadable ({type(e).__name__}): use an earlier "
                         "checkpoint or retrain") from None
    if not isinstance(record, dict) or "config" not in record:
        raise UsageError(f"checkpoint record {path} carries no sortednet config: was it written by sortednet?")
    return record


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
        found = latest_checkpoint(run_dir, note=_note)
    else:
        path = Path(ckpt)
        if not path.exists():
            raise UsageError(f"checkpoint {ckpt} does not exist: pass a run folder or a checkpoint folder")
        if path.is_file() and path.name != MODEL_FILE:
            raise UsageError(f"--ckpt {ckpt} is a file: pass a run folder or a checkpoint folder")
        if path.is_file():
            path = path.parent
        if complete(path):
            found, run_dir = path, path.parent.parent
        else:
            run_dir, found = path, latest_checkpoint(path, note=_note)
    if found is None:
        raise UsageError(no_checkpoint(run_dir, "use"))
    return run_dir, found


def load_weights(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], DictConfig]:
    """The model state_dict and the run's resolved config stored with it (a sharded checkpoint:
    consolidated into whole tensors in this one process)."""
    from safetensors.torch import load_file

    if sharded(ckpt_dir):
        from .distributed import consolidated

        return consolidated(Path(ckpt_dir) / DCP_MODEL), checkpoint_config(ckpt_dir)
    metadata, _ = _header(ckpt_dir)  # readable and written by sortednet, before the weights are read
    cfg = _config_of(metadata, ckpt_dir)
    path = Path(ckpt_dir) / MODEL_FILE
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {path} is corrupt or unreadable ({e}): use an earlier checkpoint "
                         "or retrain") from None
    for key, kept in json.loads(metadata.get("aliases") or "{}").items():
        state[key] = state[kept]  # a tied tensor, stored once: both keys load into the one parameter
    return state, cfg


def checkpoint_config(ckpt_dir: Path) -> DictConfig:
    """The run's resolved config stored with a checkpoint, read from its header or record (no weight read)."""
    if sharded(ckpt_dir):
        return OmegaConf.create(read_record(ckpt_dir)["config"])
    return _config_of(_header(ckpt_dir)[0], ckpt_dir)


def _config_of(metadata: dict, ckpt_dir: Path) -> DictConfig:
    if "config" not in metadata:
        raise UsageError(f"checkpoint {Path(ckpt_dir) / MODEL_FILE} carries no sortednet config: was it written by "
                         "sortednet?")
    return OmegaConf.create(metadata["config"])


def checkpoint_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor a checkpoint holds (a tied tensor under each of its names), read
    from its headers: what a model is checked against before any weight is read."""
    if sharded(ckpt_dir):
        from .distributed import dcp_shapes

        return dcp_shapes(Path(ckpt_dir) / DCP_MODEL)
    metadata, shapes = _header(ckpt_dir)
    for key, kept in json.loads(metadata.get("aliases") or "{}").items():
        shapes[key] = shapes[kept]
    return shapes


def _header(ckpt_dir: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    path = Path(ckpt_dir) / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {path} is corrupt or unreadable ({e}): use an earlier checkpoint "
                         "or retrain") from None


def load_into(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Read a checkpoint's weights into ``model``'s own tensors (a sharded one: DCP reads each shard into
    them), so loading holds the model once, not the model plus a state_dict of it (nor a memory map of
    the file, whose pages count as resident memory while it is open). Check the names and shapes first
    (:func:`checkpoint_shapes`)."""
    state = model.state_dict()  # the parameters' and buffers' own storage
    if sharded(ckpt_dir):
        from .distributed import load_in_place

        load_in_place(Path(ckpt_dir) / DCP_MODEL, state)
        return
    path = Path(ckpt_dir) / MODEL_FILE
    try:
        _read_into(path, state)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}): use an earlier "
                         "checkpoint or retrain") from None


def _read_into(path: Path, state: dict) -> None:
    """Read safetensors file ``path`` straight into ``state``'s tensors with ``readinto`` (the format: an
    8-byte little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then
    the data); a tensor of another dtype goes through one temporary tensor of its own size."""
    import torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        aliases = json.loads((header.get("__metadata__") or {}).get("aliases") or "{}")
        done: set[tuple[int, int]] = set()
        for key, tensor in state.items():
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if where in done:  # tied: one tensor under two names, read once
                continue
            entry = header[aliases.get(key, key)]
            begin, end = entry["data_offsets"]
            dtype = dtypes[entry["dtype"]]
            direct = tensor.dtype == dtype and tensor.device.type == "cpu" and tensor.is_contiguous()
            target = tensor if direct else torch.empty(entry["shape"], dtype=dtype)
            raw = target.reshape(-1).view(torch.uint8)
            if raw.numel() != end - begin or list(target.shape) != list(entry["shape"]):
                raise ValueError(f"{key} holds {end - begin} bytes for shape {entry['shape']}")
            f.seek(8 + size + begin)
            if f.readinto(memoryview(raw.numpy())) != end - begin:
                raise ValueError(f"{key} is cut short")
            if not direct:
                with torch.no_grad():
                    tensor.copy_(target)
            done.add(where)


def load_state(ckpt_dir: Path) -> dict:
    import torch

    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise UsageError(f"trainer state {path} is corrupt or unreadable ({type(e).__name__}): "
                         "use an earlier checkpoint") from None
