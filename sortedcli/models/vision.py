"""The vision family's adapter and export format (torchvision CNNs: ResNet, MobileNetV2).

A vision export folder holds:

- ``model.safetensors``: the plain model's state_dict (torchvision keys, smaller shapes), with its
  BatchNorm folded into the convolutions as a deployed model has it (:func:`~sortedcli.nest.fold_batchnorm`:
  the convolutions gain a ``bias``, the folded BatchNorm layers are ``nn.Identity`` and have no keys;
  ``config.json``'s ``batchnorm_folded`` counts them, ``params`` stays the sub-model's count as ``eval``
  reports it and ``folded_params`` is the deployed model's);
- ``config.json``: what rebuilds it (model name and options, classes, input channels and size, the
  sub-model's levels) plus what it scores (FLOPs, parameters, accuracy) and the normalization;
- ``model.pt2``: the same model as a ``torch.export`` program, which plain torch loads and runs
  without sortedcli: ``torch.export.load("model.pt2").module()(x)``.

:func:`load` rebuilds the plain ``nn.Module`` from the first two (this needs sortedcli, as it cuts
the architecture out the same way the export did, then loads the weights strictly). The folder is
self-contained: ``config.json``'s ``model`` is the architecture only; the file or weights name the run
started from is kept as provenance under ``initial_weights`` and never read again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..nest import COUNT, FRACTION, SubModel, extract, fold_batchnorm
from .adapter import Adapter

FORMAT = "sortednet-export/1"


class VisionFamily(Adapter):
    """A torchvision CNN sorted along width and depth; subclasses say how to build and group it."""

    dims = {"width": FRACTION, "depth": COUNT}
    tasks = ("image_classification",)
    exports = "safetensors + torch.export (model.pt2)"

    def save(self, folder, plain: nn.Module, meta: dict, example, tokenizer=None, max_shard_size=None) -> None:
        save(folder, plain, meta, example)  # one weights file: torchvision models are small


def save(folder: Path, plain: nn.Module, config: dict, example: torch.Tensor) -> None:
    """A vision export: safetensors + config.json + a ``torch.export`` program, of ``plain`` with its
    BatchNorm folded into the convolutions (checked to compute what ``plain`` computes on ``example``, a
    batch of inputs), and the program checked to reproduce it, before it is kept. ``config`` gets
    ``batchnorm_folded`` and ``folded_params``."""
    import copy

    from safetensors.torch import save_file

    folder = Path(folder)
    unfolded = plain.eval()
    plain = copy.deepcopy(unfolded)
    config["batchnorm_folded"] = fold_batchnorm(plain, example)
    config["folded_params"] = sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        want, got = unfolded(example), plain(example)
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"the model with its BatchNorm folded differs from the cut-out model: max |diff| = "
                           f"{(got - want).abs().max().item():.3g}")
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


def load(folder: str | Path) -> nn.Module:
    """The plain model of a vision export folder, rebuilt from config.json and model.safetensors."""
    from safetensors.torch import load_file

    from . import architecture, create

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder} is not a readable sortednet export ({e})") from None
    if config.get("format") != FORMAT:
        raise UsageError(f"{folder}/config.json is not a {FORMAT} file")
    options, _ = architecture(dict(config["model"]))  # older exports named the initial weights here
    sorted_model = create(options.pop("name"), num_classes=config["num_classes"],
                          in_channels=config["in_channels"], **options)
    size = config["image_size"]
    example = torch.zeros(1, config["in_channels"], size, size)
    plain = extract(sorted_model, SubModel(tuple(config["submodel"].items())), example)
    if config.get("batchnorm_folded"):  # the same layers folded (their values come from the file)
        fold_batchnorm(plain, example)
    plain.load_state_dict(state, strict=True)
    return plain.eval()
