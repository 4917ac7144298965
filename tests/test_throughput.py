"""The throughput benchmark: FLOP counts of recipes run through draftkit.train against hand counts, its CPU smoke run
and resumable --out, and the random target's shapes."""

import gc
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from draftkit.config import compose
from draftkit.engine.flops import count_flops
from draftkit.targets.tiny import random_target
from draftkit.train import run_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402  (a script in benchmarks/, imported for its accounting)

TINY_PLAN = {"target": ["target=random", "target.shape=tiny", "target.dtype=float32", "target.device=cpu"],
             "seq_len": 16, "micro_batch": 2, "log_every": 1, "intervals": 1, "precision": "fp32",
             "draft_vocab_size": 80}


def test_target_forward_count_matches_the_hand_formula():
    target = random_target("tiny", dtype="float32", device="cpu")  # H 32, 2 layers, 4 heads (2 KV) of 8, MLP 64
    ids = torch.randint(0, 300, (2, 16))
    # Per token and layer: 2 x (q, o: 32x32 each; k, v: 32x16 each; MLP 3 x 32x64) = 18432, attention 4 x 32 x 16.
    per_token = 2 * (18432 + 4 * 32 * 16)
    assert throughput.decoder_forward_flops_per_token(target.config, 16) == per_token == 40960
    counted = count_flops(lambda: target.features(ids, torch.ones_like(ids), with_logits=False))
    assert counted == per_token * ids.numel()


def medusa_flops_per_token(lm_head_rows: int) -> float:
    """Target body: 40960 per token (above). 4 heads, each: its block's forward and weight gradient (its input, the
    target's state, needs none), 4 x 32² per token; the shared frozen LM head's forward and input gradient,
    4 x rows x 32, only at the positions head k scores (16 - 2 - k of each row's 16)."""
    rows, lm_head = 2 * 16, 4 * lm_head_rows * 32
    return (rows * (40960 + 4 * 4 * 32 * 32) + sum(lm_head * 2 * (16 - 2 - k) for k in range(4))) / rows


def test_a_medusa_run_counts_target_forward_heads_and_the_lm_head_forward_and_input_gradient(tmp_path):
    recipe, own, overrides = throughput.recipe_overrides("medusa", TINY_PLAN, vocab_size=320)
    assert (recipe, own) == ("medusa", [])
    assert "data.prompts=[synthetic:2x16:320]" in overrides and "medusa.labels=data" in overrides
    run_recipe(overrides, tmp_path)
    logged = throughput.training_metrics(tmp_path)
    assert logged["stage"] == "medusa"
    assert logged["flops_per_token"] == medusa_flops_per_token(320)
    assert not (tmp_path / "selfdistill.jsonl").exists()


def test_a_draft_vocabulary_cuts_only_the_lm_head_flops_and_every_position_still_counts(tmp_path):
    recipe, own, overrides = throughput.recipe_overrides("medusa_draft_vocab", TINY_PLAN, vocab_size=320)
    assert own == ["medusa.draft_vocab_size=80", "medusa.export.formats=[vllm]"]
    assert "data.prompts=[synthetic:2x16:80]" in overrides  # ids drawn from the draft vocabulary's range
    run_recipe(overrides, tmp_path)
    assert json.loads((tmp_path / "draft_vocab.json").read_text())["label_coverage"] == 1.0
    # As the full-vocabulary count above, with 80 LM-head rows instead of 320: no scored position is dropped.
    assert throughput.training_metrics(tmp_path)["flops_per_token"] == medusa_flops_per_token(80)


def live_llamas() -> int:
    gc.collect()
    # type(), not isinstance: isinstance touches deprecated torch objects among gc's, which warn
    return sum(type(o) is LlamaForCausalLM for o in gc.get_objects())


def test_the_cpu_smoke_measures_rows_and_a_rerun_measures_only_what_is_missing(tmp_path, monkeypatch):
    """Rows run one after another in one process: each must leave no target behind (on a GPU it would stay in the
    next row's memory)."""
    out = tmp_path / "out.json"
    llamas = live_llamas()

    def bench(recipes: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["throughput.py", "--cpu-smoke", "--out", str(out), "--recipes", recipes,
                                          "--work", str(tmp_path / "work")])
        throughput.main()
        return json.loads(out.read_text())

    first = bench("hydra_draft_vocab")
    row = first["recipes"]["hydra_draft_vocab"]
    assert row["command"].startswith("python -m draftkit.train +recipe=hydra_heads target=random")
    assert row["overrides"] == ["hydra_heads.draft_vocab_size=1024"]
    assert len(row["tokens_per_s_per_interval"]) == 1  # of 2 intervals, the first (warm-up) dropped
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 989e12)
    assert row["mfu_vs_ceiling"] == pytest.approx(
        row["flops_per_token"] * row["tokens_per_s"] / row["ceiling_same_run"]["achieved_flops"])
    assert first["target"]["vocab_size"] == 4096 and not first["failed_last_run"]
    assert not any((tmp_path / "work").iterdir())  # run directories are removed once measured

    second = bench("hydra_draft_vocab,fspad_online_draft_vocab")
    assert second["recipes"]["hydra_draft_vocab"] == row  # kept, not measured again
    assert second["recipes"]["fspad_online_draft_vocab"]["flops_per_token"] > 0
    assert "fspad.train.engine.steps=4" in second["recipes"]["fspad_online_draft_vocab"]["overrides"]
    assert live_llamas() == llamas


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
