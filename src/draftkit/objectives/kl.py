"""Divergences between a teacher's (the target's) and a student's (the draft's) next-token distributions.

Every function takes logits [..., V] for both models at the same positions and a boolean mask [...] of the positions
that count, and returns LossOutput(loss_sum over counted positions, count, metrics). Softmax runs in fp32 whatever the
input dtype (bf16 log-softmax over a large vocabulary loses the small probabilities the divergences weigh), and
`temperature` divides both models' logits: to train for acceptance under sampling at temperature T, distil at T (α = 1 −
TVD holds at the decoding temperature; Leviathan et al. 2023).

Every function also reports the per-position acceptance estimate α̂ = Σ_v min(p, q) as the metric "alpha_hat"
(a sum over counted positions, like the loss), so each objective's log shows the number training is for.

Directions: forward KL is KL(p_teacher ‖ q_student) (mass-covering), reverse KL is KL(q ‖ p) (mode-seeking).
Generalized JSD(β) follows GKD/TRL: with m = β·p + (1 − β)·q, JSD(β) = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m); that interior
formula tends to 0 at both ends (JSD(β) ≈ β·FKL near 0), so β = 0 and β = 1 are defined as FKL and RKL exactly, the
endpoints TRL special-cases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from draftkit.objectives.linear_logits import LinearLogits, linear_soft_cross_entropy
from draftkit.objectives.types import LossOutput

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def _log_probs(student_logits, teacher_logits, temperature: float):
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0; got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the draft must share the target's vocabulary and be scored at the same positions")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return log_q, log_p


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per position; terms with a = 0 contribute 0 (xlogy semantics), never NaN."""
    return (log_a.exp() * (log_a - log_b)).nan_to_num(nan=0.0).sum(-1)


def _reduce(per_position: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor, mask: torch.Tensor) -> LossOutput:
    mask = mask.to(torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match the logits' leading shape {tuple(per_position.shape)}")
    loss_sum = per_position.masked_fill(~mask, 0.0).sum()
    with torch.no_grad():
        overlap = torch.minimum(log_q.exp(), log_p.exp()).sum(-1)
        alpha_hat = overlap.masked_fill(~mask, 0.0).sum()
    return LossOutput(loss_sum=loss_sum, count=mask.sum(), metrics={"alpha_hat": alpha_hat})


def forward_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOutput:
    """Σ over counted positions of KL(p ‖ q)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(_kl(log_p, log_q), log_q, log_p, mask)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOutput:
    """Σ over counted positions of KL(q ‖ p)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(_kl(log_q, log_p), log_q, log_p, mask)


def generalized_jsd(student_logits, teacher_logits, mask, *, beta: float = 0.5, temperature: float = 1.0) -> LossOutput:
    """Σ over counted positions of JSD(β) (module docstring for the definition and endpoints)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1]; got {beta}")
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    if beta == 0.0:
        per_position = _kl(log_p, log_q)
    elif beta == 1.0:
        per_position = _kl(log_q, log_p)
    else:
        log_m = torch.logsumexp(
            torch.stack([log_p + torch.log(torch.tensor(beta)), log_q + torch.log(torch.tensor(1.0 - beta))]), dim=0)
        per_position = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return _reduce(per_position, log_q, log_p, mask)


def total_variation(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOutput:
    """Σ over counted positions of TVD(p, q) = ½ Σ_v |p − q| = 1 − Σ_v min(p, q), the expected rejection rate."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    per_position = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return _reduce(per_position, log_q, log_p, mask)


def soft_cross_entropy(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOutput:
    """Σ over counted positions of −Σ_v p log q: forward KL plus the teacher's entropy, which has no gradient. The soft
    label loss of Hydra++, EAGLE, Kangaroo and Clover; reported values differ from forward_kl by that entropy.
    Student logits given as LinearLogits are computed chunk by chunk (objectives.linear_logits), which also reports
    the metric top1 (argmax agreement)."""
    if isinstance(student_logits, LinearLogits):
        return linear_soft_cross_entropy(student_logits, teacher_logits, mask, temperature=temperature)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _reduce(-(log_p.exp() * log_q).sum(-1), log_q, log_p, mask)


def divergence(student_logits, teacher_logits, mask, *, kind: str, beta: float = 0.5,
               temperature: float = 1.0) -> LossOutput:
    """Dispatch by name (fkl | rkl | jsd | tvd), for recipes that take the divergence from a config."""
    if kind == "fkl":
        return forward_kl(student_logits, teacher_logits, mask, temperature=temperature)
    if kind == "rkl":
        return reverse_kl(student_logits, teacher_logits, mask, temperature=temperature)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, mask, beta=beta, temperature=temperature)
    if kind == "tvd":
        return total_variation(student_logits, teacher_logits, mask, temperature=temperature)
    raise ValueError(f"unknown divergence {kind!r}: choose one of {', '.join(DIVERGENCES)}")
