"""The registry's adapter for Hugging Face encoders (sequence classifiers): the layouts, readouts,
importance groups and export rules live in :mod:`sortedcli.models.bert`; this class is the contract."""

from __future__ import annotations

from torch import nn

from . import bert, hf
from .adapter import Adapter


class EncoderFamily(Adapter):
    """BERT-family encoders for text classification (see :mod:`sortedcli.models.bert`)."""

    dims = bert.DIMS
    tasks = bert.TASKS
    exports = "a Hugging Face folder (AutoModelForSequenceClassification)"
    unexportable = "fewer heads at the same head size, which a stock config cannot say"

    def build(self, **args) -> nn.Module:
        return bert.build_encoder(**self.options, **args)

    def dims_of(self, model: nn.Module) -> dict[str, str]:
        supported = getattr(bert, "supported_dims", None)
        return self.dims if supported is None else {d: self.dims[d] for d in supported(model)}

    def why_not(self, model: nn.Module, dim: str) -> str:
        return f"{type(model).__name__}'s layout does not nest along {dim}"

    def tokenizer(self, options: dict):
        return bert.tokenizer(options)

    def exportable(self, model: nn.Module, sub) -> bool:
        return bert.exportable(model, sub)

    def save(self, folder, plain, meta, example, tokenizer=None, max_shard_size=None) -> None:
        bert.save(folder, plain, meta, example, tokenizer, max_shard_size)

    def snapshot(self, model, tok, folder, source) -> None:
        hf.snapshot(model, tok, folder, source)

    def importance_groups(self, model: nn.Module):
        return bert.importance_groups(model)


Family = EncoderFamily
