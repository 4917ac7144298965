"""The throughput benchmark's FLOP accounting on hand-counted examples, and the random target's shapes."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from draftkit.config import compose
from draftkit.data.collate import collate
from draftkit.targets.tiny import random_target

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402  (a script in benchmarks/, imported for its accounting)


def test_counted_flops_of_a_linear_layer_forward_and_backward_are_six_n_k_m():
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(3, 7, requires_grad=True)
    assert throughput.count_flops(lambda: F.linear(x, w).sum().backward()) == 6 * 5 * 7 * 3
    assert throughput.utilization(flops_per_token=2e9, tokens_per_s=100.0, peak_flops=1e12) == pytest.approx(0.2)


def test_target_forward_count_matches_the_hand_formula():
    target = random_target("tiny", dtype="float32", device="cpu")  # H 32, 2 layers, 4 heads (2 KV) of 8, MLP 64
    ids = torch.randint(0, 300, (2, 16))
    # Per token and layer: 2 x (q, o: 32x32 each; k, v: 32x16 each; MLP 3 x 32x64) = 18432, attention 4 x 32 x 16.
    per_token = 2 * (18432 + 4 * 32 * 16)
    assert throughput.decoder_forward_flops_per_token(target.config, 16) == per_token == 40960
    counted = throughput.count_flops(lambda: target.features(ids, torch.ones_like(ids), with_logits=False))
    assert counted == per_token * ids.numel()


def test_a_medusa_step_counts_target_forward_heads_and_the_lm_head_forward_and_input_gradient(tmp_path):
    cfg = compose(["+recipe=medusa", "target=random", "target.shape=tiny", "target.dtype=float32",
                   "target.device=cpu"])
    target = random_target("tiny", dtype="float32", device="cpu")
    examples = throughput.synthetic_examples(2, 16, target.vocab_size)
    model, step, dataset, collate_fn = throughput.build("medusa", cfg, target, examples, tmp_path)
    flops = throughput.step_flops(model, step, collate_fn(dataset), target.device)
    # Target body: 40960 per token (above). 4 heads, each: its block's forward and weight gradient (its input, the
    # target's state, needs none), 4 x 32² per token; the shared frozen LM head's forward and input gradient,
    # 4 x 320 x 32, only at the positions head k scores (16 - 2 - k of each row's 16).
    rows, lm_head = 2 * 16, 4 * 320 * 32
    assert flops == rows * (40960 + 4 * 4 * 32 * 32) + sum(lm_head * 2 * (16 - 2 - k) for k in range(4))
    assert all(p.grad is None for p in model.parameters())  # counting left no gradients behind


def test_a_draft_vocabulary_cuts_only_the_lm_head_flops_and_every_position_still_counts(tmp_path):
    cfg = compose(["+recipe=medusa", "target=random", "target.shape=tiny", "target.dtype=float32",
                   "target.device=cpu", "medusa.draft_vocab_size=32768"])
    target = random_target("tiny", dtype="float32", device="cpu")
    size = throughput.draft_vocab_size(cfg, "medusa", target)
    assert size == 320 // 4  # capped at a quarter of the tiny target's 320 tokens
    examples = throughput.synthetic_examples(2, 16, size)
    model, step, dataset, collate_fn = throughput.build("medusa_draft_vocab", cfg, target, examples, tmp_path)
    assert model.token_map.numel() == size
    flops = throughput.step_flops(model, step, collate_fn(dataset), target.device)
    # As the full-vocabulary count above, with 80 LM-head rows instead of 320; no scored position is dropped because
    # the ids were drawn from the draft vocabulary's range.
    rows, lm_head = 2 * 16, 4 * size * 32
    assert flops == rows * (40960 + 4 * 4 * 32 * 32) + sum(lm_head * 2 * (16 - 2 - k) for k in range(4))


def test_random_target_builds_the_llama3_8b_shape_without_memory():
    target = random_target("llama3_8b", device="meta")
    text = target.config
    dims = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size)
    assert dims == (4096, 32, 32, 8, 14336, 128256)
    assert not text.tie_word_embeddings
    assert sum(p.numel() for p in target.model.parameters()) == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert next(target.model.parameters()).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # building in bf16 leaves the default alone


def test_random_target_builds_the_smollm2_135m_shape():
    target = random_target("smollm2_135m", device="meta")
    # SmolLM2-135M's parameter count (its embeddings tied to the LM head).
    assert sum(p.numel() for p in target.model.parameters()) == 134_515_008
    assert target.config.tie_word_embeddings and target.num_layers == 30


def test_random_target_dimensions_can_be_overridden_and_bad_names_fail():
    target = random_target("tiny", dtype="float32", device="cpu", num_layers=3, vocab_size=1000)
    assert (target.num_layers, target.vocab_size, target.hidden_size) == (3, 1000, 32)
    ids = torch.randint(0, 1000, (1, 5))
    assert target.logits(ids).shape == (1, 5, 1000)
    with pytest.raises(ValueError, match="choose one of tiny, llama3_8b"):
        random_target("llama3_70b")
    with pytest.raises(ValueError, match="no dimension .*num_layer"):
        random_target("tiny", num_layer=3)
    cfg = compose(["+recipe=medusa", "target=random"])
    assert cfg.target.shape == "llama3_8b" and cfg.target.dtype == "bfloat16"


def test_collated_synthetic_examples_count_every_position():
    batch = collate(throughput.synthetic_examples(3, 8, 50), pad_token_id=2)
    assert batch["attention_mask"].all() and (batch["labels"] == batch["input_ids"]).all()
