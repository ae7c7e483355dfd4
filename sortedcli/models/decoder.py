"""Hugging Face decoder LLMs (``*ForCausalLM``) as sorted models, and as a layer stack for decoding.

One adapter serves every decoder that follows the LLaMA layout: token embedding -> a ``ModuleList``
of decoder layers (``self_attn`` + ``mlp``) -> a final norm -> an LM head. LLaMA 1-3, Mistral,
Qwen2/2.5, Qwen3, Gemma 1-3 (text), Phi-3, OLMo 2, SmolLM and whatever else keeps that layout load
through the stock ``AutoModelForCausalLM``; :class:`Layout` reads what differs from the loaded
model's *modules and config*, not from a list of class names:

- attention projections: separate ``q_proj``/``k_proj``/``v_proj`` (biased or not: Qwen2) or one
  fused ``qkv_proj`` (Phi-3); per-head ``q_norm``/``k_norm`` (Qwen3, Gemma 3) or norms over the
  whole projection (OLMo 2);
- MLP: separate ``gate_proj``/``up_proj`` (SwiGLU / GeGLU) or one fused ``gate_up_proj`` (Phi-3);
- per-layer attention types (``config.layer_types``: full and sliding-window layers, Mistral,
  Qwen2, Gemma 2/3), each with its own mask (and, for Gemma 3, its own rotary embedding);
- scaled embeddings (Gemma's embedding module scales itself), norms after attention / MLP (Gemma 2/3,
  OLMo 2 has no input norm), final logit soft-capping (Gemma 2/3: applied at every exit too).

Anything else (GPT-2's ``Conv1D``, mixture-of-experts MLPs, hybrid Mamba/linear-attention layers,
chunked attention) is refused in one line that names the class and what is supported.

Sorted model (the registry entries ``causal_lm``, ``llama``, ``llama_tiny``; Sorted LLaMA / SoFT):

- **depth**: the first k decoder layers; exit k reads the hidden state after layer k through the
  model's own final norm and LM head (no new parameters), or through a readout of its own
  (``model.exits``: its own norm, or an affine map and norm; see "the exits' own readouts" below). A
  dropped layer passes its hidden state on unchanged, so the depth-k sub-model and exit k of a deeper
  pass are the same function.
- **heads** (separate q/k/v projections and per-head norms only): with grouped-query attention, whole
  key/value groups: k/v projections keep ``ceil(level x kv_heads)`` heads (unit ``head_dim``), the
  query projection that many groups of ``heads / kv_heads`` query heads. The rule: a level keeps whole
  key/value groups, so the levels of a model with 2 key/value heads resolve to 1 or 2 groups
  (:meth:`~sortedcli.nest.space.Grid.distinct` merges levels that keep the same groups).
- **ffn** (separate gate/up projections only): a prefix of the intermediate neurons.
- **LoRA SoFT** (``model.lora.r=16``): peft's LoRA adapters on the chosen projections train, nothing
  else does; depth nests as above, a width dim only where no adapter sits on a projection it slices
  (heads: q/k/v/o_proj, ffn: gate/up/down_proj); eval, export and generate merge the adapters first
  (see "LoRA SoFT" below).

Every sub-model is a stock config of the same class (``head_dim`` is written explicitly), so
``export`` writes a folder the stock ``AutoModelForCausalLM`` reloads. A pretrained model is
importance-sorted first (``model.importance``, default ``l1``) along the width dims it supports:
key/value groups by the norm of their q/k/v rows, FFN neurons by their gate/up rows; the output
projections' columns move with them and the full model computes exactly what it did.

:class:`DecoderStack` implements the small stack protocol that :mod:`sortedcli.decoding` is written
against: embed tokens, run decoder layers ``[start, stop)`` while appending their keys/values to a
transformers ``DynamicCache``, read any hidden state out through the model's final norm and head (an
exit), write the keys/values of layers that a token skipped, and crop the cache. It drives the
model's own modules exactly as the model's ``forward`` does, so all layers and the head give the
logits of the stock model. Decoding is batch size 1.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import UsageError
from ..nest import COUNT, FRACTION, sortify, sorted_size
from ..nest.importance import Group, sort_by_importance
from . import hf
from .adapter import Adapter
from .weights import importance_method

if TYPE_CHECKING:  # transformers is imported where a decoder is built or decoded, not with the registry
    from transformers import DynamicCache

DIMS = {"depth": COUNT, "heads": FRACTION, "ffn": FRACTION}
TASKS = ("causal_lm",)
ATTENTION_TYPES = ("full_attention", "sliding_attention")
SUPPORTED = ("LLaMA-layout decoders (embed -> layers with self_attn and a gated MLP -> final norm -> LM head): "
             "LLaMA, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo 2, SmolLM")


@dataclass(frozen=True)
class Layout:
    """What a loaded decoder looks like, read from its modules and config (see the module doc)."""

    cls: str
    base: str  # attribute of the model holding the decoder (``model``)
    head_dim: int
    heads: int
    kv_heads: int
    fused_qkv: bool
    fused_mlp: bool
    whole_qk_norm: bool  # q/k norms over the whole projection (OLMo 2): heads cannot be sliced
    layer_types: tuple[str, ...]
    softcap: float | None

    @property
    def dims(self) -> dict[str, str]:
        """The dims this model can nest along, with why the others are missing (:meth:`why_not`)."""
        out = {"depth": COUNT}
        if not self.fused_qkv and not self.whole_qk_norm:
            out["heads"] = FRACTION
        if not self.fused_mlp:
            out["ffn"] = FRACTION
        return out

    def why_not(self, dim: str) -> str:
        if dim == "heads" and self.fused_qkv:
            return "its q/k/v projections are fused into one qkv_proj"
        if dim == "heads" and self.whole_qk_norm:
            return "its q/k norms span all heads"
        if dim == "ffn" and self.fused_mlp:
            return "its gate/up projections are fused into one gate_up_proj"
        return "it has no such dim"


def _refuse(cls: str, what: str) -> UsageError:
    return UsageError(f"{cls} is not supported: {what}; supported: {SUPPORTED}")


def layout(model: nn.Module) -> Layout:
    """Read ``model``'s :class:`Layout`, or refuse it in one line (a :class:`UsageError`)."""
    cls = type(model).__name__
    config = model.config
    for name, m in model.named_modules():
        if type(m).__name__ == "Conv1D":
            raise _refuse(cls, f"{name} is a GPT-2-style Conv1D")
    base_name = getattr(model, "base_model_prefix", "model")
    base = getattr(model, base_name, None)
    layers = getattr(base, "layers", None)
    if base is None or not isinstance(layers, nn.ModuleList) or not len(layers):
        raise _refuse(cls, f"no decoder layers at {base_name}.layers")
    if getattr(base, "embed_tokens", None) is None or getattr(base, "norm", None) is None:
        raise _refuse(cls, f"no {base_name}.embed_tokens or final {base_name}.norm")
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        raise _refuse(cls, "its LM head is not a Linear layer")
    fused_qkv = fused_mlp = whole_norm = False
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise _refuse(cls, f"layer {i} has no self_attn/mlp (hybrid Mamba or linear-attention layers)")
        if any(hasattr(mlp, a) for a in ("experts", "router", "gate")) and not hasattr(mlp, "gate_proj"):
            raise _refuse(cls, f"layer {i}'s MLP is a mixture of experts")
        if hasattr(attn, "qkv_proj"):
            fused_qkv = True
        elif not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")):
            raise _refuse(cls, f"layer {i}'s attention has no q_proj/k_proj/v_proj (or fused qkv_proj)")
        if not isinstance(getattr(attn, "o_proj", None), nn.Linear):
            raise _refuse(cls, f"layer {i}'s attention has no o_proj")
        if hasattr(mlp, "gate_up_proj"):
            fused_mlp = True
        elif not all(isinstance(getattr(mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            raise _refuse(cls, f"layer {i}'s MLP has no gate_proj/up_proj/down_proj (or fused gate_up_proj)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    norm = getattr(layers[0].self_attn, "k_norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.numel() != head_dim:
        whole_norm = True
    # per-layer types where the config lists them (Qwen2/3, Gemma 2/3, ...); without a list, a config
    # with a sliding window slides in every layer (Mistral, Phi-3, Starcoder2)
    default = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    types = tuple(getattr(config, "layer_types", None) or (default,) * len(layers))
    other = sorted(set(types) - set(ATTENTION_TYPES))
    if other:
        raise _refuse(cls, f"its layer types include {', '.join(other)}")
    return Layout(cls, base_name, head_dim, heads, getattr(config, "num_key_value_heads", None) or heads,
                  fused_qkv, fused_mlp, whole_norm, types, getattr(config, "final_logit_softcapping", None))


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", "model"))


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if not cap else torch.tanh(logits / cap) * cap


def _readout(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Exit: the model's own final norm and LM head (and logit soft-cap) on the hidden state after layer k."""
    logits = model.get_output_embeddings()(_base(model).norm(hidden))
    return _softcap(logits, getattr(model.config, "final_logit_softcapping", None))


def _out_dim(lay: Layout):
    groups = lay.heads // lay.kv_heads
    dims = lay.dims

    def out_dim(name: str, module: nn.Module):
        if "heads" in dims:
            if name.endswith("self_attn.q_proj"):
                return ("heads", lay.head_dim * groups)  # whole query groups: GQA proportion kept
            if name.endswith(("self_attn.k_proj", "self_attn.v_proj")):
                return ("heads", lay.head_dim)
        if "ffn" in dims and name.endswith(("mlp.gate_proj", "mlp.up_proj")):
            return ("ffn", 1)
        return None  # hidden size, o_proj/down_proj outputs, embeddings and the LM head stay full
    return out_dim


def importance_groups(model: nn.Module, dims=("heads", "ffn")) -> list[Group]:
    """Per layer: its key/value groups (q rows of the group's query heads, k and v rows of its
    key/value head -> o_proj columns of its query heads) and its FFN neurons (gate and up rows ->
    down_proj columns), for the dims in ``dims`` that the model supports."""
    lay = layout(model)
    groups = []
    for i, layer in enumerate(_base(model).layers):
        attn, mlp = layer.self_attn, layer.mlp
        if "heads" in dims and "heads" in lay.dims:
            groups.append(Group(f"layer{i}.heads", [attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj],
                                units=lay.kv_heads))
        if "ffn" in dims and "ffn" in lay.dims:
            groups.append(Group(f"layer{i}.ffn", [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]))
    return groups


def sortify_decoder(model: nn.Module) -> nn.Module:
    """Sort a transformers ``*ForCausalLM`` in place along depth and the width dims its layout allows."""
    lay = layout(model)
    config = model.config
    config.head_dim = lay.head_dim  # explicit, so that a config with fewer heads keeps the head size
    units, finish = hf.prefix_layers(model, f"{lay.base}.layers")

    def finish_config(plain, sub):
        finish(plain, sub)
        if sub is None:
            return
        n = plain.config.num_hidden_layers
        if getattr(plain.config, "layer_types", None) is not None:
            plain.config.layer_types = list(plain.config.layer_types)[:n]
        if getattr(plain.config, "max_window_layers", None) is not None:
            plain.config.max_window_layers = min(plain.config.max_window_layers, n)
        if sub.get("heads") is not None:
            kept = sorted_size(lay.kv_heads * lay.head_dim, sub["heads"], lay.head_dim) // lay.head_dim
            plain.config.num_key_value_heads = kept
            plain.config.num_attention_heads = kept * (lay.heads // lay.kv_heads)
        if sub.get("ffn") is not None:
            plain.config.intermediate_size = sorted_size(config.intermediate_size, sub["ffn"])

    sorted_model = sortify(model, out_dim=_out_dim(lay), units=units, readout=_readout, finish=finish_config)
    sorted_model.sortednet_layout = lay
    return sorted_model


def _config(config: dict, extra: dict):
    """A transformers config from ``model.config={...}``: ``model_type`` names the architecture
    (default ``llama``, as the LLaMA recipes have always written them)."""
    from transformers import AutoConfig

    values = {**config, **extra}
    kind = values.pop("model_type", "llama")
    try:
        return AutoConfig.for_model(kind, **values)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"model.config is not a valid {kind} config ({str(e).splitlines()[0][:200]}): "
                         "give model_type (llama, qwen2, qwen3, mistral, gemma2, ...) and its fields") from None


def build_decoder(vocab_size: int | None = None, pretrained: str | None = None, config: dict | None = None,
                  tokenizer: str | None = None, attn_implementation: str = "sdpa",
                  special_tokens: dict | None = None, importance: str | None = None,
                  require: str | None = None, lora: dict | None = None, exits: dict | None = None,
                  weights: bool = True) -> nn.Module:
    """A transformers ``*ForCausalLM`` from ``pretrained`` (a folder, hub id or GGUF) or built from
    ``config`` (random init; its vocabulary is sized to the tokenizer's), importance-sorted when
    pretrained, sorted in place. ``require``: a class name the model must be (``llama``'s entry).
    ``lora`` (``model.lora``): peft's LoRA adapters on the named projections, after sorting
    (:func:`add_lora`); every other weight is frozen. ``exits`` (``model.exits``): the exits' own
    readouts (:func:`add_exits`). ``weights=False``: a local ``pretrained`` folder's architecture only
    (:meth:`DecoderFamily.build_empty`)."""
    from transformers import AutoModelForCausalLM

    lora = lora_options(lora)  # a mistyped model.lora is refused before any weight is read
    exits = exits_options(exits, lora)

    if not pretrained and config is not None:
        config = dict(config)
        if vocab_size:
            config["vocab_size"] = vocab_size
        model = _random(AutoModelForCausalLM, _config(config, special_tokens or {}), attn_implementation)
    else:
        model = hf.load(AutoModelForCausalLM, pretrained, config, None, weights=weights,
                        attn_implementation=attn_implementation)
    if require and type(model).__name__ != require:
        raise UsageError(f"model.pretrained={pretrained} is a {type(model).__name__}, not a {require}: "
                         "use model=causal_lm for any decoder LLM")
    if vocab_size and vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary only "
                         f"{model.config.vocab_size}: use the model's own tokenizer (model.tokenizer=DIR)")
    layout(model)  # refuse what does not fit before anything is permuted
    method = importance_method(importance)
    if pretrained and method and weights and not hf.is_snapshot(Path(pretrained).expanduser()):
        sort_by_importance(importance_groups(model), method)
    return add_exits(add_lora(sortify_decoder(model), lora), exits)


# --- the exits' own readouts (model.exits) ------------------------------------------------------------
#
# By default every exit reads out through the model's own final norm and LM head (SoFT's shared
# head). A layer's hidden state is not the last layer's, though: on the untouched SmolLM2-135M the
# shared readout of layer 24 agrees with the full model on 0.43 of held-out answer tokens, its own
# copy of the final norm on 0.63, and an affine map before that norm (the "tuned lens") on 0.79; after
# an epoch of SoFT, 0.80 / 0.81 / 0.86 (docs/results/smollm2/exit-norm-probe). ``model.exits.readout``
# gives each exit of ``model.exits.at`` (the configs: the depth dim's levels, the exits the grid trains;
# ``all``: every exit 1..L-1) its own module in place of the final norm (nest.add_exit_readouts):
#
# - ``norm``: a copy of the final norm (H weights per exit). An exit cut out by export keeps it as
#   its final norm: still a stock model;
# - ``affine``: x + W x + b (W, b start at zero, so the exit starts as the shared readout, and weight
#   decay pulls it back there), then a copy of the norm: H^2 + 2H weights and 2 H^2 FLOPs a token per
#   exit. Read by eval, generate and speculative drafting; not a stock config, so export cuts out
#   only the full model (or refuses).
#
# ``model.exits.trunk=frozen`` trains the exits' readouts alone (Kangaroo's adapter on a frozen
# model): the full model computes exactly what it did, and each exit learns to read its layer; with
# distill.enabled=true and distill.alpha=1 they imitate the full model (self-distillation).

EXIT_READOUTS = ("shared", "norm", "affine")
EXIT_TRUNKS = ("train", "frozen")
EXIT_KEYS = ("readout", "trunk", "at")


def exits_options(exits, lora: dict | None = None) -> dict | None:
    """``model.exits`` checked: None for the shared readout, else ``{readout, trunk, at}``. ``at``: the
    layer counts that get a readout, ``all`` (every exit 1..L-1) or a list (the configs pass the depth
    dim's levels, ``${oc.select:dims.depth.levels,all}``: a readout for every exit the grid trains and
    none for the 19 a 10-exit recipe on a 30-layer model never reads; the full depth keeps the model's
    own readout, so it may be in the list)."""
    if exits is None:
        return None
    example = "model.exits.readout=norm|affine (and model.exits.trunk=frozen to train only them) or model.exits=null"
    if not isinstance(exits, dict):
        raise UsageError(f"model.exits must be null or a mapping ({example}), got {exits!r}")
    unknown = sorted(set(exits) - set(EXIT_KEYS))
    if unknown:
        raise UsageError(f"model.exits has no key {unknown[0]!r}: its keys are {', '.join(EXIT_KEYS)}")
    readout, trunk = exits.get("readout", "shared"), exits.get("trunk", "train")
    if readout not in EXIT_READOUTS:
        raise UsageError(f"model.exits.readout must be one of {', '.join(EXIT_READOUTS)}, got {readout!r}")
    if trunk not in EXIT_TRUNKS:
        raise UsageError(f"model.exits.trunk must be one of {', '.join(EXIT_TRUNKS)}, got {trunk!r}")
    if trunk == "frozen" and readout == "shared":
        raise UsageError("model.exits.trunk=frozen trains only the exits' own readouts, and the shared readout "
                         "has none: set model.exits.readout=norm or affine")
    if trunk == "frozen" and lora is not None:
        raise UsageError("model.exits.trunk=frozen and model.lora both choose what trains: use one of them")
    if readout == "shared":  # no exit has a readout of its own: `at` places none
        return None
    at = exits.get("at", "all")
    if at is None:
        at = "all"
    if at != "all" and not (isinstance(at, (list, tuple)) and at
                            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in at)):
        raise UsageError(f"model.exits.at must be 'all' or a list of layer counts (e.g. [15, 24]), got {at!r}")
    return {"readout": readout, "trunk": trunk, "at": at if at == "all" else sorted(set(at))}


class ExitMap(nn.Module):
    """An exit's affine map of its hidden state, ``x + delta(x)``, ``delta`` a linear layer that
    starts at zero (the identity map: the exit starts as the shared readout)."""

    def __init__(self, size: int, device=None, dtype=None):
        super().__init__()
        self.delta = nn.Linear(size, size, device=device, dtype=dtype)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)


def add_exits(model: nn.Module, exits: dict | None) -> nn.Module:
    """The exits ``exits["at"]`` (every exit 1..L-1 for ``all``) of a sorted decoder with their own
    readouts (see above), in place; ``model`` unchanged when ``exits`` is None. With ``trunk=frozen``
    only those readouts train."""
    if exits is None:
        return model
    import copy

    from ..nest import EXITS, add_exit_readouts

    norm = _base(model).norm
    weight = model.get_output_embeddings().weight

    def make(k: int) -> nn.Module:
        own = copy.deepcopy(norm).requires_grad_(True)
        if exits["readout"] == "norm":
            return own
        return nn.Sequential(ExitMap(model.config.hidden_size, weight.device, weight.dtype), own)

    L = len(_base(model).layers)
    at = exits.get("at", "all")
    depths = range(1, L) if at == "all" else [k for k in at if k < L]
    if not depths:  # (the configs' `at` is the depth dim's levels: dims.depth.levels=[L] reads no exit)
        raise UsageError(f"model.exits.readout={exits['readout']} gives exits their own readouts at {at}, and no "
                         f"sub-model of dims reads one: sort along depth with levels below the model's {L} "
                         "layers (e.g. 'dims=[depth]'), or set model.exits=null")
    add_exit_readouts(model, norm, make, depths)
    if exits["trunk"] == "frozen":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(EXITS + ".")
    model.sortednet_exit_readout = exits
    return model


def exits_exportable(model: nn.Module, sub) -> bool:
    """Whether ``sub``'s exit reads out through a stock model's own modules (the shared readout, or
    its own copy of the final norm), so that a cut-out folder reloads as the stock class."""
    exits = getattr(model, "sortednet_exit_readout", None)
    depth = sub.get(model.sortednet.scope.depth_dim)
    return exits is None or exits["readout"] == "norm" or depth is None or depth >= len(_base(model).layers)


# --- LoRA SoFT (model.lora): peft's adapters on a sorted decoder -------------------------------------
#
# peft's ``inject_adapter_in_model`` wraps each target projection (already a prefix-sliced layer) in
# its LoRA ``Linear`` in place: the model keeps its class, its sorting and its exits (the final norm
# and LM head stay shared and frozen), and its state_dict holds the base weights under
# ``...q_proj.base_layer.weight`` beside ``...lora_A.default.weight``/``lora_B``, so a checkpoint is
# still one safetensors file that a build with the same ``model.lora`` loads and resumes.
# Depth nests unchanged (a dropped layer drops its adapters). A width dim nests only where no target
# is a projection it slices: peft's LoRA product runs at the full width, so heads (q/k/v/o_proj) or
# ffn (gate/up/down_proj) with an adapter on one of their projections is refused in one line
# (:func:`lora_why_not`). eval, export and generate merge the adapters into the weights first
# (:func:`merge_lora`, peft's own merge), so sub-models, FLOPs and exports are those of plain layers.

LORA_KEYS = ("r", "alpha", "dropout", "targets")
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                    "gate_up_proj")
#: the projections a width dim slices (outputs or inputs)
LORA_SLICED = {"heads": ("q_proj", "k_proj", "v_proj", "o_proj"), "ffn": ("gate_proj", "up_proj", "down_proj")}
_LORA_EXAMPLE = "model.lora.r=16 (with model.lora.alpha, .dropout, .targets=[q_proj,v_proj]) or model.lora=null"


def lora_options(lora) -> dict | None:
    """``model.lora`` checked: None when off (``null`` or ``r: null``), else ``{r, alpha, dropout, targets}``."""
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise UsageError(f"model.lora must be null or a mapping ({_LORA_EXAMPLE}), got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise UsageError(f"model.lora has no key {unknown[0]!r}: its keys are {', '.join(LORA_KEYS)}")
    r = lora.get("r")
    if r is None:
        return None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UsageError(f"model.lora.r must be null (no adapters) or an integer >= 1 (the adapters' rank), got {r!r}")
    alpha = lora.get("alpha", 2 * r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UsageError(f"model.lora.alpha must be a number > 0 (the adapters' scale is alpha / r), got {alpha!r}")
    dropout = lora.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UsageError(f"model.lora.dropout must be a number in [0, 1), got {dropout!r}")
    targets = lora.get("targets", ["q_proj", "v_proj"])
    if isinstance(targets, str):
        targets = [targets]
    bad = [t for t in targets or [] if t not in LORA_PROJECTIONS] if isinstance(targets, (list, tuple)) else [targets]
    if not targets or bad:
        raise UsageError(f"model.lora.targets must be a list of the decoder layers' projections "
                         f"({', '.join(LORA_PROJECTIONS)}), got {targets!r}: the final norm and LM head are shared "
                         "by every exit and stay frozen")
    return {"r": r, "alpha": alpha, "dropout": float(dropout), "targets": sorted(set(targets))}


def add_lora(model: nn.Module, lora: dict | None) -> nn.Module:
    """peft's LoRA adapters injected in place on ``lora["targets"]`` of every decoder layer (only the
    adapters train); ``model`` itself when ``lora`` is None."""
    if lora is None:
        return model
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UsageError("model.lora needs peft: pip install peft (or make setup)") from None
    present = {name.rsplit(".", 1)[-1] for name, _ in _base(model).layers.named_modules()}
    missing = [t for t in lora["targets"] if t not in present]
    if missing:
        have = [p for p in LORA_PROJECTIONS if p in present]
        raise UsageError(f"model.lora.targets: {type(model).__name__} has no {', '.join(missing)} "
                         f"(its projections: {', '.join(have)})")
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["targets"], bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name  # peft marks the adapters trainable; nothing else trains
    model.sortednet_lora = lora
    return model


def lora_why_not(model: nn.Module, dim: str) -> str | None:
    """Why ``dim`` does not nest with ``model``'s LoRA adapters (None when it does, or without LoRA)."""
    lora = getattr(model, "sortednet_lora", None)
    hit = [t for t in (lora or {}).get("targets", ()) if t in LORA_SLICED.get(dim, ())]
    if not hit:
        return None
    return (f"its LoRA adapters on {', '.join(hit)} run at full width, and {dim} slices "
            f"{', '.join(LORA_SLICED[dim])}: sort along depth, or set model.lora.targets to projections {dim} "
            "does not slice")


def merge_lora(model: nn.Module) -> nn.Module:
    """The adapters merged into the weights they adapt (peft's ``merge``: W += B A alpha / r) and each
    peft layer replaced by its base layer, in place: a plain sorted model again (``merge_and_unload``)."""
    if getattr(model, "sortednet_lora", None) is None:
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m.get_base_layer())
    model.__dict__.pop("peft_config", None)
    del model.sortednet_lora
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _random(auto_class, cfg, attn_implementation: str | None) -> nn.Module:
    hf._quiet()
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    try:
        return auto_class.from_config(cfg)
    except ValueError as e:
        if attn_implementation and attn_implementation != "eager" and "attn" in str(e).lower():
            cfg._attn_implementation = "eager"  # e.g. Gemma 2's soft-capped attention has no sdpa path
            return auto_class.from_config(cfg)
        raise UsageError(f"model.config could not build a causal LM ({str(e).splitlines()[0][:200]})") from None


_PROJECT_BPE = re.compile(r"tokenizer-(?P<corpus>\w+)-bpe(?P<vocab>\d+)$")


def tokenizer(options: dict):
    """``model.tokenizer`` (a folder or hub id), else the one in ``model.pretrained``, else the project's
    byte-level BPE (:mod:`sortedcli.data.lm`; trained on the news corpus and cached on first use)."""
    from ..data import lm

    where = options.get("tokenizer")
    if where and not Path(where).exists() and _PROJECT_BPE.search(Path(where).name):
        # the project's BPE named by a folder that is not here (another machine's or folder's path):
        # the same tokenizer from this user's cache (lm.llm_cache), trained there once if missing
        m = _PROJECT_BPE.search(Path(where).name)
        return lm.load_tokenizer({"tokenizer_corpus": m["corpus"], "vocab_size": int(m["vocab"])})
    if where or options.get("pretrained"):
        tok = hf.tokenizer(options)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    return lm.load_tokenizer({})


def save(folder, plain: nn.Module, meta: dict, example, tokenizer=None, max_shard_size: int | None = None) -> None:
    """A Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads, checked to give
    ``plain``'s logits on ``example`` (the task's check input: several sequences of different
    lengths, padded); weights in safetensors files of at most ``max_shard_size`` bytes."""
    from transformers import AutoModelForCausalLM

    from ..nest import call

    with torch.no_grad():
        want = call(plain.eval(), example)
    hf.save(folder, plain, meta, example, want, AutoModelForCausalLM, tokenizer, max_shard_size)


def _module_function(module: nn.Module, name: str):
    """A function of the transformers modeling file that defines ``module``'s class (each decoder's
    own ``apply_rotary_pos_emb``: partial rotary dims and all)."""
    return getattr(sys.modules[type(module).__module__], name)


class DecoderStack:
    """A decoder ``*ForCausalLM`` seen as embed -> layers -> (final norm + LM head) for decoding.

    ``layers`` is the number of decoder layers that run: all of them by default, fewer for a depth
    sub-model (its exits are then ``1..layers``).
    """

    def __init__(self, model: nn.Module, layers: int | None = None):
        self.model = model
        self.lay = layout(model)
        self.base = _base(model)
        self.config = model.config
        self.lm_head = model.get_output_embeddings()
        self.num_layers = len(self.base.layers) if layers is None else int(layers)
        if not 1 <= self.num_layers <= len(self.base.layers):
            raise ValueError(f"layers must be in 1..{len(self.base.layers)}, got {layers}")
        self._rope_by_type = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    def new_cache(self) -> DynamicCache:
        """A cache of full (never evicting) layers: sliding-window layers see only their window through
        their mask, so cropping back after a rejected draft is always possible."""
        from transformers import DynamicCache

        return DynamicCache()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(ids)  # scaled embeddings (Gemma) scale themselves

    def _rope(self, hidden, pos, kind: str):
        return self.base.rotary_emb(hidden, pos, kind) if self._rope_by_type else self.base.rotary_emb(hidden, pos)

    def layers(self, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache,
               positions: torch.Tensor) -> torch.Tensor:
        """Run decoder layers ``[start, stop)`` on ``hidden`` (1 x T x H) at ``positions`` (T), each
        attending to what ``cache`` holds for it (through its own attention type's mask) and appending
        its keys/values. The layers in ``[start, stop)`` must hold the same number of cached tokens."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if start >= stop:
            return hidden
        pos = positions.view(1, -1)
        kinds = self.lay.layer_types
        masks, ropes = {}, {}
        for kind in set(kinds[start:stop]):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                               position_ids=pos, layer_idx=start)
            ropes[kind] = self._rope(hidden, pos, kind)
        for i in range(start, stop):
            kind = kinds[i]
            hidden = self.base.layers[i](hidden, attention_mask=masks[kind], position_embeddings=ropes[kind],
                                         position_ids=pos, cache=cache, use_cache=True)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden

    def _exit(self, layer: int | None):
        """Where exit ``layer`` (default: ``num_layers``) is read: through its own readout when the model
        gives it one (``model.exits``), else through the shared final norm."""
        nest = getattr(self.model, "sortednet", None)
        if nest is None or nest.exits is None:
            return contextlib.nullcontext()
        from ..nest import reading

        return reading(self.model, self.num_layers if layer is None else int(layer))

    def head(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Logits of the hidden state after ``layer`` layers (default: all that run): the exit's final
        norm (its own, with ``model.exits``), the LM head, its soft-cap."""
        with self._exit(layer):
            return _softcap(self.lm_head(self.base.norm(hidden)), self.lay.softcap)

    def readout_macs(self) -> float:
        """Multiply-adds per token of an exit's own readout beyond the shared one's (the Linear
        weights of ``model.exits``' maps, the mean over the exits; 0 without them): what early exit
        pays at every check on top of the head's rows (:func:`sortedcli.decoding.exit_costs`)."""
        nest = getattr(self.model, "sortednet", None)
        own = [] if nest is None or nest.exits is None else list(nest.exits.values())
        if not own:
            return 0.0
        return sum(m.weight.numel() for readout in own for m in readout.modules()
                   if isinstance(m, nn.Linear)) / len(own)

    def vocab_head(self, vocab: torch.Tensor):
        """The readout restricted to the token ids ``vocab``: the exit's final norm, then those rows of
        the LM head (gathered once, contiguous, so a draft step multiplies by |vocab| rows, not all).
        The function it returns takes ``(hidden, layer=None)`` as :meth:`head` does."""
        head = self.lm_head
        weight = head.weight.detach().index_select(0, vocab.to(head.weight.device))
        bias = None if head.bias is None else head.bias.detach().index_select(0, vocab.to(head.weight.device))
        norm, cap = self.base.norm, self.lay.softcap

        def read(hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
            with self._exit(layer):
                return _softcap(torch.nn.functional.linear(norm(hidden), weight, bias), cap)
        return read

    def _key_value(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and values (batch x kv heads x T x head_dim) of its normed input ``x``, as
        its attention computes them (fused or separate projections, whole or per-head key norms)."""
        hd = self.lay.head_dim
        if self.lay.fused_qkv:
            qkv = attn.qkv_proj(x)
            q, kv = self.lay.heads * hd, self.lay.kv_heads * hd
            k, v = qkv[..., q:q + kv], qkv[..., q + kv:]
        else:
            k, v = attn.k_proj(x), attn.v_proj(x)
        norm = getattr(attn, "k_norm", None)
        if norm is not None and self.lay.whole_qk_norm:
            k = norm(k)
        shape = (*x.shape[:-1], -1, hd)
        k, v = k.view(shape), v.view(shape)
        if norm is not None and not self.lay.whole_qk_norm:
            k = norm(k)
        return k.transpose(1, 2), v.transpose(1, 2)

    def fill(self, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache,
             positions: torch.Tensor) -> None:
        """Append keys/values for layers ``[start, stop)`` that a token skipped, computed from the
        hidden state it exited with (CALM's state propagation): each skipped layer projects that
        state through its own input norm and key/value projections and rotates the keys to the
        token's position. Later tokens attending to those layers then see a key/value for it."""
        if start >= stop:
            return
        pos = positions.view(1, -1)
        ropes = {}
        for i in range(start, stop):
            kind = self.lay.layer_types[i]
            if kind not in ropes:
                ropes[kind] = self._rope(hidden, pos, kind)
            cos, sin = ropes[kind]
            layer = self.base.layers[i]
            attn = layer.self_attn
            norm = getattr(layer, "input_layernorm", None)
            k, v = self._key_value(attn, hidden if norm is None else norm(hidden))
            _, k = _module_function(attn, "apply_rotary_pos_emb")(k, k, cos, sin)
            cache.update(k, v, i)

    def cached(self, cache: DynamicCache, layer: int) -> int:
        """How many tokens ``cache`` holds for ``layer``."""
        return cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0

    def crop(self, cache: DynamicCache, length: int) -> None:
        """Keep the first ``length`` tokens in every layer of ``cache``."""
        for layer in cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)


def truncated(model: nn.Module, layers: int) -> nn.Module:
    """A model of ``model``'s class holding its first ``layers`` decoder layers (shared weights, not
    copies), with ``num_hidden_layers`` (and ``layer_types``) set to match: the exit after ``layers``
    as a plain transformers model."""
    base = _base(model)
    if not 1 <= layers <= len(base.layers):
        raise ValueError(f"layers must be in 1..{len(base.layers)}, got {layers}")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:layers]
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        small = type(model)(config)
    small_base = _base(small)
    for name, child in base.named_children():
        setattr(small_base, name, nn.ModuleList(list(child[:layers])) if child is base.layers else child)
    for name, child in model.named_children():
        if child is not base:
            setattr(small, name, child)
    small.generation_config = model.generation_config
    return small.eval()


def weight_files(pretrained: str) -> list[Path] | None:
    """The safetensors files of the local Hugging Face folder ``pretrained`` (its index's files, or its one
    ``model.safetensors``; [] for a run's snapshot, which holds no weights); None for what is read another
    way (a hub id, a GGUF file, PyTorch ``.bin`` weights)."""
    import json

    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        return None
    if hf.is_snapshot(folder):
        return []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else None


def build_empty(options: dict) -> tuple[nn.Module, list[Path]] | None:
    """:func:`build_decoder` on the meta device, reading no weight, and the files that hold its weights
    (:meth:`Adapter.build_empty`). None for a pretrained model whose weights are not safetensors in a
    local folder, or that ``model.importance`` permutes as it loads (the permutation is computed from
    every weight of a layer: that run builds eagerly)."""
    pretrained = options.get("pretrained")
    files: list[Path] = []
    if pretrained:
        files = weight_files(str(pretrained))
        if files is None:
            return None
        if files and importance_method(options.get("importance")):
            return None
    import copy

    with torch.device("meta"):
        model = build_decoder(**options, weights=False)
    try:  # a rehearsal on copies: every such buffer is one init_buffers can recompute
        _init_buffers(model, [copy.deepcopy(m).to_empty(device="cpu") for m in _buffer_modules(model)])
    except ValueError:
        return None
    return model, files


def _buffer_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if m._non_persistent_buffers_set]


def _init_buffers(model: nn.Module, modules: list[nn.Module]) -> None:
    """``modules``' non-persistent buffers recomputed by transformers' own ``_init_weights``, which must
    write every one of them (each is NaN before); a ValueError where it cannot (a module that also holds a
    weight, which it would re-initialize; a buffer it leaves alone)."""
    for m in modules:
        if next(m.parameters(recurse=False), None) is not None:
            raise ValueError(f"{type(m).__name__} holds weights beside its non-persistent buffers")
        buffers = [b for name, b in m.named_buffers(recurse=False) if name in m._non_persistent_buffers_set]
        if not all(b.is_floating_point() for b in buffers):
            raise ValueError(f"{type(m).__name__} has a non-persistent buffer that is not floating-point")
        for b in buffers:
            b.fill_(float("nan"))
        with torch.device(buffers[0].device):
            model._init_weights(m)
        if any(b.isnan().any() for b in buffers):
            raise ValueError(f"{type(model).__name__}._init_weights leaves a buffer of {type(m).__name__} unset")


def init_buffers(model: nn.Module) -> None:
    """The non-persistent buffers (rotary ``inv_freq``), which no checkpoint holds, recomputed once their
    storage exists (:meth:`DecoderFamily.build_empty` checked that this can be done)."""
    _init_buffers(model, _buffer_modules(model))


class DecoderFamily(Adapter):
    """The registry's adapter for Hugging Face decoder LLMs (see the module doc)."""

    dims = DIMS
    tasks = TASKS
    exports = "a Hugging Face folder (AutoModelForCausalLM)"
    unexportable = ("an exit with its own affine readout (model.exits.readout=affine), which a stock model has no "
                    "place for")
    can_generate = True

    def build(self, **args) -> nn.Module:
        return build_decoder(**self.options, **args)

    def dims_of(self, model: nn.Module) -> dict[str, str]:
        return {d: k for d, k in model.sortednet_layout.dims.items() if lora_why_not(model, d) is None}

    def why_not(self, model: nn.Module, dim: str) -> str:
        return lora_why_not(model, dim) or model.sortednet_layout.why_not(dim)

    def for_inference(self, model: nn.Module) -> nn.Module:
        return merge_lora(model)

    def exportable(self, model: nn.Module, sub) -> bool:
        return exits_exportable(model, sub)

    def build_empty(self, **args) -> tuple[nn.Module, list[Path]] | None:
        return build_empty({**self.options, **args})

    def init_buffers(self, model: nn.Module) -> None:
        init_buffers(model)

    def tokenizer(self, options: dict):
        return tokenizer(options)

    def save(self, folder, plain, meta, example, tokenizer=None, max_shard_size=None) -> None:
        save(folder, plain, meta, example, tokenizer, max_shard_size)

    def stack(self, model: nn.Module) -> DecoderStack:
        return DecoderStack(model)

    def snapshot(self, model, tok, folder, source) -> None:
        hf.snapshot(model, tok, folder, source)

    def importance_groups(self, model: nn.Module) -> list[Group]:
        return importance_groups(model)


Family = DecoderFamily
