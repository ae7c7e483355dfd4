"""LLaMA (transformers' ``LlamaForCausalLM``) as a layer stack for :mod:`sortedcli.decoding`.

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

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


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
        return DynamicCache(config=self.config)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(ids)

    def layers(self, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache,
               positions: torch.Tensor) -> torch.Tensor:
        """Run decoder layers ``[start, stop)`` on ``hidden`` (1 x T x H) at ``positions`` (T), each
        attending to what ``cache`` holds for it and appending its keys/values. The layers in
        ``[start, stop)`` must hold the same number of cached tokens (the mask is built for layer
        ``start``)."""
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

    def fill(self, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache,
             positions: torch.Tensor) -> None:
        """Append keys/values for layers ``[start, stop)`` that a token skipped, computed from the
        hidden state it exited with (CALM's state propagation): each skipped layer projects that
        state through its own input RMSNorm, ``k_proj`` and ``v_proj`` and rotates the keys to the
        token's position. Later tokens attending to those layers then see a key/value for it."""
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
