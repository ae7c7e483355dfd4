"""The contract between a model family and the rest of sortednet: one :class:`Adapter` subclass per
family (vision CNNs, Hugging Face decoders, Hugging Face encoders), registered under one or more
names in :mod:`sortedcli.models`.

A family answers, for the models it builds:

- ``build(**data.model_args, **model options)``: the library model (a torchvision or transformers
  class), fitted to the data and sorted in place (:func:`sortedcli.nest.sortify`);
- ``dims`` (what the family can nest along) and ``dims_of(model)`` (what this particular model can:
  a decoder with fused q/k/v projections has no heads dim), with ``why_not(model, dim)``;
- ``tasks``: the task contracts it serves (:mod:`sortedcli.tasks`);
- ``tokenizer(options)``: its tokenizer, for models that read text;
- ``save(folder, plain, meta, example, tokenizer)`` / ``exportable(model, sub)``: its export
  format (the family owns it: safetensors + ``torch.export`` for vision, a Hugging Face folder for
  transformers) and which sub-models that format can express; ``exports`` names it for messages;
- ``stack(model)``: the model as a layer stack for :mod:`sortedcli.decoding` (causal LMs; others
  cannot generate, ``can_generate`` is False);
- ``snapshot(model, tokenizer, folder, source)``: what a run keeps of a pretrained model so that it
  never needs ``model.pretrained`` again (Hugging Face config + tokenizer);
- ``importance_groups(model)``: units that move together when a pretrained model is importance-sorted
  (:mod:`sortedcli.nest.importance`);
- ``init_options``: model options that only say where initial weights come from, not the
  architecture (an export rebuilds without them);
- ``for_inference(model)``: the loaded model as eval, export and generate run it (LoRA adapters
  merged into their weights);
- ``build_empty(**args)`` / ``init_buffers(model)``: for a sharded run (FSDP2), the model ``build``
  makes on the meta device (no weight read, nothing allocated) and the safetensors files its weights
  are then read from, and the buffers no checkpoint holds, recomputed once the shards exist
  (:func:`sortedcli.distributed.load_pretrained`); a family without them builds eagerly.

Adding a family is one subclass in one module of this package (``Family = MyFamily`` at its end)
and one ``register(...)`` line per name, plus a ``conf/model/NAME.yaml`` (see the README).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from ..nest import SubModel
    from ..nest.importance import Group


class Adapter(ABC):
    """One model family. Instances are made by the registry, one per registered name; ``options``
    are the registration's fixed build arguments (e.g. the torchvision architecture)."""

    dims: ClassVar[dict[str, str]] = {}
    tasks: ClassVar[tuple[str, ...]] = ("image_classification",)
    init_options: ClassVar[tuple[str, ...]] = ("weights",)
    exports: ClassVar[str] = "the family's export format"
    can_generate: ClassVar[bool] = False

    def __init__(self, name: str, description: str, family: str, data: str = "fashion_mnist", **options: Any):
        self.name, self.description, self.family, self.data = name, description, family, data
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @abstractmethod
    def build(self, **args) -> nn.Module:
        """The sorted library model, from the data's ``model_args`` and the model options."""

    def dims_of(self, model: nn.Module) -> dict[str, str]:
        return self.dims

    def why_not(self, model: nn.Module, dim: str) -> str:
        return "the family has no such dim"

    def tokenizer(self, options: dict):
        return None

    def exportable(self, model: nn.Module, sub: SubModel) -> bool:
        return True

    #: what makes a sub-model not :meth:`exportable`, in words for the user
    unexportable: str = ""

    @abstractmethod
    def save(self, folder, plain: nn.Module, meta: dict, example, tokenizer=None,
             max_shard_size: int | None = None) -> None:
        """Write the plain sub-model ``plain`` into ``folder`` in the family's format, checked to
        reproduce it on ``example``; ``max_shard_size`` (bytes, ``export.max_shard_size``): the largest
        weights file, where the format splits its weights into several (None: the format's default)."""

    def stack(self, model: nn.Module):
        raise ValueError(f"model={self.name} is not a causal language model: generate needs e.g. model=causal_lm")

    def snapshot(self, model: nn.Module, tokenizer, folder, source: str) -> None:
        return None  # nothing to keep beyond the checkpoint

    def importance_groups(self, model: nn.Module) -> list[Group]:
        return []

    def for_inference(self, model: nn.Module) -> nn.Module:
        """The trained model (weights loaded) as eval, export and generate run it: what only training
        needs folded away (a decoder merges its LoRA adapters into the weights they adapt)."""
        return model

    def build_empty(self, **args) -> tuple[nn.Module, list[Path]] | None:
        """What :meth:`build` makes, built on the meta device without reading a weight (shapes only), and
        the safetensors files that hold its initial weights under its own state-dict keys ([] where
        ``build`` reads none: a random init, or a run's snapshot whose weights are its checkpoint's).
        None where that cannot be done exactly (a format read another way, weights that are changed
        as they load, buffers :meth:`init_buffers` cannot recompute): the run then builds eagerly."""
        return None

    def init_buffers(self, model: nn.Module) -> None:
        """Recompute in place the buffers of a model from :meth:`build_empty`, once its storage exists
        (``to_empty``), that no checkpoint holds (non-persistent: a decoder's rotary frequencies)."""
        return None
