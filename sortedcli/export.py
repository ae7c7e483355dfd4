"""The exported-model format: a plain library model cut out of a sorted one.

An export folder holds:

- ``model.safetensors``: the plain model's state_dict (torchvision keys, smaller shapes);
- ``config.json``: what rebuilds it (model name and options, classes, input channels and size, the
  sub-model's levels) plus what it scores (FLOPs, parameters, accuracy) and the normalization;
- ``model.pt2``: the same model as a ``torch.export`` program, which plain torch loads and runs
  without sortedcli: ``torch.export.load("model.pt2").module()(x)``.

``load(folder)`` rebuilds the plain ``nn.Module`` from the first two (this needs sortedcli, as it
cuts the architecture out the same way the export did, then loads the weights strictly).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import models
from .errors import UsageError
from .nest import SubModel, extract

FORMAT = "sortednet-export/1"


def write(folder: Path, plain: nn.Module, config: dict, example: torch.Tensor) -> Path:
    """Write ``plain`` into ``folder`` atomically (a temporary folder renamed into place); the
    ``torch.export`` program is checked to reproduce ``plain`` on ``example`` before it is kept."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain = plain.eval()
    state = {k: v.detach().contiguous().cpu() for k, v in plain.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=2) + "\n")
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.cat([example[:1], example[:1]])  # batch 1 would be specialized to a constant
    program = torch.export.export(plain, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp / "model.pt2"))
    reloaded = torch.export.load(str(tmp / "model.pt2")).module()
    with torch.no_grad():
        odd = torch.cat([example, example[:1]])  # a batch size other than the traced one
        if not torch.allclose(reloaded(odd), plain(odd), atol=1e-4, rtol=1e-4):
            raise RuntimeError("the torch.export program does not reproduce the exported model")
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load(folder: str | Path) -> nn.Module:
    """The plain model of an export folder, rebuilt from config.json and model.safetensors."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder} is not a readable sortednet export ({e})") from None
    if config.get("format") != FORMAT:
        raise UsageError(f"{folder}/config.json is not a {FORMAT} file")
    options = dict(config["model"])
    sorted_model = models.create(options.pop("name"), num_classes=config["num_classes"],
                                 in_channels=config["in_channels"], **options)
    size = config["image_size"]
    example = torch.zeros(1, config["in_channels"], size, size)
    plain = extract(sorted_model, SubModel(tuple(config["submodel"].items())), example)
    plain.load_state_dict(state, strict=True)
    return plain.eval()
