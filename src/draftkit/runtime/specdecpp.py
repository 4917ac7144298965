"""SpecDec++ drafting: a standalone draft LM proposes a chain and an acceptance head decides when to stop.

After draft token Z_i is fed back to the draft, the head reads the draft's hidden state there and predicts
P(accept Z_i). With the cumulative product c_i = Π_{j ≤ i} P(accept Z_j) (the first token's forced to 1, as in the
reference, unless `score_first_token`: then a doubtful first token can end the chain at one token, which a weak draft
needs when one token per step is its best), drafting stops once 1 − c_i, the predicted probability that at least one drafted token is rejected,
exceeds `threshold`, and never before `min_tokens` or after the runtime's gamma (the max). The stop depends only on the
draft side, so verification (runtime.speculative) and losslessness are unchanged.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from draftkit.drafts.specdecpp import AcceptanceHead
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.predict import predicted_speedup, recommend_gamma
from draftkit.runtime.speculative import DraftProposal, choose_token, new_cache, truncate_cache


class SpecDecDrafter:
    def __init__(self, model: nn.Module, head: AcceptanceHead, threshold: float = 0.3, min_tokens: int = 2,
                 score_first_token: bool = False):
        hidden_size = model.config.get_text_config().hidden_size
        if head.hidden_size != hidden_size:
            raise ValueError(
                f"the acceptance head reads {head.hidden_size}-dim states but the draft's hidden size is {hidden_size}: "
                "it was trained for another draft. Fix: pass the draft it was trained on, or train a head for this one")
        if not 0.0 <= threshold <= 1.0 or min_tokens < 1:
            raise ValueError(f"specdecpp stop rule: threshold must lie in [0, 1] and min_tokens >= 1; "
                             f"got {threshold}, {min_tokens}")
        self.model, self.head, self.threshold, self.min_tokens = model, head, threshold, min_tokens
        self.first_scored = 1 if score_first_token else 2  # the first draft token whose prediction counts
        self.name = f"specdecpp(threshold={threshold}, min_tokens={min_tokens}, score_first_token={score_first_token})"
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
            if len(tokens) >= self.first_scored:  # the state of the newest draft token: its predicted acceptance
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


def drafting(draft_and_head: tuple[nn.Module, AcceptanceHead], target, options: DraftingOptions, *,
             threshold: float, min_tokens: int, score_first_token: bool = False, max_draft_tokens: int | None = None,
             static_gamma: int | None = None) -> Drafting:
    """The draft with its acceptance head (adaptive stop, at most `max_draft_tokens` per step), or with
    options.no_head the draft alone drafting the static policy's `static_gamma`. options.stop_threshold replaces the
    recorded `threshold`."""
    draft, head = draft_and_head
    if options.no_head:
        return Drafting(draft, gamma=static_gamma)
    threshold = options.stop_threshold if options.stop_threshold is not None else threshold
    drafter = SpecDecDrafter(draft, head.to(draft.device), threshold=threshold, min_tokens=min_tokens,
                             score_first_token=score_first_token)
    return Drafting(drafter, gamma=max_draft_tokens)


# Static stop policy: what a runtime without the head can use, estimated on held-out label sequences.
#
# A window of G consecutive held-out positions stands for one drafting step: its predicted acceptances h (the head's)
# decide where a stop rule ends the chain, and its labels a (the probability that verification accepts each token)
# give the expected accepted tokens, Σ_{m ≤ K} Π_{j ≤ m} a_j, of a chain of length K. The estimate of a rule is
# Σ(1 + accepted) / Σ(1 + cost_ratio · draft forwards) over all windows, the predicted speedup over plain decoding.

THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def windows(values: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Per-sequence values [L] -> every full window of `size` consecutive positions, [W, size]."""
    parts = [v.float().unfold(0, size, 1) for v in values if v.numel() >= size]
    if not parts:
        raise ValueError(f"no held-out label sequence has {size} positions; raise specdecpp.labels.max_new_tokens "
                         f"or lower the most draft tokens (eval.gamma)")
    return torch.cat(parts)


def chain_alpha(acceptance: torch.Tensor) -> list[float]:
    """Windows [W, G] of per-position acceptance -> alpha_i = P(position i accepted | all before accepted)."""
    reached = torch.cumprod(acceptance, dim=1)
    before = torch.cat([torch.ones_like(reached[:, :1]), reached[:, :-1]], dim=1)
    # The clamp only guards against rounding: reached <= before term by term.
    return (reached.sum(0) / before.sum(0).clamp_min(1e-12)).clamp(max=1.0).tolist()


def simulate_stop_rule(stop_after: torch.Tensor, accept: torch.Tensor, cost_ratio: float,
                       stop_costs_a_forward: bool) -> dict:
    """stop_after [W, G] bool: whether the rule stops once token k+1 is drafted; accept [W, G]: label acceptance.

    The chain ends at the first stop (or at G). A rule that reads a drafted token's state (the head) pays one more
    draft forward when it stops early (`stop_costs_a_forward`); the last token of a full chain is never fed."""
    size = accept.shape[1]
    stop_after = stop_after.clone()
    stop_after[:, -1] = True
    lengths = stop_after.float().argmax(dim=1) + 1  # first True
    within = torch.arange(size)[None, :] < lengths[:, None]
    accepted = (torch.cumprod(accept, dim=1) * within).sum(1)
    forwards = lengths.float() + ((lengths < size).float() if stop_costs_a_forward else 0.0)
    tau = (1 + accepted).sum()
    return {"tau": (tau / len(accept)).item(), "mean_draft_length": lengths.float().mean().item(),
            "predicted_speedup": (tau / (1 + cost_ratio * forwards).sum()).item()}


def head_stop_after(predicted: torch.Tensor, threshold: float, min_tokens: int,
                    score_first_token: bool = False) -> torch.Tensor:
    """SpecDecDrafter's rule on windows [W, G] of predicted acceptance: stop after token k once k >= min_tokens and
    1 - Π_{2 ≤ j ≤ k} h_j > threshold (the product from j = 1 with score_first_token)."""
    forced = predicted if score_first_token else torch.cat([torch.ones_like(predicted[:, :1]), predicted[:, 1:]], dim=1)
    at_least = torch.arange(1, predicted.shape[1] + 1)[None, :] >= min_tokens
    return at_least & (1 - torch.cumprod(forced, dim=1) > threshold)


def stop_policy(predicted: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], draft_probs: Sequence[torch.Tensor],
                *, max_tokens: int, min_tokens: int, cost_ratio: float, score_first_token: bool = False) -> dict:
    """The static policy for a draft: the fixed γ that `runtime.predict.recommend_gamma` picks from the head's
    per-position acceptance, the head threshold and the draft-confidence threshold (stop once the draft's probability
    of its own token is below it: HF's assistant_confidence_threshold) with the best estimated speedup, and the
    estimates behind them. Sequences: the head's predictions, the labels, the draft's probabilities of its proposals."""
    h, a, q = windows(predicted, max_tokens), windows(labels, max_tokens), windows(draft_probs, max_tokens)
    alpha_predicted, alpha_labels = chain_alpha(h), chain_alpha(a)
    gamma, gamma_speedup = recommend_gamma(alpha_predicted, cost_ratio, max_tokens)
    never = torch.zeros_like(a, dtype=torch.bool)
    fixed = {g: simulate_stop_rule(never[:, :g], a[:, :g], cost_ratio, False) for g in range(1, max_tokens + 1)}
    by_threshold = {t: simulate_stop_rule(head_stop_after(h, t, min_tokens, score_first_token), a, cost_ratio, True)
                    for t in THRESHOLD_GRID}
    by_confidence = {t: simulate_stop_rule(q < t, a, cost_ratio, False) for t in THRESHOLD_GRID}
    threshold = max(by_threshold, key=lambda t: by_threshold[t]["predicted_speedup"])
    confidence = max(by_confidence, key=lambda t: by_confidence[t]["predicted_speedup"])
    return {
        "num_speculative_tokens": gamma, "stop_threshold": threshold, "min_tokens": min_tokens,
        "score_first_token": score_first_token,
        "max_tokens": max_tokens, "draft_confidence_threshold": confidence, "cost_ratio": cost_ratio,
        "alpha_predicted": alpha_predicted, "alpha_labels": alpha_labels,
        "predicted_speedup": {
            "fixed_gamma_from_head": gamma_speedup,
            "fixed_gamma_from_labels": predicted_speedup(alpha_labels, gamma, cost_ratio),
            "fixed_gamma_simulated": {str(g): r["predicted_speedup"] for g, r in fixed.items()},
            "head_threshold": {str(t): r for t, r in by_threshold.items()},
            "draft_confidence": {str(t): r for t, r in by_confidence.items()},
        },
        "held_out_windows": len(a),
    }


@torch.no_grad()
def forward_cost_ratio(target_model: nn.Module, draft_model: nn.Module, prompt: torch.Tensor, steps: int = 16) -> float:
    """Draft forward time / target forward time for one new token on a cached prompt [1, T]: the c of
    speedup = tau / (1 + c·γ). Measured after one warm-up pass each, with the device synchronised."""
    def seconds_per_token(model: nn.Module) -> float:
        device = next(model.parameters()).device
        ids = prompt.to(device)
        timings = []
        for _ in range(2):  # the first pass warms kernels and allocator pools up
            cache = new_cache()
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = ids[:, -1:]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append((time.perf_counter() - start) / steps)
        return timings[-1]

    return seconds_per_token(draft_model) / seconds_per_token(target_model)
