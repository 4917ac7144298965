"""Steps several recipes share: training chats (self-distilled or from the data), measuring a draft's acceptance,
and tabulating before/after results."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from draftkit.data.chat import tokenize_chat
from draftkit.data.draft_vocab import label_counts
from draftkit.data.feature_cache import (
    FeatureCache,
    FeatureExamples,
    build_feature_cache,
    collate_with_features,
    expected_manifest,
)
from draftkit.data.selfdistill import answered_prompts, evaluation_questions, without_evaluation_questions
from draftkit.data.sources import load_records, prompt_file
from draftkit.drafts.vocab import coverage, select_tokens
from draftkit.engine.distributed import as_settings, frozen_dtype, is_main_process, main_process_first
from draftkit.engine.loop import stage_settings, train
from draftkit.engine.run import record_run
from draftkit.errors import ConfigError
from draftkit.export.card import card_commands
from draftkit.io import write_json_atomic, write_text_atomic
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.evaluate import evaluate_draft, interval_cell, interval_label, interval_note, load_prompts
from draftkit.runtime.tree import TREE_KINDS, check_tree_fits_vocabulary, tree_shape


def start_run(cfg: DictConfig, run_dir: Path):
    """Record how the run was made; return (metric sink, engine settings as a dict, loaded target)."""
    record_run(run_dir, cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    sink = instantiate(cfg.logger, _recursive_=False, run_dir=str(run_dir), run_config=config, run_name=run_dir.name)
    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    return sink, engine, instantiate(cfg.target)


def export_target_args(target) -> dict:
    """What an exporter of a standalone draft LM records of the target: its name, its padded vocabulary, how a model
    card names it (a loadable id or path, and the exact checkpoint trained against) and its context length."""
    return {"target_name": target.name, "target_vocab_size": target.vocab_size, "target_reference": target.reference(),
            "target_context_length": getattr(target.config.get_text_config(), "max_position_embeddings", None)}


def frozen_weight(weight, engine: dict):
    """A target weight the draft reads directly (a shared LM head, an embedding table), for use during and after
    training. ZeRO-3 swaps the target's parameters for empty placeholders once training starts (they are gathered
    only inside the target's own forward), so under ZeRO-3 the draft gets a private frozen copy taken now, in the
    dtype the frozen target will run in."""
    dist = as_settings(engine.get("distributed"))
    if dist.backend != "deepspeed" or dist.zero_stage != 3:
        return weight
    return weight.detach().to(dtype=frozen_dtype(dist, engine.get("precision", "fp32")) or weight.dtype, copy=True)


def draft_token_map(chats, size: int | None, target, run_dir: Path):
    """The draft vocabulary (drafts/vocab.py) for `size` tokens: the most frequent labels of the training chats plus
    the end-of-turn ids, as an int64 tensor on the target's device; None when size is None (the full vocabulary).
    Cached in run_dir/draft_vocab.json (the ids, their label coverage, the size) so a resumed run keeps the same set."""
    if size is None:
        return None
    path = Path(run_dir) / "draft_vocab.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("size") == size and cached.get("target_vocab_size") == target.vocab_size:
            return torch.tensor(cached["token_map"], dtype=torch.long, device=target.device)
    counts = label_counts(chats, target.vocab_size)
    eos = target.tokenizer.eos_token_id
    always = [eos] if isinstance(eos, int) else list(eos or [])
    token_map = select_tokens(counts, size, always=always)
    share = coverage(counts, token_map)
    if is_main_process():
        write_json_atomic(path, {"size": size, "target_vocab_size": target.vocab_size, "label_coverage": share,
                                 "labels_counted": int(counts.sum()), "token_map": token_map.tolist()})
    print(f"[draftkit] draft vocabulary: {size} of {target.vocab_size} tokens, covering {share:.1%} of the "
          f"{int(counts.sum())} training labels")
    return token_map.to(target.device)


def rope_theta(text_config) -> float:
    """The RoPE base of a transformers text config, wherever its version keeps it."""
    params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    return float(params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))


def check_draft_vocab_size(size: int | None, target, key: str) -> None:
    """Before the (slow) self-distillation: a draft vocabulary must fit in the target's."""
    if size is not None and size > target.vocab_size:
        raise ConfigError(f"{key}={size} is larger than the target's vocabulary of "
                          f"{target.vocab_size} tokens. Fix: choose at most {target.vocab_size}, or null for the whole "
                          "vocabulary")


FEATURE_STAGES = ("features", "train")


def check_feature_recipe(settings, name: str) -> list[str]:
    """The settings the feature-drafter recipes (`name`: fspad, eagle3) share, refused with the fix before any work:
    stages, labels, feature source and storage, the draft vocabulary size and the tree. Returns the stages."""
    stages = list(settings.stages)
    if not stages or any(s not in FEATURE_STAGES for s in stages):
        raise ConfigError(f"{name}.stages={stages} names no known stage. Fix: choose from {list(FEATURE_STAGES)}")
    check_label_source(f"{name}.labels", settings.labels)
    if settings.features.source not in ("online", "offline"):
        raise ConfigError(f"{name}.features.source={settings.features.source!r}. Fix: choose online or offline")
    if settings.tree.kind not in ("none", *TREE_KINDS):
        raise ConfigError(f"{name}.tree.kind={settings.tree.kind!r}. Fix: choose none, {', '.join(TREE_KINDS)}")
    if settings.features.storage not in ("fp32", "bf16", "int8"):
        raise ConfigError(f"{name}.features.storage={settings.features.storage!r}. Fix: choose fp32, bf16 or int8")
    size = settings.draft_vocab_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"{name}.draft_vocab_size={size!r}: must be a number of tokens >= 1. Fix: e.g. "
                          f"{name}.draft_vocab_size=8192, or null for the target's whole vocabulary")
    if settings.tree.kind != "none":
        try:
            shape = tree_shape(settings.tree.kind, settings.tree.depth, top_k=settings.tree.top_k,
                               width=settings.tree.width, budget=settings.tree.budget)
            if size is not None:
                check_tree_fits_vocabulary(shape, size)
        except ValueError as error:
            fix = "" if "Fix:" in str(error) else f". Fix: check {name}.tree (kind, depth, top_k, width, budget)"
            raise ConfigError(f"{name}.tree: {str(error).replace('<recipe>', name)}{fix}") from None
    return stages


def feature_training_data(target, chats, settings, stages: list[str], run_dir: Path, **cache_settings):
    """The `features` stage (an offline cache, built or resumed) and then what `train` reads: the chats (online) or
    the chats with their cached features, the cache refused unless it was made for exactly this target, feature and
    dataset. None when the run only builds the cache. cache_settings: norm, aux_layers (feature_cache)."""
    offline = settings.features.source == "offline"
    cache_dir = Path(settings.features.cache) if settings.features.cache else run_dir / "feature_cache"
    cache_settings = dict(storage=settings.features.storage, shard_size=settings.features.shard_size, **cache_settings)
    if "features" in stages and offline:
        build_feature_cache(target, chats, cache_dir, batch_size=settings.features.batch_size,
                            pad_token_id=target.tokenizer.pad_token_id, **cache_settings)
    if "train" not in stages:
        print(f"Feature cache ready at {cache_dir}")
        return None
    if not offline:
        return chats
    cache = FeatureCache(cache_dir)
    cache.check(expected_manifest(target, chats, **cache_settings))  # refused before any training starts
    return FeatureExamples(chats, cache)


def tree_options(tree_cfg) -> DraftingOptions:
    """A recipe's `tree` settings (kind, depth, top_k, width, budget) as the runtime's drafting options."""
    return DraftingOptions(tree=tree_cfg.kind, tree_depth=tree_cfg.depth, tree_top_k=tree_cfg.top_k,
                           tree_width=tree_cfg.width, tree_budget=tree_cfg.budget)


def train_and_measure(cfg: DictConfig, run_dir: Path, *, sink, engine: dict, target, draft, step_fn, dataset,
                      chain: Drafting, tree: Drafting | None, stage_engine: dict, tree_label: str):
    """A feature drafter's run between its data and its export: acceptance before training (eval.before), the
    resumable training stage, acceptance after (chain, and tree unless None; reports made before a resumed stage
    changed the draft are dropped). Returns (before, after, after_tree, table, the stage's loss history)."""
    before = (measure_acceptance(target, chain, cfg.eval, run_dir / "eval_before.json")
              if cfg.eval.get("before") else None)
    torch.manual_seed(cfg.engine.seed)  # the step's own randomness, whatever ran before (resume restores the state)
    result = train(model=draft, step_fn=step_fn, dataset=dataset,
                   collate=partial(collate_with_features, pad_token_id=target.tokenizer.pad_token_id),
                   settings=stage_settings(engine, **stage_engine), stage_dir=run_dir / "train", sink=sink,
                   resume=cfg.resume, desc="train")
    if result.resumed_from != result.steps:  # the draft changed: earlier reports are stale
        (run_dir / "eval_after.json").unlink(missing_ok=True)
        (run_dir / "eval_after_tree.json").unlink(missing_ok=True)
    after = measure_acceptance(target, chain, cfg.eval, run_dir / "eval_after.json")
    after_tree = measure_acceptance(target, tree, cfg.eval, run_dir / "eval_after_tree.json") if tree else None
    table = compare_markdown({"before training": before, "after training (chain)": after,
                              f"after training ({tree_label})": after_tree})
    return before, after, after_tree, table, result.history


def finish_feature_run(run_dir: Path, sink, exports: dict, before, after, after_tree, table: str, history: list[dict],
                       *, title: str, **details) -> Path:
    """summary.md, the run's summary metrics, result.json (the exports, `details`, the reports) and the console
    table."""
    write_summary(run_dir, title=title, table=table, histories={"train": history},
                  exports={("draftkit format" if fmt == "draftkit" else fmt): folder for fmt, folder in exports.items()},
                  reports=[before, after, after_tree])
    if after is not None:
        sink.summary({"tau_before": before["overall"]["tau"] if before else None, "tau_after": after["overall"]["tau"]})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"exports": {k: str(v) for k, v in exports.items()}, **details,
                                                 "before": before, "after": after, "after_tree": after_tree})
    print(f"\n{table}\n\nDraft exported to {exports['draftkit']}")
    return exports["draftkit"]


def require_shared_vocabulary(draft, target) -> None:
    """A standalone draft LM must predict the target's padded vocabulary, id for id."""
    rows = draft.get_output_embeddings().weight.shape[0]
    if rows != target.vocab_size:
        raise ConfigError(
            f"the draft predicts {rows} token ids but the target {target.name} has vocab_size={target.vocab_size}; "
            "the draft's tokens are checked against the target's id by id, so the draft must use the target's (padded) "
            "vocabulary. Fix: start from draft=from_target, a FastDraft export for this target, or a draft whose "
            "config.vocab_size equals the target's")


def load_sources(sources, limit) -> Dataset:
    parts = [load_records(src, limit=limit) for src in sources]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def self_distilled_conversations(data_cfg: DictConfig, target, run_dir: Path, seed: int) -> list[list[dict]]:
    """`data.prompts` answered by the target (cached in run_dir/selfdistill.jsonl): the chats, untokenized."""
    gen = data_cfg.selfdistill
    with main_process_first():  # rank 0 generates; the other ranks then read its cache
        return answered_prompts(
            load_sources(data_cfg.prompts, data_cfg.prompts_limit), target.model, target.tokenizer,
            num_prompts=gen.num_prompts, max_prompt_tokens=gen.max_prompt_tokens,
            cache_file=Path(run_dir) / "selfdistill.jsonl", max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature, top_p=gen.top_p, batch_size=gen.batch_size, seed=seed,
            heldout=evaluation_questions(data_cfg.get("eval_prompts")))


def self_distilled_chats(data_cfg: DictConfig, target, run_dir: Path, seed: int) -> Dataset:
    """`data.prompts` answered by the target (cached in run_dir/selfdistill.jsonl), tokenized for training: the
    loss falls on the target's own replies."""
    conversations = self_distilled_conversations(data_cfg, target, run_dir, seed)
    return tokenize_chat(Dataset.from_list([{"messages": c} for c in conversations]), target.tokenizer,
                         max_length=data_cfg.max_length, too_long=data_cfg.too_long)


def dataset_chats(data_cfg: DictConfig, tokenizer) -> Dataset:
    """`data.prompts` records with the replies they carry (no regeneration), tokenized for training."""
    records = without_evaluation_questions(load_sources(data_cfg.prompts, data_cfg.prompts_limit),
                                           evaluation_questions(data_cfg.get("eval_prompts")))
    return tokenize_chat(records, tokenizer, max_length=data_cfg.max_length, too_long=data_cfg.too_long)


LABEL_SOURCES = ("selfdistill", "data")


def check_label_source(setting: str, labels: str) -> None:
    """`<recipe>.labels` (the name of the setting): where a recipe's training replies come from."""
    if labels not in LABEL_SOURCES:
        raise ConfigError(f"{setting}={labels!r} is not a label source. Fix: choose 'selfdistill' (the target "
                          "answers the prompts) or 'data' (the replies the data carries)")


def training_chats(cfg: DictConfig, target, run_dir: Path, labels: str, seed: int):
    """Self-distilled replies (the target answers data.prompts) or the replies the data carries."""
    check_label_source("labels", labels)
    if labels == "selfdistill":
        return self_distilled_chats(cfg.data, target, run_dir, seed)
    return dataset_chats(cfg.data, target.tokenizer)


def measure_acceptance(target, drafting: Drafting, eval_cfg: DictConfig, path: Path,
                       extra_settings: dict | None = None, acceptance: str = "greedy", **evaluate_args) -> dict | None:
    """Evaluate the drafting a family's runtime built (`draftkit.runtime.<family>.drafting`, the same function
    `draftkit.eval` uses; `evaluate_args` go to evaluate_draft) on the eval prompts; a report already at `path` for the
    same settings (eval_cfg plus extra_settings) is reused, so a resumed run does not measure the untrained draft
    again."""
    if not eval_cfg.enabled:
        return None
    settings = {**OmegaConf.to_container(eval_cfg, resolve=True), **(extra_settings or {})}
    path = Path(path)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("eval_settings") == settings:
            return cached
    prompts = load_prompts(prompt_file(eval_cfg.prompts), limit_per_category=eval_cfg.limit_per_category)
    draft = drafting.drafter
    was_training = getattr(draft, "training", None)  # drafter objects leave train/eval mode to their owner
    if was_training is not None:
        draft.eval()
    report = evaluate_draft(target, draft, prompts, gamma=eval_cfg.gamma, temperature=eval_cfg.temperature,
                            acceptance=acceptance, max_new_tokens=eval_cfg.max_new_tokens,
                            measure_speedup=eval_cfg.measure_speedup, **drafting.evaluate_args(), **evaluate_args)
    if was_training is not None:
        draft.train(was_training)
    # The module's own name would be wrong here: a draft cut from the target carries the target's path as its name.
    report["config"]["draft"] = f"the draft of run {path.parent} ({path.stem})"
    report["eval_settings"] = settings
    if is_main_process():  # every rank measures (a ZeRO-3 target needs them all); one writes
        write_json_atomic(path, report)
    return report


def compare_markdown(reports: dict[str, dict | None]) -> str:
    """One row per named report: its prompt count, overall tau with its bootstrap interval, alpha by position, tokens/s
    and speedup over autoregressive. Two rows differ meaningfully only where their intervals say so."""
    measured = {name: r for name, r in reports.items() if r is not None}
    if not measured:
        return "(acceptance not measured: eval.enabled=false)"
    gamma = max(r["config"]["gamma"] for r in measured.values())
    any_report = next(iter(measured.values()))
    config = any_report["config"]
    header = (["", "prompts", "τ", f"τ {interval_label(config)}"] + [f"α@{i}" for i in range(1, gamma + 1)]
              + ["tok/s", "AR tok/s", "speedup"])
    lines = [
        f"Target {config['target']}, γ={gamma}, temperature={config['temperature']}, "
        f"max_new_tokens={config['max_new_tokens']}, device={config['device']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]

    def cell(value, digits=2, suffix=""):
        return "–" if value is None else f"{value:.{digits}f}{suffix}"

    for name, report in measured.items():
        o = report["overall"]
        alphas = list(o["alpha"]) + [None] * (gamma - len(o["alpha"]))
        row = [name, str(o["prompts"]), cell(o["tau"]), interval_cell(o.get("tau_ci"))] + [cell(a) for a in alphas]
        row += [cell(o["tokens_per_s"], 1), cell(o.get("ar_tokens_per_s"), 1), cell(o.get("speedup"), suffix="x")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", interval_note(config)]
    return "\n".join(lines)


TREND_METRICS = ("alpha_hat", "top1", "alpha_hat_head0", "top1_head0")
TREND_POINTS = 6
CPU_SPEEDUP_NOTE = (
    "A speedup below 1x is expected here. Speculative decoding wins when a target forward is expensive and "
    "memory-bound (a large model on a GPU), so that checking γ + 1 tokens costs about as much as producing one. On a "
    "CPU, and with a target as small as SmolLM2-135M, a forward's cost grows with the tokens it checks and a draft "
    "forward costs a large share of a target forward, so τ has to be far above 1 before decoding gets faster. Judge "
    "a draft here by τ and α; `python -m draftkit.eval --profile` predicts the speedup from the step costs.")


def loss_trend(history: list[dict], points: int = TREND_POINTS) -> list[str]:
    """A Markdown table of the loss (and the acceptance estimate, when the objective reports one) at a few evenly
    spaced logged steps, first and last included."""
    if not history:
        return ["(no steps logged)"]
    picks = sorted({round(i * (len(history) - 1) / max(points - 1, 1)) for i in range(points)})
    extra = [m for m in TREND_METRICS if m in history[-1]][:1]
    lines = ["| step | loss |" + "".join(f" {m} |" for m in extra), "|---:|---:|" + "---:|" * len(extra)]
    for i in picks:
        record = history[i]
        lines.append(f"| {record['step']} | {record['loss']:.4f} |" + "".join(f" {record[m]:.3f} |" for m in extra))
    return lines


def write_summary(run_dir: Path, *, title: str, table: str, histories: dict[str, list[dict]],
                  exports: dict[str, Path], reports: list[dict | None]) -> str:
    """summary.md: what the run trained, how its loss and acceptance moved, where the draft went and the one-line
    commands that use it (those of the export's own model card)."""
    lines = [f"# {title}", "", f"Run directory: `{run_dir}`", "", "## Training loss", ""]
    for stage, history in histories.items():
        if len(histories) > 1:
            lines += [f"Stage `{stage}`:", ""]
        lines += [*loss_trend(history), ""]
    lines += ["## Acceptance before and after training", "", table, ""]
    speedups = [r["overall"].get("speedup") for r in reports if r]
    if any(s is not None and s < 1 for s in speedups):
        lines += [CPU_SPEEDUP_NOTE, ""]
    lines += ["## The draft", ""]
    for label, folder in exports.items():
        lines += [f"- {label}: `{folder}`"]
        lines += [f"  - `{command}`" for command in card_commands(folder)]
    text = "\n".join(lines) + "\n"
    if is_main_process():
        write_text_atomic(Path(run_dir) / "summary.md", text)
    return text


def finish_run(run_dir: Path, sink, before: dict | None, after: dict | None, table: str, export_dir: Path,
               what: str, *, title: str, histories: dict[str, list[dict]]) -> Path:
    """The end of a train-and-measure recipe: summary.md, the run's summary metrics, result.json, the console table."""
    write_summary(run_dir, title=title, table=table, histories=histories, exports={"export": export_dir},
                  reports=[before, after])
    if after is not None:
        sink.summary({"tau_before": before["overall"]["tau"] if before else None, "tau_after": after["overall"]["tau"]})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": str(export_dir), "before": before, "after": after})
    print(f"\n{table}\n\n{what} exported to {export_dir}; summary in {run_dir / 'summary.md'}")
    return export_dir
