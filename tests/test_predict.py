"""The speedup predictor: expected tau from acceptance by position, predicted speedup from step costs, recommended
gamma, and a profiled evaluation that feeds it measured costs."""

from __future__ import annotations

import pytest
from test_runtime import SPEC_BENCH_RECORDS, perturbed_copy, sharpen

from draftkit.runtime.evaluate import evaluate_draft, render_markdown
from draftkit.runtime.predict import StepCosts, expected_tau, predicted_speedup, recommend_gamma, step_costs
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
