"""A trained run loaded back: its config, data, sorted model with weights, and grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .. import runs
from ..build import build_data, build_device, build_grid, build_model
from ..errors import UsageError
from ..nest import Grid


@dataclass
class LoadedRun:
    run_dir: Path
    ckpt: Path
    cfg: DictConfig  # the run's own resolved config
    data: object  # see sortedcli.data: VisionData, TextData, ...
    tokenizer: object  # None for models that read no text
    model: nn.Module
    grid: Grid
    device: torch.device
    amp: torch.dtype | None


def load_run(cfg: DictConfig) -> LoadedRun:
    """The run named by ``cfg.ckpt`` (default: the newest under ``cfg.paths.runs``), on the device
    that ``cfg.trainer`` asks for."""
    run_dir, ckpt = runs.resolve_checkpoint(cfg.get("ckpt"), cfg.paths.runs)
    weights, run_cfg = runs.load_weights(ckpt)
    data_cfg = run_cfg.data
    if cfg.eval.get("test_subset") is not None:
        data_cfg = OmegaConf.merge(data_cfg, {"test_subset": cfg.eval.test_subset})
    data, tokenizer = build_data(run_cfg, data_cfg)
    model = build_model(run_cfg, data.model_args)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"checkpoint {ckpt} does not fit {run_cfg.model.name}: {first}") from None
    grid = build_grid(run_cfg, model)
    device, amp = build_device(cfg)
    model.to(device).eval()
    return LoadedRun(run_dir, ckpt, run_cfg, data, tokenizer, model, grid, device, amp)
