"""FastDraft: pretrain a small LM with the target's vocabulary, then fine-tune it on the target's answers.

Stage 1 (pretrain): next-token CE on packed plain text + code. Stage 2 (finetune): next-token CE on
conversations whose assistant turns the target itself generated, loss on those turns only. Either stage can
run alone (`fastdraft.stages=[...]`). The draft's acceptance is measured before and after training.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

from datasets import Dataset, concatenate_datasets
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from draftkit.data.chat import tokenize_chat
from draftkit.data.collate import collate
from draftkit.data.packing import pack_texts
from draftkit.data.selfdistill import prompts_from_records, regenerate_responses
from draftkit.data.sources import load_records
from draftkit.engine.checkpoint import write_json_atomic, write_text_atomic
from draftkit.engine.distributed import main_process_first
from draftkit.engine.loop import stage_settings, train
from draftkit.engine.run import record_run
from draftkit.export.hf_dir import export_hf_draft
from draftkit.objectives.ce import next_token_ce
from draftkit.recipes.common import compare_markdown, measure_acceptance

STAGES = ("pretrain", "finetune")


def lm_step(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return next_token_ce(logits, batch["labels"])


def _records(sources, limit):
    parts = [load_records(src, limit=limit) for src in sources]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def run(cfg: DictConfig, run_dir: Path) -> Path:
    stages = list(cfg.fastdraft.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"fastdraft.stages={stages}: choose from {list(STAGES)}")
    record_run(run_dir, cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    sink = instantiate(cfg.logger, _recursive_=False, run_dir=str(run_dir), run_config=config, run_name=run_dir.name)
    engine = OmegaConf.to_container(cfg.engine, resolve=True)

    target = instantiate(cfg.target)
    tokenizer = target.tokenizer
    draft = instantiate(cfg.draft, vocab_size=target.vocab_size, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        target_embedding=target.embed_tokens.weight)
    draft.to(target.device)
    batch_collate = partial(collate, pad_token_id=tokenizer.pad_token_id)

    before = measure_acceptance(target, draft, cfg.eval, run_dir / "eval_before.json") if cfg.eval.get("before") else None

    results = []
    if "pretrain" in stages:
        texts = _records(cfg.data.pretrain, cfg.data.pretrain_limit)
        blocks = pack_texts(texts, tokenizer, seq_len=cfg.fastdraft.pretrain.seq_len)
        results.append(train(model=draft, step_fn=lm_step, dataset=blocks, collate=batch_collate,
              settings=stage_settings(engine, **cfg.fastdraft.pretrain.engine),
              stage_dir=run_dir / "pretrain", sink=sink, resume=cfg.resume, desc="pretrain"))

    if "finetune" in stages:
        gen = cfg.data.selfdistill
        prompts = prompts_from_records(_records(cfg.data.prompts, cfg.data.prompts_limit),
                                       max_prompt_tokens=gen.max_prompt_tokens, tokenizer=tokenizer)
        random.Random(engine["seed"]).shuffle(prompts)  # mix the sources before taking num_prompts
        prompts = prompts[: gen.num_prompts]
        with main_process_first():  # rank 0 generates; the other ranks then read its cache
            conversations = regenerate_responses(
                target.model, tokenizer, prompts, cache_file=run_dir / "selfdistill.jsonl",
                max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                batch_size=gen.batch_size, seed=engine["seed"])
        chats = tokenize_chat(Dataset.from_list([{"messages": c} for c in conversations]), tokenizer,
                              max_length=cfg.data.max_length, too_long=cfg.data.too_long)
        results.append(train(model=draft, step_fn=lm_step, dataset=chats, collate=batch_collate,
              settings=stage_settings(engine, **cfg.fastdraft.finetune.engine),
              stage_dir=run_dir / "finetune", sink=sink, resume=cfg.resume, desc="finetune"))

    if any(r.resumed_from != r.steps for r in results):  # the draft changed: an earlier report is stale
        (run_dir / "eval_after.json").unlink(missing_ok=True)
    after = measure_acceptance(target, draft, cfg.eval, run_dir / "eval_after.json")
    table = compare_markdown({"before training": before, "after training": after})
    write_text_atomic(run_dir / "summary.md", table + "\n")
    export_dir = export_hf_draft(
        draft, tokenizer, run_dir / "export", target_name=target.name, target_vocab_size=target.vocab_size,
        recipe="fastdraft", num_assistant_tokens=cfg.fastdraft.export.num_assistant_tokens,
        resolved_config_yaml=OmegaConf.to_yaml(cfg, resolve=True), eval_table_md=table)
    if after is not None:
        sink.summary({"tau_before": before["overall"]["tau"] if before else None, "tau_after": after["overall"]["tau"]})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": str(export_dir), "before": before, "after": after})
    print(f"\n{table}\n\nDraft exported to {export_dir}")
    return export_dir
