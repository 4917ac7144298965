"""SpecDec++ drafting: a standalone draft LM proposes a chain and an acceptance head decides when to stop.

After draft token Z_i is fed back to the draft, the head reads the draft's hidden state there and predicts
P(accept Z_i). With the cumulative product c_i = Π_{j ≤ i} P(accept Z_j) (the first token's forced to 1, as in the
reference), drafting stops once 1 − c_i, the predicted probability that at least one drafted token is rejected,
exceeds `threshold`, and never before `min_tokens` or after the runtime's gamma (the max). The stop depends only on the
draft side, so verification (runtime.speculative) and losslessness are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from draftkit.drafts.specdecpp import AcceptanceHead
from draftkit.runtime.speculative import DraftProposal, choose_token, new_cache, truncate_cache


class SpecDecDrafter:
    def __init__(self, model: nn.Module, head: AcceptanceHead, threshold: float = 0.3, min_tokens: int = 2):
        hidden_size = model.config.get_text_config().hidden_size
        if head.hidden_size != hidden_size:
            raise ValueError(
                f"the acceptance head reads {head.hidden_size}-dim states but the draft's hidden size is {hidden_size}: "
                "it was trained for another draft. Fix: pass the draft it was trained on, or train a head for this one")
        if not 0.0 <= threshold <= 1.0 or min_tokens < 1:
            raise ValueError(f"specdecpp stop rule: threshold must lie in [0, 1] and min_tokens >= 1; "
                             f"got {threshold}, {min_tokens}")
        self.model, self.head, self.threshold, self.min_tokens = model, head, threshold, min_tokens
        self.name = f"specdecpp(threshold={threshold}, min_tokens={min_tokens})"
        self.cache = None

    def reset(self) -> None:
        self.cache = new_cache()

    def propose(self, sequence: torch.Tensor, num_tokens: int, temperature: float,
                generator: torch.Generator | None) -> DraftProposal:
        device = self.model.device
        feed = sequence[:, self.cache.get_seq_length():].to(device)
        tokens, probs, forwards, all_accepted = [], [], 0, 1.0
        while len(tokens) < num_tokens:
            out = self.model(input_ids=feed, past_key_values=self.cache, use_cache=True, output_hidden_states=True,
                             logits_to_keep=1)
            forwards += 1
            if len(tokens) > 1:  # the state of the newest draft token: its predicted acceptance
                all_accepted *= self.head.accept_probability(out.hidden_states[-1][0, -1]).item()
            if len(tokens) >= self.min_tokens and 1.0 - all_accepted > self.threshold:
                break
            token, prob = choose_token(out.logits[0, -1], temperature, generator)
            tokens.append(token)
            probs.append(prob)
            feed = token.view(1, 1)
        return DraftProposal(
            tokens=torch.stack(tokens) if tokens else torch.empty(0, dtype=torch.long, device=device),
            probs=torch.stack(probs) if tokens and temperature > 0 else None, forwards=forwards)

    def rollback(self, num_valid_tokens: int) -> None:
        truncate_cache(self.cache, num_valid_tokens)
