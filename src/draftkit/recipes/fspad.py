"""FSPAD / EAGLE-1: train a one-layer feature drafter on the target's own answers (`fspad.labels=selfdistill`, the
default) or on the data's replies (`data`), measure it, export it.

Stages: `features` precomputes the target's features into a sharded, resumable cache (only with
fspad.features.source=offline); `train` trains the drafter, reading features from the cache (offline) or running the
frozen target inside the step (online). Both paths compute features with the same function, so they train the same
draft. Acceptance is measured before and after training with the chain feature drafter; the draft is exported in
draftkit's format and, for EAGLE-1 on post-norm features, in vLLM's and SGLang's EAGLE formats.

fspad.draft_vocab_size restricts the draft to the most frequent training labels (drafts/vocab.py): its LM head keeps
those rows, so the draft's and the teacher's distributions are both scored (and normalised) over the draft
vocabulary, and the runtime maps the draft's ids back to target ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from draftkit.data.feature_cache import feature_layer, target_features
from draftkit.drafts.fspad import FeatureDrafter, feature_drafter
from draftkit.errors import ConfigError
from draftkit.export.fspad import EAGLE_FORMATS, export_feature_drafter, format_refusal
from draftkit.objectives.fspad import align_pairs, fspad_loss
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.recipes.common import (
    check_draft_vocab_size,
    check_feature_recipe,
    draft_token_map,
    feature_training_data,
    finish_feature_run,
    rope_theta,
    start_run,
    train_and_measure,
    training_chats,
    tree_options,
)
from draftkit.runtime import fspad as fspad_runtime
from draftkit.runtime.drafting import DraftingOptions


def build_draft(target, settings, token_map: torch.Tensor | None = None) -> FeatureDrafter:
    """The drafter for `target` with the recipe's switches; its attention and MLP shapes copy the target's layers.
    token_map: the draft vocabulary (recipes.common.draft_token_map), None for the target's whole vocabulary."""
    text = target.config.get_text_config()
    head_norm = target.model.get_decoder().norm.weight if settings.features.norm == "pre_norm" else None
    draft = feature_drafter(
        embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
        num_heads=text.num_attention_heads, num_kv_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
        intermediate_size=text.intermediate_size, rope_theta=rope_theta(text), rms_norm_eps=text.rms_norm_eps,
        feature_sampling=settings.feature_sampling, partial_alignment=settings.partial_alignment,
        fc_bias=settings.fc_bias, head_norm_weight=head_norm, token_map=token_map, seed=settings.seed)
    return draft.to(target.device)


def feature_step(model: FeatureDrafter, batch: dict, features: torch.Tensor, *, noise_amplitude: float,
                 regression_weight: float, ce_weight: float, loss_chunk_size: int | None = None):
    """One loss on a batch whose target features [B, T, H] are given (from the cache or the live target).

    Both distributions go through the draft's LM head: with a draft vocabulary it holds only those rows, so the teacher
    is the target's distribution renormalised over the draft vocabulary, on both paths."""
    pairs = align_pairs(features, batch["input_ids"], batch["labels"])
    inputs = pairs.input_features
    # The forward goes through the wrapper the loop hands over (DDP or DeepSpeed, for their gradient hooks); the frozen
    # LM head is read from the drafter itself, which a DDP wrapper does not expose as attributes.
    drafter = getattr(model, "module", model)
    if model.training and noise_amplitude > 0:  # noise on the inputs only, never on the regression target
        # Drawn from a seed taken off the CPU generator, which the loop checkpoints: resume stays exact on a GPU too.
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator(device=inputs.device).manual_seed(seed)
        noise = torch.rand(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        inputs = inputs + (noise * 2 - 1) * noise_amplitude
    out = model(inputs, pairs.input_ids)
    # Only counted positions go through the LM head: at a 49k vocabulary the head dominates the step, and prompt
    # positions (about half of a chat) would be computed only to be masked out.
    counted = pairs.mask
    predict, regress, target = out.predict[counted], out.regress[counted], pairs.target_features[counted]
    everywhere = torch.ones(predict.shape[0], dtype=torch.bool, device=predict.device)
    if loss_chunk_size is None:
        with torch.no_grad():
            teacher_logits = drafter.head_logits(target)
        draft_logits = drafter.head_logits(predict)
    else:  # both distributions computed inside the loss, loss_chunk_size positions at a time
        lm_head = drafter.lm_head.weight
        with torch.no_grad():
            teacher_logits = LinearLogits(drafter.head_input(target), lm_head, chunk_size=loss_chunk_size)
        draft_logits = LinearLogits(drafter.head_input(predict), lm_head, chunk_size=loss_chunk_size)
    return fspad_loss(draft_logits, regress, target, teacher_logits, everywhere,
                      regression_weight=regression_weight, ce_weight=ce_weight)


def make_step(target, settings):
    weights = {"noise_amplitude": settings.noise_amplitude, "regression_weight": settings.regression_weight,
               "ce_weight": settings.ce_weight, "loss_chunk_size": settings.loss_chunk_size}
    norm = settings.features.norm

    def step(model, batch):
        features = batch.get("features")
        if features is None:  # online: the frozen target runs here, outside the trainable module
            features = target_features(target, batch["input_ids"], batch["attention_mask"], norm)
        dtype = getattr(model, "module", model).fc.weight.dtype
        return feature_step(model, batch, features.to(dtype), **weights)

    return step


def validate(cfg: DictConfig) -> list[str]:
    settings = cfg.fspad
    stages = check_feature_recipe(settings, "fspad")
    if settings.features.norm not in ("post_norm", "pre_norm"):
        raise ConfigError(f"fspad.features.norm={settings.features.norm!r}. Fix: choose post_norm or pre_norm")
    size = settings.draft_vocab_size
    eagle_formats = settings.export.eagle_formats
    for fmt in eagle_formats if eagle_formats is not None else ():
        if fmt not in EAGLE_FORMATS:
            raise ConfigError(f"fspad.export.eagle_formats lists {fmt!r}. Fix: choose from {list(EAGLE_FORMATS)}")
        why_not = format_refusal(fmt, eagle1=not settings.feature_sampling and not settings.partial_alignment,
                                 feature_norm=settings.features.norm, restricted_vocab=size is not None)
        if why_not is not None:  # refused here, not after training
            raise ConfigError(f"fspad.export.eagle_formats asks for {fmt}, which cannot hold this draft: {why_not}")
    return stages


def run(cfg: DictConfig, run_dir: Path) -> Path | None:
    stages = validate(cfg)
    settings = cfg.fspad
    sink, engine, target = start_run(cfg, run_dir)
    check_draft_vocab_size(settings.draft_vocab_size, target, key="fspad.draft_vocab_size")
    chats = training_chats(cfg, target, run_dir, settings.labels, cfg.engine.seed)
    dataset = feature_training_data(target, chats, settings, stages, run_dir, norm=settings.features.norm)
    if dataset is None:
        sink.finish()
        return None

    token_map = draft_token_map(chats, settings.draft_vocab_size, target, run_dir)
    draft = build_draft(target, settings, token_map)
    chain = fspad_runtime.drafting(draft, target, DraftingOptions(tree="chain"), settings.features.norm,
                                   name=f"{draft.variant} draft")
    tree = None
    if settings.tree.kind != "none":
        tree = fspad_runtime.drafting(draft, target, tree_options(settings.tree), settings.features.norm,
                                      name=f"{draft.variant} draft (tree)")
    # The step's noise is drawn after a reseed, whatever ran before (resume restores the state itself).
    before, after, after_tree, table, history = train_and_measure(
        cfg, run_dir, sink=sink, engine=engine, target=target, draft=draft, step_fn=make_step(target, settings),
        dataset=dataset, chain=chain, tree=tree, stage_engine=settings.train.engine,
        tree_label=f"{settings.tree.kind} tree, depth {settings.tree.depth}")
    exports = export_feature_drafter(
        draft, run_dir / "export", target_name=target.name, feature_norm=settings.features.norm,
        feature_layer=feature_layer(target), target_vocab_size=target.vocab_size,
        max_position_embeddings=target.config.get_text_config().max_position_embeddings,
        num_speculative_tokens=settings.export.num_speculative_tokens,
        resolved_config_yaml=OmegaConf.to_yaml(cfg, resolve=True), eval_table_md=table,
        eagle_formats=None if settings.export.eagle_formats is None else list(settings.export.eagle_formats),
        target_reference=target.reference())
    return finish_feature_run(run_dir, sink, exports, before, after, after_tree, table, history,
                              title=f"{draft.variant} feature drafter for {target.name}", variant=draft.variant,
                              features=settings.features.source)
