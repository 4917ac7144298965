"""EAGLE-3 (Li et al., arXiv 2503.01840): a one-layer drafter fed by a fusion of low, middle and high target layers.

At draft position t the module reads g_t and the embedding of x_{t+1} and predicts x_{t+2}:

    g_t  = fc(cat(a_1, ..., a_k))               # the target's residual streams entering layers l_1 < ... < l_k, at t
    x    = cat(input_layernorm(e(x_{t+1})), hidden_norm(g_t))          # 2h into attention (embedding half first)
    h    = g_t + attn(x)                          # residual: the un-normed g_t (norm_before_residual=False)
    out  = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(out))

`out` (before `norm`) stands in for g at the next draft step, which reads (out, x_{t+2}) at position t + 1 without the
fc; that is what the runtimes do (vLLM and SGLang feed the draft's pre-norm state back) and what training-time test
(`unroll`) simulates. The embedding is the target's, frozen; the LM head holds the target's rows (only the draft
vocabulary's with a `token_map`, drafts/vocab.py), frozen, or with `train_lm_head` a trained copy of them, as EAGLE-3
trains its head. fc, the layer and the final norm (started from the target's final norm) are trained.

FSPAD's two parts fit as options (drafts/fspad.py): feature sampling gates the layer's hidden input with the token
embedding, and partial alignment makes the MLP write 2h: `predict` goes to the norm and LM head, `regress` is fed back
(and aligned to the next position's fused target feature by the objective). Neither has a slot in vLLM's or SGLang's
EAGLE-3 loaders, so such drafts export in draftkit's format only. Parameter names follow the speculators / vLLM layout
(`fc`, `layers.0.{input_layernorm,hidden_norm,self_attn,post_attention_layernorm,mlp}`, `norm`, `lm_head`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from draftkit.drafts import seeded_init
from draftkit.drafts.fspad import (
    MLP,
    Attention,
    DraftOutput,
    FeatureSampling,
    KVCache,
    RMSNorm,
    attach_frozen_vocabulary,
    default_positions,
)


class Eagle3Layer(nn.Module):
    """The EAGLE-3 decoder layer: attention over [input_layernorm(embedding); hidden_norm(hidden)] (2h wide)."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, intermediate_size, rope_theta, eps, *,
                 norm_before_residual: bool, split_output: bool):
        super().__init__()
        self.norm_before_residual, self.split_output = norm_before_residual, split_output
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.hidden_norm = RMSNorm(hidden_size, eps)
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, rope_theta, input_size=2 * hidden_size)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = MLP(hidden_size, intermediate_size, 2 * hidden_size if split_output else hidden_size)

    def attention_input(self, embedded: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what attention reads [.., 2h], the residual the attention output is added to)."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        return torch.cat([self.input_layernorm(embedded), normed], dim=-1), residual

    def finish(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = residual + attended
        base = torch.cat([h, h], dim=-1) if self.split_output else h
        return base + self.mlp(self.post_attention_layernorm(h))

    def forward(self, embedded, hidden, positions, attn_mask, cache):
        x, residual = self.attention_input(embedded, hidden)
        attended, new_cache = self.self_attn(x, positions, attn_mask, cache)
        return self.finish(attended, residual), new_cache


class Eagle3Drafter(nn.Module):
    def __init__(
        self,
        *,
        embed_weight: torch.Tensor,
        lm_head_weight: torch.Tensor,
        norm_weight: torch.Tensor,
        num_aux_layers: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        rope_theta: float,
        rms_norm_eps: float,
        feature_sampling: bool,
        partial_alignment: bool,
        norm_before_residual: bool,
        token_map: torch.Tensor | None,
        train_lm_head: bool = False,
    ):
        super().__init__()
        vocab_size, hidden_size = lm_head_weight.shape
        if num_aux_layers < 2:
            # The fused input is told from a fed-back draft state by its width (as SGLang's loader does).
            raise ValueError(f"EAGLE-3 fuses several target layers; got {num_aux_layers}. Give at least two layer ids")
        self.hidden_size, self.vocab_size, self.num_aux_layers = hidden_size, vocab_size, num_aux_layers
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.intermediate_size, self.rope_theta, self.rms_norm_eps = intermediate_size, rope_theta, rms_norm_eps
        attach_frozen_vocabulary(self, embed_weight, lm_head_weight, token_map)
        # EAGLE-3's reference trains the draft's own head (from a random start; here from the target's rows). The
        # target's rows stay for the teacher, as a plain attribute: a buffer of V x h would be broadcast by DDP every
        # step and written into every checkpoint, though the target holds it.
        self._target_head_rows = None
        if train_lm_head:
            self._target_head_rows = self.lm_head.weight.detach()
            # fp32 like every trained weight (a bf16 target's rows would make bf16 master weights)
            self.lm_head.weight = nn.Parameter(self._target_head_rows.to(torch.float32, copy=True), requires_grad=True)
        self.fc = nn.Linear(num_aux_layers * hidden_size, hidden_size, bias=False)
        self.feature_sampling = FeatureSampling(hidden_size, intermediate_size, rms_norm_eps) if feature_sampling else None
        self.layers = nn.ModuleList([Eagle3Layer(hidden_size, num_heads, num_kv_heads, intermediate_size, rope_theta,
                                                 rms_norm_eps, norm_before_residual=norm_before_residual,
                                                 split_output=partial_alignment)])
        # The frozen head was trained on the target's final norm; starting there makes step 0 read like the target.
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        with torch.no_grad():
            self.norm.weight.copy_(norm_weight.detach().float())

    @property
    def lm_head_trained(self) -> bool:
        return self._target_head_rows is not None

    @property
    def teacher_head_weight(self) -> torch.Tensor:
        """The target's LM head rows (the draft vocabulary's), through which the teacher's distribution is scored."""
        return self.lm_head.weight if self._target_head_rows is None else self._target_head_rows

    def teacher_logits(self, target_states: torch.Tensor) -> torch.Tensor:
        """The target's logits over the draft vocabulary from its post-norm states. The frozen head is called as a
        module, which ZeRO-3 gathers (its parameters are empty outside a module call)."""
        if self._target_head_rows is None:
            return self.lm_head(target_states)
        return F.linear(target_states, self._target_head_rows)

    @property
    def partial_alignment(self) -> bool:
        return self.layers[0].split_output

    @property
    def norm_before_residual(self) -> bool:
        return self.layers[0].norm_before_residual

    @property
    def variant(self) -> str:
        parts = [name for name, on in (("feature_sampling", self.feature_sampling is not None),
                                       ("partial_alignment", self.partial_alignment)) if on]
        return "eagle3" + "".join("+" + p for p in parts)

    def hidden_input(self, features: torch.Tensor) -> torch.Tensor:
        """The layer's hidden input: fc over the target's fused layers ([.., k*h]), or a fed-back draft state ([.., h])."""
        if features.shape[-1] == self.num_aux_layers * self.hidden_size:
            return self.fc(features)
        if features.shape[-1] == self.hidden_size:
            return features
        raise ValueError(f"features of width {features.shape[-1]}: expected {self.num_aux_layers} fused target layers "
                         f"({self.num_aux_layers * self.hidden_size}) or a draft state ({self.hidden_size})")

    def _layer_input(self, features, input_ids):
        if features.shape[:2] != input_ids.shape:
            raise ValueError(f"features {tuple(features.shape)} and input_ids {tuple(input_ids.shape)} must align")
        hidden = self.hidden_input(features)
        embedded = self.embed_tokens(input_ids).to(hidden.dtype)
        if self.feature_sampling is not None:
            hidden = self.feature_sampling(hidden, embedded)
        return embedded, hidden

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.partial_alignment:
            predict, regress = out.split(self.hidden_size, dim=-1)
            return predict, regress
        return out, out

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        ttt_steps: int | None = None,
        score: Callable[["Eagle3Drafter", list], tuple] | None = None,
    ) -> DraftOutput | list[tuple[torch.Tensor, torch.Tensor]] | tuple:
        """features [B, T, k*h] (the target's fused layers at t) or [B, T, h] (draft states fed back), input_ids [B, T]
        (x_{t+1}) at draft positions `positions` [B, T] (default: after the cache). attn_mask: bool [T, S] or
        [B, 1, T, S] over cached + new positions; None is causal. predict feeds head_logits; regress is fed back.
        With ttt_steps, returns `unroll(features, input_ids, ttt_steps)` instead, or `score(self, unrolled)` given a
        score: training goes through forward, so a DDP or DeepSpeed wrapper sees it, and a loss scored here reads the
        head's weight where ZeRO-3 has gathered it (it is empty outside the forward)."""
        if ttt_steps is not None:
            unrolled = self.unroll(features, input_ids, ttt_steps)
            return unrolled if score is None else score(self, unrolled)
        if positions is None:
            positions = default_positions(input_ids, cache)
        embedded, hidden = self._layer_input(features, input_ids)
        out, new_cache = self.layers[0](embedded, hidden, positions, attn_mask, cache)
        predict, regress = self._split(out)
        return DraftOutput(predict=predict, regress=regress, cache=new_cache)

    def head_input(self, predict: torch.Tensor) -> torch.Tensor:
        return self.norm(predict)

    def head_logits(self, predict: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., draft_vocab_size] of a predicted state."""
        return self.lm_head(self.head_input(predict))

    def unroll(self, features: torch.Tensor, input_ids: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training-time test: `steps` draft steps at every position at once, each on the previous step's states.

        features [B, T, k*h] (g_t inputs), input_ids [B, T] (x_{t+1}). Step j at position t reads x_{t+1+j} (the ids
        shifted left by j, zero-padded at the end; those positions are never scored) and step j-1's state at t, at RoPE
        position t + j, and attends to step 0 at positions <= t and to steps 1..j at position t only: exactly what a
        chain of depth j + 1 rooted at t sees at inference. Returns [(predict, regress)] per step, each [B, T, h].
        The attention is computed directly (causal scores over step 0 plus one score per earlier step), so memory
        grows with T^2 once, not with T^2 per step."""
        if steps < 1:
            raise ValueError(f"training-time test needs at least one step; got {steps}")
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        layer = self.layers[0]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outputs = []
        current = features
        for step in range(steps):
            ids = input_ids if step == 0 else torch.cat(
                [input_ids[:, step:], input_ids.new_zeros(batch, min(step, length))], dim=1)[:, :length]
            embedded, hidden = self._layer_input(current, ids)
            x, residual = layer.attention_input(embedded, hidden)
            q, k, v = layer.self_attn.project(x, positions + step)
            keys.append(k)
            values.append(v)
            attended = self._ttt_attention(layer.self_attn, q, keys, values)
            predict, regress = self._split(layer.finish(attended, residual))
            outputs.append((predict, regress))
            current = regress
        return outputs

    @staticmethod
    def _ttt_attention(attn: Attention, q: torch.Tensor, keys: list, values: list) -> torch.Tensor:
        """Queries of the newest step over step 0 (causal) and over every later step's entry at the same position."""
        batch, heads, length, dim = q.shape
        repeat = attn.num_heads // attn.num_kv_heads

        def expand(t):
            return t.repeat_interleave(repeat, dim=1)

        scale = 1.0 / math.sqrt(dim)
        causal = (q @ expand(keys[0]).transpose(-1, -2)).float() * scale
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        causal = causal.masked_fill(future, float("-inf"))
        diagonal = [((q * expand(k)).sum(-1).float() * scale)[..., None] for k in keys[1:]]
        probs = torch.cat([causal, *diagonal], dim=-1).softmax(dim=-1).to(q.dtype)
        out = probs[..., :length] @ expand(values[0])
        for index, v in enumerate(values[1:]):
            out = out + probs[..., length + index, None] * expand(v)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def eagle3_drafter(
    *,
    embed_weight: torch.Tensor,
    lm_head_weight: torch.Tensor,
    norm_weight: torch.Tensor,
    num_aux_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    feature_sampling: bool = False,
    partial_alignment: bool = False,
    norm_before_residual: bool = False,
    token_map: torch.Tensor | None = None,
    train_lm_head: bool = False,
    seed: int = 0,
) -> Eagle3Drafter:
    """A freshly initialised EAGLE-3 drafter around the target's frozen embedding and LM head; norm_weight: the target's
    final norm (the draft's own norm starts there). token_map: int64 ascending target ids, the draft vocabulary.
    train_lm_head: the draft trains its own copy of the head's rows (EAGLE-3's reference trains its head); the
    teacher's distribution still goes through the target's rows (teacher_head_weight)."""
    with seeded_init(seed):
        return Eagle3Drafter(
            embed_weight=embed_weight, lm_head_weight=lm_head_weight, norm_weight=norm_weight,
            num_aux_layers=num_aux_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
            feature_sampling=feature_sampling, partial_alignment=partial_alignment,
            norm_before_residual=norm_before_residual, token_map=token_map, train_lm_head=train_lm_head)
