"""Where sortednet keeps what it makes once and reuses from any folder: the project's BPE tokenizer,
converted models. One place per user, like ``HF_HOME`` / ``TORCH_HOME``:

    $SORTEDNET_CACHE, else $XDG_CACHE_HOME/sortednet, else ~/.cache/sortednet

Never relative to the current folder, so a command run from another folder finds the same files.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (absolute), or ``parts`` inside it; created by whoever writes there
    (:func:`make_dir`)."""
    root = os.environ.get("SORTEDNET_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sortednet"
    return Path(root).expanduser().resolve().joinpath(*parts)


def origin() -> str | None:
    """The environment setting that chose :func:`cache_dir` (``SORTEDNET_CACHE=/proc/x``), or None: the default."""
    for name in ("SORTEDNET_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def make_dir(folder: Path, chosen_by: str | None = None) -> Path:
    """``folder`` created (with its parents) and writable, before any work is done for it; else a
    :class:`UsageError` that names the setting that chose it (``chosen_by``, ``data.cache_dir=DIR``; by
    default the cache's own, ``SORTEDNET_CACHE=/proc/x``) and the path (it was a 71-line traceback
    after the data was read, and a run folder left behind)."""
    from .errors import UsageError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
    except OSError as e:
        setting = chosen_by or origin()
        where = f"{e.filename or folder} ({e.strerror or e})"
        if setting is None:
            raise UsageError(f"cannot write sortednet's cache {where}: set SORTEDNET_CACHE to a writable folder") from None
        name = setting.partition("=")[0]
        raise UsageError(f"{setting}: cannot write sortednet's cache there, {where}: point {name} at a writable "
                         f"folder{'' if '.' in name else ', or unset it'}") from None
    return folder
