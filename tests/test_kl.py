"""Divergence properties: endpoints, limits, identities, masking, and hand-computed values."""

import math

import pytest
import torch

from draftkit.objectives.kl import (
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    soft_cross_entropy,
    total_variation,
)

ALL = [forward_kl, reverse_kl, generalized_jsd, total_variation]


def _logits(seed, shape=(2, 3, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _mask(shape=(2, 3)):
    return torch.ones(shape, dtype=torch.bool)


def test_hand_example_two_tokens():
    # p = (0.75, 0.25), q = (0.5, 0.5): every divergence by hand.
    teacher = torch.log(torch.tensor([[0.75, 0.25]]))
    student = torch.log(torch.tensor([[0.5, 0.5]]))
    mask = torch.tensor([True])
    fkl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert forward_kl(student, teacher, mask).loss_sum.item() == pytest.approx(fkl, abs=1e-6)
    assert reverse_kl(student, teacher, mask).loss_sum.item() == pytest.approx(rkl, abs=1e-6)
    assert total_variation(student, teacher, mask).loss_sum.item() == pytest.approx(0.25, abs=1e-6)
    m = (0.625, 0.375)
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert generalized_jsd(student, teacher, mask, beta=0.5).loss_sum.item() == pytest.approx(jsd, abs=1e-6)
    assert forward_kl(student, teacher, mask).metrics["alpha_hat"].item() == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("fn", ALL)
def test_zero_for_equal_inputs(fn):
    logits = _logits(0)
    out = fn(logits, logits.clone(), _mask())
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-5)
    assert out.metrics["alpha_hat"].item() == pytest.approx(6.0, abs=1e-5)


@pytest.mark.parametrize("fn", ALL)
def test_nonnegative_and_positive_when_different(fn):
    out = fn(_logits(1), _logits(2), _mask())
    assert out.loss_sum.item() > 1e-3


def test_jsd_endpoints_are_the_kls():
    s, t, m = _logits(3), _logits(4), _mask()
    assert torch.equal(generalized_jsd(s, t, m, beta=0.0).loss_sum, forward_kl(s, t, m).loss_sum)
    assert torch.equal(generalized_jsd(s, t, m, beta=1.0).loss_sum, reverse_kl(s, t, m).loss_sum)


def test_jsd_interior_tends_to_beta_times_kl_near_the_ends():
    s, t, m = _logits(5), _logits(6), _mask()
    fkl, rkl = forward_kl(s, t, m).loss_sum.item(), reverse_kl(s, t, m).loss_sum.item()
    eps = 1e-4
    assert generalized_jsd(s, t, m, beta=eps).loss_sum.item() / eps == pytest.approx(fkl, rel=1e-2)
    assert generalized_jsd(s, t, m, beta=1 - eps).loss_sum.item() / eps == pytest.approx(rkl, rel=1e-2)


def test_jsd_is_bounded_by_entropy_bound():
    s, t, m = _logits(7), _logits(8), _mask()
    # JSD(β) ≤ H(β) (the binary entropy), whatever p and q.
    for beta in (0.1, 0.5, 0.9):
        bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert generalized_jsd(s, t, m, beta=beta).loss_sum.item() / 6 <= bound + 1e-6


def test_tvd_equals_one_minus_overlap():
    s, t, m = _logits(9), _logits(10), _mask()
    out = total_variation(s, t, m)
    assert out.loss_sum.item() == pytest.approx(6 - out.metrics["alpha_hat"].item(), abs=1e-5)


def test_soft_ce_is_fkl_plus_teacher_entropy():
    s, t, m = _logits(11), _logits(12), _mask()
    p = torch.softmax(t, -1)
    entropy = -(p * torch.log(p)).sum()
    assert soft_cross_entropy(s, t, m).loss_sum.item() == pytest.approx(
        forward_kl(s, t, m).loss_sum.item() + entropy.item(), rel=1e-5)


@pytest.mark.parametrize("fn", ALL + [soft_cross_entropy])
def test_all_masked_gives_zero_sum_zero_count_and_finite_grads(fn):
    s = _logits(13).requires_grad_()
    out = fn(s, _logits(14), torch.zeros(2, 3, dtype=torch.bool))
    assert out.loss_sum.item() == 0.0 and out.count.item() == 0
    out.loss_sum.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0


@pytest.mark.parametrize("fn", ALL)
def test_masked_positions_do_not_contribute(fn):
    s, t = _logits(15), _logits(16)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    full = fn(s, t, _mask()).loss_sum
    masked = fn(s, t, mask).loss_sum
    per_position = [fn(s[i:i + 1, j:j + 1], t[i:i + 1, j:j + 1], torch.ones(1, 1, dtype=torch.bool)).loss_sum
                    for i in range(2) for j in range(3) if mask[i, j]]
    assert masked.item() == pytest.approx(sum(x.item() for x in per_position), abs=1e-5)
    assert masked.item() < full.item()


def test_temperature_scales_both_sides_and_teacher_gets_no_grad():
    s = _logits(17).requires_grad_()
    t = _logits(18).requires_grad_()
    hot = forward_kl(s, t, _mask(), temperature=2.0).loss_sum
    assert hot.item() == pytest.approx(forward_kl(s / 2, t / 2, _mask()).loss_sum.item(), rel=1e-6)
    hot.backward()
    assert t.grad is None and s.grad is not None


def test_extreme_logits_stay_finite():
    s = torch.tensor([[[1e4, -1e4, 0.0]]])
    t = torch.tensor([[[-1e4, 1e4, 0.0]]])
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        assert torch.isfinite(divergence(s, t, torch.ones(1, 1, dtype=torch.bool), kind=kind).loss_sum)


def test_bad_arguments_are_refused():
    s, m = _logits(19), _mask()
    with pytest.raises(ValueError, match="vocabulary"):
        forward_kl(s, _logits(20, (2, 3, 12)), m)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(s, s, m, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, s, m, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        total_variation(s, s, m, temperature=0.0)
