"""Writing an export folder atomically: :func:`write` lets the model family's ``save`` (its registry
adapter's: a transformer as a Hugging Face folder, a vision model as safetensors + ``torch.export``,
see :mod:`sortedcli.models.vision`) fill a temporary folder, then renames it into place.

:func:`load` rebuilds the plain model of a vision export folder (a transformer export is a Hugging
Face folder: load it with ``Auto*.from_pretrained``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from torch import nn


def write(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill(tmp)`` write the export into a temporary folder, then rename it into ``folder``
    (replacing an older export only once the new one is complete)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load(folder: str | Path) -> nn.Module:
    """The plain model of a vision export folder, rebuilt from config.json and model.safetensors."""
    from .models import vision

    return vision.load(folder)
