"""Predict speculative decoding's speedup from acceptance and step costs, and recommend a draft length.

The model (Leviathan et al. 2023; the same cost model as OSD's cost_model.py): one decoding step drafts, then runs the
target once over the draft. With alpha[i] the probability that draft position i is accepted given every earlier one was
(what GenerationStats.alpha measures), the expected tokens per step for a chain of gamma is

    tau(gamma) = 1 + sum_{k=1..gamma} prod_{i<k} alpha[i]          (the bonus/correction token included)

and the speedup over autoregressive decoding of the same target is

    speedup = tau / (verify_ratio + cost_ratio * draft_forwards)

where cost_ratio = one draft forward / one autoregressive target step, verify_ratio = one verification forward /
one autoregressive target step (1 when decoding is launch- or memory-bound, more when the k + 1 verified tokens cost
compute), and draft_forwards = drafter forwards per step (gamma for a draft LM; heads draft a whole tree in one).
The gap between this prediction, fed with the measured costs, and the measured speedup is the runtime's own overhead
per step: host syncs, bookkeeping, cache surgery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def _acceptance_at(alpha: Sequence[float | None], position: int) -> float:
    """alpha[position], reusing the last measured value for positions past the list (or never reached)."""
    known = [a for a in alpha[: position + 1] if a is not None]
    if not known:
        raise ValueError("acceptance by position is empty: measure the draft first (alpha has no value)")
    value = alpha[position] if position < len(alpha) and alpha[position] is not None else known[-1]
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"acceptance must lie in [0, 1]; got alpha[{position}] = {value}")
    return value


def expected_tau(alpha: Sequence[float | None], gamma: int) -> float:
    """Expected tokens per target forward for a chain of `gamma` draft tokens; positions past `alpha` reuse its last
    value (a draft measured at gamma=5 extrapolated to 8 assumes position 5's acceptance holds)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    tau, reach = 1.0, 1.0
    for position in range(gamma):
        reach *= _acceptance_at(alpha, position)
        tau += reach
    return tau


def predicted_speedup(alpha: Sequence[float | None], gamma: int, cost_ratio: float, *, verify_ratio: float = 1.0,
                      draft_forwards: float | None = None) -> float:
    """tau(gamma) / (verify_ratio + cost_ratio * draft_forwards); draft_forwards defaults to gamma (a draft LM runs once
    per proposed token)."""
    if cost_ratio < 0 or verify_ratio <= 0:
        raise ValueError(f"costs must be positive: cost_ratio={cost_ratio}, verify_ratio={verify_ratio}")
    forwards = gamma if draft_forwards is None else draft_forwards
    return expected_tau(alpha, gamma) / (verify_ratio + cost_ratio * forwards)


def recommend_gamma(alpha: Sequence[float | None], cost_ratio: float, max_gamma: int, *,
                    verify_ratio: float = 1.0) -> tuple[int, float]:
    """The chain length in 1..max_gamma with the highest predicted speedup, and that speedup (ties: the shorter)."""
    if max_gamma < 1:
        raise ValueError(f"max_gamma must be >= 1; got {max_gamma}")
    best = max(range(1, max_gamma + 1),
               key=lambda g: (predicted_speedup(alpha, g, cost_ratio, verify_ratio=verify_ratio), -g))
    return best, predicted_speedup(alpha, best, cost_ratio, verify_ratio=verify_ratio)


@dataclass(frozen=True)
class StepCosts:
    """Seconds per autoregressive target step, per verification forward and per drafter forward."""

    ar_step_s: float
    verify_s: float
    draft_forward_s: float

    @property
    def cost_ratio(self) -> float:
        return self.draft_forward_s / self.ar_step_s

    @property
    def verify_ratio(self) -> float:
        return self.verify_s / self.ar_step_s


def step_costs(summary: dict) -> StepCosts:
    """The costs measured by a profiled evaluation (evaluate_draft(..., profile=True, measure_speedup=True)): its
    `draft_time_s`, `verify_time_s`, forward counts and the autoregressive baseline's time per token."""
    needed = ("draft_time_s", "verify_time_s", "ar_time_s", "ar_new_tokens")
    missing = [k for k in needed if summary.get(k) is None]
    if missing:
        raise ValueError(f"the evaluation has no {missing}: run it with profile=True and measure_speedup=True")
    return StepCosts(ar_step_s=summary["ar_time_s"] / summary["ar_new_tokens"],
                     verify_s=summary["verify_time_s"] / summary["target_forwards"],
                     draft_forward_s=summary["draft_time_s"] / max(summary["draft_forwards"], 1))


def prediction(summary: dict, *, max_gamma: int | None = None, chain: bool = True) -> dict:
    """Predicted vs measured speedup for one evaluated configuration, from its measured tau and step costs; for chain
    drafters that run once per token (chain=True), also the recommended gamma up to max_gamma (default: the evaluated
    one plus 3) under the same costs."""
    costs = step_costs(summary)
    forwards_per_step = summary["draft_forwards"] / summary["target_forwards"]
    predicted = summary["tau"] / (costs.verify_ratio + costs.cost_ratio * forwards_per_step)
    measured = summary.get("speedup")
    result = {
        "cost_ratio": costs.cost_ratio,
        "verify_ratio": costs.verify_ratio,
        "draft_forwards_per_step": forwards_per_step,
        "predicted_speedup": predicted,
        "measured_speedup": measured,
        # Positive: the runtime loses this share of the predicted speedup to per-step overhead.
        "shortfall": None if measured is None else 1.0 - measured / predicted,
    }
    if chain:
        gamma = len(summary["alpha"])
        best, best_speedup = recommend_gamma(summary["alpha"], costs.cost_ratio, max_gamma or gamma + 3,
                                             verify_ratio=costs.verify_ratio)
        result.update(recommended_gamma=best, predicted_speedup_at_recommended=best_speedup)
    return result


def best_subtrees(paths: Sequence[Sequence[int]], accept_rate: Sequence[float]) -> list[tuple[int, ...]]:
    """The nodes of a static tree (`paths`, each a path of candidate ranks) in the order that builds the best subtree
    of every size: its first b entries are the b-node subtree with the highest expected tau.

    accept_rate[i] = how often node i lay on the accepted path per decoding step (greedy verification). A node can
    only be accepted when its parent is, so its rate never exceeds its parent's; the b highest rates (ties: shallower
    first) therefore form a tree, and its expected tau is 1 + the sum of their rates. Candidates of one parent are
    distinct tokens, so removing nodes never changes which of the remaining ones is accepted."""
    paths = [tuple(p) for p in paths]
    if len(paths) != len(accept_rate):
        raise ValueError(f"{len(paths)} tree paths but {len(accept_rate)} acceptance rates")
    order = sorted(range(len(paths)), key=lambda i: (-accept_rate[i], len(paths[i]), paths[i]))
    return [paths[i] for i in order]


def tree_size_curve(paths: Sequence[Sequence[int]], accept_rate: Sequence[float], verify_ratio_of_size,
                    draft_ratio: float, sizes: Sequence[int]) -> list[dict]:
    """Expected tau and predicted speedup of the best subtree of each size: tau / (verify_ratio(size) + draft_ratio),
    where draft_ratio is one step's drafting in autoregressive target steps (heads draft the whole tree at once)."""
    rate_of = {tuple(p): r for p, r in zip(paths, accept_rate)}
    ordered = best_subtrees(paths, accept_rate)
    curve = []
    for size in sizes:
        chosen = ordered[:size]
        tau = 1.0 + sum(rate_of[p] for p in chosen)
        curve.append({"size": len(chosen), "tau": tau, "predicted_speedup": tau / (verify_ratio_of_size(len(chosen))
                                                                                   + draft_ratio),
                      "paths": [list(p) for p in sorted(chosen, key=lambda p: (len(p), p))]})
    return curve


def dynamic_tree_curve(accepted_by_rank: Sequence[Sequence[int]], steps: int, depths: Sequence[int],
                       sizes: Sequence[int], verify_ratio_of_size, draft_ratio_of_depth) -> list[dict]:
    """Expected tau and predicted speedup of a tree grown by confidence (runtime.tree.DynamicTree) at every depth in
    `depths` and total_tokens in `sizes`, from one greedy measurement at the largest of both.

    accepted_by_rank[d - 1][r] = accepted nodes of depth <= d whose confidence rank among the measured tree's nodes of
    depth <= d was r (GenerationStats.accepted_by_rank), over `steps` tree verifications. The tree of depth d and
    total_tokens b keeps exactly the nodes of depth <= d ranked below b, and children of one node are distinct tokens,
    so greedy verification accepts there exactly the accepted path's nodes it keeps: tau(d, b) = 1 + (those counted
    nodes) / steps. Speedup = tau / (verify_ratio(b) + draft_ratio(d)), both in autoregressive target steps (a
    verification of b drafted tokens; d draft passes). `sizes` must not exceed the measured tree's total_tokens."""
    if steps < 1:
        raise ValueError("no tree verification was measured: the prompts produced no decoding steps")
    measured_depth = len(accepted_by_rank)
    if not depths or max(depths) > measured_depth or min(depths) < 1:
        raise ValueError(f"depths {list(depths)} must lie in 1..{measured_depth}, the measured tree's depth")
    curve = []
    for depth in depths:
        counts = accepted_by_rank[depth - 1]
        for size in sizes:
            tau = 1.0 + sum(counts[:size]) / steps
            curve.append({"depth": depth, "total_tokens": size, "tau": tau,
                          "predicted_speedup": tau / (verify_ratio_of_size(size) + draft_ratio_of_depth(depth))})
    return curve


def best_point(curve: list[dict]) -> dict:
    """The point of a dynamic_tree_curve with the highest predicted speedup; ties go to the smaller, shallower tree."""
    return max(curve, key=lambda p: (p["predicted_speedup"], -p["total_tokens"], -p["depth"]))


def forward_seconds(model, prefix_ids, token_counts: Sequence[int], repeats: int = 3) -> dict[int, float]:
    """Median seconds of one forward of `model` over n new tokens after a cached prefix, for each n in token_counts:
    what verifying a tree of n nodes costs (flat while decoding is launch- or memory-bound, rising once it computes)."""
    import statistics
    import time

    import torch

    from draftkit.runtime.speculative import new_cache, truncate_cache

    device = prefix_ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = {}
    with torch.inference_mode():
        cache = new_cache()
        model(input_ids=prefix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        length = cache.get_seq_length()
        for count in token_counts:
            feed = prefix_ids[:, -1:].expand(1, count).contiguous()
            times = []
            for _ in range(repeats + 1):  # the first run warms kernels for this shape
                sync()
                start = time.perf_counter()
                model(input_ids=feed, past_key_values=cache, use_cache=True, logits_to_keep=count)
                sync()
                times.append(time.perf_counter() - start)
                truncate_cache(cache, length)
            seconds[count] = statistics.median(times[1:])
    return seconds
