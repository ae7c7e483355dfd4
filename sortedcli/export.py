"""The exported-model formats: a plain library model cut out of a sorted one.

:func:`write` fills an export folder atomically (a temporary folder renamed into place) with the
format of the model's family (its registry entry's ``save``): a transformer as a Hugging Face folder
(:func:`sortedcli.models.hf.save`), a vision model as below (:func:`save_torch`).

A vision export folder holds:

- ``model.safetensors``: the plain model's state_dict (torchvision keys, smaller shapes);
- ``config.json``: what rebuilds it (model name and options, classes, input channels and size, the
  sub-model's levels) plus what it scores (FLOPs, parameters, accuracy) and the normalization;
- ``model.pt2``: the same model as a ``torch.export`` program, which plain torch loads and runs
  without sortedcli: ``torch.export.load("model.pt2").module()(x)``.

``load(folder)`` rebuilds the plain ``nn.Module`` from the first two (this needs sortedcli, as it
cuts the architecture out the same way the export did, then loads the weights strictly). The folder is
self-contained: ``config.json``'s ``model`` is the architecture only; the file or weights name the run
started from is kept as provenance under ``initial_weights`` and never read again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UsageError
from .nest import SubModel, extract

FORMAT = "sortednet-export/1"


def save_torch(folder: Path, plain: nn.Module, config: dict, example: torch.Tensor, tokenizer=None) -> None:
    """A vision export: safetensors + config.json + a ``torch.export`` program, which is checked to
    reproduce ``plain`` on ``example`` (a batch of inputs) before it is kept."""
    folder = Path(folder)
    plain = plain.eval()
    state = {k: v.detach().contiguous().cpu() for k, v in plain.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=2) + "\n")
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.cat([example[:1], example[:1]])  # batch 1 would be specialized to a constant
    program = torch.export.export(plain, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    reloaded = torch.export.load(str(folder / "model.pt2")).module()
    with torch.no_grad():
        odd = torch.cat([example, example[:1]])  # a batch size other than the traced one
        if not torch.allclose(reloaded(odd), plain(odd), atol=1e-4, rtol=1e-4):
            raise RuntimeError("the torch.export program does not reproduce the exported model")


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
    """The plain model of a vision export folder, rebuilt from config.json and model.safetensors.
    (A transformer export is a Hugging Face folder: load it with ``Auto*.from_pretrained``.)"""
    from . import models

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder} is not a readable sortednet export ({e})") from None
    if config.get("format") != FORMAT:
        raise UsageError(f"{folder}/config.json is not a {FORMAT} file")
    options, _ = models.architecture(dict(config["model"]))  # older exports named the initial weights here
    sorted_model = models.create(options.pop("name"), num_classes=config["num_classes"],
                                 in_channels=config["in_channels"], **options)
    size = config["image_size"]
    example = torch.zeros(1, config["in_channels"], size, size)
    plain = extract(sorted_model, SubModel(tuple(config["submodel"].items())), example)
    plain.load_state_dict(state, strict=True)
    return plain.eval()
