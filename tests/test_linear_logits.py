"""Chunked LM-head losses equal the plain ones (loss, metrics and gradients, fp32), for every objective that takes them."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.clover import clover_loss
from draftkit.objectives.fspad import fspad_loss
from draftkit.objectives.hydra_heads import hydra_loss
from draftkit.objectives.kangaroo import kangaroo_loss
from draftkit.objectives.kl import soft_cross_entropy
from draftkit.objectives.linear_logits import LinearLogits, ahead_losses, chunked_losses, linear_cross_entropy
from draftkit.objectives.medusa import medusa_loss

B, T, H, V = 2, 9, 6, 23  # B*T = 18 rows: chunks of 4 and 7 leave a remainder, 6 and 18 divide, 64 exceeds
CHUNKS = [1, 4, 6, 7, 18, 64]


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_(True)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def labels_with_holes():
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    return labels


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("skip_uncounted", [False, True])
def test_cross_entropy_equals_the_plain_one_with_its_gradients(chunk, skip_uncounted):
    hidden, weight, bias = leaf(B, T, H), leaf(V, H), leaf(V)
    labels = labels_with_holes()
    out = linear_cross_entropy(LinearLogits(hidden, weight, bias, chunk, skip_uncounted), labels)
    logits = F.linear(hidden, weight, bias)
    plain = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert_close(out.loss_sum, plain)
    assert out.count.item() == (labels != IGNORE_INDEX).sum().item() == 13
    assert out.metrics["top1"].item() == ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum().item()
    scale = torch.tensor(0.37)  # the upstream gradient is applied in backward, whatever it is
    for mine, theirs in zip(grads(out.loss_sum * scale, (hidden, weight, bias)),
                            grads(plain * scale, (hidden, weight, bias))):
        assert_close(mine, theirs)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
@pytest.mark.parametrize("skip_uncounted", [False, True])
def test_soft_cross_entropy_equals_the_plain_one_with_mask_and_temperature(chunk, teacher_kind, skip_uncounted):
    hidden, weight = leaf(B, T, H), leaf(V, H)
    teacher_hidden = torch.randn(B, T, H)
    teacher = (LinearLogits(teacher_hidden, weight.detach(), chunk_size=chunk) if teacher_kind == "hidden"
               else F.linear(teacher_hidden, weight.detach()))
    mask = torch.rand(B, T) > 0.4
    student = LinearLogits(hidden, weight, chunk_size=chunk, skip_uncounted=skip_uncounted)
    out = soft_cross_entropy(student, teacher, mask, temperature=2.0)
    student = F.linear(hidden, weight)
    plain = soft_cross_entropy(student, F.linear(teacher_hidden, weight.detach()), mask, temperature=2.0)
    assert_close(out.loss_sum, plain.loss_sum)
    assert_close(out.metrics["alpha_hat"], plain.metrics["alpha_hat"])
    assert out.count.item() == mask.sum().item()
    agree = (student.argmax(-1) == F.linear(teacher_hidden, weight).argmax(-1)) & mask
    assert out.metrics["top1"].item() == agree.sum().item()
    for mine, theirs in zip(grads(out.loss_sum, (hidden, weight)), grads(plain.loss_sum, (hidden, weight))):
        assert_close(mine, theirs)


def test_both_terms_in_one_pass_and_the_all_masked_case():
    hidden, weight = leaf(B, T, H), leaf(V, H)
    labels, teacher = labels_with_holes(), torch.randn(B, T, V)
    mask = torch.rand(B, T) > 0.3
    out = chunked_losses(LinearLogits(hidden, weight, chunk_size=5, skip_uncounted=True), labels=labels,
                         teacher=teacher, mask=mask, label_weight=0.3, teacher_weight=2.0)
    logits = F.linear(hidden, weight)
    counted = mask & (labels != IGNORE_INDEX)
    plain = (0.3 * F.cross_entropy(logits[counted], labels[counted], reduction="sum")
             + 2.0 * soft_cross_entropy(logits, teacher, counted).loss_sum)
    assert_close(out.loss_sum, plain)
    for mine, theirs in zip(grads(out.loss_sum, (hidden, weight)), grads(plain, (hidden, weight))):
        assert_close(mine, theirs)
    nothing = linear_cross_entropy(LinearLogits(hidden, weight, skip_uncounted=True), torch.full((B, T), IGNORE_INDEX))
    assert nothing.loss_sum.item() == 0.0 and nothing.count.item() == 0
    assert torch.count_nonzero(grads(nothing.loss_sum, (hidden,))[0]) == 0


def test_under_no_grad_it_computes_the_loss_and_no_gradient():
    hidden, weight = leaf(B, T, H), leaf(V, H)
    with torch.no_grad():
        out = linear_cross_entropy(LinearLogits(hidden, weight, chunk_size=4), labels_with_holes())
    assert not out.loss_sum.requires_grad and out.loss_sum.item() > 0


def test_bf16_autocast_projects_in_bf16_like_the_plain_path():
    hidden, weight = leaf(B, T, H), leaf(V, H)
    labels = labels_with_holes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(LinearLogits(hidden, weight, chunk_size=4), labels)
        plain = F.cross_entropy(F.linear(hidden, weight).reshape(-1, V).float(), labels.reshape(-1), reduction="sum")
    assert_close(out.loss_sum, plain)  # the same bf16 logits, then the same fp32 softmax
    for mine, theirs in zip(grads(out.loss_sum, (hidden, weight)), grads(plain, (hidden, weight))):
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)  # bf16 rounding of the logits' gradient


def test_medusa_with_own_heads_equals_the_plain_loss():
    states, weights = leaf(3, B, T, H), [leaf(V, H) for _ in range(3)]
    labels = labels_with_holes()
    lazy = medusa_loss([LinearLogits(s, w, chunk_size=7, skip_uncounted=True) for s, w in zip(states, weights)], labels,
                       decay=0.8)
    plain = medusa_loss(torch.stack([F.linear(s, w) for s, w in zip(states, weights)]), labels, decay=0.8)
    assert_close(lazy.loss_sum, plain.loss_sum)
    assert lazy.count.item() == plain.count.item()
    for key in plain.metrics:
        assert_close(lazy.metrics[key], plain.metrics[key])
    for mine, theirs in zip(grads(lazy.loss_sum, (states, *weights)), grads(plain.loss_sum, (states, *weights))):
        assert_close(mine, theirs)


@pytest.mark.parametrize("lm_weight,teacher_weight", [(1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_hydra_reads_each_heads_teacher_in_place_and_equals_the_plain_loss(lm_weight, teacher_weight):
    states, weight = leaf(3, B, T, H), leaf(V, H)
    labels, target_logits = labels_with_holes(), torch.randn(B, T, V)
    kwargs = dict(lm_weight=lm_weight, teacher_weight=teacher_weight, decay=0.9)
    lazy = hydra_loss([LinearLogits(s, weight, chunk_size=4, skip_uncounted=True) for s in states], labels,
                      target_logits, **kwargs)
    plain = hydra_loss(F.linear(states, weight), labels, target_logits, **kwargs)
    assert_close(lazy.loss_sum, plain.loss_sum)
    assert set(lazy.metrics) == set(plain.metrics)
    for key in plain.metrics:
        assert_close(lazy.metrics[key], plain.metrics[key])
    for mine, theirs in zip(grads(lazy.loss_sum, (states, weight)), grads(plain.loss_sum, (states, weight))):
        assert_close(mine, theirs)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
@pytest.mark.parametrize("skip_uncounted", [False, True])
def test_ahead_losses_equal_one_chunked_pass_per_head_on_the_shifted_rows(chunk, teacher_kind, skip_uncounted):
    states, weight, bias, teacher_hidden = leaf(3, B, T, H), leaf(V, H), leaf(V), torch.randn(B, T, H)
    teacher_weight = torch.randn(V, H)
    labels = [labels_with_holes() for _ in range(3)]
    masks = [torch.rand(B, T) > 0.3 for _ in range(3)]
    shifts = [1, 2, 3]
    teacher = (LinearLogits(teacher_hidden, teacher_weight, chunk_size=chunk) if teacher_kind == "hidden"
               else F.linear(teacher_hidden, teacher_weight))
    kwargs = dict(label_weight=0.3, teacher_weight=2.0, temperature=2.0)
    outs = ahead_losses([LinearLogits(s, weight, bias, chunk, skip_uncounted) for s in states], teacher, shifts,
                        labels=labels, masks=masks, **kwargs)
    # Head i at (b, t) against the teacher at (b, t + shift): the same as cutting both to the rows where that exists.
    plain = [chunked_losses(LinearLogits(s[:, :T - k], weight, bias), labels=y[:, :T - k], mask=m[:, :T - k],
                            teacher=F.linear(teacher_hidden[:, k:], teacher_weight), **kwargs)
             for s, y, m, k in zip(states, labels, masks, shifts)]
    for out, ref in zip(outs, plain):
        assert_close(out.loss_sum, ref.loss_sum)
        assert out.count.item() == ref.count.item()
        for key in ref.metrics:
            assert_close(out.metrics[key], ref.metrics[key])
    decayed = [sum(0.8 ** i * o.loss_sum for i, o in enumerate(group)) for group in (outs, plain)]
    for mine, theirs in zip(grads(decayed[0], (states, weight, bias)), grads(decayed[1], (states, weight, bias))):
        assert_close(mine, theirs)


def test_a_lazy_teacher_is_projected_once_per_row_some_head_scores():
    states, weight, teacher_hidden = leaf(3, B, T, H), torch.randn(V, H), torch.randn(B, T, H)
    labels = labels_with_holes()
    students = [LinearLogits(s, weight, chunk_size=4, skip_uncounted=True) for s in states]

    def flops(teacher):
        with FlopCounterMode(display=False) as counter:
            hydra_loss(students, labels, teacher, lm_weight=0.5, teacher_weight=1.0)
        return counter.get_total_flops()

    # Head i at t is taught by row t + 1 + i, so row s teaches some head where the label at s + 1 is scored.
    taught = (labels[:, 2:] != IGNORE_INDEX).sum().item()
    extra = flops(LinearLogits(teacher_hidden, weight, chunk_size=4)) - flops(F.linear(teacher_hidden, weight))
    assert extra == 2 * taught * V * H and taught < B * T


def test_clover_equals_the_plain_loss():
    features, weight = leaf(3, B, T, H), leaf(V, H)
    labels, target_features, target_logits = labels_with_holes(), torch.randn(B, T, H), torch.randn(B, T, V)
    lazy = clover_loss(features, [LinearLogits(f, weight, chunk_size=5, skip_uncounted=True) for f in features],
                       target_features,
                       target_logits, labels)
    plain = clover_loss(features, F.linear(features, weight), target_features, target_logits, labels)
    assert_close(lazy.loss_sum, plain.loss_sum)
    for key in plain.metrics:
        assert_close(lazy.metrics[key], plain.metrics[key])
    for mine, theirs in zip(grads(lazy.loss_sum, (features,)), grads(plain.loss_sum, (features,))):
        assert_close(mine, theirs)


def test_kangaroo_and_fspad_equal_the_plain_losses():
    hidden, weight, teacher_hidden = leaf(B, T, H), leaf(V, H), torch.randn(B, T, H)
    labels = labels_with_holes()
    lazy = kangaroo_loss(LinearLogits(hidden, weight, chunk_size=4), LinearLogits(teacher_hidden, weight.detach()),
                         labels)
    plain = kangaroo_loss(F.linear(hidden, weight), F.linear(teacher_hidden, weight.detach()), labels)
    assert_close(lazy.loss_sum, plain.loss_sum)
    assert_close(grads(lazy.loss_sum, (hidden,))[0], grads(plain.loss_sum, (hidden,))[0])
    regress, mask = leaf(B, T, H), torch.rand(B, T) > 0.5
    lazy = fspad_loss(LinearLogits(hidden, weight, chunk_size=3), regress, teacher_hidden,
                      LinearLogits(teacher_hidden, weight.detach(), chunk_size=3), mask)
    plain = fspad_loss(F.linear(hidden, weight), regress, teacher_hidden, F.linear(teacher_hidden, weight.detach()),
                       mask)
    assert_close(lazy.loss_sum, plain.loss_sum)
    for key in plain.metrics:
        assert_close(lazy.metrics[key], plain.metrics[key])
    assert_close(grads(lazy.loss_sum, (hidden,))[0], grads(plain.loss_sum, (hidden,))[0])


def test_bad_input_names_the_fix():
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        LinearLogits(hidden, weight, chunk_size=0)
    with pytest.raises(ValueError, match="does not match the LM head"):
        LinearLogits(torch.randn(B, T, H + 1), weight)
    with pytest.raises(ValueError, match="share the target's vocabulary"):
        soft_cross_entropy(LinearLogits(hidden, weight), torch.randn(B, T, V + 1), torch.ones(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_chunk_size=null"):
        LinearLogits(hidden, torch.empty(0))  # what a ZeRO-3-partitioned parameter holds outside its module's forward
    with pytest.raises(ValueError, match="needs labels"):
        chunked_losses(LinearLogits(hidden, weight))
    with pytest.raises(ValueError, match="one shift >= 1 per student"):
        ahead_losses([LinearLogits(hidden, weight)], torch.randn(B, T, V), [0])
    with pytest.raises(ValueError, match="needs LinearLogits heads"):
        hydra_loss(torch.randn(1, B, T, V), labels_with_holes(), LinearLogits(hidden, weight), teacher_weight=1.0)
