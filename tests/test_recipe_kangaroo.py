"""Kangaroo: adapter, loss, runtime (cached shallow states, double early exit, losslessness), recipe, export, CLI."""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_runtime import chi_square_p_value, micro_lm, sharpen

from draftkit.config import compose
from draftkit.data.collate import collate
from draftkit.drafts.kangaroo import kangaroo_adapter
from draftkit.engine.loop import LoopSettings, train
from draftkit.eval import main as eval_main
from draftkit.export.kangaroo import load_kangaroo
from draftkit.objectives.kangaroo import kangaroo_loss, predicted_token_mask
from draftkit.recipes import kangaroo
from draftkit.runtime.evaluate import encode_prompt
from draftkit.runtime.kangaroo import KangarooDecoder
from draftkit.runtime.speculative import autoregressive_generate, speculative_generate
from draftkit.targets.hf import Target
from draftkit.targets.tiny import tiny_target

EXIT = 2


def adapter_for(target: Target, exit_layer: int, noise: float = 0.0, seed: int = 0):
    """An adapter started as the target's next layer without its MLP, optionally perturbed (partial acceptance)."""
    adapter = kangaroo.build_adapter(target, exit_layer, "target", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return adapter.eval()


@pytest.fixture(scope="module")
def target():
    target = tiny_target(num_layers=4, seed=0)
    sharpen(target.model, seed=0)
    return target


@pytest.fixture(scope="module")
def prompt(target):
    return encode_prompt(target.tokenizer, "Write a haiku about caches.", torch.device("cpu"))


def test_loss_matches_the_full_models_next_token_distribution_at_the_same_position():
    torch.manual_seed(0)
    target_logits, adapter_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    counted = predicted_token_mask(labels)
    assert counted.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    out = kangaroo_loss(adapter_logits, target_logits, labels)
    p, log_q = target_logits.softmax(-1), adapter_logits.log_softmax(-1)
    assert out.count == 5
    assert out.loss_sum.item() == pytest.approx(-(p * log_q).sum(-1)[counted].sum().item(), rel=1e-6)
    alpha = torch.minimum(p, log_q.exp()).sum(-1)[counted].sum()
    assert out.metrics["alpha_hat"].item() == pytest.approx(alpha.item(), rel=1e-6)


def test_adapter_is_one_attention_layer_and_a_norm_started_from_the_target(target):
    adapter = adapter_for(target, EXIT)
    assert sorted(adapter.state_dict()) == [
        "layers.0.input_layernorm.weight", "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.o_proj.weight",
        "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.v_proj.weight", "norm.weight"]
    torch.testing.assert_close(adapter.layers[0].self_attn.q_proj.weight,
                               target.model.model.layers[EXIT].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match=r"exit_layer=4 is outside the target's depth.*choose 1..3"):
        kangaroo_adapter(target.config, 4)
    with pytest.raises(ValueError, match="exit_layer=0"):
        KangarooDecoder(target, adapter, 0)


def test_training_lowers_the_loss(target, tmp_path):
    adapter = kangaroo.build_adapter(target, EXIT, "random", seed=0)
    ids = torch.randint(3, 259, (8, 12), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    result = train(model=adapter, step_fn=kangaroo.kangaroo_step(target, EXIT), dataset=examples,
                   collate=partial(collate, pad_token_id=2),
                   settings=LoopSettings(steps=12, micro_batch_size=8, lr=1e-2, warmup_steps=1, log_every=1),
                   stage_dir=tmp_path, resume=False, desc="adapter")
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.15 and losses == sorted(losses, reverse=True)
    assert result.history[-1]["alpha_hat"] > result.history[0]["alpha_hat"]


def test_verification_over_cached_shallow_states_equals_a_full_target_pass(target, prompt):
    decoder = KangarooDecoder(target, adapter_for(target, EXIT, noise=0.5), EXIT, threshold=0.0)
    decoder.reset()
    sequence = prompt
    with torch.inference_mode():
        for _ in range(3):  # rounds with rollbacks in between: caches carried across verifications
            proposal = decoder.propose(sequence, 4, 0.0, None)
            k = proposal.tokens.numel()
            logits = decoder.logits(sequence, proposal.tokens)
            full = target.logits(torch.cat([sequence, proposal.tokens.view(1, -1)], dim=1))[0, -(k + 1):]
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
            # The deep layers reran nothing the shallow layers had cached: only layers l..N grew for old tokens.
            assert decoder.cache.length(0) == decoder.cache.length(EXIT) == sequence.shape[1] + k
            accepted = 1
            decoder.rollback(sequence.shape[1] + accepted)
            sequence = torch.cat([sequence, proposal.tokens[:accepted].view(1, -1), logits[accepted].argmax().view(1, 1)],
                                 dim=1)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95])
def test_greedy_is_lossless_with_the_early_exit(target, prompt, threshold):
    decoder = KangarooDecoder(target, adapter_for(target, EXIT, noise=0.3), EXIT, threshold=threshold)
    reference = autoregressive_generate(target.model, prompt, max_new_tokens=40).tokens
    out = speculative_generate(target.model, decoder, prompt, gamma=5, max_new_tokens=40, verifier=decoder)
    assert out.tokens == reference
    stats = out.stats
    assert 0 < sum(stats.accepted_per_position) < stats.drafted_tokens  # both acceptances and rejections happened
    assert stats.draft_forwards >= stats.drafted_tokens
    if threshold == 0.95:  # the second early exit cut chains short
        assert stats.drafted_tokens < 5 * stats.target_forwards


def test_early_exit_drafts_fewer_tokens_as_the_threshold_rises(target, prompt):
    adapter = adapter_for(target, EXIT, noise=0.3)
    chain_lengths = []
    for threshold in (0.0, 0.5, 0.95):
        decoder = KangarooDecoder(target, adapter, EXIT, threshold=threshold)
        stats = speculative_generate(target.model, decoder, prompt, gamma=5, max_new_tokens=40, verifier=decoder).stats
        chain_lengths.append(stats.drafted_tokens / stats.target_forwards)
    assert chain_lengths[0] >= chain_lengths[1] >= chain_lengths[2] and chain_lengths[0] > chain_lengths[2]
    assert chain_lengths[2] < 4


def test_speculative_sampling_preserves_target_distribution():
    vocab, temperature, runs = 8, 0.8, 800
    model = micro_lm(0, vocab)
    model.config.num_hidden_layers = 2
    model.model.layers.append(micro_lm(1, vocab).model.layers[0])
    model.model.layers[1].self_attn.layer_idx = 1
    micro = Target(model=model, tokenizer=None, name="micro")
    decoder = KangarooDecoder(micro, adapter_for(micro, 1, noise=0.5), 1, threshold=0.3)
    prompt = torch.tensor([[3, 1, 4]])
    with torch.inference_mode():
        first = torch.softmax(model(prompt).logits[0, -1].double() / temperature, dim=-1)
        extended = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab).view(vocab, 1)], dim=1)
        second = torch.softmax(model(extended).logits[:, -1].double() / temperature, dim=-1)
    exact = (first[:, None] * second).flatten()
    counts = torch.zeros(vocab * vocab)
    early_exits = 0
    for run in range(runs):
        out = speculative_generate(model, decoder, prompt, gamma=2, max_new_tokens=3, temperature=temperature,
                                   generator=torch.Generator().manual_seed(run), verifier=decoder)
        counts[out.tokens[0] * vocab + out.tokens[1]] += 1
        early_exits += out.stats.drafted_tokens < 2 * out.stats.target_forwards
    assert chi_square_p_value(counts, exact) > 1e-4
    assert 0 < early_exits < runs  # both the early exit and full chains were exercised


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=kangaroo", "+debug=tiny", f"hydra.run.dir={run_dir}", "target.num_layers=4",
                   "kangaroo.exit_layer=2", *overrides])
    cfg.run_dir = str(run_dir)
    return kangaroo.run(cfg, run_dir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kangaroo")
    return run_dir, run_recipe(run_dir)


def test_recipe_trains_with_pinned_losses_and_measures_acceptance(finished_run):
    run_dir, _ = finished_run
    history = json.loads((run_dir / "adapter" / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx([5.7618, 5.7616, 5.7616], abs=1e-4)
    assert all(0 < h["alpha_hat"] <= 1 for h in history)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["after"]["overall"]["outputs_differing_from_ar"] == 0 and result["before"] is not None
    assert "| after training |" in (run_dir / "summary.md").read_text()


def test_export_records_target_exit_layer_and_threshold_and_loads_exactly(finished_run):
    _, export = finished_run
    meta = json.loads((export / "draftkit.json").read_text())
    assert meta["family"] == "kangaroo" and meta["exit_layer"] == 2 and meta["threshold"] == 0.6
    assert meta["target_num_layers"] == 4 and meta["target"].startswith("tiny-llama")
    adapter, _ = load_kangaroo(export, target_shape=(4, 320))
    assert set(adapter.state_dict()) == set(meta["tensors"])
    assert json.loads((export / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(ValueError, match="trained for tiny-llama.*4 layers.*Fix: pass that target"):
        load_kangaroo(export, target_shape=(30, 49152))


def test_export_with_an_unknown_or_missing_tensor_is_refused(finished_run, tmp_path):
    _, export = finished_run
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
    del tensors["norm.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\], unexpected \['layers.0.mlp.up_proj.weight'\]"):
        load_kangaroo(broken)


def test_exit_layer_outside_the_target_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"kangaroo.exit_layer=4 is outside the target's depth.*choose 1..3"):
        run_recipe(tmp_path, "kangaroo.exit_layer=4")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "selfdistill.jsonl").exists()


def test_labels_from_the_data_skip_self_distillation(tmp_path, chats_with_replies):
    run_recipe(tmp_path / "run", "kangaroo.labels=data", f"data.prompts=[{chats_with_replies}]", "eval=none")
    history = json.loads((tmp_path / "run" / "adapter" / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx([5.7617, 5.7616, 5.7615], abs=1e-4)
    assert not (tmp_path / "run" / "selfdistill.jsonl").exists()
    with pytest.raises(ValueError, match="kangaroo.labels='gold' is not a label source. Fix: choose 'selfdistill'.* or 'data'"):
        run_recipe(tmp_path / "bad", "kangaroo.labels=gold")
    assert not (tmp_path / "bad").exists()


def test_rerun_resumes_without_retraining(finished_run):
    run_dir, export = finished_run
    history = (run_dir / "adapter" / "history.json").read_text()
    weights = (export / "model.safetensors").read_bytes()
    run_recipe(run_dir)
    assert (run_dir / "adapter" / "history.json").read_text() == history
    assert (export / "model.safetensors").read_bytes() == weights


def test_eval_cli_runs_the_kangaroo_runtime(finished_run, tmp_path, monkeypatch):
    _, export = finished_run
    monkeypatch.setattr("draftkit.eval.load_target", lambda *a, **k: tiny_target(num_layers=4))
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Hi there"]}) + "\n")
    assert eval_main(["--draft", str(export), "--prompts", str(prompts), "--max-new-tokens", "8", "--gamma", "3",
                      "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["config"]["draft"] == str(export) and report["overall"]["outputs_differing_from_ar"] == 0
    assert report["overall"]["new_tokens"] == 8
