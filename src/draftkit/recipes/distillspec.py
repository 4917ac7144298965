"""DistillSpec: distil a draft LM toward the frozen target on sequences the draft itself writes (on-policy).

Each micro-batch of prompts is continued either by the draft (probability λ = distillspec.lambda_on_policy) or by
the off-policy source (the target: sequence-level KD; or the dataset's own replies), per batch or per sequence. Both
models then score the continuation, and the divergence between their next-token distributions is minimised on the
continuation tokens only (prompt tokens carry no draft decision; scoring them dilutes the loss).
"""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from draftkit.config import instantiate_draft
from draftkit.data.rollout import (PromptExamples, TeacherRollouts, assemble, collate_prompts, continuation_mask,
                                   prompt_reply_examples, sample_continuations)
from draftkit.engine.batches import BatchStream
from draftkit.engine.checkpoint import newest_intact_checkpoint
from draftkit.engine.distributed import process_index, world_size_from_env
from draftkit.engine.loop import LoopSettings, stage_settings, train
from draftkit.errors import ConfigError
from draftkit.export.lm import export_hf_draft
from draftkit.io import write_json_atomic
from draftkit.objectives.kl import DIVERGENCES, divergence
from draftkit.objectives.types import LossOutput
from draftkit.recipes.common import (
    compare_markdown,
    export_target_args,
    load_sources,
    measure_acceptance,
    require_shared_vocabulary,
    start_run,
    write_summary,
)
from draftkit.runtime import lm as lm_runtime
from draftkit.runtime.drafting import DraftingOptions
from draftkit.runtime.evaluate import eos_token_ids

MIX_MODES = ("batch", "sequence")
OFF_POLICY_SOURCES = ("teacher", "dataset")


class DistillStep:
    """step_fn for the loop: roll out, score with both models, return the summed divergence.

    Randomness (which rows are on-policy, and the sampling itself) is drawn from generators seeded by (seed, micro
    step), so the coin of a per-batch mix is the same on every data-parallel rank (pitfall §4(b).14) and a resumed run
    draws what the uninterrupted one would have. `last` keeps the newest rollout for inspection.

    With `teacher_rollouts` (data.rollout.TeacherRollouts over the same prompt list), the target's continuations come
    from rounds written ahead in large batches instead of a generate call per micro-batch: micro-batch m reads round
    m // micro_steps_per_round, one round per epoch of the prompt list (engine.batches visits each prompt once per
    epoch; planned_teacher_prompts says which this rank reads in each). Batches must then carry "example_index".
    """

    def __init__(self, target_model, *, stop_ids, pad_token_id, lambda_on_policy, mix, off_policy, kind, beta,
                 distill_temperature, generation_temperature, max_new_tokens, seed=0, micro_step=0,
                 teacher_rollouts=None, micro_steps_per_round: int = 1):
        self.target_model = target_model
        self.stop_ids = list(stop_ids)
        self.pad_token_id = pad_token_id
        self.lambda_on_policy = lambda_on_policy
        self.mix = mix
        self.off_policy = off_policy
        self.kind, self.beta, self.distill_temperature = kind, beta, distill_temperature
        self.generation_temperature = generation_temperature
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.micro_step = micro_step
        self.teacher_rollouts = teacher_rollouts
        self.micro_steps_per_round = micro_steps_per_round
        self.generation_seconds = 0.0
        self.last: dict | None = None
        self._previous: tuple[float, float] | None = None  # (entry time, generation seconds) of the previous call

    def on_policy_rows(self, micro_step: int, rows: int) -> torch.Tensor:
        """[rows] bool: which rows of micro-batch `micro_step` the draft continues; a function of (seed, micro step)
        alone, so every rank, a resumed run and a plan made ahead (planned_teacher_prompts) draw the same coins."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step)
        coins = torch.rand(1 if self.mix == "batch" else rows, generator=generator)
        return (coins < self.lambda_on_policy).expand(rows)

    def _sample(self, model, prompt_ids, prompt_mask, rows, seed):
        return sample_continuations(
            model, prompt_ids[rows], prompt_mask[rows], max_new_tokens=self.max_new_tokens,
            temperature=self.generation_temperature, stop_ids=self.stop_ids, pad_token_id=self.pad_token_id, seed=seed)

    def __call__(self, draft, batch: dict) -> LossOutput:
        entered = time.perf_counter()
        step_seed = self.seed * 1_000_003 + self.micro_step
        round_index = self.micro_step // self.micro_steps_per_round
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["attention_mask"]
        rows, new = prompt_ids.shape[0], self.max_new_tokens
        # The coins are drawn on the CPU; deciding there which sources run costs no host-device sync.
        on_policy_host = self.on_policy_rows(self.micro_step, rows)
        on_policy = on_policy_host.to(prompt_ids.device)
        self.micro_step += 1

        continuations = prompt_ids.new_full((rows, new), self.pad_token_id)
        lengths = torch.full((rows,), new, dtype=torch.long, device=prompt_ids.device)
        if on_policy_host.any():
            continuations[on_policy] = self._sample(draft, prompt_ids, prompt_mask, on_policy, step_seed)
        off = ~on_policy
        if not on_policy_host.all():
            if self.off_policy == "teacher" and self.teacher_rollouts is not None:
                if "example_index" not in batch:
                    raise ValueError("teacher_rollouts needs batches with example_index (collate_prompts adds it when "
                                     "every example has an 'index')")
                written = self.teacher_rollouts.continuations(batch["example_index"][~on_policy_host], round_index)
                continuations[off] = written.to(continuations.device)
            elif self.off_policy == "teacher":
                continuations[off] = self._sample(self.target_model, prompt_ids, prompt_mask, off, step_seed + 1)
            else:
                replies = batch["reply_ids"][off][:, :new]
                continuations[off, : replies.shape[1]] = replies
                lengths[off] = batch["reply_lengths"][off].clamp(max=new)
        generated = time.perf_counter() - entered
        self.generation_seconds += generated

        counted = continuation_mask(continuations, lengths, self.stop_ids)
        rollout = assemble(prompt_ids, prompt_mask, continuations, counted, self.pad_token_id)
        inputs = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                  "position_ids": rollout.position_ids, "logits_to_keep": new + 1}
        # Column P-1+i predicts continuation token i; the final column predicts past the end and is dropped.
        with torch.no_grad():
            teacher_logits = self.target_model(**inputs).logits[:, :-1]
        student_logits = draft(**inputs).logits[:, :-1]
        out = divergence(student_logits, teacher_logits, counted, kind=self.kind, beta=self.beta,
                         temperature=self.distill_temperature)

        # Share of wall time spent generating, over the previous micro-step from its entry to this one (so it includes
        # that step's backward and optimizer work); the loop divides metrics by the token count, hence the product.
        if self._previous is None:
            share = generated / max(time.perf_counter() - entered, 1e-9)
        else:
            previous_entry, previous_generated = self._previous
            share = previous_generated / max(entered - previous_entry, 1e-9)
        self._previous = (entered, generated)
        count = out.count.float()
        self.last = {"rollout": rollout, "on_policy": on_policy, "continuations": continuations}
        metrics = dict(out.metrics)
        metrics["on_policy_share"] = (counted.sum(1).float() * on_policy.float()).sum()
        metrics["generation_share"] = count * share
        return LossOutput(loss_sum=out.loss_sum, count=out.count, metrics=metrics)


def resolve_distill_temperature(configured, decoding_temperature: float) -> float:
    """None means: distil at the temperature the draft will be decoded at (α = 1 − TVD holds there), 1 for greedy."""
    if configured is not None:
        return float(configured)
    return float(decoding_temperature) if decoding_temperature > 0 else 1.0


def validate(cfg: DictConfig) -> None:
    settings = cfg.distillspec
    problems = []
    if not 0.0 <= settings.lambda_on_policy <= 1.0:
        problems.append(f"distillspec.lambda_on_policy={settings.lambda_on_policy} must lie in [0, 1]")
    if settings.mix not in MIX_MODES:
        problems.append(f"distillspec.mix={settings.mix!r}: choose {' or '.join(MIX_MODES)}")
    if settings.off_policy not in OFF_POLICY_SOURCES:
        problems.append(f"distillspec.off_policy={settings.off_policy!r}: choose {' or '.join(OFF_POLICY_SOURCES)}")
    if settings.divergence not in DIVERGENCES:
        problems.append(f"distillspec.divergence={settings.divergence!r}: choose one of {', '.join(DIVERGENCES)}")
    if settings.generation.temperature < 0:
        problems.append(f"distillspec.generation.temperature={settings.generation.temperature} must be >= 0")
    teacher_batch = settings.generation.get("teacher_batch_size")
    if teacher_batch is not None and teacher_batch < 1:
        problems.append(f"distillspec.generation.teacher_batch_size={teacher_batch} must be at least 1 "
                        "(or null: the target continues each micro-batch when it is drawn)")
    if problems:
        raise ConfigError("; ".join(problems) + ". Fix: give each setting named a value as stated")


def _prompt_examples(cfg: DictConfig, tokenizer, seed: int) -> list[dict]:
    records = load_sources(cfg.data.prompts, cfg.data.prompts_limit)
    examples = prompt_reply_examples(records, tokenizer, max_prompt_tokens=cfg.data.selfdistill.max_prompt_tokens)
    random.Random(seed).shuffle(examples)
    examples = PromptExamples(example | {"index": index}
                              for index, example in enumerate(examples[: cfg.distillspec.num_prompts]))
    if not examples:
        raise ConfigError(f"no usable prompts in {list(cfg.data.prompts)} (chat records with a user turn of at most "
                          f"data.selfdistill.max_prompt_tokens={cfg.data.selfdistill.max_prompt_tokens} tokens). Fix: "
                          "raise data.selfdistill.max_prompt_tokens, or give shorter prompts")
    settings = cfg.distillspec
    if settings.off_policy == "dataset" and settings.lambda_on_policy < 1.0:
        missing = sum(1 for e in examples if not e["reply_ids"])
        if missing:
            raise ConfigError(
                f"distillspec.off_policy=dataset needs an assistant reply after each prompt, but {missing} of "
                f"{len(examples)} prompts from {list(cfg.data.prompts)} have none. Fix: distillspec.off_policy=teacher "
                "(the target writes the replies), or prompts with replies (e.g. data=shared)")
    return examples


def _apply_lora(draft, lora: DictConfig | None):
    if not lora:
        return draft
    from peft import LoraConfig, get_peft_model

    return get_peft_model(draft, LoraConfig(**OmegaConf.to_container(lora, resolve=True)))


def planned_teacher_prompts(step: DistillStep, examples: list[dict], settings: LoopSettings, *, rank: int,
                            world_size: int) -> tuple[dict[int, list[int]], int]:
    """({round: the prompts this rank will have the target continue in it}, micro-steps per round), from the loop's
    own batch order (engine.batches.BatchStream with the loop's settings) and the step's own coins, replayed from the
    first micro-step: a rank writes only its share of a round, a run shorter than an epoch only what it reads, and
    batches the draft continues are left out. Whole rounds are planned even when resuming mid-round, so a resumed run
    writes each round from the same plan as the uninterrupted one."""
    order = BatchStream(examples, settings.micro_batch_size, lambda batch: [e["index"] for e in batch],
                        seed=settings.seed, rank=rank, world_size=world_size, group_by_length=settings.group_by_length)
    plan: dict[int, list[int]] = {}
    for micro in range(settings.steps * settings.grad_accum):
        indices = order.next()
        off_policy = (~step.on_policy_rows(micro, len(indices))).tolist()
        plan.setdefault(micro // order.batches_per_epoch, []).extend(i for i, off in zip(indices, off_policy) if off)
    return plan, order.batches_per_epoch


def attach_teacher_rollouts(step: DistillStep, settings: DictConfig, examples: list[dict], loop_settings: LoopSettings,
                            pad_token_id: int) -> None:
    """When the target writes the off-policy data and generation.teacher_batch_size is set, the step reads the
    target's continuations from rounds written ahead; otherwise each micro-batch is continued when it is drawn."""
    batch_size = settings.generation.get("teacher_batch_size")
    if settings.off_policy != "teacher" or settings.lambda_on_policy >= 1.0 or batch_size is None:
        return
    plan, per_round = planned_teacher_prompts(step, examples, loop_settings, rank=process_index(),
                                              world_size=world_size_from_env())
    step.micro_steps_per_round = per_round
    step.teacher_rollouts = TeacherRollouts(
        step.target_model, [e["prompt_ids"] for e in examples], batch_size=batch_size,
        max_new_tokens=settings.generation.max_new_tokens, temperature=settings.generation.temperature,
        stop_ids=step.stop_ids, pad_token_id=pad_token_id, seed=step.seed, plan=plan,
        progress=process_index() == 0)


def run(cfg: DictConfig, run_dir: Path) -> Path:
    settings = cfg.distillspec
    validate(cfg)
    sink, engine, target = start_run(cfg, run_dir)
    tokenizer = target.tokenizer
    draft = instantiate_draft(cfg.draft, target)
    require_shared_vocabulary(draft, target)
    examples = _prompt_examples(cfg, tokenizer, engine["seed"])
    draft = _apply_lora(draft, settings.lora)
    draft.to(target.device)

    drafting = lm_runtime.drafting(draft, target, DraftingOptions())
    before = (measure_acceptance(target, drafting, cfg.eval, run_dir / "eval_before.json")
              if cfg.eval.get("before") else None)

    loop_settings = stage_settings(engine)
    stage_dir = run_dir / "distill"
    # The checkpoint the loop will resume from (a damaged newest one is skipped there too, with the warning).
    checkpoint = newest_intact_checkpoint(stage_dir / "checkpoints", warn=False) if cfg.resume else None
    resumed_step = int(checkpoint.name.split("_")[-1]) if checkpoint else 0
    temperature = resolve_distill_temperature(settings.distill_temperature, cfg.eval.get("temperature", 0.0))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(target)[0]
    step = DistillStep(
        target.model, stop_ids=eos_token_ids(target), pad_token_id=pad_token_id,
        lambda_on_policy=settings.lambda_on_policy, mix=settings.mix, off_policy=settings.off_policy,
        kind=settings.divergence, beta=settings.jsd_beta, distill_temperature=temperature,
        generation_temperature=settings.generation.temperature, max_new_tokens=settings.generation.max_new_tokens,
        seed=engine["seed"], micro_step=resumed_step * loop_settings.grad_accum)
    attach_teacher_rollouts(step, settings, examples, loop_settings, pad_token_id)
    started = time.perf_counter()
    if step.teacher_rollouts is not None and resumed_step < loop_settings.steps:
        # The first round is written before the loop starts, not inside its first step: the step bar's ETA would
        # otherwise extrapolate a whole round of generation over every remaining step.
        step.teacher_rollouts.prepare(step.micro_step // step.micro_steps_per_round)
        step.generation_seconds += time.perf_counter() - started
    result = train(model=draft, step_fn=step, dataset=examples, collate=partial(collate_prompts, pad_token_id=pad_token_id),
                   settings=loop_settings, stage_dir=stage_dir, sink=sink, resume=cfg.resume, desc="distill")
    train_seconds = time.perf_counter() - started

    if result.resumed_from != result.steps:  # the draft changed: an earlier report is stale
        (run_dir / "eval_after.json").unlink(missing_ok=True)
    after = measure_acceptance(target, drafting, cfg.eval, run_dir / "eval_after.json")
    table = compare_markdown({"before distillation": before, "after distillation": after})
    merged = draft.merge_and_unload() if settings.lora else draft
    export_dir = export_hf_draft(
        merged, tokenizer, run_dir / "export", **export_target_args(target), recipe="distillspec",
        num_assistant_tokens=settings.export.num_assistant_tokens,
        resolved_config_yaml=OmegaConf.to_yaml(cfg, resolve=True), eval_table_md=table)
    trained_here = result.steps - (result.resumed_from or 0)
    rollouts = step.teacher_rollouts
    timing = {"train_seconds": train_seconds, "generation_seconds": step.generation_seconds,
              "teacher_prompts_written": rollouts.prompts_written if rollouts else None,
              "teacher_prompts_unplanned": rollouts.unplanned_written if rollouts else None,
              "generation_share": step.generation_seconds / train_seconds if trained_here else None,
              "distill_temperature": temperature}
    write_summary(run_dir, title=f"DistillSpec draft for {target.name}", table=table,
                  histories={"distill": result.history}, exports={"export": export_dir}, reports=[before, after])
    if after is not None:
        sink.summary({"tau_before": before["overall"]["tau"] if before else None, "tau_after": after["overall"]["tau"],
                      **{k: v for k, v in timing.items() if v is not None}})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": str(export_dir), "before": before, "after": after,
                                                "timing": timing})
    share = f", {100 * timing['generation_share']:.0f}% of it generating" if timing["generation_share"] else ""
    print(f"\n{table}\n\nTrained for {train_seconds:.0f} s{share}. Draft exported to {export_dir}; summary in "
          f"{run_dir / 'summary.md'}")
    return export_dir
