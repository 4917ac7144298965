"""Steps the draft-head recipes (medusa, hydra_heads, clover) share: their training chats and their acceptance
measured twice, with a chain (top-1 per head) and with a tree."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from draftkit.data.collate import collate
from draftkit.drafts.vocab import draft_index, draft_labels, draft_rows
from draftkit.engine.checkpoint import write_json_atomic, write_text_atomic
from draftkit.engine.loop import stage_settings, train
from draftkit.errors import ConfigError
from draftkit.export.heads_dir import export_heads_dir
from draftkit.recipes.common import (
    compare_markdown,
    dataset_chats,
    frozen_weight,
    measure_acceptance,
    self_distilled_chats,
    start_run,
)
from draftkit.runtime.tree import TreeDrafter, TreeShape, check_tree_fits_vocabulary, tree_shape

LABEL_SOURCES = ("selfdistill", "data")


def training_chats(cfg: DictConfig, target, run_dir: Path, labels: str, seed: int):
    """Self-distilled replies (the target answers data.prompts) or the replies the data carries."""
    if labels not in LABEL_SOURCES:
        raise ConfigError(f"labels={labels!r} is not a label source. Fix: choose 'selfdistill' (the target answers the "
                          "prompts) or 'data'")
    if labels == "selfdistill":
        return self_distilled_chats(cfg.data, target, run_dir, seed)
    return dataset_chats(cfg.data, target.tokenizer)


def scoring_lm_head(target, token_map, engine: dict):
    """The frozen LM head the heads score with: the target's own (recipes.common.frozen_weight), or a private copy of
    its token_map rows for a draft vocabulary (a copy, so it also outlives ZeRO-3's swap of the target's weights)."""
    return draft_rows(frozen_weight(target.lm_head.weight, engine), token_map)


def label_mapper(token_map, vocab_size: int) -> Callable:
    """labels -> the draft-id labels the restricted heads are scored against (drafts.vocab.draft_labels; tokens outside
    the draft vocabulary are not scored); the identity for the full vocabulary. The index is built once."""
    if token_map is None:
        return lambda labels: labels
    index = draft_index(token_map, vocab_size)
    return lambda labels: draft_labels(labels, index.to(labels.device))


def teacher_columns(logits, token_map):
    """The target's logits over the draft vocabulary only, so a soft target is renormalised over the tokens the
    heads can score."""
    return logits if token_map is None or logits is None else logits.index_select(-1, token_map.to(logits.device))


def architecture(module_cfg: DictConfig) -> dict:
    """The builder's arguments an export records (the config node without `_target_`; target pieces come at load)."""
    return {k: v for k, v in OmegaConf.to_container(module_cfg, resolve=True).items() if not k.startswith("_")}


def eval_shapes(tree_cfg: DictConfig, num_heads: int) -> dict[str, TreeShape]:
    """The chain of every head's top-1 and the configured tree, both as deep as there are heads (or tree_cfg.depth)."""
    depth = min(num_heads, tree_cfg.depth or num_heads)
    shape = tree_shape(tree_cfg.kind, depth, top_k=tree_cfg.top_k, width=tree_cfg.width, budget=tree_cfg.budget,
                       paths=tree_cfg.get("paths"))
    return {"chain": tree_shape("chain", depth), "tree": shape}


def check_heads_settings(name: str, settings: DictConfig, num_heads: int) -> None:
    """Before any model is loaded: the label source, and the trees the heads are measured with (including that each
    fits a draft vocabulary: `<name>.draft_vocab_size`)."""
    if settings.labels not in LABEL_SOURCES:
        raise ConfigError(f"{name}.labels={settings.labels!r} is not a label source. Fix: choose 'selfdistill' (the "
                          "target answers the prompts) or 'data'")
    size = settings.get("draft_vocab_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"{name}.draft_vocab_size={size!r}: must be a number of tokens >= 1. Fix: e.g. "
                          f"{name}.draft_vocab_size=8192, or null for the target's whole vocabulary")
    try:
        for shape in eval_shapes(settings.tree, num_heads).values():
            if size is not None:
                check_tree_fits_vocabulary(shape, size)
    except ValueError as error:
        fix = "" if "Fix:" in str(error) else f". Fix: check {name}.tree (kind, depth, top_k, width, budget)"
        raise ConfigError(f"{name}.tree: {str(error).replace('<recipe>', name)}{fix}") from None


def measure_heads(target, make_drafter: Callable[[TreeShape], TreeDrafter], module, cfg: DictConfig,
                  tree_cfg: DictConfig, num_heads: int, run_dir: Path, tag: str) -> dict[str, dict | None]:
    """Chain and tree acceptance of the heads in `module` (put in eval mode while measuring); reports are cached in
    run_dir/eval_{tag}_{chain|tree}.json for the same settings."""
    was_training = module.training
    module.eval()
    reports = {}
    for name, shape in eval_shapes(tree_cfg, num_heads).items():
        settings = {"tree": OmegaConf.to_container(tree_cfg, resolve=True), "decoding": name, "shape": repr(shape)}
        reports[name] = measure_acceptance(target, make_drafter(shape), cfg.eval, run_dir / f"eval_{tag}_{name}.json",
                                           extra_settings=settings)
    module.train(was_training)
    return reports


def measure_after_training(result, measure: Callable[[str], dict], before: dict, run_dir: Path) -> tuple[dict, str]:
    """Measure the trained heads (a report from before a resumed run trained further is stale) and write summary.md."""
    if result.resumed_from != result.steps:
        for stale in Path(run_dir).glob("eval_after_*.json"):
            stale.unlink()
    after = measure("after")
    table = heads_table(before, after)
    write_text_atomic(Path(run_dir) / "summary.md", table + "\n")
    return after, table


def heads_table(before: dict[str, dict | None], after: dict[str, dict | None]) -> str:
    return compare_markdown({f"{when}, {name}": report for when, reports in (("before", before), ("after", after))
                             for name, report in reports.items()})


def train_measure_export(cfg: DictConfig, run_dir: Path, *, family: str, module, module_cfg: DictConfig, step,
                         chats, make_drafter: Callable[[TreeShape], TreeDrafter], tree_cfg: DictConfig, target, sink,
                         engine: dict, export_dtype: str) -> Path:
    """The rest of a frozen-target heads recipe: measure (before), train, measure (after), export in draftkit's heads
    format, record result.json."""
    measure = partial(measure_heads, target, make_drafter, module, cfg, tree_cfg, module.num_heads, run_dir)
    before = measure("before") if cfg.eval.get("before") else {}
    result = train(model=module, step_fn=step, dataset=chats,
                   collate=partial(collate, pad_token_id=target.tokenizer.pad_token_id),
                   settings=stage_settings(engine), stage_dir=run_dir / "train", sink=sink, resume=cfg.resume,
                   desc=family, frozen=[target.model])
    after, table = measure_after_training(result, measure, before, run_dir)
    export = export_heads_dir(module, run_dir / "export", family=family, architecture=architecture(module_cfg),
                              target_name=target.name, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                              dtype=export_dtype, extra_info={"recipe": family})
    sink.summary({f"tau_after_{name}": r["overall"]["tau"] for name, r in after.items() if r})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": str(export), "before": before, "after": after})
    print(f"\n{table}\n\n{family} exported to {export}")
    return export
