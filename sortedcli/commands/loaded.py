"""A trained run loaded back: its config, data, sorted model with weights, and grid."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .. import models, runs
from ..build import build_data, build_device, build_grid, build_model, check_settings, plain
from ..errors import UsageError
from ..nest import Grid
from ..strict import check_latency, check_test_subset


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

    @cached_property
    def record(self) -> dict:
        """The checkpoint measured: ``{"step", "path" (relative to run_dir), "fingerprint"}`` (read once)."""
        return runs.checkpoint_record(self.run_dir, self.ckpt)


def load_run(cfg: DictConfig) -> LoadedRun:
    """The run named by ``cfg.ckpt`` (default: the newest under ``cfg.paths.runs``), on the device
    that ``cfg.trainer`` asks for."""
    check_settings(cfg)  # eval.batch_size=0 and the like, before anything is read
    run_dir, ckpt = runs.resolve_checkpoint(cfg.get("ckpt"), cfg.paths.runs)
    run_cfg = runs.checkpoint_config(ckpt)
    if (run_dir / "config.yaml").is_file():
        check_belongs(ckpt, run_cfg, run_dir, runs.load_config(run_dir))
    with_run_eval_settings(cfg, run_cfg)
    check_latency(cfg)  # this command's and the run's own eval.latency, before any data is read
    check_test_subset(cfg)
    n = cfg.eval.get("test_subset")
    # eval.test_subset replaces the run's data.test_subset and counts examples as the model sees them
    # (images, sequences, blocks of tokens), whatever the data's own subset counts (documents)
    data_cfg = run_cfg.data if n is None else OmegaConf.merge(run_cfg.data, {"test_subset": None})
    if cfg.eval.get("val_subset") is not None:  # eval's cost: score the first N validation items
        data_cfg = OmegaConf.merge(data_cfg, {"val_subset": cfg.eval.val_subset})
    source = runs.self_contained(run_cfg, run_dir)  # the run's own copy of the pretrained config + tokenizer
    data, tokenizer = build_data(source, data_cfg)
    if n is not None and n < len(data.test):
        data.test = torch.utils.data.Subset(data.test, range(n))
    model = restore(ckpt, run_cfg, source, data.model_args)
    grid = build_grid(run_cfg, model)
    device, amp = build_device(cfg)
    model.to(device).eval()
    return LoadedRun(run_dir, ckpt, run_cfg, data, tokenizer, model, grid, device, amp)


def restore(ckpt: Path, run_cfg: DictConfig, source: DictConfig, model_args: dict) -> nn.Module:
    """The model of ``source.model`` with checkpoint ``ckpt``'s weights, ready for inference (LoRA adapters
    merged). The architecture is built without its initial weights (model.weights or pretrained ones:
    read, importance-sorted, then overwritten; their file may have moved since training), checked
    against the checkpoint's names and shapes, and the weights are read into it a tensor at a time (a
    sharded checkpoint a shard at a time): the model is held once, never beside a state_dict of itself."""
    architecture, _ = models.architecture(plain(source.model))
    model = build_model(OmegaConf.create({"model": architecture}), model_args)
    check_fits(ckpt, runs.checkpoint_shapes(ckpt), model, run_cfg.model.name)
    runs.load_into(model, ckpt)
    return models.entry(run_cfg.model.name).for_inference(model)


def with_run_eval_settings(cfg: DictConfig, run_cfg: DictConfig) -> None:
    """The run's own ``eval:`` settings (a recipe's ``eval.batch_size: 8`` for a 49k-token head,
    ``eval.test_subset``) become ``cfg.eval``'s, except the keys given on this command line: a recipe
    sizes its evaluation once, and eval/export/generate follow it. Settings are re-checked after."""
    theirs = run_cfg.get("eval")
    if not theirs:
        return
    given = set()
    try:
        from hydra.core.hydra_config import HydraConfig

        given = {o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task}
    except ValueError:  # not under Hydra (called from Python): cfg is what the caller built
        return
    keep = {k: v for k, v in theirs.items()
            if k in cfg.eval and f"eval.{k}" not in given and not any(g.startswith(f"eval.{k}.") for g in given)}
    if keep:
        OmegaConf.set_struct(cfg, False)
        cfg.eval = OmegaConf.merge(cfg.eval, keep)
        check_settings(cfg)


def check_belongs(ckpt: Path, ckpt_cfg: DictConfig, run_dir: Path, run_cfg: DictConfig) -> None:
    """Refuse weights that another run wrote (a LLaMA file dropped into a ResNet run): results written
    into ``run_dir`` must measure that run's model, data and grid."""
    for what, key in (("model", "model.name"), ("data", "data.name"), ("grid", "dims")):
        mine, theirs = OmegaConf.select(run_cfg, key), OmegaConf.select(ckpt_cfg, key)
        mine = plain(mine) if isinstance(mine, DictConfig) else mine
        theirs = plain(theirs) if isinstance(theirs, DictConfig) else theirs
        if mine != theirs:
            raise UsageError(f"{ckpt / runs.MODEL_FILE} was trained with another {what} ({theirs}) than the run "
                             f"{run_dir} ({mine}): it is not this run's checkpoint; pass --ckpt the run it came "
                             "from")


def check_fits(ckpt: Path, shapes: dict[str, tuple[int, ...]], model: nn.Module, name: str) -> None:
    """The checkpoint's tensor names and ``shapes`` (:func:`runs.checkpoint_shapes`) are the model's,
    before anything is loaded or written."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v) for k, v in shapes.items()}
    missing, extra = [k for k in want if k not in have], [k for k in have if k not in want]
    wrong = [k for k in want if k in have and want[k] != have[k]]
    if missing or extra or wrong:
        parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
            ([f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []) + \
            ([f"{len(wrong)} of another shape (e.g. {wrong[0]} {list(have[wrong[0]])}, the model has "
              f"{list(want[wrong[0]])})"] if wrong else [])
        raise UsageError(f"checkpoint {ckpt / runs.MODEL_FILE} does not fit {name}: of its tensors "
                         + ", ".join(parts) + "; pass --ckpt the run that wrote it")
