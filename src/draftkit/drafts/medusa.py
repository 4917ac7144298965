"""Medusa heads (Cai et al. 2024): K parallel heads on the target's final hidden state.

Head k (0-based) reads h_t, the target's hidden state after the final norm at position t (the state the target's LM head
turns into x_{t+1}), and predicts x_{t+2+k}. Each head is a stack of residual SiLU blocks, x <- x + SiLU(W x + b), with W
and b zero-initialised so a fresh head starts as the identity, followed by a vocabulary projection: its own, initialised
from the target's LM head, or the target's LM head itself (shared, not trained).

Every block has its own weights. The reference code builds `[ResBlock(h)] * n`, which repeats one module and ties all
layers of a head (FasterDecoding/Medusa#133); that is not reproduced here.

Parameter names follow vLLM's Medusa model (vllm/model_executor/models/medusa.py): `blocks.{h}.layers.{l}.weight|bias`
and `lm_heads.{h}.weight`, so the vLLM export is the state dict itself.

With a `token_map` (a restricted draft vocabulary, drafts/vocab.py) the heads score only those target ids: own
projections have len(token_map) rows, a shared LM head is passed in already sliced (W[token_map]), logits are in draft
ids, and the map is the persistent buffer `token_map` (vLLM's name for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draftkit.drafts.vocab import draft_rows, register_token_map

LM_HEAD_MODES = ("shared", "own")


class ResidualStack(nn.Module):
    """`layers[l]`: Linear(H, H); x <- x + SiLU(layers[l](x)) for each l, each layer with its own weights."""

    def __init__(self, hidden_size: int, num_layers: int, bias: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """K heads. `forward(hidden)` -> logits [K, *hidden.shape[:-1], V'] (V' = len(token_map), else V); with a shared
    LM head pass its weight (its token_map rows)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int, *,
                 lm_head: str = "shared", bias: bool = True, token_map: torch.Tensor | None = None):
        super().__init__()
        if lm_head not in LM_HEAD_MODES:
            raise ValueError(f"lm_head={lm_head!r}: choose 'shared' (the target's LM head) or 'own' (one per head)")
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"Medusa needs num_heads >= 1 and num_layers >= 1; got {num_heads} and {num_layers}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers, self.bias = num_heads, num_layers, bias
        self.lm_head_mode = lm_head
        self.draft_vocab_size = register_token_map(self, token_map, vocab_size)
        self.blocks = nn.ModuleList(ResidualStack(hidden_size, num_layers, bias) for _ in range(num_heads))
        self.lm_heads = (
            nn.ModuleList(nn.Linear(hidden_size, self.draft_vocab_size, bias=False) for _ in range(num_heads))
            if lm_head == "own" else None
        )

    def head_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [K, ..., H]: each head's blocks applied to the same target state."""
        return torch.stack([block(hidden) for block in self.blocks])

    def forward(self, hidden: torch.Tensor, shared_lm_head: torch.Tensor | None = None, *,
                project: bool = True) -> torch.Tensor:
        """project=False returns the heads' states [K, ..., H] before the vocabulary projection (for a loss that
        applies the LM head itself, a chunk of positions at a time)."""
        states = self.head_states(hidden)
        if not project:
            return states
        if self.lm_heads is not None:
            return torch.stack([head(state) for head, state in zip(self.lm_heads, states)])
        if shared_lm_head is None:
            raise ValueError("these Medusa heads share the target's LM head: pass its weight as shared_lm_head")
        return F.linear(states, shared_lm_head)


def medusa_heads(
    hidden_size: int,
    vocab_size: int,
    num_heads: int = 4,
    num_layers: int = 1,
    lm_head: str = "shared",
    bias: bool = True,
    lm_head_weight: torch.Tensor | None = None,
    token_map: torch.Tensor | None = None,
) -> MedusaHeads:
    """Build Medusa heads; with lm_head="own", every head's projection starts as a copy of `lm_head_weight` [V, H]
    (its token_map rows when a draft vocabulary is given)."""
    heads = MedusaHeads(hidden_size, vocab_size, num_heads, num_layers, lm_head=lm_head, bias=bias,
                        token_map=token_map)
    if heads.lm_heads is not None:
        if lm_head_weight is None:
            raise ValueError("lm_head='own' initialises each head from the target's LM head: pass lm_head_weight")
        if tuple(lm_head_weight.shape) != (vocab_size, hidden_size):
            raise ValueError(f"lm_head_weight has shape {tuple(lm_head_weight.shape)}, expected {(vocab_size, hidden_size)}")
        with torch.no_grad():
            for head in heads.lm_heads:
                head.weight.copy_(draft_rows(lm_head_weight.detach(), token_map).float())
    return heads


class MedusaWithTarget(nn.Module):
    """Medusa-2: the target (with trainable LoRA adapters, the rest frozen) and the heads, trained together.

    `forward` returns the target's logits [B, T, V] and the heads' logits [K, B, T, V], both from one pass of the
    adapted target. `lr_scale` lets the training loop run the heads at `heads_lr_multiplier` times the lr.
    """

    def __init__(self, target_model: nn.Module, heads: MedusaHeads, heads_lr_multiplier: float = 4.0):
        super().__init__()
        self.target = target_model
        self.heads = heads
        self.heads_lr_multiplier = heads_lr_multiplier

    def lr_scale(self, name: str) -> float:
        return self.heads_lr_multiplier if name.startswith("heads.") else 1.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.target.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        lm_head = self.target.get_output_embeddings()
        return lm_head(hidden), self.heads(hidden, lm_head.weight)
