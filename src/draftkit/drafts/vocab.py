"""A draft vocabulary: the draft scores only the `size` target tokens it will most often need (FR-Spec, EAGLE-3's
draft_vocab_size, vLLM Medusa's truncated_vocab_size).

Why: a head's LM-head work is 2·V·H FLOPs per position forward and as much again backward; at a 128k vocabulary that
is about 2.1 GFLOP per head per token against 15 GFLOP for an 8B target's whole body, so the vocabulary projection,
not the head, caps training throughput. Scoring the most frequent tokens only cuts that work by V / size and loses
only the acceptance of tokens outside the set (their share is `coverage`'s complement). Decoding stays lossless: the
target verifies every proposal, and a draft that never proposes a token is just a draft with zero probability on it.

`token_map` [size] holds the kept target ids in ascending order (draft id i is target id token_map[i]); that is the
layout vLLM's Medusa `token_map` and EAGLE-3's `d2t` (as offsets token_map[i] - i) describe.
"""

from __future__ import annotations

from typing import Iterable

import torch

IGNORE_INDEX = -100  # objectives.ce.IGNORE_INDEX; drafts import nothing of draftkit's but torch


def select_tokens(counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent target ids of `counts` [V] (ties: the lower id), plus every id in `always` (end of
    turn, end of text: tokens the draft must be able to propose however rare), in ascending order."""
    vocab_size = counts.numel()
    always = sorted({int(i) for i in always})
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft_vocab_size={size} must lie in [1, {vocab_size}] (the target's vocabulary). Fix: a "
                         "smaller <recipe>.draft_vocab_size, or null for the whole vocabulary")
    if any(not 0 <= i < vocab_size for i in always):
        raise ValueError(f"required token ids {always} fall outside the target's vocabulary of {vocab_size}")
    if len(always) > size:
        raise ValueError(f"draft_vocab_size={size} cannot hold the {len(always)} tokens it must keep: raise it")
    score = counts.double().clone()
    score[always] = float("inf")
    # A stable sort on the negated score keeps the lower id first among equal counts.
    order = torch.sort(-score, stable=True).indices[:size]
    return torch.sort(order).values.long()


def check_token_map(token_map: torch.Tensor, vocab_size: int) -> None:
    if token_map.dim() != 1 or token_map.numel() == 0:
        raise ValueError(f"a token_map is a non-empty 1-D tensor of target ids; got shape {tuple(token_map.shape)}")
    if token_map.dtype != torch.long:
        raise ValueError(f"token_map must hold int64 target ids; got {token_map.dtype}")
    if int(token_map.min()) < 0 or int(token_map.max()) >= vocab_size:
        raise ValueError(f"token_map holds ids outside the target's vocabulary of {vocab_size}")
    if token_map.numel() > 1 and not bool((token_map[1:] > token_map[:-1]).all()):
        raise ValueError("token_map must list distinct target ids in ascending order")


def draft_index(token_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] int64: the draft id of each target id, -1 where the draft vocabulary lacks it."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=token_map.device)
    index[token_map] = torch.arange(token_map.numel(), device=token_map.device)
    return index


def draft_labels(labels: torch.Tensor, index: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Target-id labels -> draft-id labels; ignored positions and tokens outside the draft vocabulary become
    ignore_index (the draft cannot propose them, so no loss can teach it to)."""
    scored = labels != ignore_index
    mapped = index[labels.masked_fill(~scored, 0)]
    return mapped.masked_fill(~scored | (mapped < 0), ignore_index)


def full_vocab_logits(logits: torch.Tensor, token_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., size] draft logits -> [..., V] with -inf at every target id the draft vocabulary lacks: the same
    distribution over the target's vocabulary (what speculative sampling compares with the target's)."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, token_map, logits)


def coverage(counts: torch.Tensor, token_map: torch.Tensor) -> float:
    """The share of the counted tokens the draft vocabulary holds."""
    total = float(counts.sum())
    return float(counts[token_map].sum()) / total if total > 0 else 0.0


def register_token_map(module: torch.nn.Module, token_map: torch.Tensor | None, vocab_size: int) -> int:
    """Give `module` a persistent `token_map` buffer (None: the full vocabulary, no state-dict entry), so every export
    of its state dict carries the map; returns how many rows its vocabulary projections have."""
    if token_map is None:
        module.register_buffer("token_map", None)
        return vocab_size
    token_map = torch.as_tensor(token_map)
    check_token_map(token_map, vocab_size)
    module.register_buffer("token_map", token_map.detach().clone(), persistent=True)
    return token_map.numel()


def draft_rows(weight: torch.Tensor, token_map: torch.Tensor | None) -> torch.Tensor:
    """The rows of a [V, ...] vocabulary tensor (an LM head) the draft vocabulary keeps; all of them without a map."""
    return weight if token_map is None else weight[token_map.to(weight.device)]


def target_ids(draft_ids: torch.Tensor, token_map: torch.Tensor | None) -> torch.Tensor:
    """Draft ids (what a restricted projection's top-k returns) -> the target ids they stand for."""
    return draft_ids if token_map is None else token_map[draft_ids]
