"""Medusa (Cai et al. 2024): K heads on the target's final hidden state, each predicting one token further ahead.

Medusa-1 (`medusa.joint=false`): the target stays frozen and only the heads train, on Σ_k decay^(k+1) CE_k.
Medusa-2 (`medusa.joint=true`): LoRA adapters (peft) on the target train together with the heads, on the target's own
term (next-token CE, or KL to the original model with the adapters disabled) plus heads_coefficient times the heads'
loss, the heads at heads_lr_multiplier times the lr. Medusa-2 changes the target: the adapters are exported with the
heads and the evaluation runs the adapted target.

Labels come from the target's own answers (`medusa.labels=selfdistill`) or from the data's replies (`data`).
Acceptance is measured with a chain (top-1 of each head) and with a tree; the heads are exported in vLLM's and
FasterDecoding's formats. `medusa.draft_vocab_size` restricts the heads to the most frequent training labels
(drafts/vocab.py): Medusa-1 only, and the vLLM format only (its truncated_vocab_size and token_map).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from draftkit.data.collate import collate
from draftkit.drafts.medusa import MedusaWithTarget
from draftkit.drafts.vocab import draft_rows
from draftkit.engine.loop import stage_settings, train
from draftkit.export.medusa import export_medusa_fasterdecoding, export_medusa_vllm
from draftkit.io import write_json_atomic
from draftkit.objectives.ce import IGNORE_INDEX, next_token_ce
from draftkit.objectives.kl import forward_kl
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.objectives.medusa import medusa2_loss, medusa_loss
from draftkit.errors import ConfigError
from draftkit.recipes.common import (draft_token_map, frozen_weight, start_run, training_chats,
                                    write_summary)
from draftkit.recipes.heads_common import check_heads_settings, label_mapper, measure_after_training, measure_heads
from draftkit.runtime import medusa as medusa_runtime

TARGET_LOSSES = ("lm", "kl")


def heads_step(target, shared_lm_head, decay: float, loss_chunk_size: int | None = None, own_lm_heads=None,
               token_map=None):
    """Medusa-1: the frozen target's final states (no grad) feed the heads. With loss_chunk_size set, the loss applies
    the LM head (shared, or each head's own: `own_lm_heads`) that many positions at a time, and only to positions it
    scores (one host sync per head; the prompt and padding rows it skips are often half of a chat batch). With a
    token_map the heads' logits and the labels are in draft ids (shared_lm_head: the head's token_map rows)."""
    labels_for = label_mapper(token_map, target.vocab_size)

    def step(heads, batch):
        hidden = target.features(batch["input_ids"], batch["attention_mask"], with_logits=False).last_hidden
        labels = labels_for(batch["labels"])
        if loss_chunk_size is None:
            return medusa_loss(heads(hidden, shared_lm_head), labels, decay=decay)
        states = heads(hidden, project=False)
        weights = [head.weight for head in own_lm_heads] if own_lm_heads is not None else [shared_lm_head] * len(states)
        logits = [LinearLogits(state, weight, chunk_size=loss_chunk_size, skip_uncounted=True)
                  for state, weight in zip(states, weights)]
        return medusa_loss(logits, labels, decay=decay)
    return step


def joint_step(decay: float, target_loss: str, heads_coefficient: float):
    """Medusa-2: one pass of the adapted target gives its logits and the heads' input; the teacher for the KL term is
    the same model with its adapters disabled."""
    def step(model, batch):
        logits, head_logits = model(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        if target_loss == "lm":
            own = next_token_ce(logits, labels)
        else:
            with model.target.disable_adapter():
                teacher = model.target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            own = forward_kl(logits[:, :-1], teacher[:, :-1].detach(), labels[:, 1:] != IGNORE_INDEX)
        return medusa2_loss(own, medusa_loss(head_logits, labels, decay=decay), heads_coefficient=heads_coefficient)
    return step


def _with_lora(target_model, lora: DictConfig):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none")
    return get_peft_model(target_model, config)


def validate(cfg: DictConfig) -> None:
    m = cfg.medusa
    check_heads_settings("medusa", m, m.heads.num_heads)
    if m.joint and m.joint_settings.target_loss not in TARGET_LOSSES:
        raise ConfigError(f"medusa.joint_settings.target_loss={m.joint_settings.target_loss!r} is not a loss. Fix: "
                          "choose 'lm' (next-token CE on the labels) or 'kl' (KL to the original target)")
    unknown = set(m.export.formats) - {"vllm", "fasterdecoding"}
    if unknown:
        raise ConfigError(f"medusa.export.formats has {sorted(unknown)}. Fix: choose from vllm, fasterdecoding")
    if "fasterdecoding" in m.export.formats and not m.heads.bias:
        raise ConfigError("medusa.heads.bias=false cannot be exported in the FasterDecoding format (its ResBlock always "
                         "has a bias). Fix: medusa.heads.bias=true, or medusa.export.formats=[vllm]")
    if m.draft_vocab_size is not None:
        if m.joint:
            raise ConfigError("medusa.draft_vocab_size restricts the heads of Medusa-1 only; Medusa-2 "
                             "(medusa.joint=true) trains the target's full LM head with them. Fix: "
                             "medusa.draft_vocab_size=null, or medusa.joint=false")
        if "fasterdecoding" in m.export.formats:
            raise ConfigError("the FasterDecoding format has no truncated vocabulary, so it cannot hold heads with "
                             "medusa.draft_vocab_size set. Fix: medusa.export.formats=[vllm] (vLLM's "
                             "truncated_vocab_size and token_map), or medusa.draft_vocab_size=null")


def run(cfg: DictConfig, run_dir: Path) -> Path:
    validate(cfg)
    m = cfg.medusa
    sink, engine, target = start_run(cfg, run_dir)
    chats = training_chats(cfg, target, run_dir, m.labels, engine["seed"])
    token_map = draft_token_map(chats, m.draft_vocab_size, target, run_dir)
    heads = instantiate(m.heads, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                        lm_head_weight=target.lm_head.weight, token_map=token_map).to(target.device)
    # Medusa-2 trains the target itself (it is then part of the trained model, whole again after training), so its
    # heads score with the target's current LM head; Medusa-1 heads with a frozen copy (ZeRO-3 swaps the target's).
    full_lm_head = None if m.joint else frozen_weight(target.lm_head.weight, engine)
    lm_head = target.lm_head.weight if m.joint else draft_rows(full_lm_head, token_map)

    def drafter(options):
        return medusa_runtime.drafting(heads, target, options, lm_head=full_lm_head)

    measure = partial(measure_heads, target, drafter, heads, cfg, m.tree, heads.num_heads, run_dir)
    before = measure("before") if cfg.eval.get("before") else {}

    if m.joint:
        js = m.joint_settings
        target.model = _with_lora(target.model, js.lora)
        model = MedusaWithTarget(target.model, heads, heads_lr_multiplier=js.heads_lr_multiplier)
        step = joint_step(m.decay, js.target_loss, js.heads_coefficient)
    else:
        model = heads
        step = heads_step(target, lm_head if heads.lm_heads is None else None, m.decay, m.loss_chunk_size,
                          heads.lm_heads, token_map)
    result = train(model=model, step_fn=step, dataset=chats,
                   collate=partial(collate, pad_token_id=target.tokenizer.pad_token_id),
                   settings=stage_settings(engine), stage_dir=run_dir / "train", sink=sink, resume=cfg.resume,
                   desc="medusa", frozen=[] if m.joint else [target.model])

    export_root = run_dir / "export"
    extra = {"recipe": "medusa", "joint": bool(m.joint)}
    if m.joint:
        # The heads read the adapted target's states: ship the adapters, then evaluate the merged model.
        target.model.save_pretrained(export_root / "target_lora")
        target.model = target.model.merge_and_unload()
        extra["target_lora"] = "../target_lora"
    after, table = measure_after_training(result, measure, before, run_dir)
    exports = {}
    if "vllm" in m.export.formats:
        exports["vllm"] = export_medusa_vllm(heads, export_root / "vllm", target_name=target.name,
                                             target_lm_head=target.lm_head.weight if m.joint else lm_head,
                                             dtype=m.export.dtype, extra_info=extra, eval_table_md=table,
                                             target_reference=target.reference())
    if "fasterdecoding" in m.export.formats:
        exports["fasterdecoding"] = export_medusa_fasterdecoding(heads, export_root / "fasterdecoding",
                                                                 target_name=target.name, dtype=m.export.dtype,
                                                                 extra_info=extra, eval_table_md=table,
                                                                 target_reference=target.reference())
    write_summary(run_dir, title=f"Medusa heads for {target.name}", table=table, histories={"medusa": result.history},
                  exports={f"{fmt} format": folder for fmt, folder in exports.items()},
                  reports=[*before.values(), *after.values()])
    tau = {name: r["overall"]["tau"] for name, r in after.items() if r}
    sink.summary({f"tau_after_{name}": value for name, value in tau.items()})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": {k: str(v) for k, v in exports.items()},
                                                "before": before, "after": after})
    print(f"\n{table}\n\nMedusa heads exported to {', '.join(str(v) for v in exports.values())}; summary in "
          f"{run_dir / 'summary.md'}")
    return export_root
