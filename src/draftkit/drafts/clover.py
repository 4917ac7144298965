"""Clover-2 (Xiao et al. 2024): regressive connection, attention decoder, augmenting block.

At position t the model reads the target's final hidden state BEFORE the final norm, h_t, and the embedding of the
next token, e(x_{t+1}); embeddings are rows of the target's LM head (the reference's frozen copy, passed in at call
time here). Pieces:
  * `fuse` (attention decoder): h + concat_j(cos(q_j(RMSNorm h), k_j(e)) · v_j(e)) over attention heads j, i.e. each
    head's cosine similarity between the hidden state's query and the token's key gates the token's value.
  * `augment` (augmenting block): `num_layers` Llama decoder layers, copies of the target's last layer, run causally
    over the fused states: H_t.
  * heads (regressive connection): head 0 outputs norm(W_0 H_t); head i > 0 updates H_i = rnn(H_{i-1}, e(x_{t+1+i}))
    (another cosine-gated block) and outputs norm(W_out [H_i; e(x_{t+1+i})]). `norm` starts as the target's final
    norm; the target's LM head turns each output into logits.
Head i at t predicts the post-norm target feature f_{t+1+i} and so the token x_{t+2+i}, the same token Medusa head i
and Hydra head i predict.

Clover owns no vocabulary projection. With a `token_map` (drafts/vocab.py) it only carries the map as its persistent
buffer `token_map` (so exports record it); the caller scores its features with the LM head's token_map rows, while
token embeddings stay rows of the full head (they embed target ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draftkit.drafts.layers import DecoderStack
from draftkit.drafts.vocab import register_token_map


class CosineGatedBlock(nn.Module):
    """x + concat_j(cos(q_j(norm x), k_j(e)) · v_j(e)); q, k, v: Linear(H, H) with bias, split into `num_heads`."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.num_heads, -1))  # noqa: E731
        gate = F.cosine_similarity(split(self.q(self.norm(x))), split(self.k(token_embeds)), dim=-1)
        return x + (gate.unsqueeze(-1) * split(self.v(token_embeds))).flatten(-2)


class Clover2(nn.Module):
    """`forward(prenorm_hidden [B, T, H], ids [B, T], embed_weight [V, H])` -> per-head features [K, B, T, H]
    (teacher forced: head i at t reads ids[t+1..t+1+i]); the target's LM head turns them into logits."""

    def __init__(self, hidden_size: int, num_heads: int, target_config, *, num_layers: int = 2,
                 num_attention_heads: int | None = None, init_layer: nn.Module | None = None,
                 final_norm: nn.Module | None = None, token_map: torch.Tensor | None = None):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"Clover-2 needs num_heads >= 1 and num_layers >= 1; got {num_heads} and {num_layers}")
        text = target_config.get_text_config()
        attention_heads = num_attention_heads or text.num_attention_heads
        eps = getattr(text, "rms_norm_eps", 1e-6)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.draft_vocab_size = register_token_map(self, token_map, text.vocab_size)
        self.fuse = CosineGatedBlock(hidden_size, attention_heads, eps)
        self.augment = DecoderStack(target_config, num_layers, init_from=init_layer, identity_init=False)
        self.first_head = nn.Linear(hidden_size, hidden_size)
        self.rnn = CosineGatedBlock(hidden_size, attention_heads, eps)
        self.out = nn.Linear(2 * hidden_size, hidden_size)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        if final_norm is not None:
            with torch.no_grad():
                self.norm.weight.copy_(final_norm.weight)

    def augmented(self, prenorm_hidden: torch.Tensor, next_embeds: torch.Tensor, cache=None,
                  past_length: int = 0) -> torch.Tensor:
        """H_t for positions past_length..: fuse h_t with e(x_{t+1}), then the causal augmenting block."""
        return self.augment(self.fuse(prenorm_hidden, next_embeds), cache=cache, past_length=past_length)

    def head_output(self, index: int, state: torch.Tensor, token_embeds: torch.Tensor | None) -> torch.Tensor:
        """Feature of head `index` from its RNN state (H_index) and, for index > 0, the embedding of its last input."""
        if index == 0:
            return self.norm(self.first_head(state))
        return self.norm(self.out(torch.cat([state, token_embeds], dim=-1)))

    def forward(self, prenorm_hidden: torch.Tensor, ids: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        embeds = F.embedding(ids, embed_weight).to(prenorm_hidden.dtype)
        length = ids.shape[1]
        # shifted[j][:, t] = e(x_{t+1+j}), zeros past the end (no label is scored there).
        shifted = [F.pad(embeds[:, 1 + j:], (0, 0, 0, min(1 + j, length)))[:, :length] for j in range(self.num_heads)]
        state = self.augmented(prenorm_hidden, shifted[0])
        outputs = [self.head_output(0, state, None)]
        for i in range(1, self.num_heads):
            state = self.rnn(state, shifted[i])
            outputs.append(self.head_output(i, state, shifted[i]))
        return torch.stack(outputs)


def clover2(
    hidden_size: int,
    num_heads: int = 4,
    num_layers: int = 2,
    num_attention_heads: int | None = None,
    target_config=None,
    init_layer: nn.Module | None = None,
    final_norm: nn.Module | None = None,
    token_map: torch.Tensor | None = None,
) -> Clover2:
    """Build Clover-2; `init_layer` (the target's last decoder layer) and `final_norm` seed the augmenting block and
    the output norm; `token_map` restricts the vocabulary its features are scored over."""
    if target_config is None:
        raise ValueError("Clover-2 copies the target's decoder-layer geometry: pass target_config")
    return Clover2(hidden_size, num_heads, target_config, num_layers=num_layers,
                   num_attention_heads=num_attention_heads, init_layer=init_layer, final_norm=final_norm,
                   token_map=token_map)
