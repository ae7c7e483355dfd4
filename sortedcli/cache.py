"""Where sortednet keeps what it makes once and reuses from any folder: the project's BPE tokenizer,
converted models. One place per user, like ``HF_HOME`` / ``TORCH_HOME``:

    $SORTEDNET_CACHE, else $XDG_CACHE_HOME/sortednet, else ~/.cache/sortednet

Never relative to the current folder, so a command run from another folder finds the same files.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (absolute), or ``parts`` inside it; created by whoever writes there."""
    root = os.environ.get("SORTEDNET_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sortednet"
    return Path(root).expanduser().resolve().joinpath(*parts)
