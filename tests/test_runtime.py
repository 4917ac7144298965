"""Speculative-decoding runtime: greedy losslessness, distribution preservation under sampling, statistics, evaluation, CLI."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from draftkit.eval import main as eval_main
from draftkit.runtime import (
    LMDrafter,
    autoregressive_generate,
    evaluate_draft,
    load_prompts,
    render_markdown,
    speculative_generate,
)
from draftkit.runtime.evaluate import autoregressive_baseline, encode_prompt
from draftkit.targets.tiny import tiny_target

MAX_NEW = 24


def sharpen(model: torch.nn.Module, seed: int, scale: float = 2.0) -> torch.nn.Module:
    """Re-draw every matrix at `scale` / sqrt(fan_in). At the default init a tiny Llama just repeats its last input
    token, which would make every greedy comparison trivially pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, scale / param.shape[1] ** 0.5, generator=generator)
    return model


def perturbed_copy(model: torch.nn.Module, seed: int, noise: float = 0.05) -> torch.nn.Module:
    """A draft close enough to the target to accept some tokens and reject others (alpha around 0.3-0.6)."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return draft



@pytest.fixture(scope="module")
def target():
    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    return target


@pytest.fixture(scope="module")
def drafts(target):
    unrelated = tiny_target(seed=1, num_layers=1).model
    return {
        "self": target.model,
        "perturbed": perturbed_copy(target.model, seed=5),
        "unrelated": sharpen(unrelated, seed=1),
    }


@pytest.fixture(scope="module")
def prompts(target):
    return {
        "one-token": torch.tensor([[1]]),
        "raw": torch.tensor([[1, 50, 60, 70, 80]]),
        "chat": encode_prompt(target.tokenizer, "Write a haiku about caches.", torch.device("cpu")),
    }


def greedy_reference(model, input_ids, max_new_tokens, eos_token_id=None) -> list[int]:
    out = model.generate(
        input_ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=0
    )
    return out[0, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("draft_name", ["self", "perturbed", "unrelated"])
def test_greedy_output_equals_target_generate(target, drafts, prompts, draft_name):
    accepted_any = rejected_any = False
    for prompt in prompts.values():
        reference = greedy_reference(target.model, prompt, MAX_NEW)
        assert len(reference) == MAX_NEW
        for gamma in (1, 3, 5):
            out = speculative_generate(
                target.model, LMDrafter(drafts[draft_name]), prompt, gamma=gamma, max_new_tokens=MAX_NEW
            )
            assert out.tokens == reference, (draft_name, gamma, prompt.tolist())
            accepted_any |= sum(out.stats.accepted_per_position) > 0
            rejected_any |= out.stats.draft_acceptance < 1.0
    if draft_name == "perturbed":
        # The interesting case: both acceptance and rollback paths were exercised.
        assert accepted_any and rejected_any


def test_greedy_rollback_through_sliding_window_layers():
    """Gemma 3 style models mix in sliding-window layers (window 4 here, overrun at every step): rollback must work and
    the window must still apply (the greedy output with an unbounded window differs from this reference)."""
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = sharpen(Gemma3ForCausalLM(config).eval(), seed=0, scale=1.0)
    with torch.no_grad():
        # Gemma multiplies embeddings by sqrt(hidden) and starts norms at identity; untamed, greedy output is one
        # repeated token and the comparison would prove nothing.
        model.model.embed_tokens.weight.mul_(0.2)
        generator = torch.Generator().manual_seed(1)
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0.0, 0.5, generator=generator)
    draft = perturbed_copy(model, seed=3, noise=0.1)
    prompt = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 3]])
    reference = greedy_reference(model, prompt, 30)
    assert len(set(reference)) > 5
    for gamma in (1, 3, 5):
        out = speculative_generate(model, LMDrafter(draft), prompt, gamma=gamma, max_new_tokens=30)
        assert out.tokens == reference
        assert 0.0 < out.stats.draft_acceptance < 1.0


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_stops_at_eos(target, drafts, prompts, gamma):
    prompt = prompts["raw"]
    reference = greedy_reference(target.model, prompt, MAX_NEW)
    stop_at = next(i for i in range(4, MAX_NEW) if reference[i] not in reference[:i])
    eos = reference[stop_at]
    expected = reference[: stop_at + 1]
    assert greedy_reference(target.model, prompt, MAX_NEW, eos_token_id=eos) == expected
    for eos_token_id in (eos, [eos, 12345]):
        out = speculative_generate(
            target.model, LMDrafter(drafts["perturbed"]), prompt,
            gamma=gamma, max_new_tokens=MAX_NEW, eos_token_id=eos_token_id,
        )
        assert out.tokens == expected
        assert out.stats.new_tokens == len(expected)
    assert autoregressive_generate(target.model, prompt, max_new_tokens=MAX_NEW, eos_token_id=eos).tokens == expected


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 7])
def test_max_new_tokens_is_never_exceeded(target, drafts, prompts, max_new_tokens):
    prompt = prompts["chat"]
    reference = greedy_reference(target.model, prompt, MAX_NEW)
    for draft_name in ("self", "perturbed"):
        out = speculative_generate(
            target.model, LMDrafter(drafts[draft_name]), prompt, gamma=5, max_new_tokens=max_new_tokens
        )
        assert out.tokens == reference[:max_new_tokens]
        assert out.stats.new_tokens == max_new_tokens


def test_self_draft_statistics(target, drafts, prompts):
    gamma, max_new_tokens = 5, 20
    out = speculative_generate(
        target.model, LMDrafter(drafts["self"]), prompts["raw"], gamma=gamma, max_new_tokens=max_new_tokens
    )
    stats = out.stats
    assert stats.alpha == [1.0] * gamma
    assert stats.draft_acceptance == 1.0
    # 6 + 6 + 6 tokens, then 2 left: gamma shrinks to 1 so the step commits exactly 2.
    assert stats.accepted_lengths == [6, 6, 6, 2]
    assert sum(stats.accepted_lengths) == len(out.tokens) == max_new_tokens
    assert stats.target_forwards == len(stats.accepted_lengths)
    assert stats.tau == pytest.approx(20 / 4)
    assert stats.proposed_per_position == [4, 3, 3, 3, 3]


def test_partial_acceptance_accounting(target, drafts, prompts):
    gamma = 4
    out = speculative_generate(
        target.model, LMDrafter(drafts["perturbed"]), prompts["chat"], gamma=gamma, max_new_tokens=MAX_NEW
    )
    stats = out.stats
    assert sum(stats.accepted_lengths) == len(out.tokens) == MAX_NEW
    assert stats.target_forwards == len(stats.accepted_lengths)
    # A standalone LM spends one forward per drafted token.
    assert stats.draft_forwards == stats.drafted_tokens
    # Every target forward commits its accepted drafts plus one token of its own.
    assert sum(stats.accepted_per_position) + stats.target_forwards == MAX_NEW
    for i in range(gamma):
        assert stats.accepted_per_position[i] <= stats.proposed_per_position[i]
        if i:
            # Position i is reached exactly when position i-1 was accepted (and the step drafted that far).
            assert stats.proposed_per_position[i] <= stats.accepted_per_position[i - 1]
    assert 0.0 < stats.alpha[0] < 1.0


def micro_lm(seed: int, vocab_size: int = 8) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Scale 1 keeps the distributions spread over several tokens, so every sampler branch gets exercised.
    return sharpen(model, seed, scale=1.0).eval()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts [K] against probs [K]; cells expecting fewer than 5 hits are pooled into one."""
    expected = probs.double() * counts.sum()
    sparse = expected < 5
    observed = torch.cat([counts[~sparse], counts[sparse].sum().view(1)]).double()
    expected = torch.cat([expected[~sparse], expected[sparse].sum().view(1)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    degrees_of_freedom = torch.tensor(keep.sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(degrees_of_freedom / 2, statistic / 2).item()


# (gamma, max_new_tokens): (1, 2) puts the bonus token of a full acceptance into the observed pair, (2, 3) puts the
# second draft position's accept/resample there. Checked by hand with 1500 runs: keeping unverified draft tokens gives
# p < 1e-95 in both configurations, resampling from p instead of the residual p < 1e-24 in both, drawing the bonus token
# from the previous position's distribution p < 1e-290 at (1, 2); the correct sampler gave p in [0.049, 0.99] over six
# seed offsets (and 0.19 / 0.15 with 8000 runs, so no small bias hides under the threshold).
@pytest.mark.parametrize("gamma,max_new_tokens", [(1, 2), (2, 3)])
def test_speculative_sampling_preserves_target_distribution(gamma, max_new_tokens):
    vocab, temperature, runs = 8, 0.8, 1500
    target = micro_lm(0, vocab)
    draft = perturbed_copy(target, seed=11, noise=0.3)
    prompt = torch.tensor([[3, 1, 4]])
    with torch.inference_mode():
        first = torch.softmax(target(prompt).logits[0, -1].double() / temperature, dim=-1)
        extended = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab).view(vocab, 1)], dim=1)
        second = torch.softmax(target(extended).logits[:, -1].double() / temperature, dim=-1)
        draft_first = torch.softmax(draft(prompt).logits[0, -1].double() / temperature, dim=-1)
    exact = (first[:, None] * second).flatten()
    # The test has power only if the draft disagrees with the target (TV 0.30 here) yet is often accepted.
    assert 0.2 < 0.5 * (first - draft_first).abs().sum() < 0.5

    counts = torch.zeros(vocab * vocab)
    drafter = LMDrafter(draft)
    for run in range(runs):
        out = speculative_generate(
            target, drafter, prompt, gamma=gamma, max_new_tokens=max_new_tokens, temperature=temperature,
            generator=torch.Generator().manual_seed(run),
        )
        counts[out.tokens[0] * vocab + out.tokens[1]] += 1
    assert chi_square_p_value(counts, exact) > 1e-4


def test_sampling_with_self_draft_accepts_everything_and_is_seeded(target, prompts):
    def sample(seed):
        return speculative_generate(
            target.model, LMDrafter(target.model), prompts["raw"], gamma=3, temperature=1.0, max_new_tokens=16,
            generator=torch.Generator().manual_seed(seed),
        )

    out = sample(7)
    assert out.stats.alpha == [1.0, 1.0, 1.0]
    assert out.tokens == sample(7).tokens
    assert len(out.tokens) == 16


def test_autoregressive_baseline(target, prompts):
    prompt = prompts["chat"]
    greedy = autoregressive_generate(target.model, prompt, max_new_tokens=MAX_NEW)
    assert greedy.tokens == greedy_reference(target.model, prompt, MAX_NEW)
    assert greedy.stats.target_forwards == MAX_NEW and greedy.stats.tau == 1.0

    def sample(seed):
        return autoregressive_generate(
            target.model, prompt, max_new_tokens=MAX_NEW, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        ).tokens

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


SPEC_BENCH_RECORDS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a limerick about a cat.", "Now shorter."]},
    {"question_id": 2, "category": "writing", "turns": ["Describe autumn."]},
    {"question_id": 3, "category": "math_reasoning", "turns": ["What is 17 * 3?"]},
]


def test_evaluate_draft_report_and_markdown(target, drafts):
    gamma = 3
    report = evaluate_draft(
        target, drafts["perturbed"], SPEC_BENCH_RECORDS, gamma=gamma, max_new_tokens=12, progress=False
    )
    assert set(report) == {"config", "overall", "categories", "prompts"}
    assert set(report["categories"]) == {"writing", "math_reasoning"}
    assert report["categories"]["writing"]["prompts"] == 2
    overall = report["overall"]
    for key in (
        "tau", "alpha", "draft_acceptance", "new_tokens", "target_forwards", "tokens_per_s",
        "ar_tokens_per_s", "speedup", "outputs_differing_from_ar",
    ):
        assert key in overall
    assert len(overall["alpha"]) == gamma
    assert overall["outputs_differing_from_ar"] == 0
    assert overall["new_tokens"] == sum(c["new_tokens"] for c in report["categories"].values())
    assert overall["tau"] == pytest.approx(overall["new_tokens"] / overall["target_forwards"])
    assert overall["speedup"] > 0
    json.dumps(report, allow_nan=False)

    markdown = render_markdown(report)
    for text in ("writing", "math_reasoning", "overall", "alpha@3", "speedup"):
        assert text in markdown

    sampled = evaluate_draft(
        target, drafts["perturbed"], SPEC_BENCH_RECORDS[:1], gamma=2, temperature=1.0, max_new_tokens=8,
        measure_speedup=False, progress=False,
    )
    assert "speedup" not in sampled["overall"]
    assert "speedup" not in render_markdown(sampled)


def test_one_baseline_serves_a_sweep(target, drafts):
    prompts = SPEC_BENCH_RECORDS[:2]
    baseline = autoregressive_baseline(target, prompts, max_new_tokens=10, progress=False)
    assert [row["new_tokens"] for row in baseline["prompts"]] == [10, 10]
    for gamma in (1, 3):
        fresh = evaluate_draft(target, drafts["perturbed"], prompts, gamma=gamma, max_new_tokens=10, progress=False)
        reused = evaluate_draft(target, drafts["perturbed"], prompts, gamma=gamma, max_new_tokens=10, progress=False,
                                baseline=baseline)
        assert reused["overall"]["tau"] == fresh["overall"]["tau"]
        assert reused["overall"]["outputs_differing_from_ar"] == 0
        assert reused["overall"]["ar_new_tokens"] == fresh["overall"]["ar_new_tokens"] == 20
        assert [r["ar_time_s"] for r in reused["prompts"]] == [r["time_s"] for r in baseline["prompts"]]
    with pytest.raises(ValueError, match="same prompts and settings"):
        evaluate_draft(target, drafts["perturbed"], prompts, max_new_tokens=12, progress=False, baseline=baseline)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_prompts_filters_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", SPEC_BENCH_RECORDS)
    assert [r["question_id"] for r in load_prompts(path)] == [1, 2, 3]
    assert [r["question_id"] for r in load_prompts(path, limit_per_category=1)] == [1, 3]
    assert [r["question_id"] for r in load_prompts(path, categories=["math_reasoning"])] == [3]
    with pytest.raises(ValueError, match=r"Fix: choose from \["):
        load_prompts(path, categories=["coding"])

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(SPEC_BENCH_RECORDS[0]) + "\n" + '{"turns": ["unterminated\n')
    with pytest.raises(ValueError, match=f"{broken}:2"):
        load_prompts(broken)
    no_turns = write_jsonl(tmp_path / "no_turns.jsonl", [SPEC_BENCH_RECORDS[0], {"category": "x", "turns": []}])
    with pytest.raises(ValueError, match=f"{no_turns}:2"):
        load_prompts(no_turns)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(tmp_path / "missing.jsonl")


def test_cli_end_to_end(tmp_path, target, drafts, capsys, user_error):
    target_dir, draft_dir, out_dir = tmp_path / "target", tmp_path / "draft", tmp_path / "report"
    target.model.save_pretrained(target_dir)
    target.tokenizer.save_pretrained(target_dir)
    drafts["perturbed"].save_pretrained(draft_dir)
    prompts_path = write_jsonl(tmp_path / "prompts.jsonl", SPEC_BENCH_RECORDS)

    common = ["--target", str(target_dir), "--prompts", str(prompts_path), "--no-progress"]
    exit_code = eval_main(
        ["--draft", str(draft_dir), *common, "--gamma", "2", "--max-new-tokens", "8",
         "--categories", "writing", "--limit-per-category", "1", "--out", str(out_dir)]
    )
    assert exit_code == 0
    report = json.loads((out_dir / "eval.json").read_text())
    assert list(report["categories"]) == ["writing"] and report["overall"]["prompts"] == 1
    assert report["overall"]["outputs_differing_from_ar"] == 0
    assert (out_dir / "eval.md").read_text() in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["eval.json", "eval.md"]

    wrong_vocab_dir = tmp_path / "wrong_vocab"
    tiny_target(vocab_size=384).model.save_pretrained(wrong_vocab_dir)
    assert re.search("vocab_size=384.*Fix", user_error(eval_main, ["--draft", str(wrong_vocab_dir), *common]))


def test_bootstrap_interval_of_pooled_tau_is_pinned_and_widens_with_fewer_prompts():
    from draftkit.runtime.evaluate import bootstrap_ratios

    # Four prompts: new tokens and target forwards. Pooled tau = 250 / 157.
    tokens, forwards = [[64], [40], [96], [50]], [[40], [32], [40], [45]]
    [four] = bootstrap_ratios(tokens, forwards, seed=0)
    assert four == pytest.approx([1.1688311688311688, 2.1578947368421053])
    assert four[0] < 250 / 157 < four[1]
    assert bootstrap_ratios(tokens, forwards, seed=0) == [four]  # seeded: the same table, the same interval
    # The same four prompts ten times over: same pooled tau, a narrower interval (roughly by sqrt(10)).
    [forty] = bootstrap_ratios(tokens * 10, forwards * 10, seed=0)
    assert forty == pytest.approx([1.4432546327526685, 1.742477940322768])
    assert four[0] < forty[0] < 250 / 157 < forty[1] < four[1]
    # A position no prompt reached has no interval, and neither does a single prompt.
    assert bootstrap_ratios([[3, 0], [2, 0]], [[4, 0], [4, 0]]) == [[0.5, 0.75], None]
    assert bootstrap_ratios([[3, 1]], [[4, 2]]) == [None, None]


def test_evaluation_reports_intervals_for_tau_and_alpha(target, drafts):
    report = evaluate_draft(target, drafts["perturbed"], SPEC_BENCH_RECORDS, gamma=2, max_new_tokens=10,
                            measure_speedup=False, progress=False, seed=3)
    overall = report["overall"]
    assert report["config"]["interval"] == {"method": "per-prompt bootstrap, percentile interval", "level": 0.95,
                                            "resamples": 1000, "seed": 3}
    assert overall["tau_ci"][0] <= overall["tau"] <= overall["tau_ci"][1]
    assert len(overall["alpha_ci"]) == 2
    for alpha, interval in zip(overall["alpha"], overall["alpha_ci"]):
        assert interval is None or interval[0] <= alpha <= interval[1]
    assert report["categories"]["math_reasoning"]["tau_ci"] is None  # one prompt: no interval
    assert report["categories"]["writing"]["tau_ci"] is not None
    markdown = render_markdown(report)
    assert "tau 95% CI" in markdown and f"[{overall['tau_ci'][0]:.2f}, {overall['tau_ci'][1]:.2f}]" in markdown
    from draftkit.recipes.common import compare_markdown

    table = compare_markdown({"after training": report, "skipped": None})
    row = next(line for line in table.splitlines() if line.startswith("| after training |"))
    assert row.startswith(f"| after training | 3 | {overall['tau']:.2f} | [{overall['tau_ci'][0]:.2f}, ")
    assert "| prompts | τ | τ 95% CI |" in table and "1000 resamples of the prompts (seed 3)" in table
