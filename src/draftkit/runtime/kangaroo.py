"""Kangaroo decoding: the target's first `exit_layer` layers plus an adapter draft a chain; the rest of the target verifies.

One object is both the Drafter and the Verifier of `speculative_generate`, because both sides share state:
  * the target's KV cache (`LayerCache`) holds layers 0..l-1 for every token the shallow layers have seen (committed
    and drafted) and layers l..N-1 only for tokens verified so far; drafting writes the shallow entries the target
    would have written itself, so verification never recomputes them;
  * `exited` [1, L, H] keeps hidden[l] of every token the shallow layers have seen; verification runs layers l..N-1
    on the exited states of the tokens the deep layers have not seen (never the shallow layers again);
  * the adapter has its own cache over the exited states; after a full acceptance it lacks the last draft token,
    which the next proposal feeds from `exited` together with the newer ones.
All three are cut back to the accepted prefix after each verification.

Second early exit: after the first draft token, drafting stops as soon as the adapter's top-1 probability (at
temperature 1) falls below `threshold`. The stop depends only on the draft side, so verification stays lossless.
"""

from __future__ import annotations

import torch

from draftkit.drafts.kangaroo import KangarooAdapter
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.speculative import DraftProposal, choose_token
from draftkit.targets.hf import LayerCache, Target, causal_mask


class KangarooDecoder:
    def __init__(self, target: Target, adapter: KangarooAdapter, exit_layer: int, threshold: float = 0.6):
        if not 1 <= exit_layer < target.num_layers:
            raise ValueError(
                f"kangaroo exit_layer={exit_layer} is outside the target's depth: choose 1..{target.num_layers - 1} "
                f"for this {target.num_layers}-layer target (the adapter was trained for one exit layer; use that one)"
            )
        if adapter.config.hidden_size != target.hidden_size:
            raise ValueError(
                f"the adapter has hidden_size={adapter.config.hidden_size} but the target has {target.hidden_size}: "
                "it was trained for another target. Fix: pass the target named in its draftkit.json"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"kangaroo threshold={threshold} must lie in [0, 1] (0 disables the early exit)")
        self.target = target
        self.model = adapter
        self.exit_layer = exit_layer
        self.threshold = threshold
        self.name = f"kangaroo(exit_layer={exit_layer}, threshold={threshold})"
        self.reset()

    def reset(self) -> None:
        self.cache = LayerCache()
        self.adapter_cache = LayerCache()
        self.exited = None

    def _shallow(self, tokens: torch.Tensor) -> None:
        """Run layers 0..l-1 on `tokens` [1, n] that follow what they have seen; keep their exited states."""
        if tokens.shape[1] == 0:
            return
        hidden = self.target.run_layers(self.target.embed(tokens), 0, self.exit_layer, self.cache)
        self.exited = hidden if self.exited is None else torch.cat([self.exited, hidden], dim=1)

    def _adapter_logits(self) -> torch.Tensor:
        """Feed the adapter every exited state it has not seen; the draft's logits [V] at the newest position."""
        past = self.adapter_cache.length(0)
        # The adapter may run in another precision than the target (an fp32 adapter during bf16 evaluation).
        hidden = self.exited[:, past:].to(self.model.norm.weight.dtype)
        positions = torch.arange(past, past + hidden.shape[1], device=hidden.device)[None]
        mask = causal_mask(hidden.shape[1], past, hidden.dtype, hidden.device)
        out = self.model(hidden, positions, mask, cache=self.adapter_cache)
        return self.target.lm_head(out[:, -1:].to(self.exited.dtype))[0, -1]

    def propose(self, sequence: torch.Tensor, num_tokens: int, temperature: float,
                generator: torch.Generator | None) -> DraftProposal:
        self._shallow(sequence[:, self.cache.length(0):])
        tokens, probs, forwards = [], [], 0
        for position in range(num_tokens):
            logits = self._adapter_logits()
            forwards += 1
            # The early exit is Kangaroo's one per-step host sync: whether to draft on decides the next launch.
            if position > 0 and torch.softmax(logits.float(), dim=-1).max().item() < self.threshold:
                break
            token, prob = choose_token(logits, temperature, generator)
            tokens.append(token)
            probs.append(prob)
            # The next step needs this token's exited state; if drafting ends here, verification reuses it.
            if position < num_tokens - 1:
                self._shallow(token.view(1, 1))
        device = sequence.device
        return DraftProposal(
            tokens=torch.stack(tokens) if tokens else torch.empty(0, dtype=torch.long, device=device),
            probs=torch.stack(probs) if tokens and temperature > 0 else None,
            forwards=forwards,
        )

    def logits(self, sequence: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Layers l..N-1 over the exited states the deep layers have not seen; only a draft token the shallow layers
        have not seen yet (the last of a full-length chain) goes through layers 0..l-1 first."""
        tokens = torch.cat([sequence, draft_tokens.view(1, -1)], dim=1)
        self._shallow(tokens[:, self.cache.length(0):])
        deep_past = self.cache.length(self.exit_layer)
        hidden = self.target.run_layers(self.exited[:, deep_past:], self.exit_layer, self.target.num_layers, self.cache)
        return self.target.head_logits(hidden[:, -(draft_tokens.numel() + 1):])[0]

    def rollback(self, num_valid_tokens: int) -> None:
        self.cache.truncate(num_valid_tokens)
        self.adapter_cache.truncate(num_valid_tokens)
        self.exited = self.exited[:, :num_valid_tokens]


def drafting(adapter: KangarooAdapter, target: Target, options: DraftingOptions, *, exit_layer: int,
             threshold: float) -> Drafting:
    """Self-drafting: the decoder drafts over the target's first `exit_layer` layers and verifies over the rest, so it
    is both the drafter and the verifier. `options` has nothing for it: Kangaroo drafts a chain."""
    decoder = KangarooDecoder(target, adapter.to(target.device), exit_layer, threshold)
    return Drafting(decoder, verifier=decoder)
