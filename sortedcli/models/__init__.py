"""One registry, one constructor, one contract for every architecture.

Each registered name maps to an adapter of its family (:class:`~sortedcli.models.adapter.Adapter`:
``vision``-based ``resnet`` and ``mobilenet``, ``decoder`` for Hugging Face causal LMs, ``encoder``
for Hugging Face sequence classifiers). The family's module (which imports torchvision or
transformers) is imported when the name is first used, so the registry itself costs nothing to import
and a vision run never imports transformers.

To add a family: write one module here with an ``Adapter`` subclass and ``Family = ThatClass`` at its
end, register its names below, and add ``conf/model/NAME.yaml``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from .adapter import Adapter


@dataclass(frozen=True)
class Registration:
    """A registered name: its family module, a one-line description, the data ``sortednet submodels``
    sizes it for when none is given, and the fixed build options of the name (e.g. the architecture)."""

    name: str
    family: str
    description: str
    data: str = "fashion_mnist"
    options: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, Registration] = {}
_ADAPTERS: dict[str, Adapter] = {}


def register(name: str, family: str, description: str, data: str = "fashion_mnist", **options: Any) -> None:
    REGISTRY[name] = Registration(name, family, description, data, options)
    _ADAPTERS.pop(name, None)


for _arch, _desc in [("resnet18", "torchvision ResNet-18, 8 basic blocks"),
                     ("resnet34", "torchvision ResNet-34, 16 basic blocks"),
                     ("resnet50", "torchvision ResNet-50, 16 bottleneck blocks")]:
    register(_arch, "resnet", _desc, arch=_arch)
register("resnet_tiny", "resnet", "torchvision ResNet(BasicBlock, [1,1,1,1]) at 1/8 width, for tests and quick runs",
         arch="tiny")
register("mobilenet_v2", "mobilenet", "torchvision MobileNetV2, 17 inverted-residual blocks, 10 of them droppable",
         arch="mobilenet_v2")
register("mobilenet_tiny", "mobilenet", "torchvision MobileNetV2 with 3 small stages (6 blocks, 3 droppable), for tests",
         arch="tiny")
register("encoder", "encoder", "any transformers encoder sequence classifier (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, "
         "DistilBERT, ...): model.pretrained=DIR_OR_HUB_ID or model.config={model_type: ..., ...}",
         data="rotten_tomatoes")
register("bert", "encoder", "transformers BERT-family sequence classifier (BERT, RoBERTa, MiniLM): "
         "model.pretrained=DIR_OR_HUB_ID or model.config={...}", data="rotten_tomatoes")
register("causal_lm", "decoder", "any transformers decoder LLM of the LLaMA layout (LLaMA, Mistral, Qwen2/3, Gemma, "
         "Phi-3, OLMo 2, ...): model.pretrained=DIR_OR_HUB_ID_OR_GGUF or model.config={model_type: ..., ...}; "
         "exits through the model's own final norm and LM head", data="hamlet")
register("llama", "decoder", "transformers LlamaForCausalLM (Sorted LLaMA / SoFT): model.pretrained=DIR_OR_HUB_ID or "
         "model.config={...}; exits through the model's own final norm and LM head", data="hamlet",
         require="LlamaForCausalLM")
register("llama_tiny", "decoder", "a randomly initialized 4-layer LLaMA (conf/model/llama_tiny.yaml), for tests and "
         "smoke runs", data="hamlet", require="LlamaForCausalLM")


def entry(name: str) -> Adapter:
    """The adapter registered as ``name`` (made once, on first use)."""
    if name not in _ADAPTERS:
        try:
            reg = REGISTRY[name]
        except KeyError:
            raise UsageError(f"unknown model {name!r}: choose one of {', '.join(sorted(REGISTRY))}") from None
        family = importlib.import_module(f"{__name__}.{reg.family}").Family
        _ADAPTERS[name] = family(reg.name, reg.description, reg.family, reg.data, **reg.options)
    return _ADAPTERS[name]


def create(name: str, **args) -> nn.Module:
    """Build the sorted model ``name`` (see :data:`REGISTRY`) from the data's ``model_args``
    (``num_classes``, ``in_channels``, ...) and the model options."""
    return entry(name).build(**args)


def tokenizer(options: dict):
    """The tokenizer of the model the options name, or None for models that read no text."""
    return entry(options["name"]).tokenizer(options)


def architecture(options: dict) -> tuple[dict, dict]:
    """``(architecture, initial weights)``: the model options with the entry's ``init_options`` set to
    None (they build the same architecture with fresh weights) and those options as they were."""
    init = {k: options[k] for k in entry(options["name"]).init_options if options.get(k) is not None}
    return {**options, **dict.fromkeys(init)}, init
