"""Hydra heads (Ankner et al. 2024): sequentially dependent draft heads, and Hydra++'s prefix-attention layer.

Head i (0-based) at position t reads concat(h_t, e(x_{t+1}), ..., e(x_{t+1+i})), the target's final hidden state and
the embeddings of the tokens before the one it predicts, x_{t+2+i}. Embeddings come from the target's frozen input
embedding table, passed in at call time (never a parameter here). The first block of head i maps H·(i+2) to H with a
learned linear residual, `x = R u + SiLU(W u + b)`; the next num_layers - 1 blocks are x <- x + SiLU(W x + b), each
with its own weights (the reference code's `[ResBlock] * n` tie is not reproduced). W starts at zero. The vocabulary
projection is the target's LM head (shared) or one per head initialised from it (Hydra's own heads carry a bias).

Hydra++'s prefix layer (`prefix_layer=True`) is one Llama decoder layer run causally over the target's hidden states
before the heads read them (its own KV cache at inference). Its o_proj and down_proj start at zero, so it begins as
the identity and training moves it away; the reference initialises a fresh LlamaModel layer.

With a `token_map` (drafts/vocab.py) the heads score only those target ids, as Medusa's do (drafts/medusa.py): own
projections have len(token_map) rows, a shared LM head comes in sliced, and logits are in draft ids. The embeddings a
head reads are still of target ids (the tokens on the drafted path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draftkit.drafts.layers import DecoderStack
from draftkit.drafts.medusa import LM_HEAD_MODES, ResidualStack
from draftkit.drafts.vocab import draft_rows, register_token_map


class GroundedBlock(nn.Module):
    """u [..., D_in] -> R u + SiLU(W u + b) [..., H]: the first block of a Hydra head."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(in_features, hidden_size)
        self.res_connection = nn.Linear(in_features, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        with torch.no_grad():  # R starts by passing h_t through (the first H inputs) and ignoring the embeddings
            self.res_connection.weight.zero_()
            self.res_connection.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
            self.res_connection.bias.zero_()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.res_connection(u) + F.silu(self.linear(u))


class HydraHeads(nn.Module):
    """`forward(hidden [B, T, H], ids [B, T], embed, shared_lm_head)` -> logits [K, B, T, V] with teacher forcing:
    head i at t reads the embeddings of ids[t+1..t+1+i] (zeros past the end, where no label is scored)."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int, *, lm_head: str = "shared",
                 prefix_layer: bool = False, target_config=None, dropout: float = 0.0,
                 token_map: torch.Tensor | None = None):
        super().__init__()
        if lm_head not in LM_HEAD_MODES:
            raise ValueError(f"lm_head={lm_head!r}: choose 'shared' (the target's LM head) or 'own' (one per head)")
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"Hydra needs num_heads >= 1 and num_layers >= 1; got {num_heads} and {num_layers}")
        if prefix_layer and target_config is None:
            raise ValueError("the prefix layer copies the target's attention geometry: pass target_config")
        self.hidden_size, self.vocab_size, self.num_heads, self.num_layers = hidden_size, vocab_size, num_heads, num_layers
        self.lm_head_mode = lm_head
        self.draft_vocab_size = register_token_map(self, token_map, vocab_size)
        self.first = nn.ModuleList(GroundedBlock(hidden_size * (i + 2), hidden_size) for i in range(num_heads))
        self.rest = nn.ModuleList(ResidualStack(hidden_size, num_layers - 1) for _ in range(num_heads))
        self.lm_heads = (nn.ModuleList(nn.Linear(hidden_size, self.draft_vocab_size) for _ in range(num_heads))
                         if lm_head == "own" else None)
        self.prefix = DecoderStack(target_config, 1) if prefix_layer else None
        self.dropout = nn.Dropout(dropout)

    def head_state(self, index: int, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Head `index`'s state [..., H] (before the vocabulary projection) on hidden [..., H] and the embeddings
        [..., index + 1, H] of the tokens before its target."""
        u = torch.cat([hidden, token_embeds.flatten(-2)], dim=-1)
        return self.rest[index](self.first[index](self.dropout(u)))

    def head_logits(self, index: int, hidden: torch.Tensor, token_embeds: torch.Tensor,
                    shared_lm_head: torch.Tensor | None) -> torch.Tensor:
        """Head `index`'s logits on hidden [..., H] and the embeddings [..., index + 1, H] of the tokens before its
        target."""
        x = self.head_state(index, hidden, token_embeds)
        if self.lm_heads is not None:
            return self.lm_heads[index](x)
        if shared_lm_head is None:
            raise ValueError("these Hydra heads share the target's LM head: pass its weight as shared_lm_head")
        return F.linear(x, shared_lm_head)

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, embed: nn.Module,
                shared_lm_head: torch.Tensor | None = None, *, project: bool = True) -> torch.Tensor:
        """Logits [K, B, T, V]; project=False returns the heads' states [K, B, T, H] before the vocabulary projection
        (for a loss that applies the LM head itself, a chunk of positions at a time)."""
        if self.prefix is not None:
            hidden = self.prefix(hidden)
        embeds = embed(ids).to(hidden.dtype)
        length = ids.shape[1]
        # shifted[j][:, t] = e(x_{t+1+j}); shifting (not torch.roll) leaves zeros, not wrapped tokens, at the end.
        shifted = [F.pad(embeds[:, 1 + j:], (0, 0, 0, min(1 + j, length))) [:, :length] for j in range(self.num_heads)]
        if not project:
            return torch.stack([self.head_state(i, hidden, torch.stack(shifted[: i + 1], dim=-2))
                                for i in range(self.num_heads)])
        return torch.stack([
            self.head_logits(i, hidden, torch.stack(shifted[: i + 1], dim=-2), shared_lm_head)
            for i in range(self.num_heads)
        ])


def hydra_heads(
    hidden_size: int,
    vocab_size: int,
    num_heads: int = 4,
    num_layers: int = 1,
    lm_head: str = "shared",
    prefix_layer: bool = False,
    dropout: float = 0.0,
    target_config=None,
    lm_head_weight: torch.Tensor | None = None,
    token_map: torch.Tensor | None = None,
) -> HydraHeads:
    """Build Hydra heads; with lm_head="own", every projection starts as the target's LM head (its token_map rows when
    a draft vocabulary is given) and a zero bias."""
    heads = HydraHeads(hidden_size, vocab_size, num_heads, num_layers, lm_head=lm_head, prefix_layer=prefix_layer,
                       target_config=target_config, dropout=dropout, token_map=token_map)
    if heads.lm_heads is not None:
        if lm_head_weight is None or tuple(lm_head_weight.shape) != (vocab_size, hidden_size):
            raise ValueError(f"lm_head='own' initialises each head from the target's LM head: pass lm_head_weight "
                             f"of shape {(vocab_size, hidden_size)}")
        with torch.no_grad():
            for head in heads.lm_heads:
                head.weight.copy_(draft_rows(lm_head_weight.detach(), token_map).float())
                head.bias.zero_()
    return heads
