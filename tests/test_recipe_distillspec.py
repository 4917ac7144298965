"""DistillSpec on the tiny target: rollouts, masking, mixing, the end-to-end run, resume, LoRA, export and bad input."""

import json
import shutil

import pytest
from hydra.errors import InstantiationException
import torch
from transformers import AutoModelForCausalLM

from draftkit.config import compose
from draftkit.data.rollout import TeacherRollouts, assemble, collate_prompts, continuation_mask, left_pad
from draftkit.drafts.lm import draft_from_target, llama_draft
from draftkit.recipes import distillspec
from draftkit.engine.loop import LoopSettings
from draftkit.recipes.distillspec import DistillStep, planned_teacher_prompts, resolve_distill_temperature
from draftkit.runtime.speculative import LMDrafter, autoregressive_generate, speculative_generate
from draftkit.targets.tiny import tiny_target

EOS = 2


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=distillspec", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return distillspec.run(cfg, run_dir)


def history(run_dir):
    return json.loads((run_dir / "distill" / "history.json").read_text())


@pytest.fixture(scope="module")
def models():
    target = tiny_target()
    # Untied, so it does not just repeat the last token as a tied random model (and the tiny target) does.
    draft = llama_draft(vocab_size=target.vocab_size, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=False, seed=1)
    return target, draft


def _step(target, **overrides):
    settings = dict(stop_ids=[EOS], pad_token_id=EOS, lambda_on_policy=1.0, mix="batch", off_policy="teacher",
                    kind="fkl", beta=0.5, distill_temperature=1.0, generation_temperature=0.0, max_new_tokens=6)
    settings.update(overrides)
    return DistillStep(target.model, **settings)


def _batch(prompts, replies=None):
    replies = replies or [[] for _ in prompts]
    return collate_prompts([{"prompt_ids": p, "reply_ids": r} for p, r in zip(prompts, replies)], pad_token_id=EOS)


PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51, 52, 53], [1, 60, 61, 62, 63]]


def _greedy(model, prompt, new_tokens):
    out = autoregressive_generate(model, torch.tensor([prompt]), max_new_tokens=new_tokens, eos_token_id=EOS)
    return out.tokens


def test_continuation_mask_counts_up_to_and_including_the_first_stop():
    continuations = torch.tensor([[5, 6, EOS, 7, EOS], [5, 6, 7, 8, 9], [EOS, 5, 5, 5, 5], [5, 6, 7, 8, 9]])
    lengths = torch.tensor([5, 5, 5, 3])
    mask = continuation_mask(continuations, lengths, [EOS])
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_assembled_rollout_masks_prompt_padding_and_post_eos():
    prompt_ids, prompt_mask = left_pad([[1, 9], [1, 8, 7]], EOS)
    continuations = torch.tensor([[5, EOS, 6], [4, 4, 4]])
    counted = continuation_mask(continuations, torch.tensor([3, 3]), [EOS])
    rollout = assemble(prompt_ids, prompt_mask, continuations, counted, EOS)
    assert rollout.input_ids.tolist() == [[EOS, 1, 9, 5, EOS, EOS], [1, 8, 7, 4, 4, 4]]
    assert rollout.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert rollout.position_ids.tolist()[0][1:5] == [0, 1, 2, 3]
    assert rollout.continuation_mask.int().tolist() == [[1, 1, 0], [1, 1, 1]]


def test_left_padding_does_not_change_what_the_models_score(models):
    # Position ids follow the mask, so a padded row gets the logits it gets alone.
    target, _ = models
    prompt_ids, prompt_mask = left_pad([[1, 9, 10], [1, 8, 7, 6, 5]], EOS)
    continuations = torch.tensor([[5, 6], [4, 3]])
    rollout = assemble(prompt_ids, prompt_mask, continuations, torch.ones(2, 2, dtype=torch.bool), EOS)
    with torch.no_grad():
        batched = target.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                               position_ids=rollout.position_ids, logits_to_keep=3).logits
        alone = target.model(input_ids=torch.tensor([[1, 9, 10, 5, 6]])).logits[:, -3:]
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_on_policy_batches_hold_the_drafts_own_samples(models):
    target, draft = models
    step = _step(target)
    out = step(draft, _batch(PROMPTS))
    assert step.last["on_policy"].all()
    for row, prompt in enumerate(PROMPTS):
        expected = _greedy(draft, prompt, 6)
        counted = step.last["rollout"].continuation_mask[row]
        assert step.last["continuations"][row][counted].tolist() == expected
    assert out.count.item() == step.last["rollout"].continuation_mask.sum().item()
    # The target writes something else, so this checks the source, not a coincidence.
    assert _greedy(target.model, PROMPTS[0], 6) != _greedy(draft, PROMPTS[0], 6)


def test_teacher_batches_hold_the_targets_samples(models):
    target, draft = models
    step = _step(target, lambda_on_policy=0.0)
    step(draft, _batch(PROMPTS))
    assert not step.last["on_policy"].any()
    for row, prompt in enumerate(PROMPTS):
        counted = step.last["rollout"].continuation_mask[row]
        assert step.last["continuations"][row][counted].tolist() == _greedy(target.model, prompt, 6)


def test_dataset_replies_are_cut_at_their_stop_and_padding_is_not_counted(models):
    target, draft = models
    step = _step(target, lambda_on_policy=0.0, off_policy="dataset")
    out = step(draft, _batch(PROMPTS, replies=[[70, 71, EOS, 99], [72], [73, 74, 75, 76, 77, 78, 79, 80]]))
    # 3 tokens (through the stop), 1 token, then the 6-token cap.
    assert step.last["rollout"].continuation_mask.sum(1).tolist() == [3, 1, 6]
    assert out.count.item() == 10
    assert step.last["continuations"][0, :3].tolist() == [70, 71, EOS]


def test_mixing_per_batch_and_per_sequence(models):
    target, draft = models
    per_batch = _step(target, lambda_on_policy=0.5, max_new_tokens=2)
    per_sequence = _step(target, lambda_on_policy=0.5, mix="sequence", max_new_tokens=2)
    batch = _batch(PROMPTS * 2)
    seen_batch, seen_sequence = set(), set()
    for _ in range(8):
        per_batch(draft, batch)
        flags = per_batch.last["on_policy"]
        assert flags.all() or not flags.any()
        seen_batch.add(bool(flags[0]))
        per_sequence(draft, batch)
        seen_sequence.add(tuple(per_sequence.last["on_policy"].tolist()))
    assert seen_batch == {True, False}
    assert any(len(set(flags)) == 2 for flags in seen_sequence)


def test_coins_replay_from_the_micro_step(models):
    target, draft = models
    first = _step(target, lambda_on_policy=0.5, mix="sequence", max_new_tokens=2, generation_temperature=1.0)
    batch = _batch(PROMPTS * 2)
    draws = []
    for _ in range(3):
        first(draft, batch)
        draws.append((first.last["on_policy"].tolist(), first.last["continuations"].tolist()))
    resumed = _step(target, lambda_on_policy=0.5, mix="sequence", max_new_tokens=2, generation_temperature=1.0,
                    micro_step=2)
    resumed(draft, batch)
    assert (resumed.last["on_policy"].tolist(), resumed.last["continuations"].tolist()) == draws[2]


UNEVEN_PROMPTS = [[1, 40, 41], [1, 50, 51, 52, 53, 54], [1, 60], [1, 70, 71, 72]]


def _rollouts(target, prompts, **overrides):
    settings = dict(batch_size=2, max_new_tokens=6, temperature=0.0, stop_ids=[EOS], pad_token_id=EOS, seed=3,
                    progress=False)
    settings.update(overrides)
    return TeacherRollouts(target.model, prompts, **settings)


def _indexed_batch(indices, prompts):
    return collate_prompts([{"prompt_ids": prompts[i], "reply_ids": [], "index": i} for i in indices],
                           pad_token_id=EOS)


def test_teacher_rollouts_written_in_batches_are_the_targets_own_greedy_continuations(models):
    # Prompts of different lengths share a left-padded batch; each row must still be what the target writes alone.
    target, _ = models
    rollouts = _rollouts(target, UNEVEN_PROMPTS)
    written = rollouts.continuations(torch.tensor([3, 0, 2, 1]), 0)
    for row, index in enumerate([3, 0, 2, 1]):
        expected = _greedy(target.model, UNEVEN_PROMPTS[index], 6)
        assert written[row, : len(expected)].tolist() == expected
    rollouts.continuations(torch.tensor([1]), 5)
    assert rollouts.rounds_written == 1  # greedy: every round is the same round


def test_sampled_rounds_differ_and_a_fresh_pool_replays_any_round(models):
    target, _ = models
    everything = torch.arange(len(UNEVEN_PROMPTS))
    first = _rollouts(target, UNEVEN_PROMPTS, temperature=1.0, max_new_tokens=8)
    round_0, round_1 = first.continuations(everything, 0), first.continuations(everything, 1)
    assert not torch.equal(round_0, round_1)
    resumed = _rollouts(target, UNEVEN_PROMPTS, temperature=1.0, max_new_tokens=8)
    assert torch.equal(resumed.continuations(everything, 1), round_1)  # without writing round 0 first
    assert first.rounds_written == 2 and resumed.rounds_written == 1


def test_a_plan_limits_what_is_written_and_a_prompt_outside_it_is_written_when_asked(models):
    target, _ = models
    rollouts = _rollouts(target, UNEVEN_PROMPTS, temperature=1.0, plan={0: [0, 2], 1: [1]})
    first = rollouts.continuations(torch.tensor([2, 0]), 0)
    assert (rollouts.prompts_written, rollouts.unplanned_written) == (2, 0)
    rollouts.continuations(torch.tensor([3]), 0)
    assert (rollouts.prompts_written, rollouts.unplanned_written) == (3, 1)
    assert torch.equal(rollouts.continuations(torch.tensor([2, 0]), 0), first)  # written ones are kept
    rollouts.continuations(torch.tensor([1]), 1)
    assert (rollouts.rounds_written, rollouts.prompts_written, rollouts.unplanned_written) == (2, 4, 1)
    # The same plan writes the same samples: a resumed run's round equals the uninterrupted one's.
    again = _rollouts(target, UNEVEN_PROMPTS, temperature=1.0, plan={0: [0, 2], 1: [1]})
    assert torch.equal(again.continuations(torch.tensor([2, 0]), 0), first)
    greedy = _rollouts(target, UNEVEN_PROMPTS, plan={0: [0], 1: [1]})
    greedy.continuations(torch.tensor([0]), 0)
    greedy.continuations(torch.tensor([1]), 1)  # greedy: one round holds every planned prompt
    assert (greedy.rounds_written, greedy.prompts_written, greedy.unplanned_written) == (1, 2, 0)


def test_plans_follow_the_loops_order_and_coins_and_split_between_ranks(models):
    target, _ = models
    examples = [{"prompt_ids": [1, 5 + i], "reply_ids": [], "index": i} for i in range(12)]
    settings = LoopSettings(steps=5, micro_batch_size=2, seed=4)
    step = _step(target, lambda_on_policy=0.0)
    plans = [planned_teacher_prompts(step, examples, settings, rank=r, world_size=2) for r in (0, 1)]
    (plan_0, per_round), (plan_1, _) = plans
    assert per_round == 3  # 12 prompts / (2 per micro-batch x 2 ranks)
    assert sorted(plan_0) == [0, 1] and len(plan_0[0]) == 6 and len(plan_0[1]) == 4
    assert sorted(plan_0[0] + plan_1[0]) == list(range(12))  # the ranks share the first epoch, each prompt once
    assert not set(plan_0[1]) & set(plan_1[1])
    mixed = _step(target, lambda_on_policy=0.5)
    plan, _ = planned_teacher_prompts(mixed, examples, settings, rank=0, world_size=1)
    on_policy_steps = [m for m in range(5) if mixed.on_policy_rows(m, 2).all()]
    assert 0 < len(on_policy_steps) < 5
    assert sum(len(p) for p in plan.values()) == 2 * (5 - len(on_policy_steps))


def test_the_step_reads_one_round_per_epoch_of_micro_batches(models):
    target, draft = models
    rollouts = _rollouts(target, UNEVEN_PROMPTS, temperature=1.0)
    step = _step(target, lambda_on_policy=0.0, generation_temperature=1.0, teacher_rollouts=rollouts,
                 micro_steps_per_round=2)
    orders = [[2, 0], [1, 3], [0, 3], [2, 1]]
    for micro, indices in enumerate(orders):
        step(draft, _indexed_batch(indices, UNEVEN_PROMPTS))
        expected = rollouts.continuations(torch.tensor(indices), micro // 2)
        counted = step.last["rollout"].continuation_mask
        assert torch.equal(step.last["continuations"][counted], expected[counted])
    assert rollouts.rounds_written == 2
    with pytest.raises(ValueError, match="example_index"):
        step(draft, _batch(UNEVEN_PROMPTS[:2]))


def test_distill_temperature_follows_decoding_unless_set():
    assert resolve_distill_temperature(None, 0.0) == 1.0
    assert resolve_distill_temperature(None, 0.7) == 0.7
    assert resolve_distill_temperature(0.5, 0.7) == 0.5


def test_draft_from_target_keeps_the_targets_first_layers():
    target = tiny_target(num_layers=3)
    draft = draft_from_target(target.model, num_layers=1, vocab_size=target.vocab_size)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        features = target.features(ids, torch.ones_like(ids), layers=[1])
        hidden = draft.model(input_ids=ids).last_hidden_state
    # The draft's final norm over its one layer equals the target's final norm over its first layer's residual.
    torch.testing.assert_close(hidden, target.model.model.norm(features.hidden[1]))
    draft.model.embed_tokens.weight.data.add_(1.0)  # an independent copy: training it leaves the target alone
    assert not torch.equal(draft.model.embed_tokens.weight, target.model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="between 1 and 2"):
        draft_from_target(target.model, num_layers=3)


# The default mixes in no on-policy data (λ = 0); the pinned run exercises the draft's own rollouts.
# Two checkpoints kept (the default keeps the newest only), so a test can roll a run back to before its last step.
ON_POLICY_RUN = ("distillspec.lambda_on_policy=1.0", "distillspec.num_prompts=8",
                 "distillspec.generation.max_new_tokens=12", "engine.keep_checkpoints=2")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distillspec")
    export = run_recipe(run_dir, *ON_POLICY_RUN)
    return run_dir, export


def test_end_to_end_losses_are_pinned(finished_run):
    run_dir, _ = finished_run
    records = history(run_dir)
    assert [r["loss"] for r in records] == pytest.approx([0.0125, 0.0118, 0.0111], abs=1e-4)
    assert all(0.0 < r["alpha_hat"] <= 1.0 and r["on_policy_share"] == 1.0 for r in records)
    assert all(0.0 <= r["generation_share"] <= 1.0 for r in records)
    summary = (run_dir / "summary.md").read_text()
    assert "| before distillation |" in summary and "| after distillation |" in summary
    # A newcomer's summary: a title, the loss and acceptance trend, where the draft is and how to use it.
    assert summary.startswith("# DistillSpec draft for tiny-llama")
    assert "| step | loss | alpha_hat |" in summary and f"| 3 | {records[-1]['loss']:.4f} |" in summary
    assert f"- export: `{run_dir / 'export'}`" in summary
    assert f"python -m draftkit.eval --draft {run_dir / 'export'}" in summary
    assert f'"model": "{run_dir / "export"}"' in summary and "vllm serve" in summary
    result = json.loads((run_dir / "result.json").read_text())
    for report in (result["before"], result["after"]):  # not the target's checkpoint, which the cut's config named
        assert report["config"]["draft"].startswith(f"the draft of run {run_dir}")
    timing = json.loads((run_dir / "result.json").read_text())["timing"]
    assert 0.0 < timing["generation_share"] < 1.0


def test_exported_draft_is_lossless_in_the_runtime(finished_run):
    _, export = finished_run
    target = tiny_target()
    draft = AutoModelForCausalLM.from_pretrained(export)
    assert draft.config.vocab_size == target.vocab_size
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        reference = autoregressive_generate(target.model, ids, max_new_tokens=20, eos_token_id=EOS).tokens
        spec = speculative_generate(target.model, LMDrafter(draft), ids, gamma=3, max_new_tokens=20, eos_token_id=EOS)
        assert spec.tokens == reference


def test_resume_replays_the_interrupted_step(finished_run):
    run_dir, _ = finished_run
    full = history(run_dir)

    shutil.rmtree(run_dir / "distill" / "checkpoints" / "step_000003")
    (run_dir / "distill" / "history.json").unlink()
    run_recipe(run_dir, *ON_POLICY_RUN)

    def without_timing(records):
        return [{k: v for k, v in r.items() if k != "generation_share"} for r in records]

    assert without_timing(history(run_dir)) == without_timing(full)


# The default: the target writes the continuations, a round per epoch ahead of the steps. 4 prompts in micro-batches
# of 2 make 2 micro-steps per round, so the 3 steps cross into round 1 and the resumed step starts there.
TEACHER_RUN = ("distillspec.num_prompts=4", "distillspec.generation.max_new_tokens=12", "engine.keep_checkpoints=2")


def test_teacher_written_run_is_pinned_and_resumes_into_its_second_round(tmp_path):
    run_recipe(tmp_path, *TEACHER_RUN)
    full = history(tmp_path)
    assert [r["loss"] for r in full] == pytest.approx([0.01254, 0.01185, 0.01178], abs=1e-5)
    assert all(r["on_policy_share"] == 0.0 for r in full)
    # 3 steps of 2 read 6 continuations: round 0's 4 prompts and 2 of round 1, all forecast by the plan.
    timing = json.loads((tmp_path / "result.json").read_text())["timing"]
    assert (timing["teacher_prompts_written"], timing["teacher_prompts_unplanned"]) == (6, 0)

    shutil.rmtree(tmp_path / "distill" / "checkpoints" / "step_000003")
    (tmp_path / "distill" / "history.json").unlink()
    run_recipe(tmp_path, *TEACHER_RUN)
    resumed = history(tmp_path)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def test_the_first_teacher_round_is_written_before_the_loop_starts(tmp_path, monkeypatch):
    """The step bar's ETA must not extrapolate a whole round of generation from step 1: the loop starts with the
    first round already written."""
    seen = {}
    real_train = distillspec.train

    def train(*, step_fn, **kwargs):
        seen["rounds_written_at_start"] = step_fn.teacher_rollouts.rounds_written
        return real_train(step_fn=step_fn, **kwargs)

    monkeypatch.setattr(distillspec, "train", train)
    run_recipe(tmp_path, *TEACHER_RUN, "eval=none")
    assert seen["rounds_written_at_start"] == 1
    assert json.loads((tmp_path / "result.json").read_text())["timing"]["teacher_prompts_written"] == 6


def test_grouping_by_length_batches_prompts_of_similar_length(tmp_path):
    run_recipe(tmp_path, *TEACHER_RUN, "engine.group_by_length=true")
    timing = json.loads((tmp_path / "result.json").read_text())["timing"]
    assert (timing["teacher_prompts_written"], timing["teacher_prompts_unplanned"]) == (6, 0)
    examples = distillspec._prompt_examples(compose(["+recipe=distillspec", "+debug=tiny", *TEACHER_RUN]),
                                            tiny_target().tokenizer, seed=0)
    assert examples.lengths == [len(e["prompt_ids"]) for e in examples] and len(examples) == 4


def test_lora_trains_adapters_and_exports_a_merged_draft(tmp_path):
    export = run_recipe(tmp_path, "distillspec.num_prompts=8", "distillspec.generation.max_new_tokens=8", "eval=none",
                        "distillspec.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}")
    draft = AutoModelForCausalLM.from_pretrained(export)
    assert not any("lora" in name for name, _ in draft.named_parameters())
    assert len(history(tmp_path)) == 3


def test_a_draft_with_another_vocabulary_is_refused_before_training(tmp_path):
    other = llama_draft(vocab_size=300, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=64)
    other.save_pretrained(tmp_path / "other")
    # Hydra wraps the builder's ValueError; the message is what the user reads.
    with pytest.raises((ValueError, InstantiationException), match="vocab_size=300 but the target has 320"):
        run_recipe(tmp_path / "run", "draft=pretrained", f"draft.path={tmp_path / 'other'}")
    assert not (tmp_path / "run" / "distill").exists()


def test_dataset_source_without_replies_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="distillspec.off_policy=dataset needs an assistant reply"):
        run_recipe(tmp_path, "distillspec.lambda_on_policy=0.5", "distillspec.off_policy=dataset")


@pytest.mark.parametrize("override, message", [
    ("distillspec.divergence=kl", "choose one of fkl, rkl, jsd, tvd"),
    ("distillspec.mix=token", "choose batch or sequence"),
    ("distillspec.lambda_on_policy=1.5", "must lie in"),
    ("distillspec.generation.teacher_batch_size=0", "teacher_batch_size=0 must be at least 1"),
])
def test_bad_settings_are_refused(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_recipe(tmp_path, override)
