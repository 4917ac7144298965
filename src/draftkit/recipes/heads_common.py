"""Steps the draft-head recipes (medusa, hydra_heads, clover) share: their acceptance measured twice, with a chain
(top-1 per head) and with a tree, and the train-measure-export sequence."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from draftkit.data.collate import collate
from draftkit.drafts.vocab import draft_index, draft_labels
from draftkit.engine.loop import stage_settings, train
from draftkit.errors import ConfigError
from draftkit.io import write_json_atomic
from draftkit.recipes.common import check_label_source, compare_markdown, measure_acceptance, write_summary
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.tree import check_tree_fits_vocabulary


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


def eval_options(tree_cfg: DictConfig, num_heads: int) -> dict[str, DraftingOptions]:
    """The chain of every head's top-1 and the configured tree, both as deep as there are heads (or tree_cfg.depth)."""
    depth = min(num_heads, tree_cfg.depth or num_heads)
    paths = tree_cfg.get("paths")
    tree = DraftingOptions(tree=tree_cfg.kind, tree_depth=depth, tree_top_k=tree_cfg.top_k, tree_width=tree_cfg.width,
                           tree_budget=tree_cfg.budget, tree_paths=None if paths is None else tuple(map(tuple, paths)))
    return {"chain": DraftingOptions(tree="chain", tree_depth=depth), "tree": tree}


def check_heads_settings(name: str, settings: DictConfig, num_heads: int) -> None:
    """Before any model is loaded: the label source, and the trees the heads are measured with (including that each
    fits a draft vocabulary: `<name>.draft_vocab_size`)."""
    check_label_source(f"{name}.labels", settings.labels)
    size = settings.get("draft_vocab_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"{name}.draft_vocab_size={size!r}: must be a number of tokens >= 1. Fix: e.g. "
                          f"{name}.draft_vocab_size=8192, or null for the target's whole vocabulary")
    try:
        for options in eval_options(settings.tree, num_heads).values():
            shape = options.shape(num_heads, "static")
            if size is not None:
                check_tree_fits_vocabulary(shape, size)
    except ValueError as error:
        fix = "" if "Fix:" in str(error) else f". Fix: check {name}.tree (kind, depth, top_k, width, budget)"
        raise ConfigError(f"{name}.tree: {str(error).replace('<recipe>', name)}{fix}") from None


def measure_heads(target, make_drafter: Callable[[DraftingOptions], Drafting], module, cfg: DictConfig,
                  tree_cfg: DictConfig, num_heads: int, run_dir: Path, tag: str) -> dict[str, dict | None]:
    """Chain and tree acceptance of the heads in `module` (put in eval mode while measuring), with the drafter the
    family's runtime builds for each (`make_drafter`); reports are cached in run_dir/eval_{tag}_{chain|tree}.json for
    the same settings."""
    was_training = module.training
    module.eval()
    reports = {}
    for name, options in eval_options(tree_cfg, num_heads).items():
        drafting = make_drafter(options)
        settings = {"tree": OmegaConf.to_container(tree_cfg, resolve=True), "decoding": name,
                    "shape": repr(drafting.drafter.shape)}
        reports[name] = measure_acceptance(target, drafting, cfg.eval, run_dir / f"eval_{tag}_{name}.json",
                                           extra_settings=settings)
    module.train(was_training)
    return reports


def measure_after_training(result, measure: Callable[[str], dict], before: dict, run_dir: Path) -> tuple[dict, str]:
    """Measure the trained heads (a report from before a resumed run trained further is stale); returns the reports
    and the before/after table."""
    if result.resumed_from != result.steps:
        for stale in Path(run_dir).glob("eval_after_*.json"):
            stale.unlink()
    after = measure("after")
    return after, heads_table(before, after)


def heads_table(before: dict[str, dict | None], after: dict[str, dict | None]) -> str:
    return compare_markdown({f"{when}, {name}": report for when, reports in (("before", before), ("after", after))
                             for name, report in reports.items()})


def train_measure_export(cfg: DictConfig, run_dir: Path, *, family: str, module, module_cfg: DictConfig, step,
                         chats, make_drafter: Callable[[DraftingOptions], Drafting], write_export: Callable,
                         tree_cfg: DictConfig, target, sink, engine: dict, export_dtype: str) -> Path:
    """The rest of a frozen-target heads recipe: measure (before), train, measure (after), export in draftkit's heads
    format, record result.json."""
    measure = partial(measure_heads, target, make_drafter, module, cfg, tree_cfg, module.num_heads, run_dir)
    before = measure("before") if cfg.eval.get("before") else {}
    result = train(model=module, step_fn=step, dataset=chats,
                   collate=partial(collate, pad_token_id=target.tokenizer.pad_token_id),
                   settings=stage_settings(engine), stage_dir=run_dir / "train", sink=sink, resume=cfg.resume,
                   desc=family, frozen=[target.model])
    after, table = measure_after_training(result, measure, before, run_dir)
    export = write_export(module, run_dir / "export", architecture=architecture(module_cfg), target_name=target.name,
                          hidden_size=target.hidden_size, vocab_size=target.vocab_size, dtype=export_dtype,
                          extra_info={"recipe": family}, eval_table_md=table, target_reference=target.reference())
    write_summary(run_dir, title=f"{family} draft heads for {target.name}", table=table,
                  histories={family: result.history}, exports={"export": export},
                  reports=[*before.values(), *after.values()])
    sink.summary({f"tau_after_{name}": r["overall"]["tau"] for name, r in after.items() if r})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": str(export), "before": before, "after": after})
    print(f"\n{table}\n\n{family} exported to {export}; summary in {run_dir / 'summary.md'}")
    return export
