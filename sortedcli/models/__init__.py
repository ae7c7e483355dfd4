"""One registry, one constructor, one contract for every architecture.

An entry builds the library model (torchvision / transformers class), fitted to the data, and sorts
it in place: the result is the library model with prefix-sliced layers and ``model.sortednet``
describing its depth units. ``dims`` says which sorted dimensions the family supports and of what
kind; levels come from config (``conf/dims``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from ..errors import UsageError
from . import mobilenet, resnet


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    dims: dict[str, str]  # dim name -> space.FRACTION | space.COUNT
    build: Callable[..., nn.Module]  # build(num_classes=, in_channels=, **model options) -> sorted model
    description: str


REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> None:
    REGISTRY[entry.name] = entry


for _arch, _desc in [("resnet18", "torchvision ResNet-18, 8 basic blocks"),
                     ("resnet34", "torchvision ResNet-34, 16 basic blocks"),
                     ("resnet50", "torchvision ResNet-50, 16 bottleneck blocks")]:
    register(ModelEntry(_arch, "resnet", resnet.DIMS, partial(resnet.build_resnet, _arch), _desc))
register(ModelEntry("resnet_tiny", "resnet", resnet.DIMS, resnet.build_resnet_tiny,
                    "torchvision ResNet(BasicBlock, [1,1,1,1]) at 1/8 width, for tests and quick runs"))
register(ModelEntry("mobilenet_v2", "mobilenet", mobilenet.DIMS, mobilenet.build_mobilenet_v2,
                    "torchvision MobileNetV2, 17 inverted-residual blocks, 10 of them droppable"))
register(ModelEntry("mobilenet_tiny", "mobilenet", mobilenet.DIMS, mobilenet.build_mobilenet_tiny,
                    "torchvision MobileNetV2 with 3 small stages (6 blocks, 3 droppable), for tests"))


def entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(sorted(REGISTRY))}") from None


def create(name: str, num_classes: int, in_channels: int, **options) -> nn.Module:
    """Build the sorted model ``name`` (see :data:`REGISTRY`)."""
    return entry(name).build(num_classes=num_classes, in_channels=in_channels, **options)
