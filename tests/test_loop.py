"""The one training loop: pinned losses, normalisation invariances, resume equality, failure handling."""

import json
import math
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftkit.data.collate import collate
from draftkit.engine.checkpoint import list_checkpoints
from draftkit.engine.loop import LoopSettings, NonFiniteLossError, stage_settings, train
from draftkit.errors import ConfigError
from draftkit.objectives.ce import next_token_ce
from draftkit.objectives.types import LossOutput

VOCAB = 64


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def examples(n=16, seed=0):
    """Variable lengths and partial loss masks, so token counts differ between micro-batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + i % 7
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100 if j < i % 3 else t for j, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def lm_step(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return next_token_ce(logits, batch["labels"])


def collate0(batch):
    return collate(batch, pad_token_id=0)


def run(tmp_path, model=None, step_fn=lm_step, data=None, resume=True, **overrides):
    settings = LoopSettings(**{"steps": 6, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "log_every": 2,
                               "save_every": 3, **overrides})
    model = model or tiny_lm()
    result = train(model=model, step_fn=step_fn, dataset=data or examples(), collate=collate0, settings=settings,
                   stage_dir=tmp_path, resume=resume, desc="test")
    return model, [h["loss"] for h in result.history]


def test_pinned_losses_and_loss_goes_down(tmp_path):
    model, losses = run(tmp_path, steps=12)
    assert losses[:3] == pytest.approx([4.1572, 4.1210, 4.1650], abs=1e-4)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3


def test_trainable_parameters_change_and_frozen_ones_do_not(tmp_path):
    model = tiny_lm()
    model.model.embed_tokens.weight.requires_grad_(False)  # tied with lm_head: both frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(tmp_path, model=model, steps=2)
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == p.requires_grad, name


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4x1 and 2x2 see the same tokens per step; with per-token normalisation the trajectories coincide."""
    big, big_losses = run(tmp_path / "a", micro_batch_size=4, grad_accum=1)
    acc, acc_losses = run(tmp_path / "b", micro_batch_size=2, grad_accum=2)
    assert acc_losses == pytest.approx(big_losses, abs=1e-5)
    for (n, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_gradient_is_mean_over_tokens_of_the_whole_step(tmp_path):
    """One step by hand: grad = d/dw (sum of token losses) / (tokens in the step), clipped norm reported."""
    data = examples(4)
    reference = tiny_lm()
    batch = collate0(data)
    out = lm_step(reference, batch)
    (out.loss_sum / out.count).backward()
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    settings = LoopSettings(steps=1, micro_batch_size=2, grad_accum=2, lr=0.0, warmup_steps=0, max_grad_norm=1e9,
                            log_every=1, save_every=1)
    result = train(model=tiny_lm(), step_fn=lm_step, dataset=data, collate=collate0, settings=settings,
                   stage_dir=tmp_path, desc="t")
    assert result.history[0]["grad_norm"] == pytest.approx(expected_norm.item(), rel=1e-5)
    assert result.history[0]["loss"] == pytest.approx((out.loss_sum / out.count).item(), rel=1e-6)
    assert result.history[0]["tokens"] == out.count.item()


def test_resume_after_a_crash_reproduces_the_uninterrupted_curve(tmp_path):
    _, uninterrupted = run(tmp_path / "full", steps=8, save_every=3)

    calls = {"n": 0}

    def crashing_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # in step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return lm_step(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", step_fn=crashing_step, steps=8, save_every=3)
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step_000003"]
    _, resumed = run(tmp_path / "cut", steps=8, save_every=3)
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    run(tmp_path / "default", steps=6, save_every=2)
    assert [p.name for p in list_checkpoints(tmp_path / "default" / "checkpoints")] == ["step_000004", "step_000006"]
    run(tmp_path / "one", steps=6, save_every=2, keep_checkpoints=1)
    assert [p.name for p in list_checkpoints(tmp_path / "one" / "checkpoints")] == ["step_000006"]


def test_finished_stage_is_not_retrained_on_resume(tmp_path):
    model, losses = run(tmp_path, steps=4, save_every=2)
    again, losses_again = run(tmp_path, model=tiny_lm(seed=5), steps=4, save_every=2)
    assert losses_again == losses
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding_step(model, batch):
        calls["n"] += 1
        out = lm_step(model, batch)
        if calls["n"] >= 5:
            return LossOutput(out.loss_sum * math.inf, out.count, out.metrics)
        return out

    with pytest.raises(NonFiniteLossError, match="step 5.*newest checkpoint, with finite weights, is .*step_000004.*"
                                                 r"Fix: .*engine.lr=0.001 resume=force"):
        run(tmp_path, step_fn=exploding_step, steps=8, save_every=2, log_every=4)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000002", "step_000004"]
    state = json.loads((tmp_path / "checkpoints" / "step_000004" / "state.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in state["history"])


def test_a_finite_loss_with_a_non_finite_gradient_stops_before_the_checkpoint(tmp_path):
    calls = {"n": 0}

    def overflowing_step(model, batch):
        calls["n"] += 1
        out = lm_step(model, batch)
        if calls["n"] == 4:  # sqrt'(0) = inf: the loss stays finite, its gradient is nan (like a bf16 overflow)
            weight = next(model.parameters())
            out = LossOutput(out.loss_sum + torch.sqrt((weight - weight.detach()) ** 2).sum(), out.count, out.metrics)
        return out

    with pytest.raises(NonFiniteLossError, match="gradient norm is nan at step 4.*newest checkpoint.*step_000002"):
        run(tmp_path, step_fn=overflowing_step, steps=8, save_every=2, log_every=4)
    # Step 4's update made the weights nan: its checkpoint is never written.
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000002"]


def test_stage_settings_caps_steps_and_rejects_unknown_keys():
    s = stage_settings({"steps": 100, "max_steps_per_stage": 3, "warmup_steps": 10}, lr=0.5)
    assert (s.steps, s.warmup_steps, s.lr) == (3, 3, 0.5)
    with pytest.raises(ValueError, match="unknown engine settings.*stepz"):
        stage_settings({"stepz": 1})


@pytest.mark.parametrize("key, value", [("steps", 0), ("steps", "abc"), ("steps", 2.5), ("micro_batch_size", 0),
                                        ("save_every", 0), ("log_every", 0), ("grad_accum", 0), ("lr", -1.0),
                                        ("lr", "fast"), ("betas", [0.9]), ("max_grad_norm", 0), ("precision", "fp16"),
                                        ("group_by_length", "yes"), ("tf32", 1), ("max_steps_per_stage", 0),
                                        ("warmup_steps", -1)])
def test_engine_values_that_cannot_work_are_refused_by_their_name(key, value):
    with pytest.raises(ConfigError, match=rf"^engine\.{re.escape(f'{key}={value!r}')}: must be .*Fix: e\.g\. engine\.{key}="):
        stage_settings({"steps": 10, key: value})
    # a stage's own value is named by its node
    with pytest.raises(ConfigError, match=rf"^fastdraft\.pretrain\.engine\.{key}="):
        stage_settings({"steps": 10}, "fastdraft.pretrain.engine", **{key: value})


def test_tf32_holds_while_the_steps_run_and_full_fp32_is_back_after_them_even_after_an_error(tmp_path):
    seen = []

    def watching_step(model, batch):
        seen.append(torch.get_float32_matmul_precision())
        return lm_step(model, batch)

    assert torch.get_float32_matmul_precision() == "highest"
    run(tmp_path / "tf32", step_fn=watching_step, steps=2, tf32=True)
    assert seen == ["high", "high"] and torch.get_float32_matmul_precision() == "highest"
    assert json.loads((tmp_path / "tf32" / "settings.json").read_text())["tf32"] is True

    seen.clear()
    run(tmp_path / "fp32", step_fn=watching_step, steps=2)
    assert seen == ["highest", "highest"]

    def failing_step(model, batch):
        watching_step(model, batch)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run(tmp_path / "failing", step_fn=failing_step, steps=2, tf32=True)
    assert seen[-1] == "high" and torch.get_float32_matmul_precision() == "highest"


def test_dataset_smaller_than_a_batch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        run(tmp_path, data=examples(3), micro_batch_size=4)


def test_bf16_training_leaves_the_model_in_full_precision_afterwards(tmp_path):
    # accelerate wraps forward in autocast for bf16; after training, callers (evaluation, export, drafters that call
    # other methods on fp32 weights) must get the model back as it was built.
    model = tiny_lm()
    run(tmp_path, model=model, precision="bf16", steps=1)
    assert "_original_forward" not in model.__dict__
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.float32
    hidden = model.model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert hidden.dtype == torch.float32


def test_the_log_reports_the_share_of_positions_that_are_padding(tmp_path):
    class Records:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step):
            self.rows.append(metrics)

    sink = Records()
    data = [{"input_ids": [5] * n, "labels": [5] * n} for n in (2, 6, 4, 8)]  # one batch: padded to 8
    train(model=tiny_lm(), step_fn=lm_step, dataset=data, collate=collate0, sink=sink, stage_dir=tmp_path,
          settings=LoopSettings(steps=2, micro_batch_size=4, log_every=2, save_every=2, warmup_steps=1),
          resume=False, desc="test")
    assert sink.rows[-1]["test/padding_fraction"] == pytest.approx(1 - 20 / 32)
    # both rates over the same interval: 2 steps of 20 tokens
    row = sink.rows[-1]
    assert row["test/steps_per_s"] > 0 and row["test/steps_per_s"] / row["test/tokens_per_s"] == pytest.approx(2 / 40)


def test_grouping_by_length_cuts_padding_and_still_visits_every_example_once_per_epoch():
    from draftkit.engine.batches import BatchStream

    data = [{"input_ids": [5] * n, "labels": [5] * n} for n in torch.randint(2, 60, (203,)).tolist()]

    def epoch(group):
        stream = BatchStream(data, 4, lambda rows: rows, seed=1, group_by_length=group)
        batches = [stream.next() for _ in range(stream.batches_per_epoch)]
        padded = sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
        return sorted(id(r) for b in batches for r in b), padded, [[len(r["input_ids"]) for r in b] for b in batches]

    plain_ids, plain_padded, _ = epoch(False)
    grouped_ids, grouped_padded, grouped_batches = epoch(True)
    assert len(grouped_ids) == len(set(grouped_ids)) == 200  # 50 full batches of 4: each example once
    tokens = sum(sum(b) for b in grouped_batches)
    assert grouped_padded - tokens < (plain_padded - tokens) / 4  # a quarter of the padding, or less
    assert epoch(True)[2] == grouped_batches  # a function of (seed, epoch): resume replays it


def test_grouping_by_length_refuses_examples_without_a_length():
    from draftkit.engine.batches import BatchStream

    stream = BatchStream([{"prompt": [1, 2], "reply": [3]}] * 8, 4, lambda rows: rows, group_by_length=True)
    with pytest.raises(ConfigError, match=r"no input_ids \(nor does its dataset give lengths\)\. Fix: "
                                          r"engine\.group_by_length=false"):
        stream.next()


class Rows:
    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows.append({"step": step, **metrics})


def weight_guarded_step(limit):
    """A loss that turns nan once a weight grows past `limit`: a too-high lr diverges after a few healthy steps, a low
    one never does, like a real divergence but at a known point."""
    def step(model, batch):
        out = lm_step(model, batch)
        if model.lm_head.weight.detach().abs().max() > limit:
            return LossOutput(out.loss_sum * math.nan, out.count, out.metrics)
        return out
    return step


def test_a_lower_lr_given_on_resume_is_used_so_the_suggested_fix_gets_past_the_divergence(tmp_path):
    start = tiny_lm().lm_head.weight.abs().max().item()
    step_fn = weight_guarded_step(start + 0.35)
    with pytest.raises(NonFiniteLossError, match=r"engine.lr=0.01 resume=force") as stopped:
        run(tmp_path, step_fn=step_fn, steps=8, save_every=2, log_every=1, lr=0.1, warmup_steps=0)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert str(newest) in str(stopped.value)
    sink = Rows()
    settings = LoopSettings(steps=8, micro_batch_size=4, lr=0.01, warmup_steps=0, log_every=1, save_every=2)
    result = train(model=tiny_lm(), step_fn=step_fn, dataset=examples(), collate=collate0, settings=settings,
                   stage_dir=tmp_path, sink=sink, desc="test")
    assert result.resumed_from == int(newest.name.split("_")[1]) and len(result.history) == 8
    assert all(math.isfinite(h["loss"]) for h in result.history)
    # the schedule of the new lr from the resumed step on, not the checkpoint's
    first = sink.rows[0]
    assert first["test/lr"] == pytest.approx(0.01 * cosine_factor(first["step"], settings))
    recorded = json.loads((tmp_path / "settings.json").read_text())
    assert recorded["lr"] == 0.01 and recorded["resumed_from"] == result.resumed_from


def cosine_factor(step, settings):
    from draftkit.engine.loop import cosine_with_warmup

    return cosine_with_warmup(step, settings)


def test_diverging_again_right_after_resuming_points_at_the_checkpoint_before_or_a_fresh_start(tmp_path):
    start = tiny_lm().lm_head.weight.abs().max().item()
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, step_fn=weight_guarded_step(start + 0.35), steps=8, save_every=2, log_every=1, lr=0.1,
            warmup_steps=0)
    found = list_checkpoints(tmp_path / "checkpoints")
    with pytest.raises(NonFiniteLossError, match=rf"resumed from {re.escape(str(found[-1]))} and diverged again.*"
                                                 rf"Fix: continue from the checkpoint before it, {re.escape(str(found[-2]))}.*"
                                                 "start over in a new run directory"):
        run(tmp_path, step_fn=weight_guarded_step(start + 0.35), steps=8, save_every=2, log_every=1, lr=0.1,
            warmup_steps=0)


def test_weights_that_are_not_finite_are_never_checkpointed(tmp_path):
    model = tiny_lm()
    model.spare = torch.nn.Parameter(torch.zeros(3))  # trained but unused by the loss: its nan shows in no loss
    calls = {"n": 0}

    def poisoning_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                model.spare.fill_(math.nan)
        return lm_step(model, batch)

    with pytest.raises(NonFiniteLossError, match=r"the weights \['spare'\] are not finite at step 4.*step_000002"):
        run(tmp_path, model=model, step_fn=poisoning_step, steps=6, save_every=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000002"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_with_a_warning(tmp_path, capsys):
    _, uninterrupted = run(tmp_path / "full", steps=8, save_every=2)
    run(tmp_path / "cut", steps=8, save_every=2, keep_checkpoints=3)
    checkpoints = list_checkpoints(tmp_path / "cut" / "checkpoints")
    model_file = checkpoints[-1] / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # cut short, as a full disk or a crash would leave it
    (tmp_path / "cut" / "checkpoints" / ".step_000010.x1y2").mkdir()  # a killed save's staging directory
    capsys.readouterr()
    _, resumed = run(tmp_path / "cut", steps=8, save_every=2)
    assert f"checkpoint {checkpoints[-1]} is damaged (model.pt has 100 bytes" in capsys.readouterr().err
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)
    assert not list((tmp_path / "cut" / "checkpoints").glob(".step_*"))


def test_a_checksum_mismatch_is_damage_too_and_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    from draftkit.engine.checkpoint import CheckpointError, checkpoint_problem

    run(tmp_path, steps=4, save_every=2)
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    for path in checkpoints:
        data = bytearray((path / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
        (path / "optimizer.pt").write_bytes(bytes(data))
    assert "optimizer.pt does not match its recorded checksum" in checkpoint_problem(checkpoints[-1])
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged.*Fix: move"):
        run(tmp_path, steps=6, save_every=2)


def test_a_checkpoint_past_the_planned_steps_is_refused(tmp_path):
    run(tmp_path, steps=4, save_every=2)
    with pytest.raises(ConfigError, match="is at step 4, past steps=3. Fix:"):
        run(tmp_path, steps=3, save_every=2)


def test_a_resumed_run_logs_each_step_once(tmp_path):
    from draftkit.engine.log import JsonlSink

    calls = {"n": 0}

    def crashing_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # in step 6: steps 4 and 5 were logged, the checkpoint is at step 3
            raise KeyboardInterrupt
        return lm_step(model, batch)

    settings = dict(steps=8, micro_batch_size=4, lr=1e-2, warmup_steps=2, log_every=1, save_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(model=tiny_lm(), step_fn=crashing_step, dataset=examples(), collate=collate0, desc="test",
              settings=LoopSettings(**settings), stage_dir=tmp_path, sink=JsonlSink(run_dir=str(tmp_path)))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "test/lo')  # the torn line of a killed write
    train(model=tiny_lm(), step_fn=lm_step, dataset=examples(), collate=collate0, desc="test",
          settings=LoopSettings(**{**settings, "log_every": 2}), stage_dir=tmp_path,
          sink=JsonlSink(run_dir=str(tmp_path)))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6, 8]  # 4 and 5 of the first attempt replaced/rewound


def test_counted_flops_of_a_linear_layer_forward_and_backward_are_six_n_k_m():
    from draftkit.engine.flops import count_flops

    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(3, 7, requires_grad=True)
    assert count_flops(lambda: torch.nn.functional.linear(x, w).sum().backward()) == 6 * 5 * 7 * 3


def test_counted_attention_treats_grouped_kv_heads_as_full_heads():
    from draftkit.engine.flops import count_flops

    q = torch.randn(1, 4, 6, 8, requires_grad=True)
    kv = torch.randn(1, 2, 6, 8, requires_grad=True)
    full = torch.randn(1, 4, 6, 8, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    grouped = count_flops(lambda: sdpa(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward())
    assert grouped == count_flops(lambda: sdpa(q, full, full, is_causal=True).sum().backward())
    # Forward: QK^T and AV over the full square, 4·heads·T²·d; backward 2.5x that (the fused kernel recomputes QK^T).
    assert grouped == 3.5 * 4 * 4 * 6 * 6 * 8


def test_the_loop_counts_the_first_micro_steps_flops_and_logs_achieved_tflops_and_mfu(tmp_path):
    """Embedding -> linear: the linear's forward, weight gradient and input gradient are 2·H·V each per token; the
    embedding lookup and the loss are no matmuls. Every later log carries the same count, from the same one step."""
    class Records:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step):
            self.rows.append(metrics)

    hidden, steps = 8, 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, hidden), torch.nn.Linear(hidden, VOCAB, bias=False))

    def step(model, batch):
        return next_token_ce(model(batch["input_ids"]), batch["labels"])

    data = [{"input_ids": [3 + i] * 6, "labels": [3 + i] * 6} for i in range(8)]  # fixed length: no padding
    sink = Records()
    train(model=model, step_fn=step, dataset=data, collate=collate0, sink=sink, stage_dir=tmp_path, resume=False,
          settings=LoopSettings(steps=steps, micro_batch_size=2, grad_accum=2, log_every=2, save_every=steps,
                                warmup_steps=1, count_flops=True, peak_tflops=2.0), desc="test")
    assert len(sink.rows) == 2
    for row in sink.rows:
        assert row["test/flops_per_token"] == 6 * hidden * VOCAB
        achieved = row["test/flops_per_token"] * row["test/tokens_per_s"]
        assert row["test/tflops_per_device"] == pytest.approx(achieved / 1e12)
        assert row["test/mfu"] == pytest.approx(achieved / 2e12)


def test_flop_counting_is_off_by_default_and_a_peak_needs_it():
    assert not LoopSettings().count_flops
    with pytest.raises(ValueError, match="engine.peak_tflops=989.*Fix: engine.count_flops=true"):
        LoopSettings(peak_tflops=989)
    with pytest.raises(ValueError, match="engine.peak_tflops=0"):
        LoopSettings(count_flops=True, peak_tflops=0)
