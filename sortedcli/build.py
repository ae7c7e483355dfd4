"""The one place where config becomes objects: model, grid, sampler, optimizer, device.

Everything below takes plain config sections (DictConfig or dict) and returns library objects; the
commands compose them. Mistakes in the config become :class:`UsageError` with what to do.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import models
from .data import build_data as _build_data
from .engine import Distill, autocast_dtype, pick_device
from .errors import UsageError
from .nest import COUNT, Dim, Grid, nesting
from .sampling import SAMPLERS, Sampler, create_sampler


def plain(section) -> dict:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


def build_data(cfg: DictConfig, data_cfg=None):
    """``(data, tokenizer)``: the model's tokenizer (None for models that read no text) and the data
    of ``cfg.data`` (or ``data_cfg``) prepared with it, checked to be a task the model serves."""
    tokenizer = models.tokenizer(plain(cfg.model))
    data = _build_data(cfg.data if data_cfg is None else data_cfg, tokenizer)
    entry = models.entry(cfg.model.name)
    if data.task.name not in entry.tasks:
        raise UsageError(f"model {entry.name} does not do {data.task.name.replace('_', ' ')} "
                         f"(data={data.name}); it does {', '.join(t.replace('_', ' ') for t in entry.tasks)}")
    return data, tokenizer


def build_model(cfg: DictConfig, model_args: dict) -> nn.Module:
    """The sorted model named by ``cfg.model`` (see :mod:`sortedcli.models`), sized by the data's
    ``model_args`` (classes, image channels, labels)."""
    options = plain(cfg.model)
    name = options.pop("name")
    return models.create(name, **model_args, **options)


def build_grid(cfg: DictConfig, model: nn.Module) -> Grid:
    """The grid from ``cfg.dims`` (``dims=[width,depth]``): each dim's ``levels``, checked against
    what the model supports. ``levels: all`` on a count dim means every count from 1 to the model's
    number of depth units."""
    entry = models.entry(cfg.model.name)
    chosen = plain(cfg.get("dims") or {})
    if not chosen:
        raise UsageError("no sorted dims chosen: pass e.g. 'dims=[width,depth]'")
    dims = []
    for name, spec in chosen.items():
        if name not in entry.dims:
            raise UsageError(f"model {entry.name} cannot be sorted along {name!r}: it supports "
                             f"{', '.join(entry.dims)}")
        kind, levels = entry.dims[name], (spec or {}).get("levels")
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
    return Grid(tuple(dims))


def build_sampler(cfg: DictConfig, grid: Grid) -> Sampler:
    options = plain(cfg.sampler)
    name = options.pop("name")
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    try:
        return create_sampler(name, grid, seed=cfg.seed, **options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"sampler={name}: {e}") from None


def build_distill(cfg: DictConfig) -> Distill:
    return Distill(**plain(cfg.get("distill") or {}))


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = plain(cfg.optim)
    # No weight decay on BatchNorm / bias parameters (1-D), as torchvision's reference recipes do.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o.get("momentum", 0.9),
                               nesterov=o.get("nesterov", False))
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))))
    raise UsageError(f"unknown optimizer {o['name']!r}: choose sgd or adamw")


def build_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype | None]:
    try:
        device = pick_device(cfg.trainer.device)
        return device, autocast_dtype(device, cfg.trainer.precision)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
