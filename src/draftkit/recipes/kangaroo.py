"""Kangaroo: train an adapter on the target's early exit to match the full model's next-token distribution.

Data: the target's own answers to the data group's prompts (self-distillation, `kangaroo.labels=selfdistill`) or the
replies the data carries (`data`), loss on the answer tokens. Each step runs the frozen target once (its early-exit
hidden state and its logits), the adapter on the early exit, and the target's frozen LM head on the adapter's output;
the loss is soft cross entropy to the full model (objectives/kangaroo.py).
Acceptance is measured with Kangaroo's own runtime (runtime/kangaroo.py) before and after training.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from draftkit.data.collate import collate
from draftkit.drafts.kangaroo import kangaroo_adapter
from draftkit.engine.loop import stage_settings, train
from draftkit.errors import ConfigError
from draftkit.export.kangaroo import export_kangaroo
from draftkit.objectives.kangaroo import kangaroo_loss
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.recipes.common import (
    check_label_source,
    compare_markdown,
    finish_run,
    measure_acceptance,
    start_run,
    training_chats,
)
from draftkit.runtime import kangaroo as kangaroo_runtime
from draftkit.runtime.drafting import DraftingOptions
from draftkit.targets.hf import Target, causal_mask

INITS = ("target", "random")


def kangaroo_step(target: Target, exit_layer: int, loss_chunk_size: int | None = None):
    """step_fn for the loop; the frozen target stays in the closure, outside the trained module. With loss_chunk_size
    set, both models' logits are computed inside the loss that many positions at a time."""
    chunked = loss_chunk_size is not None

    def step(adapter, batch):
        features = target.features(batch["input_ids"], batch["attention_mask"], layers=[exit_layer],
                                   with_logits=not chunked)
        early = features.hidden[exit_layer]
        length = early.shape[1]
        positions = torch.arange(length, device=early.device)[None]
        mask = causal_mask(length, 0, early.dtype, early.device, padding_mask=batch["attention_mask"])
        adapted = adapter(early, positions, mask)
        if not chunked:
            return kangaroo_loss(target.lm_head(adapted), features.logits, batch["labels"])
        head = target.lm_head
        return kangaroo_loss(LinearLogits(adapted, head.weight, head.bias, loss_chunk_size, skip_uncounted=True),
                             LinearLogits(features.last_hidden, head.weight, head.bias, loss_chunk_size),
                             batch["labels"])

    return step


def validate(cfg: DictConfig) -> None:
    settings = cfg.kangaroo
    check_label_source("kangaroo.labels", settings.labels)
    if settings.init not in INITS:
        raise ConfigError(f"kangaroo.init={settings.init!r} is not an initialisation. Fix: choose from {list(INITS)}")
    exit_layer = settings.exit_layer
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer < 1:
        raise ConfigError(f"kangaroo.exit_layer={exit_layer!r}: the draft needs at least one of the target's layers. "
                          "Fix: e.g. kangaroo.exit_layer=2")
    layers = cfg.target.get("num_layers")  # known before loading for the built-in random targets
    if isinstance(layers, int) and exit_layer >= layers:
        choice = "kangaroo.exit_layer=1" if layers == 2 else f"choose 1..{layers - 1}"
        raise ConfigError(f"kangaroo.exit_layer={exit_layer} is outside the target's depth: verification needs at "
                          f"least one deep layer. Fix: {choice} for this {layers}-layer target")
    if not 0.0 <= settings.threshold <= 1.0:
        raise ConfigError(f"kangaroo.threshold={settings.threshold}: a probability. Fix: a value in [0, 1] (0: never "
                          "stop early)")


def build_adapter(target: Target, exit_layer: int, init: str, seed: int):
    if init not in INITS:
        raise ConfigError(f"kangaroo.init={init!r} is not an initialisation. Fix: choose from {list(INITS)}")
    decoder = target.model.get_decoder()
    # The exit layer is checked by the builder before any of the target's layers is indexed.
    source = decoder.layers[exit_layer] if init == "target" and 1 <= exit_layer < target.num_layers else None
    return kangaroo_adapter(
        target.config, exit_layer, init_attention=source.self_attn if source else None,
        init_input_norm=source.input_layernorm if source else None,
        init_final_norm=decoder.norm if init == "target" else None, seed=seed)


def run(cfg: DictConfig, run_dir: Path) -> Path:
    validate(cfg)
    settings = cfg.kangaroo
    sink, engine, target = start_run(cfg, run_dir)
    adapter = build_adapter(target, settings.exit_layer, settings.init, engine["seed"]).to(target.device)
    drafting = kangaroo_runtime.drafting(adapter, target, DraftingOptions(), exit_layer=settings.exit_layer,
                                         threshold=settings.threshold)

    def measure(path: Path):
        return measure_acceptance(target, drafting, cfg.eval, path)

    before = measure(run_dir / "eval_before.json") if cfg.eval.get("before") else None
    chats = training_chats(cfg, target, run_dir, settings.labels, engine["seed"])
    result = train(model=adapter, step_fn=kangaroo_step(target, settings.exit_layer, settings.loss_chunk_size),
                   dataset=chats,
                   collate=partial(collate, pad_token_id=target.tokenizer.pad_token_id),
                   settings=stage_settings(engine), stage_dir=run_dir / "adapter", sink=sink, resume=cfg.resume,
                   desc="adapter")
    if result.resumed_from != result.steps:  # the adapter changed: an earlier report is stale
        (run_dir / "eval_after.json").unlink(missing_ok=True)
    after = measure(run_dir / "eval_after.json")
    table = compare_markdown({"before training": before, "after training": after})
    export_dir = export_kangaroo(
        adapter, run_dir / "export", target_name=target.name, target_num_layers=target.num_layers,
        target_vocab_size=target.vocab_size, exit_layer=settings.exit_layer, threshold=settings.threshold,
        max_draft_tokens=cfg.eval.gamma, eval_table_md=table, target_reference=target.reference())
    return finish_run(run_dir, sink, before, after, table, export_dir, "Kangaroo adapter",
                      title=f"Kangaroo adapter for {target.name}", histories={"adapter": result.history})
