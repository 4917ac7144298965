"""FastDraft: pretrain a small LM with the target's vocabulary, then fine-tune it on the target's answers.

Stage 1 (pretrain): next-token CE on packed plain text + code. Stage 2 (finetune): next-token CE on
conversations whose assistant turns the target itself generated, loss on those turns only. Either stage can
run alone (`fastdraft.stages=[...]`). The draft's acceptance is measured before and after training.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from draftkit.config import instantiate_draft
from draftkit.data.collate import collate
from draftkit.data.packing import pack_texts
from draftkit.data.sources import check_source_list
from draftkit.engine.loop import stage_settings, train
from draftkit.errors import ConfigError
from draftkit.export.lm import export_hf_draft
from draftkit.objectives.ce import next_token_ce
from draftkit.recipes.common import (
    compare_markdown,
    export_target_args,
    finish_run,
    load_sources,
    measure_acceptance,
    self_distilled_chats,
    start_run,
)
from draftkit.runtime import lm as lm_runtime
from draftkit.runtime.drafting import DraftingOptions

STAGES = ("pretrain", "finetune")


def lm_step(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return next_token_ce(logits, batch["labels"])


def validate(cfg: DictConfig) -> None:
    stages = list(cfg.fastdraft.stages)
    if not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"fastdraft.stages={stages} names no known stage. Fix: choose from {list(STAGES)}")
    if "pretrain" in stages:
        pretrain = cfg.data.pretrain
        check_source_list("data.pretrain", OmegaConf.to_container(pretrain, resolve=True)
                          if isinstance(pretrain, ListConfig) else pretrain)


def run(cfg: DictConfig, run_dir: Path) -> Path:
    validate(cfg)
    stages = list(cfg.fastdraft.stages)
    sink, engine, target = start_run(cfg, run_dir)
    tokenizer = target.tokenizer
    draft = instantiate_draft(cfg.draft, target)
    draft.to(target.device)
    batch_collate = partial(collate, pad_token_id=tokenizer.pad_token_id)

    drafting = lm_runtime.drafting(draft, target, DraftingOptions())
    before = (measure_acceptance(target, drafting, cfg.eval, run_dir / "eval_before.json")
              if cfg.eval.get("before") else None)

    results = {}
    if "pretrain" in stages:
        texts = load_sources(cfg.data.pretrain, cfg.data.pretrain_limit)
        blocks = pack_texts(texts, tokenizer, seq_len=cfg.fastdraft.pretrain.seq_len)
        results["pretrain"] = train(model=draft, step_fn=lm_step, dataset=blocks, collate=batch_collate,
                                    settings=stage_settings(engine, "fastdraft.pretrain.engine",
                                                            **cfg.fastdraft.pretrain.engine),
                                    stage_dir=run_dir / "pretrain", sink=sink, resume=cfg.resume, desc="pretrain")

    if "finetune" in stages:
        chats = self_distilled_chats(cfg.data, target, run_dir, engine["seed"])
        results["finetune"] = train(model=draft, step_fn=lm_step, dataset=chats, collate=batch_collate,
                                    settings=stage_settings(engine, "fastdraft.finetune.engine",
                                                            **cfg.fastdraft.finetune.engine),
                                    stage_dir=run_dir / "finetune", sink=sink, resume=cfg.resume, desc="finetune")

    if any(r.resumed_from != r.steps for r in results.values()):  # the draft changed: an earlier report is stale
        (run_dir / "eval_after.json").unlink(missing_ok=True)
    after = measure_acceptance(target, drafting, cfg.eval, run_dir / "eval_after.json")
    table = compare_markdown({"before training": before, "after training": after})
    export_dir = export_hf_draft(
        draft, tokenizer, run_dir / "export", **export_target_args(target), recipe="fastdraft",
        num_assistant_tokens=cfg.fastdraft.export.num_assistant_tokens,
        resolved_config_yaml=OmegaConf.to_yaml(cfg, resolve=True), eval_table_md=table)
    return finish_run(run_dir, sink, before, after, table, export_dir, "Draft",
                      title=f"FastDraft draft for {target.name}", histories={stage: r.history for stage, r in results.items()})
