"""Feature-level drafter: FSPAD (Gui et al., arXiv 2408.15562) with EAGLE-1 (Li et al., arXiv 2401.15077) as its ablation.

At draft position t the module reads the target's feature f_t and the embedding of token x_{t+1}, and predicts the
target's next feature f_{t+1}, whose LM-head distribution is the draft distribution of x_{t+2}.

    u   = fc(cat(e(x_{t+1}), f_t))                                   # embedding first, as every EAGLE loader expects
    u   = u + down(SiLU(gate(e)) * up(RMSNorm(u)))                   # feature sampling (FSPAD; off in EAGLE-1)
    h   = u + attn(u)                                                # one Llama layer, no input norm (EAGLE layer 0)
    out = h + mlp(RMSNorm(h))                                        # EAGLE-1: predict = regress = out
    out = cat(h, h) + mlp2h(RMSNorm(h)); predict, regress = split    # partial alignment distillation (FSPAD)

`predict` goes through the target's frozen LM head; `regress` is the half aligned to the target feature and is what
drafting feeds back as the next step's feature. The embedding and LM head are the target's tensors, frozen and shared
(not copied). With a `token_map` (drafts/vocab.py) the head keeps only those rows (a frozen copy of size x H), so the
draft scores its draft vocabulary (draft id i = target id token_map[i]); the embedding stays the target's full one,
since the tokens fed back are target ids. Parameter names follow the EAGLE checkpoint layout (`fc`, `layers.0.*`) so the
EAGLE-1 variant exports by name; FSPAD's extra tensors live under `feature_sampling.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from draftkit.drafts import seeded_init
from draftkit.drafts.vocab import draft_rows, register_token_map


class RMSNorm(nn.Module):
    """Llama's RMSNorm, normalising in fp32 like the target does (a bf16 mean of squares drifts)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's default rotary embedding of x [B, heads, T, d] at integer positions [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + _rotate_half(x) * sin


@dataclass
class KVCache:
    """The draft layer's keys and values [1, kv_heads, S, d] for S earlier draft positions."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def truncated(self, length: int) -> "KVCache":
        return KVCache(self.keys[:, :, :length], self.values[:, :, :length])


class Attention(nn.Module):
    """Llama attention with RoPE. input_size: the width q/k/v read (default hidden_size; EAGLE-3's layer reads 2h)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, rope_theta: float,
                 input_size: int | None = None):
        super().__init__()
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"hidden_size={hidden_size} must divide by num_heads={num_heads}, and num_heads by "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.rope_theta = rope_theta
        input_size = input_size or hidden_size
        self.q_proj = nn.Linear(input_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(input_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(input_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def project(self, x, positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, heads, T, d] and keys, values [B, kv_heads, T, d] of x [B, T, in] at positions [B, T] (RoPE)."""
        batch, length, _ = x.shape

        def heads(proj, n):
            return proj(x).view(batch, length, n, self.head_dim).transpose(1, 2)

        q = rope(heads(self.q_proj, self.num_heads), positions, self.rope_theta)
        k = rope(heads(self.k_proj, self.num_kv_heads), positions, self.rope_theta)
        return q, k, heads(self.v_proj, self.num_kv_heads)

    def forward(self, x, positions, attn_mask, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        batch, length, _ = x.shape
        q, k, v = self.project(x, positions)
        if cache is not None:
            k = torch.cat([cache.keys, k], dim=2)
            v = torch.cat([cache.values, v], dim=2)
        new_cache = KVCache(k, v)
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if attn_mask is None and cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif attn_mask is None and length == 1:  # one new position sees the whole cache: no mask needed
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            if attn_mask is None:  # new positions see the whole cache and each other causally
                past = k.shape[2] - length
                attn_mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), new_cache


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, out_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, out_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """A Llama decoder layer without its input norm; with `split_output` its MLP writes 2h (partial alignment)."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, intermediate_size, rope_theta, eps, split_output: bool):
        super().__init__()
        self.split_output = split_output
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, rope_theta)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        out_size = 2 * hidden_size if split_output else hidden_size
        self.mlp = MLP(hidden_size, intermediate_size, out_size)

    def forward(self, x, positions, attn_mask, cache):
        attended, new_cache = self.self_attn(x, positions, attn_mask, cache)
        h = x + attended
        residual = torch.cat([h, h], dim=-1) if self.split_output else h
        return residual + self.mlp(self.post_attention_layernorm(h)), new_cache


class FeatureSampling(nn.Module):
    """FSPAD's token-gated expansion: the embedding gates an intermediate-size projection of the fused feature."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, fused: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return fused + self.down_proj(F.silu(self.gate_proj(embedded)) * self.up_proj(self.norm(fused)))


def attach_frozen_vocabulary(module: nn.Module, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                             token_map: torch.Tensor | None) -> None:
    """Give a feature drafter the target's embedding and LM head, frozen and sharing the target's storage (a tied
    49k-token head would otherwise cost a copy per draft); with a `token_map` the head keeps only those rows."""
    vocab_size, hidden_size = lm_head_weight.shape
    if embed_weight.shape[1] != hidden_size:
        raise ValueError(f"embedding width {embed_weight.shape[1]} != LM head width {hidden_size}")
    module.embed_tokens = nn.Embedding.from_pretrained(embed_weight.detach(), freeze=True)
    module.draft_vocab_size = register_token_map(module, token_map, vocab_size)
    # On the meta device its own init draws no random numbers and allocates nothing: the target's rows (shared
    # storage without a token_map) replace it, so a seed gives the trained layers the same start with or without
    # a token_map.
    module.lm_head = nn.Linear(hidden_size, module.draft_vocab_size, bias=False, device="meta")
    module.lm_head.weight = nn.Parameter(draft_rows(lm_head_weight.detach(), module.token_map), requires_grad=False)


def default_positions(input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Positions [B, T] of new draft positions that follow what `cache` holds."""
    start = cache.length if cache is not None else 0
    return torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


@dataclass
class DraftOutput:
    """predict: [B, T, H] the half the LM head reads; regress: [B, T, H] the predicted target feature (fed back when
    drafting); both are the same tensor without partial alignment. cache: the layer's keys/values incl. these positions."""

    predict: torch.Tensor
    regress: torch.Tensor
    cache: KVCache


class FeatureDrafter(nn.Module):
    def __init__(
        self,
        *,
        embed_weight: torch.Tensor,
        lm_head_weight: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        rope_theta: float,
        rms_norm_eps: float,
        feature_sampling: bool,
        partial_alignment: bool,
        fc_bias: bool = False,
        head_norm_weight: torch.Tensor | None = None,
        token_map: torch.Tensor | None = None,
    ):
        super().__init__()
        vocab_size, hidden_size = lm_head_weight.shape
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.intermediate_size, self.rope_theta, self.rms_norm_eps = intermediate_size, rope_theta, rms_norm_eps
        attach_frozen_vocabulary(self, embed_weight, lm_head_weight, token_map)
        # Pre-norm features need the target's final norm before its LM head; post-norm ones are what the head reads.
        self.head_norm = None
        if head_norm_weight is not None:
            self.head_norm = RMSNorm(hidden_size, rms_norm_eps)
            self.head_norm.weight = nn.Parameter(head_norm_weight.detach(), requires_grad=False)
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=fc_bias)
        self.feature_sampling = FeatureSampling(hidden_size, intermediate_size, rms_norm_eps) if feature_sampling else None
        self.layers = nn.ModuleList([DraftLayer(hidden_size, num_heads, num_kv_heads, intermediate_size, rope_theta,
                                                rms_norm_eps, split_output=partial_alignment)])

    @property
    def partial_alignment(self) -> bool:
        return self.layers[0].split_output

    @property
    def variant(self) -> str:
        if self.feature_sampling is None and not self.partial_alignment:
            return "eagle1"
        if self.feature_sampling is not None and self.partial_alignment:
            return "fspad"
        return "fspad_without_" + ("feature_sampling" if self.feature_sampling is None else "partial_alignment")

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> DraftOutput:
        """features [B, T, H] (f_t) and input_ids [B, T] (x_{t+1}) at draft positions `positions` [B, T]
        (default 0..T-1 after the cache). attn_mask: bool [T, S] or [B, 1, T, S] over cached + new positions; None is
        causal over them. Returns the predicted features f_{t+1}."""
        if features.shape[:2] != input_ids.shape:
            raise ValueError(f"features {tuple(features.shape)} and input_ids {tuple(input_ids.shape)} must align")
        if positions is None:
            positions = default_positions(input_ids, cache)
        embedded = self.embed_tokens(input_ids).to(features.dtype)
        fused = self.fc(torch.cat([embedded, features], dim=-1))
        if self.feature_sampling is not None:
            fused = self.feature_sampling(fused, embedded)
        out, new_cache = self.layers[0](fused, positions, attn_mask, cache)
        if self.partial_alignment:
            predict, regress = out.split(self.hidden_size, dim=-1)
        else:
            predict = regress = out
        return DraftOutput(predict=predict, regress=regress, cache=new_cache)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the target's LM head reads for a (predicted or real) feature: the feature itself, or its final norm."""
        return self.head_norm(hidden) if self.head_norm is not None else hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's LM head on a (predicted or real) feature: [..., draft_vocab_size] logits over draft ids (the
        target's ids when there is no token_map)."""
        return self.lm_head(self.head_input(hidden))


def feature_drafter(
    *,
    embed_weight: torch.Tensor,
    lm_head_weight: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    feature_sampling: bool = True,
    partial_alignment: bool = True,
    fc_bias: bool = False,
    head_norm_weight: torch.Tensor | None = None,
    token_map: torch.Tensor | None = None,
    seed: int = 0,
) -> FeatureDrafter:
    """A freshly initialised feature drafter around the target's frozen embedding and LM head.

    feature_sampling=False and partial_alignment=False give EAGLE-1 (with `fc` bias off by default, since vLLM's EAGLE
    loader builds fc without one). head_norm_weight: the target's final norm, for drafters fed pre-norm features.
    token_map: int64 [size] ascending target ids, the draft vocabulary (None: the target's whole vocabulary).
    """
    with seeded_init(seed):
        return FeatureDrafter(
            embed_weight=embed_weight, lm_head_weight=lm_head_weight, num_heads=num_heads, num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
            feature_sampling=feature_sampling, partial_alignment=partial_alignment, fc_bias=fc_bias,
            head_norm_weight=head_norm_weight, token_map=token_map,
        )
