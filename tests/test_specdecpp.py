"""SpecDec++ pieces: the acceptance head, its class-weighted soft BCE, and adaptive stopping in the runtime."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_runtime import perturbed_copy, sharpen

from draftkit.data import specdecpp_labels
from draftkit.data.sources import DataError
from draftkit.data.specdecpp_labels import (
    acceptance_labels,
    build_acceptance_labels,
    check_label_settings,
    draft_proposals,
    mix_inputs,
)
from draftkit.drafts.specdecpp import acceptance_head, draft_fingerprint
from draftkit.objectives.specdecpp import acceptance_bce
from draftkit.runtime.evaluate import encode_prompt
from draftkit.runtime.specdecpp import (
    SpecDecDrafter,
    chain_alpha,
    head_stop_after,
    simulate_stop_rule,
    stop_policy,
    windows,
)
from draftkit.runtime.speculative import autoregressive_generate, speculative_generate
from draftkit.targets.tiny import tiny_target


@pytest.fixture(scope="module")
def pair():
    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    return target, perturbed_copy(target.model, seed=5, noise=0.3)


def test_head_blocks_have_their_own_weights():
    head = acceptance_head(16, num_layers=3)
    weights = [block.linear.weight for block in head.blocks]
    assert len({id(w) for w in weights}) == 3 and not torch.equal(weights[0], weights[1])
    assert head(torch.randn(4, 5, 16)).shape == (4, 5, 2)
    assert sorted(head.state_dict())[:2] == ["blocks.0.linear.bias", "blocks.0.linear.weight"]


def test_weighted_soft_bce_on_a_hand_example():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, -5.0]])  # P(accept) = 0.75, 0.25, ~0
    labels = torch.tensor([1.0, 0.25, 0.5])
    mask = torch.tensor([True, True, False])  # the third position kept the target's token: no loss
    out = acceptance_bce(logits, labels, mask, reject_weight=6.0)
    # position 0: 1 * 1.0 * -log 0.75; position 1: 6 * 0.75 * -log 0.75 + 1 * 0.25 * -log 0.25
    expected_sum = -math.log(0.75) + 4.5 * -math.log(0.75) + 0.25 * -math.log(0.25)
    assert out.loss_sum.item() == pytest.approx(expected_sum, rel=1e-6)
    assert out.count.item() == pytest.approx(1.0 + 4.5 + 0.25)
    assert (out.loss_sum / out.count).item() == pytest.approx(expected_sum / 5.75, rel=1e-6)


def chain_lengths(target, drafter, prompt, gamma):
    out = speculative_generate(target.model, drafter, prompt, gamma=gamma, max_new_tokens=40)
    assert out.tokens == autoregressive_generate(target.model, prompt, max_new_tokens=40).tokens
    return out.stats.drafted_tokens / out.stats.target_forwards, out.stats


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7])
def test_greedy_is_lossless_with_adaptive_stopping(pair, threshold):
    target, draft = pair
    prompt = encode_prompt(target.tokenizer, "Tell me about caches.", torch.device("cpu"))
    head = acceptance_head(draft.config.hidden_size, seed=1)
    with torch.no_grad():
        head.out.bias.copy_(torch.tensor([0.0, 1.0]))  # P(accept) around 0.7: the threshold decides the length
    length, stats = chain_lengths(target, SpecDecDrafter(draft, head, threshold=threshold, min_tokens=1), prompt, 6)
    assert 0 < sum(stats.accepted_per_position) < stats.drafted_tokens
    assert 1 <= length < 6


def test_the_stop_rule_follows_the_predicted_acceptance(pair):
    target, draft = pair
    prompt = encode_prompt(target.tokenizer, "Tell me about caches.", torch.device("cpu"))
    head = acceptance_head(draft.config.hidden_size, seed=1)
    lengths = {}
    for name, bias in (("confident", [-20.0, 20.0]), ("doubtful", [20.0, -20.0])):
        with torch.no_grad():
            head.out.weight.zero_()
            head.out.bias.copy_(torch.tensor(bias))
        lengths[name], _ = chain_lengths(target, SpecDecDrafter(draft, head, threshold=0.3, min_tokens=2), prompt, 5)
    # A confident head drafts to the maximum; a doubtful one stops at min_tokens (the first token counts as accepted).
    assert lengths["confident"] == pytest.approx(5.0, abs=0.6)  # only the last step is shortened by max_new_tokens
    assert lengths["doubtful"] == pytest.approx(2.0, abs=0.2)


def test_a_head_for_another_draft_is_refused(pair):
    _, draft = pair
    with pytest.raises(ValueError, match="trained for another draft"):
        SpecDecDrafter(draft, acceptance_head(draft.config.hidden_size + 8))


def test_labels_are_min_one_p_over_q_on_a_hand_example():
    # One row, three positions, vocabulary 3; logits are log-probabilities, so p and q are exactly these.
    p = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]])
    q = torch.tensor([[[0.25, 0.5, 0.25], [0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]])
    proposals = torch.tensor([[0, 1, 0]])
    labels = acceptance_labels(p.log(), q.log(), proposals, temperature=1.0)
    torch.testing.assert_close(labels, torch.tensor([[1.0, 1.0, 0.2 / 0.6]]))  # min(1, .5/.25), min(1, .6/.3), .2/.6
    # At temperature 2 both distributions are p^(1/2) and q^(1/2) renormalised.
    p2, q2 = p.sqrt() / p.sqrt().sum(-1, keepdim=True), q.sqrt() / q.sqrt().sum(-1, keepdim=True)
    expected = torch.minimum(torch.ones(1, 3), p2[0, [0, 1, 2], [0, 1, 0]] / q2[0, [0, 1, 2], [0, 1, 0]]).view(1, 3)
    torch.testing.assert_close(acceptance_labels(p.log(), q.log(), proposals, temperature=2.0), expected)
    # Greedy: accepted exactly where the proposal is the target's argmax (0, 1, 2 here).
    assert acceptance_labels(p.log(), q.log(), torch.tensor([[0, 2, 2]]), 0.0).tolist() == [[1.0, 0.0, 1.0]]
    chosen, prob = draft_proposals(q.log(), 0.0, torch.Generator())
    assert chosen.tolist() == [[1, 2, 0]] and prob[0].tolist() == pytest.approx([0.5, 0.5, 0.6])


def test_mixing_keeps_the_targets_token_at_a_seeded_fraction_with_no_loss_there():
    target_tokens = torch.zeros(4, 50, dtype=torch.long)
    proposals = torch.ones(4, 50, dtype=torch.long)
    counted = torch.ones(4, 50, dtype=torch.bool)
    counted[3, 30:] = False  # past the end of a response
    inputs, loss_mask = mix_inputs(target_tokens, proposals, counted, 0.15, torch.Generator().manual_seed(7))
    kept = torch.rand(4, 50, generator=torch.Generator().manual_seed(7)) < 0.15
    assert torch.equal(inputs, (~kept).long())  # Z = X (0) where kept, Y (1) elsewhere
    assert torch.equal(loss_mask, counted & ~kept)
    again, _ = mix_inputs(target_tokens, proposals, counted, 0.15, torch.Generator().manual_seed(7))
    assert torch.equal(again, inputs) and 10 < kept.sum() < 50
    none_kept, all_loss = mix_inputs(target_tokens, proposals, counted, 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(none_kept, proposals) and torch.equal(all_loss, counted)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_mixing_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"mixing_fraction=.* must lie in \[0, 1\)"):
        check_label_settings(temperature=1.0, mixing_fraction=fraction, max_new_tokens=8, batch_size=2)


def test_the_draft_fingerprint_sees_weights_not_dtype(pair):
    _, draft = pair
    fingerprint = draft_fingerprint(draft)
    assert draft_fingerprint(copy.deepcopy(draft).to(torch.bfloat16)) == fingerprint
    other = copy.deepcopy(draft)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0  # inside the strided sample (its first element)
    assert draft_fingerprint(other) != fingerprint


def test_chain_alpha_and_stop_rule_simulation_on_hand_windows():
    accept = torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0]])
    # alpha_1 = (1 + .5) / 2; alpha_2 = (.5 + .5) / 1.5; alpha_3 = (.25 + 0) / 1
    assert chain_alpha(accept) == pytest.approx([0.75, 2 / 3, 0.25])
    stop = torch.tensor([[False, True, False], [False, False, False]])  # row 0 stops after 2 tokens, row 1 drafts 3
    out = simulate_stop_rule(stop, accept, cost_ratio=0.5, stop_costs_a_forward=True)
    # accepted: row 0: 1 + .5 = 1.5; row 1: .5 + .5 + 0 = 1. forwards: 2 + 1 (the stop read token 2) and 3.
    assert out["tau"] == pytest.approx((2.5 + 2.0) / 2) and out["mean_draft_length"] == pytest.approx(2.5)
    assert out["predicted_speedup"] == pytest.approx(4.5 / ((1 + 0.5 * 3) + (1 + 0.5 * 3)))
    # The head rule ignores the first token's prediction and waits for min_tokens.
    predicted = torch.tensor([[0.1, 0.9, 0.5]])
    assert head_stop_after(predicted, 0.3, 1).tolist() == [[False, False, True]]  # 1 - .9 = .1; 1 - .45 = .55
    assert head_stop_after(predicted, 0.05, 2).tolist() == [[False, True, True]]


def test_static_policy_picks_gamma_and_thresholds_from_held_out_sequences():
    # Runs of likely acceptances broken by likely rejections, and labels that agree with the head: a fixed chain
    # either stops short in the easy runs or wastes tokens in the hard ones; the head's stop does neither.
    predicted = [torch.tensor(([0.9] * 6 + [0.1] * 2) * 3)]
    labels = [p.clone() for p in predicted]
    policy = stop_policy(predicted, labels, labels, max_tokens=6, min_tokens=1, cost_ratio=0.1)
    assert policy["alpha_predicted"] == pytest.approx(chain_alpha(windows(predicted, 6)))
    assert policy["num_speculative_tokens"] == 4 and policy["stop_threshold"] == 0.35
    adaptive = policy["predicted_speedup"]["head_threshold"][str(policy["stop_threshold"])]["predicted_speedup"]
    fixed = policy["predicted_speedup"]["fixed_gamma_simulated"]
    assert adaptive > max(fixed.values())  # stopping where the head expects a rejection beats every fixed length
    with pytest.raises(ValueError, match="no held-out label sequence has 6 positions"):
        stop_policy([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], max_tokens=6, min_tokens=1, cost_ratio=0.1)


def build_labels(pair, cache_dir, prompts, **overrides):
    target, draft = pair
    settings = dict(identity={"target": "t", "draft": draft_fingerprint(draft)}, temperature=1.0, max_new_tokens=6,
                    mixing_fraction=0.15, batch_size=2, seed=0, stop_ids=[2], pad_token_id=2, progress=False)
    return build_acceptance_labels(target.model, draft, prompts, cache_dir, **{**settings, **overrides})


def test_a_killed_label_build_resumes_without_redoing_work(pair, tmp_path, monkeypatch):
    prompts = [[1, 5 + i, 9, 40 + i] for i in range(5)]  # three batches of two (the last one short)
    uninterrupted = build_labels(pair, tmp_path / "whole", prompts)
    assert len(uninterrupted) == 5 and all(len(e["tokens"]) == len(e["accept"]) > 0 for e in uninterrupted)
    assert 0 < torch.tensor([a for e in uninterrupted for a in e["accept"]]).mean() < 1

    calls = []
    real_batch = specdecpp_labels.label_batch

    def killed_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the process dies while labelling the second batch
        calls.append(1)
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(specdecpp_labels, "label_batch", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_labels(pair, tmp_path / "killed", prompts)
    assert [p.name for p in sorted((tmp_path / "killed").iterdir())] == ["shard_00000.safetensors"]

    resumed_calls = []
    monkeypatch.setattr(specdecpp_labels, "label_batch",
                        lambda *a, **k: resumed_calls.append(1) or real_batch(*a, **k))
    resumed = build_labels(pair, tmp_path / "killed", prompts)
    assert len(resumed_calls) == 2  # only the two missing batches
    assert resumed == uninterrupted  # the same labels as a build that was never interrupted

    with pytest.raises(DataError, match="made for another target, draft.*Fix: delete that folder"):
        build_labels(pair, tmp_path / "killed", prompts, temperature=0.5)


def test_scoring_the_first_token_lets_a_doubtful_head_stop_after_one(pair):
    target, draft = pair
    prompt = encode_prompt(target.tokenizer, "Tell me about caches.", torch.device("cpu"))
    head = acceptance_head(draft.config.hidden_size, seed=1)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.copy_(torch.tensor([20.0, -20.0]))  # every token predicted rejected
    reference = SpecDecDrafter(draft, head, threshold=0.3, min_tokens=1)
    scored = SpecDecDrafter(draft, head, threshold=0.3, min_tokens=1, score_first_token=True)
    # The reference rule ignores the first token's prediction, so min_tokens=1 still drafts two; scoring it stops at one.
    assert chain_lengths(target, reference, prompt, 5)[0] == pytest.approx(2.0, abs=0.2)
    assert chain_lengths(target, scored, prompt, 5)[0] == pytest.approx(1.0, abs=0.05)
    windows = torch.full((3, 4), 0.01)
    assert head_stop_after(windows, 0.3, 1).float().argmax(1).tolist() == [1, 1, 1]  # stops after token 2
    assert head_stop_after(windows, 0.3, 1, score_first_token=True).float().argmax(1).tolist() == [0, 0, 0]
