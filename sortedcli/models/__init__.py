"""One registry, one constructor, one contract for every architecture.

An entry builds the library model (torchvision / transformers class), fitted to the data, and sorts
it in place: the result is the library model with prefix-sliced layers and ``model.sortednet``
describing its depth units (and, for stacks of layers, how an exit reads out). ``dims`` says which
sorted dimensions the family supports and of what kind; levels come from config (``conf/dims``).
``tasks`` says which task contracts (:mod:`sortedcli.tasks`) it serves; ``tokenizer`` loads its
tokenizer from the model options (text models); ``save`` writes an export folder in the family's
ecosystem format; ``exportable`` says which sub-models that format can express; ``stack`` wraps a causal LM for
:mod:`sortedcli.decoding` (``sortednet generate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from ..errors import UsageError
from . import bert, hf, llama, mobilenet, resnet
from .. import export


def _every(model, sub) -> bool:
    return True


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    dims: dict[str, str]  # dim name -> space.FRACTION | space.COUNT
    build: Callable[..., nn.Module]  # build(**data.model_args, **model options) -> sorted model
    description: str
    tasks: tuple[str, ...] = ("image_classification",)
    tokenizer: Callable[[dict], object] | None = None  # model options -> tokenizer (text models)
    save: Callable[..., None] = export.save_torch  # save(folder, plain, meta, check inputs, tokenizer)
    exportable: Callable[[nn.Module, object], bool] = _every  # (sorted model, sub) -> can be saved
    stack: Callable[[nn.Module], object] | None = None  # model -> decoding.Stack (causal LMs: generate)
    # snapshot(model, tokenizer, folder, source): a pretrained model's config + tokenizer into the run folder
    snapshot: Callable[..., None] | None = None


REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> None:
    REGISTRY[entry.name] = entry


for _arch, _desc in [("resnet18", "torchvision ResNet-18, 8 basic blocks"),
                     ("resnet34", "torchvision ResNet-34, 16 basic blocks"),
                     ("resnet50", "torchvision ResNet-50, 16 bottleneck blocks")]:
    register(ModelEntry(_arch, "resnet", resnet.DIMS, partial(resnet.build_resnet, _arch), _desc))
register(ModelEntry("resnet_tiny", "resnet", resnet.DIMS, resnet.build_resnet_tiny,
                    "torchvision ResNet(BasicBlock, [1,1,1,1]) at 1/8 width, for tests and quick runs"))
register(ModelEntry("bert", "bert", bert.DIMS, bert.build_encoder,
                    "transformers BERT-family sequence classifier (BERT, RoBERTa, MiniLM): "
                    "model.pretrained=DIR_OR_HUB_ID or model.config={...}",
                    tasks=bert.TASKS, tokenizer=hf.tokenizer, save=bert.save, exportable=bert.exportable, snapshot=hf.snapshot))
register(ModelEntry("mobilenet_v2", "mobilenet", mobilenet.DIMS, mobilenet.build_mobilenet_v2,
                    "torchvision MobileNetV2, 17 inverted-residual blocks, 10 of them droppable"))
register(ModelEntry("mobilenet_tiny", "mobilenet", mobilenet.DIMS, mobilenet.build_mobilenet_tiny,
                    "torchvision MobileNetV2 with 3 small stages (6 blocks, 3 droppable), for tests"))
register(ModelEntry("llama", "llama", llama.DIMS, llama.build_llama,
                    "transformers LlamaForCausalLM (Sorted LLaMA / SoFT): model.pretrained=DIR_OR_HUB_ID or "
                    "model.config={...}; exits through the model's own final norm and LM head",
                    tasks=llama.TASKS, tokenizer=llama.tokenizer, save=llama.save, exportable=llama.exportable,
                    stack=llama.LlamaStack, snapshot=hf.snapshot))
register(ModelEntry("llama_tiny", "llama", llama.DIMS, llama.build_llama,
                    "a randomly initialized 4-layer LLaMA (conf/model/llama_tiny.yaml), for tests and smoke runs",
                    tasks=llama.TASKS, tokenizer=llama.tokenizer, save=llama.save, exportable=llama.exportable,
                    stack=llama.LlamaStack, snapshot=hf.snapshot))


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
