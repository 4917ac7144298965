import torch
import torch.nn.functional as F

from draftkit.objectives.ce import next_token_ce


def test_next_token_ce_is_summed_cross_entropy_over_unmasked_shifted_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    out = next_token_ce(logits, labels)
    expected_mean = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.count.item() == 6  # 8 shifted positions, positions 1 and 2 of row 0 masked
    torch.testing.assert_close(out.loss_sum / out.count, expected_mean)


def test_next_token_ce_counts_correct_argmax():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 2] = 10.0  # predicts labels[1] = 2: right
    logits[0, 1, 0] = 10.0  # predicts labels[2] = 3: wrong
    out = next_token_ce(logits, torch.tensor([[9, 2, 3]]))
    assert out.metrics["top1"].item() == 1.0
    assert out.count.item() == 2


def test_next_token_ce_all_masked_is_zero_with_zero_count():
    out = next_token_ce(torch.randn(1, 4, 7, requires_grad=True), torch.full((1, 4), -100))
    assert out.loss_sum.item() == 0.0 and out.count.item() == 0
    out.loss_sum.backward()  # still differentiable: a fully masked micro-batch must not break accumulation


def test_next_token_ce_upcasts_bf16_logits():
    logits = torch.randn(1, 4, 7)
    labels = torch.randint(0, 7, (1, 4))
    full = next_token_ce(logits.bfloat16().float(), labels)
    half = next_token_ce(logits.bfloat16(), labels)
    assert half.loss_sum.dtype == torch.float32
    torch.testing.assert_close(half.loss_sum, full.loss_sum)
