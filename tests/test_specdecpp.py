"""SpecDec++ pieces: the acceptance head, its class-weighted soft BCE, and adaptive stopping in the runtime."""

from __future__ import annotations

import math

import pytest
import torch
from test_runtime import perturbed_copy, sharpen

from draftkit.drafts.specdecpp import acceptance_head
from draftkit.objectives.specdecpp import acceptance_bce
from draftkit.runtime.evaluate import encode_prompt
from draftkit.runtime.specdecpp import SpecDecDrafter
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
