"""Kangaroo (Liu et al., arXiv 2404.18911): a self-draft made of the target's first `exit_layer` layers plus an adapter.

The adapter is one attention-only Llama decoder layer (input RMSNorm, attention, residual; no MLP) and a final RMSNorm;
its output goes through the target's frozen LM head. Tensor names follow the reference implementation's adapter
checkpoint: `layers.0.input_layernorm.weight`, `layers.0.self_attn.{q,k,v,o}_proj.weight`, `norm.weight`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding

from draftkit.drafts import seeded_init
from draftkit.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama",)


class AttentionOnlyLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx=0)


class KangarooAdapter(nn.Module):
    """hidden[exit_layer] of the target ([B, T, H], pre-norm residual) -> normed states for the target's LM head."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([AttentionOnlyLayer(config)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None
    ) -> torch.Tensor:
        """position_ids [B, T]; attention_mask: additive [B or 1, 1, T, past + T]; cache: anything with the
        transformers `update(keys, values, layer_idx)` interface (the runtime's per-layer cache), or None."""
        layer = self.layers[0]
        position_embeddings = self.rotary_emb(hidden, position_ids)
        attended, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=position_embeddings,
                                      attention_mask=attention_mask, past_key_values=cache)
        return self.norm(hidden + attended)


def adapter_config(target_config) -> LlamaConfig:
    """The adapter's config: the target's (text) config with one layer; the exported config.json."""
    text_config = target_config.get_text_config()
    if text_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Kangaroo adapters are built from Llama attention layers; the target is a {text_config.model_type!r} "
            f"model. Supported target families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = 1
    config.architectures = None
    # Eager and SDPA both take the additive masks draftkit builds; other kernels would ignore them.
    config._attn_implementation = "sdpa"
    return config


def kangaroo_adapter(
    target_config,
    exit_layer: int,
    init_attention: nn.Module | None = None,
    init_input_norm: nn.Module | None = None,
    init_final_norm: nn.Module | None = None,
    seed: int = 0,
) -> KangarooAdapter:
    """A fresh adapter for a target with `target_config`, exiting after `exit_layer` layers.

    The init modules (typically the target's layer `exit_layer` attention and input norm, and its final norm) start
    the adapter as "the next target layer without its MLP", far closer to the full model than random weights.
    """
    num_layers = target_config.get_text_config().num_hidden_layers
    if not 1 <= exit_layer < num_layers:
        raise ConfigError(
            f"kangaroo exit_layer={exit_layer} is outside the target's depth: the draft needs at least one shallow "
            f"layer and verification at least one deep layer. Fix: choose 1..{num_layers - 1} for this "
            f"{num_layers}-layer target (the paper uses 2 of 32)"
        )
    config = adapter_config(target_config)
    with seeded_init(seed):
        adapter = KangarooAdapter(config)
    layer = adapter.layers[0]
    with torch.no_grad():
        for module, source in ((layer.self_attn, init_attention), (layer.input_layernorm, init_input_norm),
                               (adapter.norm, init_final_norm)):
            if source is not None:
                module.load_state_dict({k: v.detach().float().clone() for k, v in source.state_dict().items()})
    return adapter.float()
