"""SpecDec++: train an acceptance head on a frozen standalone draft, so drafting stops when a rejection gets likely.

Data: the target answers `data.prompts` and the draft proposes a token at every response position; each proposal's
label is its acceptance probability min(1, p/q) (data/specdecpp_labels.py: batched, cached in the run directory,
resumable). Training: the draft (frozen) reads the labelled sequence, the head reads its last hidden state at each
proposal and learns the label through class-weighted soft BCE (objectives/specdecpp.py). Held-out prompts, labelled
without mixing, give the static stop policy (runtime/specdecpp.py: stop_policy) and the held-out error. Evaluation:
the draft with a fixed γ against the draft with the head's adaptive stop and against the policy's γ.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from draftkit.config import instantiate_draft
from draftkit.data.chat import prompt_ids
from draftkit.data.feature_cache import target_fingerprint
from draftkit.data.selfdistill import prompts_from_records
from draftkit.data.sources import prompt_file
from draftkit.data.specdecpp_labels import build_acceptance_labels, check_label_settings, collate_labels
from draftkit.drafts.specdecpp import acceptance_head, draft_fingerprint
from draftkit.engine.distributed import is_main_process, main_process_first
from draftkit.engine.loop import stage_settings, train
from draftkit.errors import ConfigError
from draftkit.export.specdecpp import export_specdecpp, load_acceptance_head
from draftkit.io import write_json_atomic
from draftkit.objectives.specdecpp import acceptance_bce
from draftkit.objectives.types import LossOutput
from draftkit.recipes.common import (
    compare_markdown,
    export_target_args,
    finish_run,
    load_sources,
    measure_acceptance,
    require_shared_vocabulary,
    start_run,
)
from draftkit.runtime import lm as lm_runtime
from draftkit.runtime import specdecpp as specdecpp_runtime
from draftkit.runtime.drafting import DraftingOptions
from draftkit.runtime.evaluate import autoregressive_baseline, eos_token_ids, load_prompts
from draftkit.runtime.specdecpp import forward_cost_ratio, stop_policy
from draftkit.targets.hf import freeze


def validate(cfg: DictConfig) -> None:
    settings = cfg.specdecpp
    problems = []
    threshold = settings.stop.threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        problems.append(f"specdecpp.stop.threshold={threshold} must lie in [0, 1] (or null: the policy's)")
    if settings.stop.min_tokens < 1:
        problems.append(f"specdecpp.stop.min_tokens={settings.stop.min_tokens} must be >= 1")
    if settings.reject_weight <= 0:
        problems.append(f"specdecpp.reject_weight={settings.reject_weight} must be > 0")
    if settings.labels.num_prompts < 1 or settings.labels.heldout_prompts < 1:
        problems.append("specdecpp.labels.num_prompts and heldout_prompts must be >= 1")
    cost = settings.policy.cost_ratio
    if cost is not None and cost < 0:
        problems.append(f"specdecpp.policy.cost_ratio={cost} must be >= 0 (or null: measured)")
    try:
        labels = settings.labels
        check_label_settings(temperature=labels.temperature, mixing_fraction=labels.mixing_fraction,
                             max_new_tokens=labels.max_new_tokens, batch_size=labels.batch_size)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise ConfigError("; ".join(problems) + ". Fix: give each setting named a value as stated")


def draft_states(draft, batch: dict) -> torch.Tensor:
    """The frozen draft's last hidden state at every labelled column, [B, N, H] (column i holds input Z_i)."""
    with torch.no_grad():
        out = draft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, -batch["accept"].shape[1]:]


def head_step(draft, reject_weight: float):
    """step_fn for the loop; the frozen draft stays in the closure, outside the trained module."""

    def step(head, batch):
        logits = head(draft_states(draft, batch))
        out = acceptance_bce(logits, batch["accept"], batch["loss_mask"], reject_weight=reject_weight)
        mask = batch["loss_mask"]
        # Plain means over the labelled positions; times the (weighted) count, which the loop divides by.
        per_position = out.count / mask.sum().clamp_min(1)
        predicted = torch.softmax(logits.detach().float(), dim=-1)[..., 1]
        metrics = {**out.metrics, "predicted_acceptance": predicted[mask].sum() * per_position,
                   "label_acceptance": batch["accept"][mask].sum() * per_position}
        return LossOutput(loss_sum=out.loss_sum, count=out.count, metrics=metrics)

    return step


@torch.no_grad()
def predict_acceptance(draft, head, examples: list[dict], pad_token_id: int, batch_size: int) -> list[torch.Tensor]:
    """The head's P(accept) at every position of each labelled example, [len(tokens)] each."""
    device = next(head.parameters()).device
    predictions = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_labels(chunk, pad_token_id).items()}
        probs = head.accept_probability(draft_states(draft, batch)).cpu()
        predictions += [probs[row, :len(e["tokens"])] for row, e in enumerate(chunk)]
    return predictions


def heldout_summary(predicted: list[torch.Tensor], examples: list[dict]) -> dict:
    p = torch.cat(predicted)
    a = torch.cat([torch.tensor(e["accept"]) for e in examples])
    return {"positions": len(a), "mean_abs_error": (p - a).abs().mean().item(),
            "mean_predicted_acceptance": p.mean().item(), "mean_label_acceptance": a.mean().item()}


def split_prompts(cfg: DictConfig, tokenizer, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(held-out, training) prompt token ids, drawn from the shuffled data.prompts."""
    labels = cfg.specdecpp.labels
    conversations = prompts_from_records(load_sources(cfg.data.prompts, cfg.data.prompts_limit),
                                         max_prompt_tokens=cfg.data.selfdistill.max_prompt_tokens, tokenizer=tokenizer)
    random.Random(seed).shuffle(conversations)
    heldout = conversations[:labels.heldout_prompts]
    training = conversations[labels.heldout_prompts:labels.heldout_prompts + labels.num_prompts]
    if not training:
        raise ConfigError(f"{len(conversations)} usable prompts in {list(cfg.data.prompts)}: none left for training "
                         f"after specdecpp.labels.heldout_prompts={labels.heldout_prompts}. Fix: lower it, or add "
                         "prompts (data.prompts, data.prompts_limit)")
    return [prompt_ids(c, tokenizer) for c in heldout], [prompt_ids(c, tokenizer) for c in training]


def cost_ratio(settings: DictConfig, target, draft, prompt: list[int], run_dir: Path) -> float:
    """The configured draft/target cost ratio, or one measured here and kept in the run (a rerun reuses it, so the
    policy, and the reports that depend on it, stay the same)."""
    if settings.policy.cost_ratio is not None:
        return float(settings.policy.cost_ratio)
    path = run_dir / "cost_ratio.json"
    with main_process_first():  # every rank derives the policy from rank 0's measurement
        if not path.is_file():
            measured = forward_cost_ratio(target.model, draft, torch.tensor([prompt], device=target.device))
            write_json_atomic(path, {"cost_ratio": measured, "device": str(target.device)})
    return json.loads(path.read_text())["cost_ratio"]


def shared_baseline(target, eval_cfg: DictConfig, run_dir: Path) -> dict | None:
    """One autoregressive run of the eval prompts (kept in the run) that every compared configuration divides by, so
    the table's speedups differ only by the drafting."""
    if not (eval_cfg.enabled and eval_cfg.measure_speedup):
        return None
    path = run_dir / "eval_baseline.json"
    if path.is_file():
        return json.loads(path.read_text())
    prompts = load_prompts(prompt_file(eval_cfg.prompts), limit_per_category=eval_cfg.limit_per_category)
    baseline = autoregressive_baseline(target, prompts, temperature=eval_cfg.temperature,
                                       max_new_tokens=eval_cfg.max_new_tokens)
    if is_main_process():
        write_json_atomic(path, baseline)
    return baseline


def summary_markdown(reports: dict[str, dict | None], heldout: dict) -> str:
    """The comparison table, each configuration's mean draft length, and how well the head predicts held-out labels."""
    lengths = "; ".join(f"{name}: {r['overall']['drafted_tokens'] / r['overall']['target_forwards']:.2f}"
                        for name, r in reports.items() if r is not None)
    table = compare_markdown(reports) + (f"\n\nMean draft tokens per target forward: {lengths}." if lengths else "")
    return table + (f"\n\nHeld-out labels ({heldout['positions']} positions): mean predicted acceptance "
                    f"{heldout['mean_predicted_acceptance']:.3f} vs label {heldout['mean_label_acceptance']:.3f}, "
                    f"mean abs error {heldout['mean_abs_error']:.3f}.")


def run(cfg: DictConfig, run_dir: Path) -> Path:
    settings = cfg.specdecpp
    validate(cfg)
    sink, engine, target = start_run(cfg, run_dir)
    tokenizer = target.tokenizer
    draft = instantiate_draft(cfg.draft, target)
    require_shared_vocabulary(draft, target)
    draft = freeze(draft.to(target.device))
    fingerprint = draft_fingerprint(draft)
    if settings.init_head:
        head, _ = load_acceptance_head(settings.init_head, draft)  # refuses a head trained for another draft
    else:
        head = acceptance_head(draft.config.get_text_config().hidden_size, settings.head.num_layers,
                               seed=settings.head.seed)
    head.to(target.device)
    gamma = cfg.eval.gamma
    baseline = shared_baseline(target, cfg.eval, run_dir)
    before = measure_acceptance(target, lm_runtime.drafting(draft, target, DraftingOptions()), cfg.eval,
                                run_dir / "eval_fixed.json", baseline=baseline) if cfg.eval.get("before") else None

    labels = settings.labels
    stop_ids = eos_token_ids(target)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    heldout_prompts, train_prompts = split_prompts(cfg, tokenizer, engine["seed"])
    label_args = dict(identity={"target": target_fingerprint(target), "draft": fingerprint},
                      temperature=labels.temperature, max_new_tokens=labels.max_new_tokens,
                      batch_size=labels.batch_size, seed=labels.seed, stop_ids=stop_ids, pad_token_id=pad_token_id)
    with main_process_first():  # rank 0 labels; the other ranks then read its shards
        examples = build_acceptance_labels(target.model, draft, train_prompts, run_dir / "specdecpp_labels" / "train",
                                           mixing_fraction=labels.mixing_fraction, **label_args)
        heldout = build_acceptance_labels(target.model, draft, heldout_prompts,
                                          run_dir / "specdecpp_labels" / "heldout", mixing_fraction=0.0,
                                          desc="held-out labels", **label_args)

    result = train(model=head, step_fn=head_step(draft, settings.reject_weight), dataset=examples,
                   collate=partial(collate_labels, pad_token_id=pad_token_id), settings=stage_settings(engine),
                   stage_dir=run_dir / "head", sink=sink, resume=cfg.resume, desc="head")
    if result.resumed_from != result.steps:  # the head changed: an earlier report is stale
        (run_dir / "eval_adaptive.json").unlink(missing_ok=True)

    predicted = predict_acceptance(draft, head, heldout, pad_token_id, labels.batch_size)
    policy = stop_policy(predicted, [torch.tensor(e["accept"]) for e in heldout],
                         [torch.tensor(e["draft_prob"]) for e in heldout], max_tokens=gamma,
                         min_tokens=settings.stop.min_tokens, score_first_token=settings.stop.score_first_token,
                         cost_ratio=cost_ratio(settings, target, draft, heldout_prompts[0], run_dir))
    policy["heldout"] = heldout_summary(predicted, heldout)
    threshold = settings.stop.threshold if settings.stop.threshold is not None else policy["stop_threshold"]
    sink.log({"head/heldout_" + k: v for k, v in policy["heldout"].items()}, step=result.steps)

    static_gamma = policy["num_speculative_tokens"]
    recorded = {"threshold": threshold, "min_tokens": settings.stop.min_tokens,
                "score_first_token": settings.stop.score_first_token, "max_draft_tokens": gamma,
                "static_gamma": static_gamma}
    adaptive = specdecpp_runtime.drafting((draft, head), target, DraftingOptions(), **recorded)
    fixed = specdecpp_runtime.drafting((draft, head), target, DraftingOptions(no_head=True), **recorded)
    after = measure_acceptance(target, adaptive, cfg.eval, run_dir / "eval_adaptive.json",
                               extra_settings={"threshold": threshold, "min_tokens": settings.stop.min_tokens,
                                               "score_first_token": settings.stop.score_first_token},
                               baseline=baseline)
    static = measure_acceptance(target, fixed, OmegaConf.merge(cfg.eval, {"gamma": fixed.gamma}),
                                run_dir / "eval_static.json", baseline=baseline)
    reports = {f"draft, fixed γ={gamma}": before, f"draft + head, threshold {threshold}, max {gamma}": after,
               f"static policy, fixed γ={static_gamma}": static}
    table = summary_markdown(reports, policy["heldout"])

    export_dir = run_dir / "export"
    if is_main_process():
        head_info = {"threshold": threshold, "min_tokens": settings.stop.min_tokens,
                     "score_first_token": settings.stop.score_first_token, "max_draft_tokens": gamma,
                     "target": target.name, "draft": OmegaConf.to_container(cfg.draft, resolve=True),
                     "reject_weight": settings.reject_weight, "label_temperature": labels.temperature}
        export_specdecpp(draft, head, tokenizer, export_dir, **export_target_args(target), head_info=head_info,
                         stop_policy=policy,
                         resolved_config_yaml=OmegaConf.to_yaml(cfg, resolve=True), eval_table_md=table)
    return finish_run(run_dir, sink, before, after, table, export_dir, "SpecDec++ draft, acceptance head and policy",
                      title=f"SpecDec++ draft, acceptance head and policy for {target.name}", histories={"head": result.history})
