"""The speedup predictor: expected tau from acceptance by position, predicted speedup from step costs, recommended
gamma, and a profiled evaluation that feeds it measured costs."""

from __future__ import annotations

import pytest
from test_runtime import SPEC_BENCH_RECORDS, perturbed_copy, sharpen
from test_tree import LMTreeDrafter

from draftkit.runtime.evaluate import evaluate_draft, render_markdown
from draftkit.runtime.predict import (
    StepCosts,
    best_point,
    best_subtrees,
    dynamic_tree_curve,
    expected_tau,
    predicted_speedup,
    recommend_gamma,
    step_costs,
    tree_size_curve,
)
from draftkit.targets.tiny import tiny_target


@pytest.mark.parametrize("alpha, gamma", [(0.6, 4), (0.9, 7), (0.0, 3), (1.0, 5)])
def test_constant_acceptance_gives_the_closed_form(alpha, gamma):
    closed_form = gamma + 1.0 if alpha == 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert expected_tau([alpha] * gamma, gamma) == pytest.approx(closed_form)


def test_acceptance_by_position_and_extrapolation():
    # 1 + 0.8 + 0.8*0.5 + 0.8*0.5*0.25
    assert expected_tau([0.8, 0.5, 0.25], 3) == pytest.approx(2.3)
    # Past the measured positions the last value holds; an unreached position (None) too.
    assert expected_tau([0.8, 0.5], 4) == pytest.approx(1 + 0.8 + 0.4 + 0.2 + 0.1)
    assert expected_tau([0.8, 0.5, None], 3) == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    assert expected_tau([0.8], 0) == 1.0


def test_predicted_speedup_and_recommended_gamma():
    alpha = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    assert predicted_speedup(alpha, 2, 0.1) == pytest.approx((1 + 0.8 + 0.56) / 1.2)
    assert predicted_speedup(alpha, 2, 0.1, verify_ratio=1.5, draft_forwards=1) == pytest.approx(2.36 / 1.6)
    # Free drafting: draft as far as allowed; expensive drafting: one token; in between: the argmax of the curve.
    assert recommend_gamma(alpha, 0.0, 6)[0] == 6
    assert recommend_gamma(alpha, 2.0, 6)[0] == 1
    best, speedup = recommend_gamma(alpha, 0.1, 6)
    curve = [predicted_speedup(alpha, g, 0.1) for g in range(1, 7)]
    assert speedup == pytest.approx(max(curve)) and best == 1 + curve.index(max(curve))
    assert 1 < best < 6


@pytest.mark.parametrize("call, message", [
    (lambda: expected_tau([], 2), "empty"),
    (lambda: expected_tau([1.5], 1), r"\[0, 1\]"),
    (lambda: expected_tau([0.5], -1), "gamma"),
    (lambda: predicted_speedup([0.5], 1, -0.1), "positive"),
    (lambda: recommend_gamma([0.5], 0.1, 0), "max_gamma"),
    (lambda: step_costs({"tau": 1.2}), "profile=True"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_step_costs_from_a_profiled_summary():
    costs = step_costs({"ar_time_s": 2.0, "ar_new_tokens": 100, "verify_time_s": 1.5, "target_forwards": 50,
                        "draft_time_s": 0.5, "draft_forwards": 100})
    assert costs == StepCosts(ar_step_s=0.02, verify_s=0.03, draft_forward_s=0.005)
    assert costs.cost_ratio == pytest.approx(0.25) and costs.verify_ratio == pytest.approx(1.5)


def test_profiled_evaluation_predicts_from_its_own_costs():
    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    draft = perturbed_copy(target.model, seed=5)
    report = evaluate_draft(target, draft, SPEC_BENCH_RECORDS[:2], gamma=3, max_new_tokens=12, progress=False,
                            profile=True)
    overall = report["overall"]
    assert 0 < overall["draft_time_s"] and 0 < overall["verify_time_s"]
    # Both are parts of the decoding time; the rest is the runtime's bookkeeping.
    assert overall["draft_time_s"] + overall["verify_time_s"] < overall["time_s"]
    predicted = overall["prediction"]
    costs = step_costs(overall)
    assert predicted["predicted_speedup"] == pytest.approx(
        overall["tau"] / (costs.verify_ratio + costs.cost_ratio * overall["draft_forwards"] / overall["target_forwards"]))
    assert predicted["measured_speedup"] == overall["speedup"]
    assert 1 <= predicted["recommended_gamma"] <= 6
    assert "recommended gamma" in render_markdown(report)
    plain = evaluate_draft(target, draft, SPEC_BENCH_RECORDS[:1], gamma=3, max_new_tokens=8, progress=False)
    assert "prediction" not in plain["overall"] and plain["prompts"][0]["draft_time_s"] == 0.0


def test_best_subtrees_take_the_likeliest_nodes_as_a_tree():
    paths = [(0,), (1,), (0, 0), (0, 1), (1, 0)]
    rates = [0.5, 0.2, 0.3, 0.1, 0.05]
    order = best_subtrees(paths, rates)
    assert order == [(0,), (0, 0), (1,), (0, 1), (1, 0)]
    for size in range(1, 6):  # every prefix is closed under parents
        chosen = set(order[:size])
        assert all(len(p) == 1 or p[:-1] in chosen for p in chosen)
    curve = tree_size_curve(paths, rates, lambda n: 1.0 + 0.1 * n, 0.05, [1, 2, 5])
    assert [c["tau"] for c in curve] == pytest.approx([1.5, 1.8, 2.15])
    assert curve[1]["predicted_speedup"] == pytest.approx(1.8 / (1.2 + 0.05))
    assert curve[1]["paths"] == [[0], [0, 0]]
    with pytest.raises(ValueError, match="acceptance rates"):
        best_subtrees(paths, rates[:2])


def medusa_drafter(target, shape, std: float):
    import torch

    from draftkit.drafts.medusa import medusa_heads
    from draftkit.runtime.medusa import MedusaDrafter

    torch.manual_seed(3)
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=2)
    for stack in heads.blocks:  # std 0: Medusa's identity init, whose candidates this repetitive target often accepts
        for layer in stack.layers:
            torch.nn.init.normal_(layer.weight, std=std)
    return MedusaDrafter(heads.eval(), shape, shared_lm_head=target.lm_head.weight)


def test_a_subtree_accepts_exactly_the_part_of_the_full_trees_path_it_keeps():
    import torch

    from draftkit.runtime.tree import StaticTree, tree_generate, tree_shape

    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    full = tree_shape("static", 3)
    keep = {p for p in full.paths if p[0] == 0 and all(r <= 1 for r in p)}
    subtree = StaticTree.from_paths(keep)
    node_of = {p: i for i, p in enumerate(full.paths)}
    generator = torch.Generator().manual_seed(0)
    accepted, cut = 0, 0
    for _ in range(80):
        length = int(torch.randint(0, 5, (1,), generator=generator))
        ids = torch.cat([torch.tensor([1]), torch.randint(3, target.vocab_size, (length,), generator=generator)])[None]
        # Two new tokens: the prefill commits one, then exactly one tree is verified, from the same state in both runs.
        big = tree_generate(target.model, medusa_drafter(target, full, 0.0), ids, max_new_tokens=2)
        small = tree_generate(target.model, medusa_drafter(target, subtree, 0.0), ids, max_new_tokens=2)
        path = [p for p in full.paths if big.stats.accepted_nodes[node_of[p]]]
        kept = sum(1 for p in path if p in keep)  # the accepted path is one chain from the root
        assert sum(small.stats.accepted_nodes) == kept
        accepted += bool(path)
        cut += kept < len(path)
    assert accepted >= 5 and cut >= 3  # the check saw accepted paths, some of them cut by the subtree


def test_profiled_tree_evaluation_recommends_a_subtree():
    from draftkit.runtime.tree import tree_shape

    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    shape = tree_shape("static", 3)
    report = evaluate_draft(target, medusa_drafter(target, shape, 0.0), SPEC_BENCH_RECORDS[:2], max_new_tokens=12,
                            progress=False, profile=True)
    nodes = report["overall"]["tree_nodes"]
    assert len(nodes["accept_rate"]) == shape.size and all(0 <= r <= 1 for r in nodes["accept_rate"])
    predicted = report["overall"]["prediction"]
    assert [point["size"] for point in predicted["curve"]] == [1, 2, 4, 8, shape.size]
    assert 1 <= predicted["recommended_tree_size"] <= shape.size
    chosen = {tuple(p) for p in predicted["recommended_tree_paths"]}
    assert all(len(p) == 1 or p[:-1] in chosen for p in chosen)
    assert "best subtree" in render_markdown(report)


def test_dynamic_tree_curve_prices_every_depth_and_total_from_one_measurement():
    # 10 verified trees; accepted nodes by confidence rank among the nodes of depth <= 1, <= 2, <= 3.
    accepted_by_rank = [[6, 2], [6, 2, 3, 1], [6, 2, 3, 1, 2, 0, 1]]
    curve = dynamic_tree_curve(accepted_by_rank, 10, [1, 2, 3], [1, 2, 4, 7],
                               lambda size: 1.0 + 0.05 * size, lambda depth: 0.1 * depth)
    point = {(p["depth"], p["total_tokens"]): p for p in curve}
    assert len(curve) == 12
    assert point[(3, 4)]["tau"] == pytest.approx(1 + 12 / 10)
    assert point[(3, 7)]["tau"] == pytest.approx(1 + 15 / 10)
    assert point[(1, 7)]["tau"] == pytest.approx(1 + 8 / 10)  # depth 1 has only two ranked acceptances
    assert point[(2, 4)]["predicted_speedup"] == pytest.approx(2.2 / (1.2 + 0.2))
    # Depth 3 adds nothing within 4 tokens but costs a draft pass; 7 tokens add 0.1 tau for 0.15 of verification.
    best = best_point(curve)
    assert (best["depth"], best["total_tokens"]) == (2, 4)
    with pytest.raises(ValueError, match="must lie in 1..3"):
        dynamic_tree_curve(accepted_by_rank, 10, [4], [1], lambda size: 1.0, lambda depth: 0.0)
    with pytest.raises(ValueError, match="no tree verification"):
        dynamic_tree_curve(accepted_by_rank, 0, [1], [1], lambda size: 1.0, lambda depth: 0.0)


@pytest.fixture(scope="module")
def draft_pair():
    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    return target, perturbed_copy(target.model, seed=5)


def test_a_smaller_dynamic_tree_accepts_exactly_what_the_larger_ones_ranks_predict(draft_pair):
    import torch

    from draftkit.runtime.tree import DynamicTree, tree_generate

    target, draft = draft_pair
    generator = torch.Generator().manual_seed(1)
    smaller = [(1, 1), (1, 3), (2, 2), (2, 5), (3, 4)]
    accepted, cut = 0, 0
    for _ in range(40):
        length = int(torch.randint(0, 5, (1,), generator=generator))
        ids = torch.cat([torch.tensor([1]), torch.randint(3, target.vocab_size, (length,), generator=generator)])[None]
        # Two new tokens: the prefill commits one, then exactly one tree is verified, from the same state in each run.
        big = tree_generate(target.model, LMTreeDrafter(draft, DynamicTree(3, 3, 12)), ids, max_new_tokens=2)
        ranks = big.stats.accepted_by_rank
        accepted += sum(big.stats.accepted_per_position) > 0
        for depth, total in smaller:
            small = tree_generate(target.model, LMTreeDrafter(draft, DynamicTree(depth, 3, total)), ids,
                                  max_new_tokens=2)
            predicted = sum(ranks[depth - 1][:total]) if ranks else 0
            assert sum(small.stats.accepted_per_position) == predicted, (depth, total)
            cut += predicted < sum(big.stats.accepted_per_position)
    assert accepted >= 5 and cut >= 5  # the check saw accepted paths, some of them cut by the smaller trees


def test_auto_dynamic_tree_is_chosen_by_the_predictor_and_then_measured(draft_pair):
    from draftkit.runtime.evaluate import evaluate_dynamic_tree_auto
    from draftkit.runtime.tree import DynamicTree

    target, draft = draft_pair
    built = []

    def make_drafter(shape):
        built.append(shape)
        return LMTreeDrafter(draft, shape)

    report = evaluate_dynamic_tree_auto(target, make_drafter, SPEC_BENCH_RECORDS[:2], depth=3, top_ks=(2, 3),
                                        max_total_tokens=12, max_new_tokens=12, progress=False)
    choice = report["tree_choice"]
    assert [c["tree"] for c in choice["calibrations"]] == [
        {"kind": "dynamic", "depth": 3, "top_k": k, "total_tokens": 12} for k in (2, 3)]
    chosen = choice["chosen"]
    assert report["config"]["tree"] == chosen and chosen["kind"] == "dynamic"
    assert 1 <= chosen["depth"] <= 3 and 1 <= chosen["total_tokens"] <= 12 and chosen["top_k"] in (2, 3)
    best = max(choice["calibrations"], key=lambda c: c["recommended"]["predicted_speedup_at_recommended"])
    assert (chosen["depth"], chosen["total_tokens"]) == (best["recommended"]["recommended_depth"],
                                                         best["recommended"]["recommended_total_tokens"])
    assert choice["measured_tau"] == report["overall"]["tau"] and report["overall"]["outputs_differing_from_ar"] == 0
    assert built[:2] == [DynamicTree(3, 2, 12), DynamicTree(3, 3, 12)]
    assert "Tree chosen by the predictor" in render_markdown(report)
