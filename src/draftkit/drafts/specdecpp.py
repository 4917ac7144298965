"""SpecDec++ (Huang, Guo, Wang; arXiv 2405.19715): an acceptance-prediction head on a standalone draft's hidden state.

The head reads the draft's last hidden state at the position whose input is draft token Z_i and predicts whether the
target accepts Z_i: residual blocks (each with its own weights; the reference's `[ResBlock(h)] * n` shares one block,
since a list repeated with `*` holds one module n times) and a 2-way output where class 1 is "accepted".
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from draftkit.drafts import seeded_init


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.act(self.linear(hidden))


class AcceptanceHead(nn.Module):
    """hidden [..., H] -> logits [..., 2] (index 1 = accepted)."""

    def __init__(self, hidden_size: int, num_layers: int = 3):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.blocks = nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)])
        self.out = nn.Linear(hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(hidden.to(self.out.weight.dtype)))

    def accept_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(hidden).float(), dim=-1)[..., 1]


def acceptance_head(hidden_size: int, num_layers: int = 3, seed: int = 0) -> AcceptanceHead:
    if num_layers < 0 or hidden_size < 1:
        raise ValueError(f"acceptance head needs hidden_size >= 1 and num_layers >= 0; got {hidden_size}, {num_layers}")
    with seeded_init(seed):
        return AcceptanceHead(hidden_size, num_layers)


# The config fields that decide what a draft's hidden states mean; others (dtype, name, generation ids) do not.
_IDENTITY_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "intermediate_size", "vocab_size", "tie_word_embeddings")


def draft_fingerprint(draft: nn.Module) -> str:
    """Identity of the draft an acceptance head reads: its architecture and a strided sample of every weight.

    A head only means something on the hidden states it was trained on, and two drafts of the same shape (a cut of
    the target before and after distillation) differ only in their weights. Samples are rounded to bf16 before
    hashing, so the same draft loaded in fp32 or bf16 has the same fingerprint.
    """
    digest = hashlib.sha256()
    config = draft.config.get_text_config()
    digest.update(json.dumps({k: getattr(config, k, None) for k in _IDENTITY_CONFIG_KEYS}, sort_keys=True).encode())
    for name, param in sorted(draft.named_parameters()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.bfloat16).float()
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]
