"""BERT-family encoders (transformers' own classes: BERT, RoBERTa; MiniLM is a BERT) as sorted models
for sequence classification.

- **depth**: the first k encoder layers; exit k reads the hidden state after layer k through the
  model's own pooler and classifier (one shared head for every exit, as the paper: no new
  parameters). A dropped layer passes its hidden state on unchanged, so the full forward of the
  depth-k sub-model and exit k of a deeper pass are the same function.
- **heads**: a prefix of the attention heads: the query/key/value projections keep their first
  ``h x head_size`` output features (in whole heads); the attention output projection reads its input
  width from the tensor. transformers 5.x views q/k/v as ``(-1, head_size)`` and reshapes the output
  with ``-1``, so fewer heads need no change to the library's attention.
- **ffn**: a prefix of the intermediate neurons of every layer.

Embeddings, hidden size, vocabulary and classes stay full. FLOPs are counted with eager attention so
that the attention matmuls are in the count.

A pretrained model is **importance-sorted** first (``model.importance``, default ``l1``): in every
layer the heads are reordered by the L1 norm of their query/key/value weights and the FFN neurons by
the L1 norm of their input weights (:mod:`sortedcli.nest.importance`; the output projections' columns
move with them), so the prefixes keep the strongest units and the full model computes exactly what
it did.

Export writes a Hugging Face folder that ``AutoModelForSequenceClassification`` loads. Depth and FFN
reductions are plain config fields (``num_hidden_layers``, ``intermediate_size``); fewer heads at the
same head size are not (BERT's config derives the head size as hidden_size / num_attention_heads, and
transformers 5.x dropped head pruning), so ``export`` chooses among the sub-models with every head.
"""

from __future__ import annotations

from torch import nn

from ..errors import UsageError
from ..nest import COUNT, FRACTION, SubModel, sortify, sorted_size
from ..nest.importance import Group, sort_by_importance
from . import hf
from .weights import importance_method

tokenizer = hf.tokenizer  # the registry's tokenizer hook: model.tokenizer, or the pretrained folder's

DIMS = {"depth": COUNT, "heads": FRACTION, "ffn": FRACTION}
TASKS = ("text_classification",)


def _readout(model: nn.Module, hidden):
    """Exit: the model's own head on the hidden state after layer k."""
    base = model.base_model
    if getattr(base, "pooler", None) is not None:  # BERT: pooler -> dropout -> classifier
        return model.classifier(model.dropout(base.pooler(hidden)))
    return model.classifier(hidden)  # RoBERTa-style heads read the first token themselves


def _out_dim(head_size: int):
    def out_dim(name: str, module: nn.Module):
        if name.endswith(("attention.self.query", "attention.self.key", "attention.self.value")):
            return ("heads", head_size)
        if name.endswith("intermediate.dense"):
            return ("ffn", 1)
        return None  # hidden size, pooler and classifier stay full
    return out_dim


def sortify_encoder(model: nn.Module) -> nn.Module:
    """Sort a transformers ``*ForSequenceClassification`` encoder in place along depth, heads, ffn."""
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    units, finish = hf.prefix_layers(model, f"{model.base_model_prefix}.encoder.layer")

    def finish_config(plain, sub):
        finish(plain, sub)
        if sub is not None and sub.get("ffn") is not None:
            plain.config.intermediate_size = sorted_size(config.intermediate_size, sub["ffn"])

    return sortify(model, out_dim=_out_dim(head_size), units=units, readout=_readout, finish=finish_config)


def importance_groups(model: nn.Module) -> list[Group]:
    """Per layer: its attention heads (q, k, v rows -> output projection columns, in head units) and
    its FFN neurons (intermediate rows -> output columns)."""
    head_size = model.config.hidden_size // model.config.num_attention_heads
    groups = []
    for i, layer in enumerate(model.base_model.encoder.layer):
        att = layer.attention
        groups.append(Group(f"layer{i}.heads", [att.self.query, att.self.key, att.self.value], [att.output.dense],
                            unit=head_size))
        groups.append(Group(f"layer{i}.ffn", [layer.intermediate.dense], [layer.output.dense]))
    return groups


def exportable(model: nn.Module, sub: SubModel) -> bool:
    """A stock BERT config can say this sub-model: every head kept."""
    heads = model.config.num_attention_heads
    return sub.get("heads") is None or sorted_size(heads, sub["heads"]) == heads


def build_encoder(num_classes: int, pretrained: str | None = None, config: dict | None = None,
                  tokenizer: str | None = None, attn_implementation: str = "eager",
                  labels: list | None = None, importance: str | None = "l1") -> nn.Module:
    """A transformers sequence classifier from ``pretrained`` (folder or hub id) or ``config``, with a
    new ``num_classes``-way head when the checkpoint has another, importance-sorted when pretrained,
    sorted in place."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    extra = {"num_labels": num_classes, "attn_implementation": attn_implementation}
    if labels:
        extra["id2label"] = {i: str(v) for i, v in enumerate(labels)}
        extra["label2id"] = {str(v): i for i, v in enumerate(labels)}
    if pretrained:
        extra["ignore_mismatched_sizes"] = True
    model = hf.load(AutoModelForSequenceClassification, pretrained, config, BertConfig, **extra)
    if not hasattr(model.base_model, "encoder") or not hasattr(model.base_model.encoder, "layer"):
        raise UsageError(f"model.pretrained={pretrained} is a {type(model).__name__}, not a BERT-family encoder")
    method = importance_method(importance)
    if pretrained and method:
        sort_by_importance(importance_groups(model), method)
    return sortify_encoder(model)


def save(folder, plain: nn.Module, meta: dict, example, tokenizer=None) -> None:
    """A Hugging Face folder that ``AutoModelForSequenceClassification.from_pretrained`` loads, checked
    to give ``plain``'s logits on ``example`` (the task's check input: several
    sequences of different lengths, padded)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ..nest import call

    with torch.no_grad():
        want = call(plain.eval(), example)
    hf.save(folder, plain, meta, example, want, AutoModelForSequenceClassification, tokenizer)


snapshot = hf.snapshot  # the registry's snapshot hook: the pretrained config + tokenizer into the run folder
