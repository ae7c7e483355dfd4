"""Hugging Face encoders for sequence classification (transformers' own classes) as sorted models.

The layout is detected from the loaded model's modules, not from its class name (:func:`layout_of`):

- **bert**: ``<base>.encoder.layer[i]`` with ``attention.self.query/key/value``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, and an encoder that does nothing
  after its layers: BERT, RoBERTa, XLM-RoBERTa, ELECTRA (and MiniLM, which is a BERT). BERT's head is
  pooler -> dropout -> classifier; RoBERTa/XLM-RoBERTa/ELECTRA heads read the first token themselves.
- **distilbert**: ``distilbert.transformer.layer[i]`` with ``attention.q_lin/k_lin/v_lin/out_lin`` and
  ``ffn.lin1/lin2``; head hidden[:, 0] -> pre_classifier -> ReLU -> dropout -> classifier; config
  fields ``n_layers``, ``n_heads``, ``hidden_dim``.
- **modernbert**: ``model.layers[i]`` with a fused ``attn.Wqkv`` and a fused GLU ``mlp.Wi``, then
  ``final_norm``, ``head``, ``drop``, ``classifier`` with cls or mean pooling (the exits' mean pooling
  uses the attention mask of the forward they read). ``Wqkv``'s rows are [all q | all k | all v],
  viewed as ``(3, -1, head_dim)``, and ``Wi``'s rows are [input | gate], split by ``chunk(2)``: a plain
  prefix of their rows would mix q with k, or input with gate, so they are sliced block by block
  (:class:`SortedFusedLinear`: the same prefix of whole heads / neurons in each block), and importance
  sorting permutes every block alike (``Group.blocks``). The first layer has no attention norm and
  half the layers attend in a sliding window (``config.layer_types``, cut with the layers on export).

:func:`supported_dims` says which dims a model's layout nests (today all three for every layout) and
:func:`check_dims` refuses the others in one line.

Before sorting, the layout's readout is checked to reproduce the model's own logits from the last
layer's hidden state (one tiny forward): a class whose modules look right but computes something more
after its layers (a final norm in the encoder, another pooling) is refused instead of getting wrong exits.

Per layout:

- **depth**: the first k layers; exit k reads the hidden state after layer k through the model's own
  head (and final norm) — one shared head for every exit, as the paper: no new parameters. A dropped
  layer passes its hidden state on unchanged, so the full forward of the depth-k sub-model and exit k
  of a deeper pass are the same function.
- **heads**: a prefix of whole heads: the query/key/value projections keep their first
  ``h x head_size`` output features (in each block of ModernBERT's fused ``Wqkv``); the attention
  output projection reads its input width from the tensor. transformers 5.x views q/k/v as
  ``(-1, head_size)`` and reshapes the output with ``-1`` in all three layouts, so fewer heads need no
  change to the library's attention.
- **ffn**: a prefix of the intermediate neurons of every layer (of both halves of ModernBERT's ``Wi``).

Embeddings, hidden size, vocabulary and classes stay full. FLOPs are counted with eager attention so
that the attention matmuls are in the count.

A pretrained model is **importance-sorted** first (``model.importance``, default ``l1``): in every
layer the heads are reordered by the L1 norm of their query/key/value weights and the FFN neurons by
the L1 norm of their input weights (:mod:`sortedcli.nest.importance`; the output projections' columns
move with them), so the prefixes keep the strongest units and the full model computes exactly what
it did.

Export writes a Hugging Face folder that ``AutoModelForSequenceClassification`` loads. Depth and FFN
reductions are plain config fields (``num_hidden_layers`` / ``n_layers``, ``intermediate_size`` /
``hidden_dim``; ModernBERT's ``layer_types`` is cut with its layers); fewer heads at the same head size
are not (every one of these configs derives the head size as hidden size / heads, and transformers 5.x
dropped head pruning), so ``export`` chooses among the sub-models with every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UsageError
from ..nest import COUNT, FRACTION, SubModel, sortify, sorted_size, use
from ..nest.importance import Group, sort_by_importance
from ..nest.layers import SortedLinear, prefix
from . import hf
from .weights import importance_method

tokenizer = hf.tokenizer  # the registry's tokenizer hook: model.tokenizer, or the pretrained folder's

DIMS = {"depth": COUNT, "heads": FRACTION, "ffn": FRACTION}
TASKS = ("text_classification",)


# ---------------------------------------------------------------- layouts
def _bert_heads(layer):
    att = layer.attention
    return [att.self.query, att.self.key, att.self.value], [att.output.dense]


def _bert_ffn(layer):
    return [layer.intermediate.dense], [layer.output.dense]


def _distil_heads(layer):
    att = layer.attention
    return [att.q_lin, att.k_lin, att.v_lin], [att.out_lin]


def _distil_ffn(layer):
    return [layer.ffn.lin1], [layer.ffn.lin2]


def _modernbert_heads(layer):
    return [layer.attn.Wqkv], [layer.attn.Wo]


def _modernbert_ffn(layer):
    return [layer.mlp.Wi], [layer.mlp.Wo]


class SortedFusedLinear(SortedLinear):
    """A fused projection whose output is ``sorted_blocks`` equal blocks, each holding every unit
    (ModernBERT's ``Wqkv``: q | k | v; ``Wi``: GLU input | gate): a sub-model keeps the same prefix of
    whole units in each block, so the library's own split of the output (``view(3, -1, head_dim)``,
    ``chunk(2)``) sees whole heads / matching input and gate neurons."""

    sorted_blocks: int = 1

    def out_size(self, full: int) -> int:
        return self.sorted_blocks * super().out_size(full // self.sorted_blocks)

    def sliced(self, n_in, n_out):
        blocks = self.sorted_blocks
        if n_out == self.out_features:
            return super().sliced(n_in, n_out)
        keep = n_out // blocks
        weight = prefix(self.weight.view(blocks, -1, self.in_features), blocks, keep, n_in).reshape(n_out, n_in)
        bias = None if self.bias is None else prefix(self.bias.view(blocks, -1), blocks, keep).reshape(n_out)
        return {"weight": weight, "bias": bias}


def _bert_readout(model, hidden, mask):
    if isinstance(model.classifier, nn.Linear):  # BERT: pooler -> dropout -> classifier
        return model.classifier(model.dropout(model.base_model.pooler(hidden)))
    return model.classifier(hidden)  # RoBERTa / XLM-RoBERTa / ELECTRA heads read the first token themselves


def _distil_readout(model, hidden, mask):
    pooled = torch.relu(model.pre_classifier(hidden[:, 0]))
    return model.classifier(model.dropout(pooled))


def _modernbert_readout(model, hidden, mask):
    hidden = model.base_model.final_norm(hidden)
    if model.config.classifier_pooling == "mean":
        if hidden.dim() != 3:
            raise ValueError("ModernBERT's mean pooling reads every position: run_exits(at=...) is not supported")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.bool)
        pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    else:
        pooled = hidden[:, 0]
    return model.classifier(model.drop(model.head(pooled)))


def _has(module, *paths) -> bool:
    for path in paths:
        try:
            module.get_submodule(path)
        except AttributeError:
            return False
    return True


def _linears(module, *paths) -> bool:
    return _has(module, *paths) and all(isinstance(module.get_submodule(p), nn.Linear) for p in paths)


def _bert_matches(base) -> bool:
    if not _has(base, "encoder.layer") or not isinstance(base.encoder.layer, nn.ModuleList) or not base.encoder.layer:
        return False
    layer = base.encoder.layer[0]
    return (_linears(layer, "attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense")
            # nothing after the layers inside the encoder (XLM-RoBERTa-XL's final LayerNorm would be)
            and all(name == "layer" for name, _ in base.encoder.named_children()))


def _distil_matches(base) -> bool:
    if not _has(base, "transformer.layer") or not isinstance(base.transformer.layer, nn.ModuleList):
        return False
    layer = base.transformer.layer[0]
    return (_linears(layer, "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                     "ffn.lin1", "ffn.lin2")
            and all(name == "layer" for name, _ in base.transformer.named_children()))


def _modernbert_matches(base) -> bool:
    if not _has(base, "layers", "final_norm") or not isinstance(base.layers, nn.ModuleList):
        return False
    layer = base.layers[0]
    return (_linears(layer, "attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo")
            and layer.attn.Wqkv.out_features == 3 * layer.attn.Wo.in_features  # q | k | v
            and layer.mlp.Wi.out_features == 2 * layer.mlp.Wo.in_features)  # input | gate


@dataclass(frozen=True)
class Layout:
    """How one family of encoders lays out its layers, config and head."""

    name: str
    examples: str  # the classes it covers, for messages
    stack: str  # the ModuleList of layers, under the base model
    depth_key: str  # config field: number of layers
    heads_key: str  # config field: attention heads
    ffn_key: str | None  # config field: FFN width (None: ffn not supported)
    matches: Callable[[nn.Module], bool]  # (base model) -> has this layout
    readout: Callable  # (model, hidden after the last kept layer, attention mask) -> logits
    heads: Callable | None = None  # layer -> ([q, k, v], [o]); None: heads not supported
    ffn: Callable | None = None  # layer -> ([in], [out]); None: ffn not supported
    blocks: dict | None = None  # dim -> blocks of its fused producers (ModernBERT: heads 3, ffn 2)
    needs_mask: bool = False  # the readout pools with the attention mask

    @property
    def dims(self) -> tuple[str, ...]:
        return ("depth",) + (("heads",) if self.heads else ()) + (("ffn",) if self.ffn else ())


LAYOUTS = (
    Layout("bert", "BERT, RoBERTa, XLM-RoBERTa, ELECTRA", "encoder.layer", "num_hidden_layers",
           "num_attention_heads", "intermediate_size", _bert_matches, _bert_readout, _bert_heads, _bert_ffn),
    Layout("distilbert", "DistilBERT", "transformer.layer", "n_layers", "n_heads", "hidden_dim",
           _distil_matches, _distil_readout, _distil_heads, _distil_ffn),
    Layout("modernbert", "ModernBERT", "layers", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           _modernbert_matches, _modernbert_readout, _modernbert_heads, _modernbert_ffn,
           blocks={"heads": 3, "ffn": 2}, needs_mask=True),
)

SUPPORTED = ("BERT-layout (BERT, RoBERTa, XLM-RoBERTa, ELECTRA: encoder.layer[i].attention.self.query), "
             "DistilBERT (transformer.layer[i].attention.q_lin) and ModernBERT (layers[i].attn.Wqkv) "
             "*ForSequenceClassification models")


def _find(model: nn.Module) -> Layout | None:
    base = getattr(model, "base_model", None)
    if base is None or base is model:  # a bare encoder, no classification head
        return None
    return next((lay for lay in LAYOUTS if lay.matches(base)), None)


def layout_of(model: nn.Module) -> Layout:
    """The layout of a transformers sequence classifier (sorted or not), found from its modules; a
    class that fits none is refused in one line naming it and what is supported."""
    lay = _find(model)
    if lay is None:
        raise UsageError(f"{type(model).__name__} is not a supported encoder: supported are {SUPPORTED}")
    return lay


def supported_dims(model: nn.Module) -> tuple[str, ...]:
    """The sorted dimensions this model's layout supports (``("depth", "heads", "ffn")`` for all three
    layouts today; a layout without ``heads``/``ffn`` functions would drop them)."""
    return layout_of(model).dims


def check_dims(model: nn.Module, dims) -> None:
    """Refuse, in one line, dims that this model's layout cannot nest."""
    lay = layout_of(model)
    bad = [d for d in dims if d not in lay.dims]
    if bad:
        raise UsageError(f"{type(model).__name__} cannot sort dims {', '.join(bad)}: it supports "
                         f"dims=[{','.join(lay.dims)}]")


def _stack(model: nn.Module, lay: Layout) -> nn.ModuleList:
    return model.base_model.get_submodule(lay.stack)


def _head_size(model: nn.Module, lay: Layout) -> int:
    return model.config.hidden_size // getattr(model.config, lay.heads_key)


def _probe(model: nn.Module):
    """Two tiny sequences (one padded) for the checks below."""
    vocab = model.config.vocab_size
    ids = (torch.arange(2 * 5).view(2, 5) % max(vocab - 1, 1) + 1).to(next(model.parameters()).device)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask


@torch.no_grad()
def _check_readout(model: nn.Module, lay: Layout) -> None:
    """The layout's readout of the last layer's hidden state must give the model's own logits."""
    caught = {}
    hook = _stack(model, lay)[-1].register_forward_hook(
        lambda m, args, out: caught.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    ids, mask = _probe(model)
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=ids, attention_mask=mask).logits
        got = lay.readout(model, caught["h"], mask)
        same = got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    except (AttributeError, TypeError, RuntimeError, KeyError):
        same = False
    finally:
        hook.remove()
        model.train(was_training)
    if not same:
        raise UsageError(f"{type(model).__name__} has the {lay.name} layout's layers but its head does not read "
                         f"out the last layer as {lay.examples} do: supported are {SUPPORTED}")


@torch.no_grad()
def _check_widths(model: nn.Module, lay: Layout) -> None:
    """The smallest heads/ffn sub-model must run: an attention that reshapes with its configured head
    count (instead of ``-1``) cannot take fewer heads."""
    ids, mask = _probe(model)
    narrow = SubModel.of(**{d: 1e-9 for d in lay.dims if d != "depth"})
    was_training = model.training
    model.eval()
    try:
        with use(model, narrow):
            model(input_ids=ids, attention_mask=mask)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UsageError(f"{type(model).__name__} has the {lay.name} layout's layers but does not run with "
                         f"fewer heads or FFN neurons ({first}): supported are {SUPPORTED}") from None
    finally:
        model.train(was_training)


def sortify_encoder(model: nn.Module) -> nn.Module:
    """Sort a transformers ``*ForSequenceClassification`` encoder in place along depth (and heads, ffn
    where its layout has them)."""
    lay = layout_of(model)
    _check_readout(model, lay)
    config = model.config
    sized, fused = {}, {}
    for layer in _stack(model, lay):
        for dim, unit, producers in (("heads", _head_size(model, lay), lay.heads), ("ffn", 1, lay.ffn)):
            if producers is None:
                continue
            for m in producers(layer)[0]:
                sized[id(m)] = (dim, unit)
                if (lay.blocks or {}).get(dim, 1) > 1:
                    fused[id(m)] = lay.blocks[dim]

    def out_dim(name: str, module: nn.Module):
        return sized.get(id(module))  # hidden size, pooler, head and classifier stay full

    path = f"{model.base_model_prefix}.{lay.stack}" if model.base_model is not model else lay.stack
    units, finish = hf.prefix_layers(model, path, config_key=lay.depth_key)
    seen = {}
    hooks = []
    if lay.needs_mask:  # the exits' pooling needs the attention mask of the forward they read
        def remember(module, args, kwargs):
            seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

        hooks.append(model.register_forward_pre_hook(remember, with_kwargs=True))

    def readout(m, hidden):
        return lay.readout(m, hidden, seen.get("mask"))

    def finish_config(plain, sub):
        for h in hooks:  # the copied model must not write into this model's state
            plain._forward_pre_hooks.pop(h.id, None)
            plain._forward_pre_hooks_with_kwargs.pop(h.id, None)
        finish(plain, sub)
        depth = None if sub is None else sub.get("depth")
        if depth is not None and isinstance(getattr(plain.config, "layer_types", None), list):
            plain.config.layer_types = plain.config.layer_types[:depth]
        if sub is not None and sub.get("ffn") is not None and lay.ffn_key:
            setattr(plain.config, lay.ffn_key, sorted_size(getattr(config, lay.ffn_key), sub["ffn"]))

    sortify(model, out_dim=out_dim, units=units, readout=readout, finish=finish_config)
    for m in model.modules():
        if id(m) in fused:
            m.__class__ = SortedFusedLinear
            m.sorted_blocks = fused[id(m)]
    _check_widths(model, lay)
    return model


def importance_groups(model: nn.Module) -> list[Group]:
    """Per layer: its attention heads (q, k, v rows -> output projection columns, in head units) and
    its FFN neurons (intermediate rows -> output columns); a fused producer (ModernBERT's Wqkv, Wi) in
    blocks that are permuted alike."""
    lay = layout_of(model)
    groups = []
    for i, layer in enumerate(_stack(model, lay)):
        for dim, unit, units_of in (("heads", _head_size(model, lay), lay.heads), ("ffn", 1, lay.ffn)):
            if units_of is None:
                continue
            producers, consumers = units_of(layer)
            n = (lay.blocks or {}).get(dim, 1)
            blocks = (producers[0].out_features // n,) * n if n > 1 else None
            groups.append(Group(f"layer{i}.{dim}", producers, consumers, unit=unit, blocks=blocks))
    return groups


def exportable(model: nn.Module, sub: SubModel) -> bool:
    """A stock config can say this sub-model: every head kept."""
    heads = getattr(model.config, layout_of(model).heads_key)
    return sub.get("heads") is None or sorted_size(heads, sub["heads"]) == heads


def _config_class(config: dict | None):
    """BertConfig, or the config class of ``config["model_type"]`` (``roberta``, ``distilbert``, ...)."""
    from transformers import CONFIG_MAPPING, BertConfig

    model_type = (config or {}).get("model_type")
    if model_type is None:
        return BertConfig, config
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        raise UsageError(f"model.config.model_type={model_type} is not a transformers model type") from None
    return cls, {k: v for k, v in config.items() if k != "model_type"}


def build_encoder(num_classes: int, pretrained: str | None = None, config: dict | None = None,
                  tokenizer: str | None = None, attn_implementation: str = "eager",
                  labels: list | None = None, importance: str | None = "l1") -> nn.Module:
    """A transformers sequence classifier from ``pretrained`` (folder or hub id) or ``config`` (a
    BertConfig's fields, or any encoder's with ``model_type``), with a new ``num_classes``-way head when
    the checkpoint has another, importance-sorted when pretrained, sorted in place."""
    from transformers import AutoModelForSequenceClassification

    extra = {"num_labels": num_classes, "attn_implementation": attn_implementation}
    if labels:
        extra["id2label"] = {i: str(v) for i, v in enumerate(labels)}
        extra["label2id"] = {str(v): i for i, v in enumerate(labels)}
    if pretrained:
        extra["ignore_mismatched_sizes"] = True
    config_class, config = _config_class(config)
    try:
        model = hf.load(AutoModelForSequenceClassification, pretrained, config, config_class, **extra)
    except ValueError as e:  # a config of a model type without a sequence classifier
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"no sequence classifier for this model ({first[:200]}): supported are {SUPPORTED}") from None
    layout_of(model)
    method = importance_method(importance)
    if pretrained and method:
        sort_by_importance(importance_groups(model), method)
    return sortify_encoder(model)


def save(folder, plain: nn.Module, meta: dict, example, tokenizer=None, max_shard_size: int | None = None) -> None:
    """A Hugging Face folder that ``AutoModelForSequenceClassification.from_pretrained`` loads, checked
    to give ``plain``'s logits on ``example`` (the task's check input: several
    sequences of different lengths, padded); weights in safetensors files of at most ``max_shard_size``."""
    from transformers import AutoModelForSequenceClassification

    from ..nest import call

    with torch.no_grad():
        want = call(plain.eval(), example)
    hf.save(folder, plain, meta, example, want, AutoModelForSequenceClassification, tokenizer, max_shard_size)


snapshot = hf.snapshot  # the registry's snapshot hook: the pretrained config + tokenizer into the run folder
