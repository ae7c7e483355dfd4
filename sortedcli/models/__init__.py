"""One registry, one constructor, one contract for every architecture.

An entry builds the library model (torchvision / transformers class), fitted to the data, and sorts
it in place: the result is the library model with prefix-sliced layers and ``model.sortednet``
describing its depth units (and, for stacks of layers, how an exit reads out). ``dims`` says which
sorted dimensions the family supports and of what kind; levels come from config (``conf/dims``).
``tasks`` says which task contracts (:mod:`sortedcli.tasks`) it serves; ``tokenizer`` loads its
tokenizer from the model options (text models); ``save`` writes an export folder in the family's
ecosystem format; ``exportable`` says which sub-models that format can express; ``stack`` wraps a causal LM for
:mod:`sortedcli.decoding` (``sortednet generate``); ``init_options`` names the model options that only say
where the initial weights come from (a file, a weights name), not the architecture: a vision export
rebuilds its architecture without them (:func:`architecture`), so it needs no file but its own.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Callable

from ..errors import UsageError

if TYPE_CHECKING:
    from torch import nn


def _every(model, sub) -> bool:
    return True


@dataclass(frozen=True)
class ModelEntry:
    """A registered model. Its adapter module (``sortedcli.models.<family>``, which imports torchvision
    or transformers) is imported when the entry is first used, so the registry itself costs nothing to
    import and a vision run never imports transformers. ``hooks`` names the adapter's functions:
    ``build`` (required), ``tokenizer``, ``save``, ``exportable``, ``stack``, ``snapshot`` (see the module
    doc)."""

    name: str
    family: str
    description: str
    hooks: dict[str, str] = field(default_factory=dict)
    build_args: tuple = ()  # leading arguments of the adapter's build function (the torchvision arch)
    data: str = "fashion_mnist"  # the data `sortednet submodels` sizes the model for when none is given

    @property
    def adapter(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.family}")

    def _hook(self, role: str, default=None):
        name = self.hooks.get(role)
        return default if name is None else getattr(self.adapter, name)

    @property
    def dims(self) -> dict[str, str]:  # dim name -> space.FRACTION | space.COUNT
        return self.adapter.DIMS

    @property
    def tasks(self) -> tuple[str, ...]:
        return getattr(self.adapter, "TASKS", ("image_classification",))

    @property
    def build(self) -> Callable[..., nn.Module]:  # build(**data.model_args, **model options) -> sorted model
        return partial(self._hook("build"), *self.build_args)

    @property
    def tokenizer(self) -> Callable[[dict], object] | None:  # model options -> tokenizer (text models)
        return self._hook("tokenizer")

    @property
    def save(self) -> Callable[..., None]:  # save(folder, plain, meta, check inputs, tokenizer)
        from .. import export

        return self._hook("save", export.save_torch)

    @property
    def exportable(self) -> Callable[[nn.Module, object], bool]:  # (sorted model, sub) -> can be saved
        return self._hook("exportable", _every)

    @property
    def stack(self) -> Callable[[nn.Module], object] | None:  # model -> decoding.Stack (causal LMs: generate)
        return self._hook("stack")

    @property
    def snapshot(self) -> Callable[..., None] | None:
        """snapshot(model, tokenizer, folder, source): a pretrained model's config + tokenizer into the run
        folder (so that the run does not depend on model.pretrained staying where it was)."""
        return self._hook("snapshot")

    # options that load initial weights, not shape the model (an export rebuilds without them)
    init_options: tuple[str, ...] = ("weights",)


REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> None:
    REGISTRY[entry.name] = entry


TEXT = {"tokenizer": "tokenizer", "save": "save", "exportable": "exportable", "snapshot": "snapshot"}
for _arch, _desc in [("resnet18", "torchvision ResNet-18, 8 basic blocks"),
                     ("resnet34", "torchvision ResNet-34, 16 basic blocks"),
                     ("resnet50", "torchvision ResNet-50, 16 bottleneck blocks")]:
    register(ModelEntry(_arch, "resnet", _desc, {"build": "build_resnet"}, (_arch,)))
register(ModelEntry("resnet_tiny", "resnet",
                    "torchvision ResNet(BasicBlock, [1,1,1,1]) at 1/8 width, for tests and quick runs",
                    {"build": "build_resnet_tiny"}))
register(ModelEntry("bert", "bert",
                    "transformers BERT-family sequence classifier (BERT, RoBERTa, MiniLM): "
                    "model.pretrained=DIR_OR_HUB_ID or model.config={...}",
                    {"build": "build_encoder", **TEXT}, data="rotten_tomatoes"))
register(ModelEntry("mobilenet_v2", "mobilenet",
                    "torchvision MobileNetV2, 17 inverted-residual blocks, 10 of them droppable",
                    {"build": "build_mobilenet_v2"}))
register(ModelEntry("mobilenet_tiny", "mobilenet",
                    "torchvision MobileNetV2 with 3 small stages (6 blocks, 3 droppable), for tests",
                    {"build": "build_mobilenet_tiny"}))
register(ModelEntry("llama", "llama",
                    "transformers LlamaForCausalLM (Sorted LLaMA / SoFT): model.pretrained=DIR_OR_HUB_ID or "
                    "model.config={...}; exits through the model's own final norm and LM head",
                    {"build": "build_llama", **TEXT, "stack": "LlamaStack"}, data="hamlet"))
register(ModelEntry("llama_tiny", "llama",
                    "a randomly initialized 4-layer LLaMA (conf/model/llama_tiny.yaml), for tests and smoke runs",
                    {"build": "build_llama", **TEXT, "stack": "LlamaStack"}, data="hamlet"))


def entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(sorted(REGISTRY))}") from None


def create(name: str, **args) -> nn.Module:
    """Build the sorted model ``name`` (see :data:`REGISTRY`) from the data's ``model_args``
    (``num_classes``, ``in_channels``, ...) and the model options."""
    return entry(name).build(**args)


def tokenizer(options: dict):
    """The tokenizer of the model the options name, or None for models that read no text."""
    e = entry(options["name"])
    return None if e.tokenizer is None else e.tokenizer(options)


def architecture(options: dict) -> tuple[dict, dict]:
    """``(architecture, initial weights)``: the model options with the entry's ``init_options`` set to
    None (they build the same architecture with fresh weights) and those options as they were."""
    init = {k: options[k] for k in entry(options["name"]).init_options if options.get(k) is not None}
    return {**options, **dict.fromkeys(init)}, init
