"""``sortednet train``: train every sub-model of the grid in one run."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

from .. import distributed, models, runs
from ..build import (build_data, build_device, build_distill, build_grid, build_model, build_optimizer,
                     build_sampler, build_teacher, check_settings)
from ..engine import (NonFiniteLoss, Progress, calibration_batches, checkpoint_activations, cosine_schedule,
                      evaluate, fit, precision_label, steps_per_epoch)
from ..errors import UsageError
from ..models import hf
from ..nest import EXITS, nesting, synchronize
from ..tensorboard_log import TensorBoardLog
from .loaded import check_fits


def resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The saved config of ``run_dir`` with the ``key=value`` overrides of the resume (``trainer.epochs=30``):
    only what does not change the model, its grid or data (:data:`runs.RESUMABLE`); the rest is refused."""
    return runs.resumed_config(run_dir, overrides)


_HELD: list[Path] = []  # run folders whose lock this process took, released when `run` returns or raises


def _releasing_locks(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mark = len(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_HELD) > mark:
                runs.unlock_run(_HELD.pop())
    return wrapper


def _lock(run_dir: Path, d, console: Console) -> None:
    """Rank 0 takes ``run_dir``'s lock (one process trains into a run folder at a time); every rank
    stops when it is refused."""
    refused = None
    if d.main:
        try:
            _HELD.append(runs.lock_run(run_dir, note=lambda m: console.print(f"[yellow]{m}[/]")).parent)
        except UsageError as e:
            refused = e
    said = d.broadcast(None if refused is None else str(refused))
    if refused is not None:
        raise refused
    if said is not None:
        raise UsageError(said)


def resume_from(path: Path, console: Console) -> tuple[Path, Path, dict]:
    """``(run_dir, checkpoint, trainer state)`` to resume: ``path`` is a checkpoint folder
    (``RUN/checkpoints/step-N``: that one) or a run folder (its latest checkpoint; when that is
    unreadable, the newest earlier one that reads, said on the console). Only the weights' headers are
    read here (names, shapes, and that the data is all there): the weights themselves are read into the
    built model (:func:`load_resumed`), so a resumed run never holds its model twice."""
    if runs.is_checkpoint(path):
        run_dir, chosen = path.parent.parent, [path]
    else:  # `latest` naming a folder that is gone: the newest complete one, said on the console
        run_dir, latest = path, runs.latest_checkpoint(path, note=lambda m: console.print(f"[yellow]{m}[/]"))
        chosen = [] if latest is None else \
            [latest, *(c for c in runs.checkpoints(path) if runs.step_of(c) < runs.step_of(latest))]
        if not chosen:
            raise UsageError(f"--resume {path}: {runs.no_checkpoint(path, 'resume from')}")
    failed = []
    for ckpt in chosen:
        try:
            runs.checkpoint_shapes(ckpt)  # readable and whole; the weights are read once the model is built
            state = runs.load_state(ckpt)
        except UsageError as e:
            if len(chosen) == 1:
                raise
            failed.append((ckpt, str(e)))
            continue
        if failed:
            console.print(f"[yellow]{failed[0][1]}[/]\nresuming from {ckpt.name} instead, the newest readable "
                          "checkpoint (the steps after it are trained again)")
        return run_dir, ckpt, state
    raise UsageError(f"--resume {path}: none of its {len(chosen)} checkpoints is readable ({failed[0][1]})")


def _stopped(step: int, what: str, run_dir: Path, cfg: DictConfig, bad: int) -> UsageError:
    """Training diverged at ``step``: ``latest`` goes back to the newest checkpoint from before step
    ``bad`` (the first whose weights are NaN or gave a non-finite loss), and the one line says so."""
    latest = runs.roll_back(run_dir, before=bad) if (run_dir / "checkpoints").is_dir() else None
    kept = (f"checkpoints/latest is {latest.name}, the newest whose weights still gave a finite loss"
            if latest is not None else "no checkpoint from before it: nothing to resume")
    return UsageError(f"{what} at step {step}: training stopped ({kept}); lower optim.lr (now {cfg.optim.lr}) "
                      "or add optim.warmup_steps, and train again")


def standalone_config(cfg: DictConfig, sub) -> DictConfig:
    """``cfg`` made to train ``sub`` alone: a one-member grid (each dim at ``sub``'s level) whose largest
    is ``sub``, plain training (``sampler=full``), no distillation; data, optimizer and epochs unchanged."""
    one = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for dim, level in sub.levels:
        OmegaConf.update(one, f"dims.{dim}.levels", [level], merge=False)
    OmegaConf.update(one, "sampler", {"name": "full"}, merge=False)
    OmegaConf.update(one, "standalone", None)
    if one.get("distill") is not None:
        OmegaConf.update(one, "distill", {"enabled": False, "teacher": "self", "anchor": 0.0, "anchor_only": False},
                         merge=True)
    return one


def run_standalone(cfg: DictConfig, run_dir: Path, console: Console) -> list[Path]:
    """``standalone=[NAME, ...]``: train each named sub-model of the grid alone into
    ``run_dir/standalone/<name>/`` (an ordinary run each); returns their final checkpoints."""
    names = [cfg.standalone] if isinstance(cfg.standalone, str) else list(cfg.standalone)
    if cfg.get("resume") is not None:
        raise UsageError("standalone=[...] cannot be combined with --resume: resume one sub-model's run instead "
                         "(--resume RUN/standalone/NAME)")
    data, _ = build_data(cfg)
    grid = build_grid(cfg, build_model(cfg, data.model_args))
    subs = []
    for name in names:
        try:
            subs.append(grid.parse(str(name)))
        except KeyError:
            raise UsageError(f"standalone: {name!r} is not a sub-model of the grid (e.g. {grid.smallest.name}, "
                             f"{grid.largest.name}; `sortednet submodels` lists them all)") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    finals = []
    for i, sub in enumerate(subs, 1):
        console.print(f"[bold]standalone {i}/{len(subs)}[/]: {sub.name} trained alone")
        finals.append(run(standalone_config(cfg, sub), run_dir / "standalone" / sub.name, console))
    console.print(f"trained {len(subs)} sub-models alone under {run_dir / 'standalone'}; compare a sorted run "
                  f"with them: sortednet eval --all-submodels --ckpt SORTED_RUN standalone={run_dir}")
    return finals


def _empty(entry, cfg: DictConfig, model_cfg: DictConfig, model_args: dict, resuming: bool, d, console: Console):
    """``(model on the meta device, its safetensors files)`` for a sharded run that can build without
    copies: resumed (the checkpoint holds every weight) or pretrained from a local folder of safetensors
    whose keys are the model's; None where every rank builds the whole model (a random init: the same
    weights as one process, rank 0's broadcast; a format, or a permutation, read whole; distill.teacher=
    initial, whose frozen copy of the starting model every rank holds anyway), said on the console for a
    pretrained model. Every rank agrees (rank 0 reads the files' headers)."""
    from ..build import plain

    options = plain(model_cfg.model)
    options.pop("name")
    pretrained = None if resuming else options.get("pretrained")
    distill = plain(cfg.get("distill") or {})
    if (not resuming and not pretrained) or (distill.get("enabled") and distill.get("teacher") == "initial"):
        return None
    built = entry.build_empty(**model_args, **options)
    if built is not None and (resuming or not built[1]):  # resumed: the checkpoint, not the files, fills it
        built = (built[0], []) if resuming else None
    why = None if all(d.gather(built is not None)) else "it is not a local folder of safetensors weights that " \
        "load as they are (a hub id, GGUF, .bin, or model.importance permuting them)"
    if why is None and pretrained:
        missing = distributed.uncovered(built[0], built[1]) if d.main else None
        why = d.broadcast(None if not missing else f"its safetensors hold {len(missing)} of the model's weights under "
                          f"no key of its own (e.g. {missing[0]})")
    if why is None:
        return built
    if pretrained:
        console.print(f"[yellow]model.pretrained={pretrained}: {why}; every rank builds the whole model before "
                      "sharding it (to build each rank's shards only: a local folder, e.g. huggingface-cli download "
                      "ID --local-dir DIR)[/]")
    return None


def load_resumed(model: torch.nn.Module, ckpt: Path, name: str) -> None:
    """A resumed one-file checkpoint's weights read into ``model``'s own tensors, a tensor at a time
    (checked against its names and shapes first): never a second copy of the model beside it."""
    check_fits(ckpt, runs.checkpoint_shapes(ckpt), model, name)
    runs.load_into(model, ckpt)


def _shard(model, empty, ckpt: Path | None, entry, device: torch.device, amp, d, console: Console) -> None:
    """FSDP2 on ``model``; where it was built on the meta device (``empty``: :func:`_empty`), each rank's
    shards then made and filled: from one-file checkpoint ``ckpt`` (resumed; a sharded checkpoint is
    read later with the optimizer) or, not resuming, from the pretrained files, rank 0 reading one at a time."""
    ties = distributed.tied(model)  # (before sharding: the same parameter under two names stays one)
    distributed.shard(model, param_dtype=amp)
    if empty is None:
        return
    if not empty[1]:  # resumed: the checkpoint's weights fill the shards
        distributed.materialize(model, device, entry.init_buffers, ties)
        if ckpt is not None:  # a one-file checkpoint, held whole by every rank while its shards are cut
            weights, _ = runs.load_weights(ckpt)
            distributed.load_whole(model, weights)
            del weights
        return
    loaded = distributed.load_pretrained(model, empty[1], device, entry.init_buffers, ties, d)
    grown = "" if loaded.growth is None else f": host memory grew by at most {loaded.growth / 2**20:.1f} MiB on a rank"
    console.print(f"built on the meta device and sharded before any weight existed; rank 0 read {loaded.files} "
                  f"safetensors file(s) one at a time (largest {loaded.largest / 2**20:.1f} MiB) and broadcast "
                  f"them{grown} (the whole model: {distributed.weight_bytes(model) / 2**20:.1f} MiB)")


@dataclass
class Launch:
    """Where this process trains: ``d`` its place among the processes, ``device`` and ``amp`` (the
    autocast dtype or None), its ``console`` (quiet off rank 0), the run folder all ranks agreed on, and
    ``strategy`` and ``accumulate`` as the command line gave them (a resume keeps them, not the saved ones)."""

    run_dir: Path
    console: Console
    d: distributed.Dist
    device: torch.device
    amp: torch.dtype | None
    strategy: str
    accumulate: int


@dataclass
class Resumed:
    """The checkpoint a resume starts from (its weights are read into the built model, a sharded one's
    with the optimizer), ``state`` the trainer state (optimizer, scheduler, sampler, random streams, progress)."""

    checkpoint: Path
    state: dict

    @property
    def sharded(self) -> bool:
        return runs.sharded(self.checkpoint)


@dataclass
class Recipe:
    """Everything a run trains with, built by :func:`setup`; :func:`restore` brings a resumed one's
    ``progress`` (and ``own``, whether this rank resumes its own random stream) back from its checkpoint."""

    cfg: DictConfig
    run_dir: Path
    console: Console
    d: distributed.Dist
    device: torch.device
    amp: torch.dtype | None
    resuming: bool
    accumulate: int  # micro-batches per optimizer step
    data: object
    model: torch.nn.Module
    grid: object
    sampler: object
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    per_epoch: int  # optimizer steps in an epoch
    steps: int | None  # trainer.steps: the run's length in steps, when it is not trainer.epochs
    total: int  # the steps this run ends at (trainer.max_steps may stop it early)
    progress: Progress
    own: bool = False


@_releasing_locks
def run(cfg: DictConfig, run_dir: Path, console: Console | None = None, overrides: list[str] = ()) -> Path:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the final checkpoint folder (with
    ``standalone=[...]``: the folder of the standalone runs)."""
    where = launch(cfg, Path(run_dir), console or Console())
    if cfg.get("standalone"):
        run_standalone(cfg, where.run_dir, where.console)
        return where.run_dir / "standalone"
    cfg, run_dir, resumed = open_run(cfg, where, overrides)
    r = setup(cfg, run_dir, where, resumed)
    if resumed is not None and restore(r, resumed):  # already at its end: nothing to train
        return resumed.checkpoint
    begin(r)
    first_step = r.progress.step  # steps run by this process are counted from here
    started = train(r)
    return save(r, first_step, started)


def launch(cfg: DictConfig, run_dir: Path, console: Console) -> Launch:
    """The process(es) and device of the run, its settings checked before anything is written, and the
    run folder's lock taken (one process trains into a run folder at a time)."""
    resuming = cfg.get("resume") is not None
    check_settings(cfg)  # trainer sizes and counts, typed optimizer values: before anything is written
    device, amp = build_device(cfg)
    d = distributed.setup(device)  # one of several torchrun processes, or Dist(): the only one
    device = distributed.local_device(device, d)
    if not d.main:
        console = Console(quiet=True)  # rank 0 prints and writes; the others train
    strategy = cfg.trainer.get("strategy", "ddp")
    if strategy == "fsdp" and not d.enabled and not resuming:  # (a sharded run resumes in one process)
        raise UsageError("trainer.strategy=fsdp shards the model over several processes and this run has one: pass "
                         "trainer.devices=N (N > 1) or launch it with torchrun --nproc-per-node N, or drop "
                         "trainer.strategy=fsdp")
    accumulate = cfg.trainer.get("accumulate", 1)
    if cfg.trainer.batch_size % (d.world * accumulate):
        raise UsageError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch of a step and must be a "
                         f"multiple of the {d.world} process(es) x trainer.accumulate={accumulate} micro-batches")
    if not resuming:
        run_dir = distributed.agree_on_run_dir(run_dir, d)
    # one process trains into a run folder at a time: a second `--resume RUN` would interleave its steps
    if not resuming or runs.run_of(Path(cfg.resume)).is_dir():  # (a resume of no folder is refused below)
        _lock(runs.run_of(Path(cfg.resume)) if resuming else run_dir, d, console)
    return Launch(run_dir, console, d, device, amp, strategy, accumulate)


def open_run(cfg: DictConfig, where: Launch, overrides: list[str]) -> tuple[DictConfig, Path, Resumed | None]:
    """``(config, run folder, checkpoint to resume or None)``: a resume reads its checkpoint and its saved
    config with the resume's overrides; a new run refuses a folder that already holds one. Rank 0 makes
    the folder."""
    d, run_dir, resumed = where.d, where.run_dir, None
    if cfg.get("resume") is not None:
        run_dir, ckpt, state = resume_from(Path(cfg.resume), where.console)
        cfg = resume_config(run_dir, list(overrides))
        check_settings(cfg)
        resumed = Resumed(ckpt, state)
    elif (run_dir / "config.yaml").exists():
        resume = ", or --resume it" if (run_dir / "checkpoints" / "latest").is_file() else \
            " (it holds no checkpoint to resume: remove it to train into it again)"
        raise UsageError(f"{run_dir} already holds a run (two runs started in the same second?): "
                         f"pass hydra.run.dir=NEW_DIR{resume}")
    d.barrier()  # every rank has looked before rank 0 writes
    if d.main:  # the only rank that writes there (another node may not share this disk, or may not write there)
        run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir, resumed


def check_context(data, model) -> None:
    """Refuse data whose sequences are longer than the model's context (``max_position_embeddings``):
    it trained silently, then generate refused prompts past the context and the export's config kept it."""
    longest = (getattr(data, "info", None) or {}).get("longest")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(longest, int) and isinstance(context, int) and not isinstance(context, bool) and longest > context:
        raise UsageError(f"the data's sequences run to {longest} tokens but the model's context is {context} "
                         "positions (max_position_embeddings): lower data.block_size (text) or data.max_length "
                         "(instructions), or use a model with a longer context")


def check_something_trains(model: torch.nn.Module, grid) -> None:
    """A model whose only trainable weights are its exits' own readouts (``model.exits.trunk=frozen``)
    needs a sub-model that reads one, a depth below the full model's: else every step would train
    nothing and the run would save the model it started from."""
    nest = nesting(model)
    if nest.exits is None or any(p.requires_grad for name, p in model.named_parameters()
                                 if not name.startswith(EXITS + ".")):
        return
    if not any(str(sub.get(nest.scope.depth_dim)) in nest.exits for sub in grid):
        raise UsageError(f"only the exits' own readouts train (model.exits.trunk=frozen), and no sub-model of dims "
                         f"reads one: sort along depth with levels below the model's {nest.depth} layers "
                         "(e.g. 'dims=[depth]')")


def warn_random_lora(model_cfg: DictConfig, console: Console) -> None:
    """LoRA (``model.lora.r``) trains low-rank adapters beside frozen weights: on a model built from a
    config (no ``model.pretrained``) those weights are random and stay so. Not refused (a tiny random
    model is how the tests exercise it), but said, once, where a user starting a run sees it."""
    lora = model_cfg.get("lora")
    if lora is not None and lora.get("r") and not model_cfg.get("pretrained"):
        console.print("[yellow]model.lora trains only the adapters, and this model's frozen weights are random "
                      "(no model.pretrained): it will not learn much. Give model.pretrained=... or drop "
                      "model.lora.r[/]", soft_wrap=True)


def setup(cfg: DictConfig, run_dir: Path, where: Launch, resumed: Resumed | None) -> Recipe:
    """Data, model (on the device, the same on every rank, or sharded), grid, sampler, teacher, optimizer
    and learning-rate schedule of the run, seeded by ``cfg.seed``."""
    console, d, device, amp = where.console, where.d, where.device, where.amp
    resuming = resumed is not None
    # a resumed one-file checkpoint: read whole only where FSDP shards a model built on the meta device
    whole = resuming and not resumed.sharded
    strategy = where.strategy
    torch.manual_seed(cfg.seed)
    source = runs.self_contained(cfg, run_dir) if resuming else cfg  # a resumed run reads its own copy
    data, tokenizer = build_data(source)
    # resumed: the checkpoint holds every weight, so the initial ones (model.weights, a file that may
    # have moved) are not read
    architecture = models.architecture(OmegaConf.to_container(source.model, resolve=True))[0]
    model_cfg = OmegaConf.create({"model": architecture}) if resuming else source
    entry = models.entry(cfg.model.name)
    # sharded: built on the meta device where the family can (no weight on any rank until each has its shards)
    empty = _empty(entry, cfg, model_cfg, data.model_args, resuming, d, console) \
        if d.enabled and strategy == "fsdp" else None
    model = build_model(model_cfg, data.model_args) if empty is None else empty[0]
    check_context(data, model)
    if not resuming and d.main and cfg.model.get("pretrained"):
        entry.snapshot(model, tokenizer, run_dir / runs.PRETRAINED_DIR, str(cfg.model.pretrained))
    elif not resuming and d.main and cfg.model.get("tokenizer") and tokenizer is not None:
        hf.keep_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    grid = build_grid(cfg, model)
    check_something_trains(model, grid)
    if not resuming and d.main:
        warn_random_lora(cfg.model, console)
    sampler = build_sampler(cfg, grid)
    for note in sampler.notes:  # a setting the schedule had to change (g above the grid's size)
        console.print(f"[yellow]{note}[/]")
    if empty is None:  # every rank holds the whole model; rank 0's weights become everyone's
        if whole:  # the checkpoint's weights read into the model's own tensors, before any sharding
            load_resumed(model, resumed.checkpoint, cfg.model.name)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        d.broadcast_module(model)
    teacher = build_teacher(cfg, model, run_dir, resuming, d.main, amp)  # distill.teacher=initial, else None
    if d.enabled and cfg.trainer.get("sync_batchnorm", False):
        synchronize(model)
    if cfg.trainer.get("activation_checkpointing", False):
        checkpoint_activations(model)  # before sharding: fully_shard then wraps the checkpointed units
    if d.enabled and strategy == "fsdp":
        d = replace(d, sharded=True)
        _shard(model, empty, resumed.checkpoint if whole else None, entry, device, amp, d, console)
    optimizer = build_optimizer(cfg, model)
    t = cfg.trainer
    per_epoch = steps_per_epoch(data.train, t.batch_size)
    if per_epoch == 0:  # full batches only: an epoch would have no step
        raise UsageError(f"{len(data.train)} training examples make no full batch of trainer.batch_size="
                         f"{t.batch_size}: lower trainer.batch_size (at most {len(data.train)}) or add data")
    steps = t.get("steps")  # the run's length in optimizer steps, when it is not trainer.epochs
    length = per_epoch * t.epochs if steps is None else steps
    total = length if t.max_steps is None else min(length, t.max_steps)
    scheduler = cosine_schedule(optimizer, length, cfg.optim.get("warmup_steps", 0))
    return Recipe(cfg, run_dir, console, d, device, amp, resuming, where.accumulate, data, model, grid, sampler,
                  teacher, optimizer, scheduler, per_epoch, steps, total, Progress())


def restore(r: Recipe, resumed: Resumed) -> bool:
    """The optimizer, schedule, sampler, random streams and progress of ``resumed`` put back into ``r``;
    True (said on the console) when the run is already at its end and there is nothing to train."""
    d, console, t, steps = r.d, r.console, r.cfg.trainer, r.steps
    optimizer, scheduler, ckpt, state = r.optimizer, r.scheduler, resumed.checkpoint, resumed.state
    if resumed.sharded:  # a sharded checkpoint: weights and optimizer resharded for these processes
        distributed.load_sharded(r.model, optimizer, ckpt)
    else:
        distributed.load_optimizer_state(r.model, optimizer, state["optimizer"], d)
    scheduler.load_state_dict(state["scheduler"])
    # the learning rate of the next step follows this run's schedule: a finished run resumed with more
    # steps or epochs (a longer cosine) took the saved one, 0 at the end of the old schedule, for a step
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    r.sampler.load_state_dict(state["sampler"])
    # each rank its own random stream where the checkpoint has one (same number of processes or
    # fewer); a rank the checkpoint had not is derived from the seed below
    r.own = d.rank < len(state.get("rng_ranks", [state["rng"]]))
    torch.set_rng_state(state.get("rng_ranks", [state["rng"]])[d.rank] if r.own else state["rng"])
    cuda_rngs = state.get("cuda_rng_ranks", [state["cuda_rng"]] if "cuda_rng" in state else [])
    if r.device.type == "cuda" and d.rank < len(cuda_rngs):
        torch.cuda.set_rng_state(cuda_rngs[d.rank])
    progress = r.progress = Progress(**state["progress"])
    finished = progress.epoch >= t.epochs if steps is None else progress.step >= steps
    if not finished and t.get("max_minutes") is not None and progress.seconds >= 60 * t.max_minutes:
        console.print(f"nothing to train: {r.run_dir} has trained {progress.seconds / 60:.1f} minutes (trainer."
                      f"max_minutes={t.max_minutes:g}); to train further: sortednet train --resume {r.run_dir} "
                      f"trainer.max_minutes={2 * t.max_minutes:g}")
        return True
    if finished or (t.max_steps is not None and progress.step >= t.max_steps):
        limit = "null" if t.max_steps is None else t.max_steps
        more = (f"trainer.max_steps={2 * t.max_steps}" if t.max_steps is not None and progress.step >= t.max_steps
                else f"trainer.epochs={t.epochs + 1}" if steps is None else f"trainer.steps={2 * steps}")
        length_is = f"trainer.epochs={t.epochs}" if steps is None else f"trainer.steps={steps}"
        console.print(f"nothing to train: {r.run_dir} is at step {progress.step}, epoch {progress.epoch} "
                      f"({length_is}, trainer.max_steps={limit}); to train further: "
                      f"sortednet train --resume {r.run_dir} {more}")
        return True
    console.print(f"resuming {r.run_dir} from {ckpt.name} (epoch {progress.epoch}, step {progress.step})"
                  + (f" with {d.world} processes" if d.enabled else ""))
    return False


def begin(r: Recipe) -> None:
    """Rank 0 records the config the run uses; every other rank gets its own random stream (where it
    resumes none); the console says what trains."""
    cfg, d, t = r.cfg, r.d, r.cfg.trainer
    if d.main:  # a resume records the settings it changed (trainer.max_steps, ...): what the run used
        runs.save_config(r.run_dir, cfg)
    if d.rank > 0 and not (r.resuming and r.own):  # rank 0 keeps the single-process random stream; the
        torch.manual_seed(cfg.seed + 7919 * d.rank + r.progress.step)  # others get their own (augmentation)
    r.console.print(f"[bold]sortednet train[/] {cfg.model.name} on {r.data.name} ({len(r.data.train)} examples), "
                    f"{len(r.grid)} sub-models ({' x '.join(f'{dim.name} {len(dim.levels)}' for dim in r.grid.dims)}), "
                    f"sampler={r.sampler.name}, device={r.device.type}, "
                    f"precision {precision_label(r.device, cfg.trainer.precision, r.amp)}"
                    + (f" x {d.world} processes{' (FSDP)' if d.sharded else ''} (global batch {t.batch_size})"
                       if d.enabled else "")
                    + f" -> {r.run_dir}")
    r.console.print(f"augmentation: {r.data.augmentation}")


def checkpoint(r: Recipe) -> Path:
    """A checkpoint of ``r`` at its step (weights, optimizer, schedule, sampler, every rank's random
    stream, progress); training stops in one line where the weights are NaN or infinite."""
    d, model, optimizer, progress, run_dir, cfg = r.d, r.model, r.optimizer, r.progress, r.run_dir, r.cfg
    if d.sharded:  # each rank its own shards, written by torch.distributed.checkpoint: no whole copy
        weights, optimizer_state = distributed.sharded_state(model, optimizer)
        values = distributed.local_values(weights)
    else:  # the ranks hold the same weights: one copy, loadable by any number of processes
        weights, optimizer_state = distributed.full_state(model, optimizer, d)
        values = list(weights.values())
    finite = [torch.isfinite(v).all() for v in values if v.is_floating_point()]
    bad = torch.tensor([0.0 if not finite or bool(torch.stack(finite).all()) else 1.0], device=r.device)
    if d.sum(bad).item():  # every rank agrees (sharded: each looked at its own shards)
        d.barrier()
        raise _stopped(progress.step, "the weights are NaN or infinite", run_dir, cfg, bad=progress.step) \
            if d.main else UsageError("diverged")
    rngs = d.gather(torch.get_rng_state())  # every rank's stream: a data-parallel resume is exact too
    state = {
        "scheduler": r.scheduler.state_dict(),
        "sampler": r.sampler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
        "progress": {"step": progress.step, "epoch": progress.epoch, "batch": progress.batch,
                     "seconds": progress.seconds},
    }
    if r.device.type == "cuda":
        state["cuda_rng_ranks"] = d.gather(torch.cuda.get_rng_state())
        state["cuda_rng"] = state["cuda_rng_ranks"][0]
    path = run_dir / "checkpoints" / f"step-{progress.step:08d}"
    keep = cfg.trainer.keep_checkpoints
    if d.sharded:  # a temporary folder (rank 0 makes it), every rank's shards, then rank 0 the rest
        tmp = d.broadcast(str(runs.begin_checkpoint(run_dir, progress.step)) if d.main else None)
        distributed.save_sharded(weights, optimizer_state, tmp)
        if d.main:
            runs.save_sharded_record(run_dir, progress.step, cfg, d.world)
            path = runs.finish_checkpoint(run_dir, progress.step, state, keep=keep)
    elif d.main:
        state["optimizer"] = optimizer_state
        path = runs.save_checkpoint(run_dir, progress.step, weights, state, cfg, keep=keep)
    d.barrier()
    return path


def train(r: Recipe) -> float:
    """The training loop of ``r`` with its progress bar, metrics (``metrics.jsonl``, TensorBoard),
    evaluations at the end of each epoch and checkpoints; returns when it started (``time.perf_counter``)."""
    cfg, d, data, model, grid, progress, scheduler = r.cfg, r.d, r.data, r.model, r.grid, r.progress, r.scheduler
    task, t, device, amp, run_dir = data.task, cfg.trainer, r.device, r.amp, r.run_dir
    board = TensorBoardLog(run_dir, t.get("tensorboard", True) and d.main,
                           purge_step=progress.step if r.resuming else None)

    def log(record: dict) -> None:
        if d.main:
            runs.append_metrics(run_dir, record)
            board.write(record)

    calib = test = None
    if t.epoch_eval:
        calib = calibration_batches(model, task, data.calib, cfg.eval.calib_batch_size, cfg.eval.calib_batches,
                                    cfg.seed, device, data.collate)
        # each rank tests its share of the subset; the metric's sums are added up over the ranks (sharded:
        # every rank runs every batch, as FSDP's gathers need all ranks in each forward)
        share = (0, 1) if d.sharded else (d.rank, d.world)
        subset = torch.utils.data.Subset(data.test, range(share[0], min(len(data.test), t.epoch_eval_subset),
                                                          share[1]))
        test_dist = distributed.Dist() if d.sharded else d
        test = torch.utils.data.DataLoader(subset, batch_size=cfg.eval.batch_size, collate_fn=data.collate)

    started = time.perf_counter()
    losses: list[float] = []
    clip = cfg.optim.get("clip_grad_norm") or None
    stats: dict = {}  # the last step's gradient norm (before clipping), when clipping
    norms: list[float] = []

    with Bar(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=r.console,
             transient=False, disable=not d.main) as bar:
        job = bar.add_task("train", total=r.total, completed=progress.step, epoch=progress.epoch + 1, loss="-")

        last = [time.perf_counter()]  # the end of the previous step: a step's time includes its checkpoint
        budget = None if t.get("max_minutes") is None else 60.0 * t.max_minutes

        def out_of_time() -> bool:  # rank 0's clock decides for every rank
            return bool(d.broadcast(progress.seconds >= budget if d.main else None))

        def on_step(p: Progress, loss: float) -> None:
            now = time.perf_counter()
            p.seconds += now - last[0]
            last[0] = now
            losses.append(loss)
            if "grad_norm" in stats:
                norms.append(stats.pop("grad_norm"))
            bar.update(job, completed=p.step, epoch=p.epoch + 1, loss=f"{loss:.3f}")
            if p.step % t.log_every == 0:
                record = {"step": p.step, "epoch": p.epoch, "loss": sum(losses) / len(losses),
                          "lr": scheduler.get_last_lr()[0], "time": time.perf_counter() - started}
                if norms:  # the mean global gradient norm before clipping, over the steps since the last line
                    record["grad_norm"] = sum(norms) / len(norms)
                log(record)
                losses.clear()
                norms.clear()
            if t.ckpt_every and p.step % t.ckpt_every == 0:
                checkpoint(r)

        def on_epoch_end(p: Progress) -> None:
            record = {"epoch": p.epoch, "step": p.step, "time": time.perf_counter() - started}
            if p.batch:  # trainer.steps ended the run inside an epoch: epochs done + batches of the next
                record["batch"] = p.batch
            if test is not None:
                short = "acc" if task.metric == "accuracy" else task.metric
                for label, sub in (("largest", grid.largest), ("smallest", grid.smallest)):
                    record[f"{short}_{label}"] = evaluate(model, task, sub, calib, test, device, amp, test_dist,
                                                         keep_batchnorm=True)  # checkpointed next
                when = (f"epoch {p.epoch}" if not p.batch
                        else f"end (epoch {p.epoch} + {p.batch}/{r.per_epoch} batches)")
                bar.console.print(f"{when}: {task.metric} largest {record[f'{short}_largest']:.2f}, "
                                  f"smallest {record[f'{short}_smallest']:.2f} (first "
                                  f"{min(len(data.test), t.epoch_eval_subset)} test examples)")
            log(record)
            checkpoint(r)

        try:
            fit(model, task, r.sampler, r.optimizer, scheduler, data.train, epochs=t.epochs, batch_size=t.batch_size,
                seed=cfg.seed, device=device, amp=amp, distill=build_distill(cfg, r.teacher), progress=progress,
                steps=r.steps, max_steps=t.max_steps, num_workers=t.num_workers, collate=data.collate, dist=d,
                accumulate=r.accumulate, clip_grad_norm=clip, stats=stats, on_step=on_step,
                stop=None if budget is None else out_of_time,
                on_epoch_end=on_epoch_end)
        except NonFiniteLoss as e:
            board.close()
            if not d.main:  # rank 0 moves `latest` back and says so
                raise UsageError("diverged") from None
            raise _stopped(e.step, f"the loss is {e.loss}", run_dir, cfg, bad=e.step - 1) from None

    board.close()
    return started


def save(r: Recipe, first_step: int, started: float) -> Path:
    """The final checkpoint (unless the last step already wrote one), said on the console with the steps
    this process trained since ``first_step`` and the time since ``started``; returns its folder."""
    # rank 0 looks and every rank follows: a checkpoint is a collective, and on another node the run
    # folder may be missing (no shared disk) or not show the newest step yet (a network filesystem)
    final = r.d.broadcast(runs.latest_checkpoint(r.run_dir) if r.d.main else None)
    if final is None or final.name != f"step-{r.progress.step:08d}":
        final = checkpoint(r)
    done = r.progress.step - first_step
    r.console.print(f"trained {done} step{'' if done == 1 else 's'}"
                    + (f" (steps {first_step + 1}-{r.progress.step})" if first_step else "")
                    + f" in {time.perf_counter() - started:.1f}s; checkpoint {final}")
    limit = r.cfg.trainer.get("max_minutes")
    if limit is not None and r.progress.seconds >= 60 * limit:
        r.console.print(f"stopped at trainer.max_minutes={limit:g}: {r.progress.seconds / 60:.1f} minutes of training "
                        f"in all, step {r.progress.step}")
    return final
