"""The one place where config becomes objects: model, grid, sampler, optimizer, device.

Everything below takes plain config sections (DictConfig or dict) and returns library objects; the
commands compose them. Mistakes in the config become :class:`UsageError` with what to do.

Importing this module costs nothing (torch, the data and the engine are imported by the builders
that use them), so that :func:`check_settings` can refuse a bad setting before the heavy imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from . import models
from .errors import UsageError

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from .engine import Distill
    from .nest import Grid
    from .sampling import Sampler


def plain(section) -> dict:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


def build_data(cfg: DictConfig, data_cfg=None):
    """``(data, tokenizer)``: the model's tokenizer (None for models that read no text) and the data
    of ``cfg.data`` (or ``data_cfg``) prepared with it, checked to be a task the model serves."""
    from .data import build_data as _build_data

    tokenizer = models.tokenizer(plain(cfg.model))
    data = _build_data(cfg.data if data_cfg is None else data_cfg, tokenizer, models.entry(cfg.model.name).tasks)
    _check_task(cfg, data.task.name, data.name)
    return data, tokenizer


def _check_task(cfg: DictConfig, task: str, data: str) -> None:
    entry = models.entry(cfg.model.name)
    if task not in entry.tasks:
        raise UsageError(f"model {entry.name} does not do {task.replace('_', ' ')} "
                         f"(data={data}); it does {', '.join(t.replace('_', ' ') for t in entry.tasks)}")


def build_inputs(cfg: DictConfig) -> tuple[dict, object, str]:
    """``(model_args, example, unit)`` as :func:`build_data` would give them (the model's tokenizer
    sizes a language model's vocabulary), from the config alone, without reading the data: what
    ``sortednet submodels`` builds the model of ``train`` with and counts its FLOPs on."""
    from .data import input_spec, task_name

    tokenizer = models.tokenizer(plain(cfg.model))
    model_args, example, unit = input_spec(cfg.data, tokenizer, models.entry(cfg.model.name).tasks)
    _check_task(cfg, task_name(cfg.data), str(cfg.data.get("name")))
    return model_args, example, unit


def build_model(cfg: DictConfig, model_args: dict) -> nn.Module:
    """The sorted model named by ``cfg.model`` (see :mod:`sortedcli.models`), sized by the data's
    ``model_args`` (classes, image channels, labels)."""
    options = plain(cfg.model)
    name = options.pop("name")
    return models.create(name, **model_args, **options)


def build_grid(cfg: DictConfig, model: nn.Module) -> Grid:
    """The grid from ``cfg.dims`` (``dims=[width,depth]``): each dim's ``levels``, checked against
    what the model supports. ``levels: all`` on a count dim means every count from 1 to the model's
    number of depth units. Combinations of levels that select the same slices of ``model`` are one
    sub-model (:meth:`Grid.distinct`: e.g. heads 0.75 and 1 with 3 key/value heads)."""
    from .nest import COUNT, Dim, Grid, nesting, resolved

    entry = models.entry(cfg.model.name)
    chosen = plain(cfg.get("dims") or {})
    if not chosen:
        raise UsageError("no sorted dims chosen: pass e.g. 'dims=[width,depth]'")
    dims = []
    supported = entry.dims_of(model)
    for name, spec in chosen.items():
        if name not in supported:
            why = f" ({type(model).__name__}: {entry.why_not(model, name)})" if name in entry.dims else ""
            raise UsageError(f"model {entry.name} cannot be sorted along {name!r}{why}: it supports "
                             f"{', '.join(supported)}")
        kind, levels = supported[name], (spec or {}).get("levels")
        if kind == COUNT:
            n = nesting(model).depth
            if levels == "all":
                levels = list(range(1, n + 1))
            if not levels or not all(isinstance(v, int) and 1 <= v <= n for v in levels):
                raise UsageError(f"dims.{name}.levels must be 'all' or integers in 1..{n} for {entry.name}, "
                                 f"got {levels}")
        else:
            if not levels or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in levels):
                raise UsageError(f"dims.{name}.levels must be fractions in (0, 1], got {levels}")
            levels = [float(v) for v in levels]
        try:
            dims.append(Dim(name, kind, tuple(sorted(set(levels)))))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return Grid(tuple(dims)).distinct(lambda sub: resolved(model, sub))


def build_sampler(cfg: DictConfig, grid: Grid) -> Sampler:
    from .sampling import SAMPLERS, create_sampler

    options = plain(cfg.sampler)
    name = options.pop("name")
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    try:
        return create_sampler(name, grid, seed=cfg.seed, **options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"sampler={name}: {e}") from None


def build_distill(cfg: DictConfig, teacher: nn.Module | None = None) -> Distill:
    """``cfg.distill`` as the engine's :class:`~sortedcli.engine.Distill`; ``teacher``: the frozen
    starting model of ``distill.teacher=initial`` (:func:`build_teacher`)."""
    from .engine import Distill

    return Distill(**plain(cfg.get("distill") or {}), model=teacher)


#: the run's starting weights, kept in its pretrained/ folder by a run whose distillation teacher is
#: the starting model (``distill.teacher=initial``): a resume rebuilds that teacher from them, and
#: ``eval`` measures every exit's agreement with them
INITIAL_FILE = "initial.safetensors"

#: model options that give a model starting weights (a random init has none of them set)
STARTING_WEIGHTS = ("pretrained", "weights")


def initial_weights(run_dir) -> Path:
    from pathlib import Path

    from .runs import PRETRAINED_DIR

    return Path(run_dir) / PRETRAINED_DIR / INITIAL_FILE


def build_teacher(cfg: DictConfig, model: nn.Module, run_dir, resuming: bool, write: bool,
                  dtype: torch.dtype | None = None) -> nn.Module | None:
    """The frozen teacher of ``distill.teacher=initial`` (None for any other setting): a copy of the
    starting model (:func:`~sortedcli.engine.frozen_copy`: eval mode, no gradients, on ``model``'s
    device, in ``dtype`` when the run computes in it). A new run copies ``model`` as built, before any
    step, and (``write``: the rank that writes) keeps its weights in :func:`initial_weights`; a resumed
    run copies the architecture and loads those weights into it, never the trained ones."""
    import os

    from safetensors.torch import load_model, save_model

    from .engine import frozen_copy

    d = plain(cfg.get("distill") or {})
    if not (d.get("enabled") and d.get("teacher") == "initial"):
        return None
    path = initial_weights(run_dir)
    if resuming and not path.is_file():
        raise UsageError(f"distill.teacher=initial: {path}, the run's starting weights that its frozen teacher is "
                         "rebuilt from, is missing; the run cannot go on with the same teacher: start a new run")
    teacher = frozen_copy(model)
    if resuming:
        from safetensors import SafetensorError

        try:
            load_model(teacher, str(path), strict=True, device=str(next(teacher.parameters()).device))
        except (SafetensorError, OSError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"distill.teacher=initial: {path} does not hold this run's starting weights ({first}): "
                             "start a new run") from None
    elif write:  # through a temporary file and a rename: a killed write leaves no half file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_model(teacher, str(tmp))
        os.replace(tmp, path)
    return teacher.to(dtype) if dtype is not None else teacher


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    import torch

    o = plain(cfg.optim)
    # No weight decay on BatchNorm / bias parameters (1-D), as torchvision's reference recipes do.
    # Frozen weights (model.lora: all but the adapters) are not the optimizer's.
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o.get("momentum", 0.9),
                               nesterov=o.get("nesterov", False))
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))))
    raise UsageError(f"unknown optimizer {o['name']!r}: choose sgd or adamw")


def build_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype | None]:
    from .engine import autocast_dtype, pick_device

    try:
        device = pick_device(cfg.trainer.device)
        return device, autocast_dtype(device, cfg.trainer.precision)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None


# --- settings checked before a run starts: a wrongly typed or impossible value is the user's mistake

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: section -> key -> (what it must be, check). Keys a config does not have are not checked.
SETTINGS = {
    "trainer": {
        "epochs": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
        "batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
        "steps": ("null or an integer >= 1 (the run's length in optimizer steps)",
                  lambda v: v is None or (_is_int(v) and v >= 1)),
        "max_steps": ("null or an integer >= 0", lambda v: v is None or (_is_int(v) and v >= 0)),
        "max_minutes": ("null or a number of minutes > 0 (training time, over resumes too)",
                        lambda v: v is None or (_is_number(v) and v > 0)),
        "log_every": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
        "ckpt_every": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "keep_checkpoints": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
        "num_workers": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "epoch_eval": ("true or false", lambda v: isinstance(v, bool)),
        "epoch_eval_subset": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
        "tensorboard": ("true or false", lambda v: isinstance(v, bool)),
        "accumulate": ("an integer >= 1 (micro-batches per optimizer step)", lambda v: _is_int(v) and v >= 1),
        "devices": ("an integer >= 1 (processes)", lambda v: _is_int(v) and v >= 1),
        "sync_batchnorm": ("true or false", lambda v: isinstance(v, bool)),
        "strategy": ("ddp (replicas, gradients all-reduced) or fsdp (FSDP2: parameters, gradients and "
                     "optimizer state sharded)", lambda v: v in ("ddp", "fsdp")),
        "activation_checkpointing": ("true or false", lambda v: isinstance(v, bool)),
    },
    "optim": {
        "lr": ("a number > 0", lambda v: _is_number(v) and v > 0),
        "weight_decay": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
        "momentum": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
        "nesterov": ("true or false", lambda v: isinstance(v, bool)),
        "warmup_steps": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "clip_grad_norm": ("null or a number >= 0 (the largest global L2 norm of the gradients; null or 0: "
                           "no clipping)", lambda v: v is None or (_is_number(v) and v >= 0)),
        "betas": ("two numbers in [0, 1)", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                  and all(_is_number(b) and 0 <= b < 1 for b in v)),
    },
    "eval": {
        "batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
        "calib_batches": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
        "calib_batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    },
    "distill": {
        "enabled": ("true or false", lambda v: isinstance(v, bool)),
        "temperature": ("a number > 0", lambda v: _is_number(v) and v > 0),
        "alpha": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
        "teacher": ("self (the same step's full model) or initial (a frozen copy of the starting model)",
                    lambda v: v in ("self", "initial")),
        "anchor": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
        "anchor_only": ("true or false", lambda v: isinstance(v, bool)),
    },
    "plan": {"gpu_memory_gb": ("a number > 0 (GB of one GPU)", lambda v: _is_number(v) and v > 0)},
    "": {"seed": ("an integer", _is_int)},
}


def check_settings(cfg: DictConfig) -> None:
    """Refuse impossible or wrongly typed trainer / optimizer / eval / distill settings up front
    (``trainer.batch_size=-1``, ``optim.lr=abc``), with the key, what it must be and what it got."""
    for section, checks in SETTINGS.items():
        values = {k: cfg.get(k) for k in checks if k in cfg} if not section else plain(cfg.get(section) or {})
        for key, (want, ok) in checks.items():
            if key in values and not ok(values[key]):
                name = f"{section}.{key}" if section else key
                raise UsageError(f"{name} must be {want}, got {values[key]!r}")
    check_distill(cfg)


def check_distill(cfg: DictConfig) -> None:
    """Distillation settings that contradict each other or the model, refused before anything is written:
    an anchor without the frozen teacher, a teacher or anchor without distillation, and the starting
    model as teacher when there is none (a random init)."""
    d = plain(cfg.get("distill") or {})
    teacher, anchor = d.get("teacher", "self"), d.get("anchor", 0)
    if anchor and teacher != "initial":
        raise UsageError(f"distill.anchor={anchor} holds the full model to the starting model: it needs "
                         "distill.teacher=initial")
    if d.get("anchor_only") and not anchor:
        raise UsageError("distill.anchor_only=true trains the full model on the anchor alone: it needs "
                         "distill.anchor > 0 (and distill.teacher=initial)")
    if (teacher != "self" or anchor) and not d.get("enabled"):
        raise UsageError(f"distill.teacher={teacher} distill.anchor={anchor} act only with distillation on: add "
                         "distill.enabled=true")
    if teacher == "initial" and (cfg.get("trainer") or {}).get("strategy") == "fsdp":
        raise UsageError("distill.teacher=initial keeps a whole frozen copy of the model on every process, which "
                         "trainer.strategy=fsdp does not build: use trainer.strategy=ddp, or distill.teacher=self")
    model = plain(cfg.get("model") or {})
    if teacher == "initial" and cfg.get("resume") is None and model \
            and not any(model.get(k) for k in STARTING_WEIGHTS):
        raise UsageError(f"distill.teacher=initial distils from the starting model, and model={model.get('name')} "
                         "starts from a random init: pass model.pretrained=DIR (or model.weights=...), or use "
                         "distill.teacher=self")
