"""Building blocks the draft-head families share: a stack of Llama decoder layers with the target's attention
geometry (Hydra++'s prefix layer, Clover-2's augmenting block) and the causal mask it runs under. The stack always
uses SDPA attention, which takes the boolean mask as is."""

from __future__ import annotations

import torch
from torch import nn


def causal_mask(query_length: int, past_length: int, device) -> torch.Tensor:
    """Boolean [1, 1, q, past + q] mask (True = attend): query j (at position past + j) sees keys 0..past + j. Boolean,
    so it stays valid whatever dtype autocast gives the queries."""
    return torch.ones(query_length, past_length + query_length, dtype=torch.bool, device=device).tril(past_length)[None, None]


class DecoderStack(nn.Module):
    """`num_layers` Llama decoder layers run causally over [B, T, H] states, with their own KV cache at decoding time.

    Geometry (heads, KV heads, head_dim, MLP width, RoPE) comes from the target's HF config. Each layer starts as a
    copy of `init_from` (a target decoder layer) if given; otherwise fresh, with o_proj and down_proj at zero when
    `identity_init`, so the stack starts as the identity.
    """

    def __init__(self, target_config, num_layers: int = 1, *, init_from: nn.Module | None = None,
                 identity_init: bool = True):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        text = target_config.get_text_config()
        config = LlamaConfig(
            hidden_size=text.hidden_size, intermediate_size=text.intermediate_size, num_hidden_layers=num_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6), max_position_embeddings=text.max_position_embeddings,
            rope_parameters=getattr(text, "rope_parameters", None), vocab_size=1,
        )
        config._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(num_layers))
        self.rotary = LlamaRotaryEmbedding(config)
        for layer in self.layers:
            if init_from is not None:
                layer.load_state_dict(init_from.state_dict())
            elif identity_init:
                nn.init.zeros_(layer.self_attn.o_proj.weight)
                nn.init.zeros_(layer.mlp.down_proj.weight)

    def forward(self, hidden: torch.Tensor, cache=None, past_length: int = 0) -> torch.Tensor:
        """hidden [B, T, H] at positions past_length.. (causal; right padding needs no extra mask)."""
        length = hidden.shape[1]
        positions = torch.arange(past_length, past_length + length, device=hidden.device)[None]
        mask = causal_mask(length, past_length, hidden.device)
        rotary = self.rotary(hidden, positions)
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=cache is not None, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden
