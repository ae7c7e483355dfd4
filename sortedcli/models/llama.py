"""LLaMA (transformers' ``LlamaForCausalLM``) as a sorted model, and as a layer stack for decoding.

Sorted model (the registry entry ``llama``; Sorted LLaMA / SoFT):

- **depth**: the first k decoder layers; exit k reads the hidden state after layer k through the
  model's own final RMSNorm and LM head (no new parameters). A dropped layer passes its hidden state
  on unchanged, so the depth-k sub-model and exit k of a deeper pass are the same function, and one
  trunk pass trains every exit (``sampler=all``).
- **heads**: with grouped-query attention, key/value heads and their query groups in proportion: k/v
  projections keep ``ceil(level x kv_heads)`` heads (unit ``head_dim``), the query projection that many
  groups of ``heads / kv_heads`` query heads; ``o_proj`` reads its input width from the tensor.
- **ffn**: a prefix of the SwiGLU intermediate neurons (``gate_proj``/``up_proj`` outputs; ``down_proj``
  reads its input width from the tensor).

LLaMA's config states ``head_dim`` explicitly, so every sub-model (fewer layers, heads or FFN
neurons) is a stock ``LlamaConfig``: ``export`` writes a folder ``AutoModelForCausalLM`` loads.

:class:`LlamaStack` implements the small stack protocol that decoding is written against: embed
tokens, run decoder layers ``[start, stop)`` on hidden states while appending their keys/values to a
transformers ``DynamicCache``, read any hidden state out through the model's own final RMSNorm and
LM head (an exit: no new parameters), write the keys/values of layers that a token skipped, and crop
the cache. It drives the model's own modules (``model.embed_tokens``, ``model.layers``,
``model.rotary_emb``, ``model.norm``, ``lm_head``) exactly as ``LlamaModel.forward`` does, so running
all layers and the head gives the logits of ``LlamaForCausalLM`` itself.

Decoding is batch size 1: positions are one sequence's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..nest import COUNT, FRACTION, SubModel, sortify, sorted_size
from . import hf

if TYPE_CHECKING:  # transformers is imported where a LLaMA is built or decoded, not with the registry
    from transformers import DynamicCache, LlamaForCausalLM

DIMS = {"depth": COUNT, "heads": FRACTION, "ffn": FRACTION}
TASKS = ("causal_lm",)


def _readout(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Exit: the model's own final RMSNorm and LM head on the hidden state after layer k."""
    return model.lm_head(model.model.norm(hidden))


def _out_dim(head_dim: int, groups: int):
    def out_dim(name: str, module: nn.Module):
        if name.endswith("self_attn.q_proj"):
            return ("heads", head_dim * groups)  # whole query groups: GQA proportion kept
        if name.endswith(("self_attn.k_proj", "self_attn.v_proj")):
            return ("heads", head_dim)
        if name.endswith(("mlp.gate_proj", "mlp.up_proj")):
            return ("ffn", 1)
        return None  # hidden size, o_proj/down_proj outputs, embeddings and the LM head stay full
    return out_dim


def sortify_llama(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Sort a transformers ``LlamaForCausalLM`` in place along depth, heads and ffn."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.head_dim = head_dim  # explicit, so that a config with fewer heads keeps the head size
    kv = config.num_key_value_heads or config.num_attention_heads
    groups = config.num_attention_heads // kv
    units, finish = hf.prefix_layers(model, "model.layers")

    def finish_config(plain, sub):
        finish(plain, sub)
        if sub is None:
            return
        if getattr(plain.config, "layer_types", None) is not None:
            plain.config.layer_types = list(plain.config.layer_types)[:plain.config.num_hidden_layers]
        if sub.get("heads") is not None:
            kept = sorted_size(kv * head_dim, sub["heads"], head_dim) // head_dim
            plain.config.num_key_value_heads = kept
            plain.config.num_attention_heads = kept * groups
        if sub.get("ffn") is not None:
            plain.config.intermediate_size = sorted_size(config.intermediate_size, sub["ffn"])

    return sortify(model, out_dim=_out_dim(head_dim, groups), units=units, readout=_readout, finish=finish_config)


def build_llama(vocab_size: int | None = None, pretrained: str | None = None, config: dict | None = None,
                tokenizer: str | None = None, attn_implementation: str = "sdpa",
                special_tokens: dict | None = None) -> LlamaForCausalLM:
    """A transformers ``LlamaForCausalLM`` from ``pretrained`` (a folder or hub id) or built from
    ``config`` (random init; its vocabulary is sized to the tokenizer's), sorted in place."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    extra = {"attn_implementation": attn_implementation}
    if not pretrained and config is not None:
        config = {**config, **(special_tokens or {})}
        if vocab_size:
            config["vocab_size"] = vocab_size
    model = hf.load(AutoModelForCausalLM, pretrained, config, LlamaConfig, **extra)
    if not isinstance(model, LlamaForCausalLM):
        raise UsageError(f"model.pretrained={pretrained} is a {type(model).__name__}, not a LlamaForCausalLM")
    if vocab_size and vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary only "
                         f"{model.config.vocab_size}: use the model's own tokenizer (model.tokenizer=DIR)")
    return sortify_llama(model)


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


def exportable(model: nn.Module, sub: SubModel) -> bool:
    return True  # depth, heads (GQA-proportional, explicit head_dim) and ffn are all LlamaConfig fields


def save(folder, plain: nn.Module, meta: dict, example, tokenizer=None) -> None:
    """A Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads, checked to give
    ``plain``'s logits on ``example`` (the task's check input: several
    sequences of different lengths, padded)."""
    from transformers import AutoModelForCausalLM

    from ..nest import call

    with torch.no_grad():
        want = call(plain.eval(), example)
    hf.save(folder, plain, meta, example, want, AutoModelForCausalLM, tokenizer)


class LlamaStack:
    """A ``LlamaForCausalLM`` seen as embed -> layers -> (final norm + LM head) for decoding.

    ``layers`` is the number of decoder layers that run: all of them by default, fewer for a depth
    sub-model (its exits are then ``1..layers``).
    """

    def __init__(self, model: LlamaForCausalLM, layers: int | None = None):
        self.model = model
        self.base = model.model
        self.config = model.config
        self.num_layers = len(self.base.layers) if layers is None else int(layers)
        if not 1 <= self.num_layers <= len(self.base.layers):
            raise ValueError(f"layers must be in 1..{len(self.base.layers)}, got {layers}")

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    def new_cache(self) -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(ids)

    def layers(self, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache,
               positions: torch.Tensor) -> torch.Tensor:
        """Run decoder layers ``[start, stop)`` on ``hidden`` (1 x T x H) at ``positions`` (T), each
        attending to what ``cache`` holds for it and appending its keys/values. The layers in
        ``[start, stop)`` must hold the same number of cached tokens (the mask is built for layer
        ``start``)."""
        from transformers.masking_utils import create_causal_mask

        if start >= stop:
            return hidden
        pos = positions.view(1, -1)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  cache=cache, position_ids=pos, layer_idx=start)
        rope = self.base.rotary_emb(hidden, position_ids=pos)
        for layer in self.base.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos,
                           cache=cache, use_cache=True)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of any layer's hidden state: the model's final RMSNorm, then its LM head."""
        return self.model.lm_head(self.base.norm(hidden))

    def vocab_head(self, vocab: torch.Tensor):
        """The readout restricted to the token ids ``vocab``: the final RMSNorm, then those rows of the
        LM head (gathered once, contiguous, so a draft step multiplies by |vocab| rows, not all)."""
        head = self.model.lm_head
        weight = head.weight.detach().index_select(0, vocab.to(head.weight.device))
        bias = None if head.bias is None else head.bias.detach().index_select(0, vocab.to(head.weight.device))
        norm = self.base.norm
        return lambda hidden: torch.nn.functional.linear(norm(hidden), weight, bias)

    def fill(self, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache,
             positions: torch.Tensor) -> None:
        """Append keys/values for layers ``[start, stop)`` that a token skipped, computed from the
        hidden state it exited with (CALM's state propagation): each skipped layer projects that
        state through its own input RMSNorm, ``k_proj`` and ``v_proj`` and rotates the keys to the
        token's position. Later tokens attending to those layers then see a key/value for it."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if start >= stop:
            return
        pos = positions.view(1, -1)
        cos, sin = self.base.rotary_emb(hidden, position_ids=pos)
        for i in range(start, stop):
            layer = self.base.layers[i]
            attn = layer.self_attn
            shape = (*hidden.shape[:-1], -1, attn.head_dim)
            x = layer.input_layernorm(hidden)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
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


def truncated(model: LlamaForCausalLM, layers: int) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` holding the first ``layers`` decoder layers of ``model`` (shared
    weights, not copies), with ``num_hidden_layers`` set to match: the exit after ``layers`` as a
    plain transformers model."""
    from transformers import LlamaForCausalLM

    if not 1 <= layers <= len(model.model.layers):
        raise ValueError(f"layers must be in 1..{len(model.model.layers)}, got {layers}")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:layers]
    with torch.device("meta"):
        small = LlamaForCausalLM(config)
    small.model.embed_tokens = model.model.embed_tokens
    small.model.layers = nn.ModuleList(list(model.model.layers[:layers]))
    small.model.norm = model.model.norm
    small.model.rotary_emb = model.model.rotary_emb
    small.lm_head = model.lm_head
    small.generation_config = model.generation_config
    return small.eval()


snapshot = hf.snapshot  # the registry's snapshot hook: the pretrained config + tokenizer into the run folder
