"""EAGLE-3: train a one-layer drafter on fused low/middle/high target layers with training-time test, measure it,
export it for vLLM (speculators format) and SGLang.

Stages as in recipes/fspad.py: `features` precomputes the target's fused-layer features (the aux layers and the
post-norm last state, compressed like FSPAD's cache) into a sharded, resumable cache (only with
eagle3.features.source=offline); `train` unrolls the drafter eagle3.ttt.steps times on its own states and sums the
weighted soft cross-entropies (objectives/eagle3.py). Both paths compute features with one function. Acceptance is
measured before and after training with runtime/eagle3.py's chain drafter (and its tree drafter), the same runtime
`python -m draftkit.eval` uses.

eagle3.feature_sampling and eagle3.partial_alignment are FSPAD's two parts on EAGLE-3 (drafts/eagle3.py); with either,
the draft exports in draftkit's format only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from draftkit.data.feature_cache import target_features
from draftkit.drafts.eagle3 import Eagle3Drafter, eagle3_drafter
from draftkit.errors import ConfigError
from draftkit.export.eagle3 import RUNTIME_FORMATS, export_eagle3, format_refusal
from draftkit.export.hub import only_here
from draftkit.objectives.eagle3 import eagle3_loss, step_weights, ttt_masks
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.objectives.types import LossOutput
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
from draftkit.runtime import eagle3 as eagle3_runtime
from draftkit.runtime.drafting import DraftingOptions
from draftkit.targets.hf import resolve_target_path


def aux_layers(settings, num_layers: int) -> list[int]:
    """The fused target layers: eagle3.aux_layers, or the references' low/middle/high default [2, L // 2, L - 3]
    (vLLM, SGLang, speculators, SafeAILab EAGLE-3): ids of the residual streams entering those decoder layers."""
    given = settings.aux_layers
    layers = [2, num_layers // 2, num_layers - 3] if given is None else [int(i) for i in given]
    where = "the default [2, L // 2, L - 3]" if given is None else f"eagle3.aux_layers={layers}"
    if len(layers) < 2 or any(not 0 <= i <= num_layers for i in layers) or layers != sorted(set(layers)):
        raise ConfigError(f"{where} gives {layers} for a target of {num_layers} layers: EAGLE-3 needs at least two "
                         f"distinct ascending layer ids in 0..{num_layers} (three in 1..{num_layers - 1} for vLLM and "
                         "SGLang). Fix: set eagle3.aux_layers, e.g. [1, 2, 3]")
    return layers


def build_draft(target, settings, layers, token_map: torch.Tensor | None = None) -> Eagle3Drafter:
    """The drafter for `target`: attention and MLP shapes copy the target's layers; its own norm starts as the target's
    final norm. token_map: the draft vocabulary (recipes.common.draft_token_map), None for the whole vocabulary."""
    text = target.config.get_text_config()
    draft = eagle3_drafter(
        embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
        norm_weight=target.model.get_decoder().norm.weight, num_aux_layers=len(layers),
        num_heads=text.num_attention_heads, num_kv_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
        intermediate_size=text.intermediate_size, rope_theta=rope_theta(text), rms_norm_eps=text.rms_norm_eps,
        feature_sampling=settings.feature_sampling, partial_alignment=settings.partial_alignment,
        norm_before_residual=settings.norm_before_residual, token_map=token_map,
        train_lm_head=settings.lm_head == "trained", seed=settings.seed)
    return draft.to(target.device)


def _shifted(x: torch.Tensor, step: int, length: int) -> torch.Tensor:
    """x[:, step + 1 + t] for t in 0..length-1, zero past the end (those positions are never counted)."""
    part = x[:, step + 1: step + 1 + length]
    pad = x.new_zeros(x.shape[0], length - part.shape[1], *x.shape[2:])
    return torch.cat([part, pad], dim=1)


def feature_step(model: Eagle3Drafter, batch: dict, features: torch.Tensor, *, steps: int, weights: list[float],
                 regression_weight: float, loss_chunk_size: int | None = None):
    """One loss on a batch whose features [B, T, (k + 1) h] are given (fused aux layers, then the post-norm last
    state): the drafter unrolled `steps` times (training-time test), step j scored against the target's distribution
    of x_{t+j+2}, both through the draft's frozen LM head (its draft vocabulary's rows)."""
    # The unroll goes through the wrapper the loop hands over (DDP or DeepSpeed, for their gradient hooks); the sizes
    # are read from the drafter itself, which a DDP wrapper does not expose as attributes.
    drafter = getattr(model, "module", model)
    fused_width = drafter.num_aux_layers * drafter.hidden_size
    aux, last = features[..., :fused_width], features[..., fused_width:]
    input_ids, labels = batch["input_ids"], batch["labels"]
    length = input_ids.shape[1] - 1
    masks = ttt_masks(labels, steps)

    def score(drafter: Eagle3Drafter, outputs) -> tuple:
        # Runs inside the drafter's forward: under ZeRO-3 the head's weight is gathered there and only there, which a
        # chunked loss reading it directly needs. A tuple, so DeepSpeed hooks the loss for its backward.
        with torch.no_grad():
            fused_targets = drafter.hidden_input(aux) if drafter.partial_alignment else None
        draft_logits, teacher_logits, regress, regress_targets = [], [], [], []
        for step, ((predict, fed_back), mask) in enumerate(zip(outputs, masks)):
            # Only counted positions go through the head (the step's largest cost at a large vocabulary).
            teacher_states = _shifted(last, step, length)[mask]
            # The teacher is the target's distribution, through the target's rows even when the draft trains its head.
            if loss_chunk_size is None:
                with torch.no_grad():
                    teacher_logits.append(drafter.teacher_logits(teacher_states))
                draft_logits.append(drafter.head_logits(predict[mask]))
            else:
                with torch.no_grad():
                    teacher_logits.append(LinearLogits(teacher_states, drafter.teacher_head_weight,
                                                       chunk_size=loss_chunk_size))
                draft_logits.append(LinearLogits(drafter.head_input(predict[mask]), drafter.lm_head.weight,
                                                 chunk_size=loss_chunk_size))
            if fused_targets is not None:
                regress.append(fed_back[mask])
                regress_targets.append(_shifted(fused_targets, step, length)[mask])
        out = eagle3_loss(draft_logits, teacher_logits, weights, regress=regress or None,
                          regress_targets=regress_targets or None, regression_weight=regression_weight)
        return out.loss_sum, out.count, out.metrics

    loss_sum, count, metrics = model(aux[:, :-1], input_ids[:, 1:], ttt_steps=steps, score=score)
    return LossOutput(loss_sum=loss_sum, count=count, metrics=metrics)


def make_step(target, settings, layers: list[int]):
    ttt = settings.ttt
    weights = step_weights(ttt.steps, ttt.decay, None if ttt.step_weights is None else list(ttt.step_weights))
    options = {"steps": ttt.steps, "weights": weights, "regression_weight": settings.regression_weight,
               "loss_chunk_size": settings.loss_chunk_size}

    def step(model, batch):
        features = batch.get("features")
        if features is None:  # online: the frozen target runs here, outside the trainable module
            features = target_features(target, batch["input_ids"], batch["attention_mask"], aux_layers=layers)
        dtype = getattr(model, "module", model).fc.weight.dtype
        return feature_step(model, batch, features.to(dtype), **options)

    return step


def validate(cfg: DictConfig) -> list[str]:
    settings = cfg.eagle3
    stages = check_feature_recipe(settings, "eagle3")
    ttt = settings.ttt
    if isinstance(ttt.steps, bool) or not isinstance(ttt.steps, int) or ttt.steps < 1:
        raise ConfigError(f"eagle3.ttt.steps={ttt.steps!r}. Fix: give the number of unrolled draft steps, >= 1")
    step_weights(ttt.steps, ttt.decay, None if ttt.step_weights is None else list(ttt.step_weights))
    if settings.lm_head not in ("trained", "frozen"):
        raise ConfigError(f"eagle3.lm_head={settings.lm_head!r}. Fix: choose trained (EAGLE-3's own head) or frozen "
                          "(the target's)")
    for fmt in settings.export.formats or ():
        if fmt not in RUNTIME_FORMATS:
            raise ConfigError(f"eagle3.export.formats lists {fmt!r}. Fix: choose from {list(RUNTIME_FORMATS)}")
    if cfg.get("push_to_hub") and cfg.get("push_format") == "speculators":
        # the upload's config names the target that `vllm serve <repo>` loads: refused now rather than after training
        named = settings.export.verifier or cfg.target.get("path")
        # a GGUF target is named by the folder it is converted into here (verifier_name_or_path), whatever its path
        converted = not settings.export.verifier and (cfg.target.get("gguf_file") or str(named).endswith(".gguf"))
        if not named or converted or only_here(str(named)):
            what = ("no target (this one is built in-process)" if not named else
                    f"the folder the GGUF target {str(named)!r} is converted into, which only this machine can find"
                    if converted else f"the target {str(named)!r}, which only this machine can find")
            raise ConfigError(f"push_to_hub with push_format=speculators would upload a config naming {what}, so "
                              "`vllm serve` of the upload could not load it. Fix: eagle3.export.verifier=<the target's "
                              "Hub id>, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    return stages


def verifier_name_or_path(cfg: DictConfig) -> str | None:
    """What a speculators config names as the verifier: eagle3.export.verifier, else the target's Hub id or the local
    checkpoint it was loaded from (a GGUF's converted directory); None for a target built in-process."""
    if cfg.eagle3.export.verifier:
        return str(cfg.eagle3.export.verifier)
    path = cfg.target.get("path")
    if not path:
        return None
    resolved = resolve_target_path(str(path), cfg.target.get("gguf_file"))
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


def run(cfg: DictConfig, run_dir: Path) -> Path | None:
    stages = validate(cfg)
    settings = cfg.eagle3
    sink, engine, target = start_run(cfg, run_dir)
    layers = aux_layers(settings, target.num_layers)  # refused before any generation
    check_draft_vocab_size(settings.draft_vocab_size, target, key="eagle3.draft_vocab_size")
    if settings.export.formats:  # an explicit runtime format that cannot hold the draft is refused before training
        arch = {"feature_sampling": settings.feature_sampling, "partial_alignment": settings.partial_alignment,
                "aux_layers": layers, "norm_before_residual": settings.norm_before_residual}
        for fmt in settings.export.formats:
            why_not = format_refusal(fmt, arch, target.num_layers)
            if why_not is not None:
                raise ConfigError(f"eagle3.export.formats asks for {fmt}, which cannot hold this draft: {why_not}")
    chats = training_chats(cfg, target, run_dir, settings.labels, cfg.engine.seed)
    dataset = feature_training_data(target, chats, settings, stages, run_dir, norm="post_norm", aux_layers=layers)
    if dataset is None:
        sink.finish()
        return None

    token_map = draft_token_map(chats, settings.draft_vocab_size, target, run_dir)
    draft = build_draft(target, settings, layers, token_map)
    chain = eagle3_runtime.drafting(draft, target, DraftingOptions(tree="chain"), layers, name=f"{draft.variant} draft")
    tree = None
    if settings.tree.kind != "none":
        tree = eagle3_runtime.drafting(draft, target, tree_options(settings.tree), layers,
                                       name=f"{draft.variant} draft (tree)")
    before, after, after_tree, table, history = train_and_measure(
        cfg, run_dir, sink=sink, engine=engine, target=target, draft=draft, step_fn=make_step(target, settings, layers),
        dataset=dataset, chain=chain, tree=tree, stage_engine=settings.train.engine,
        tree_label=f"{settings.tree.kind} tree, depth {settings.tree.depth}")
    exports = export_eagle3(
        draft, run_dir / "export", aux_layers=layers, target_name=target.name, num_target_layers=target.num_layers,
        max_position_embeddings=target.config.get_text_config().max_position_embeddings,
        num_speculative_tokens=settings.export.num_speculative_tokens,
        resolved_config_yaml=OmegaConf.to_yaml(cfg, resolve=True), verifier_name_or_path=verifier_name_or_path(cfg),
        verifier_architectures=list(target.config.architectures or []), eval_table_md=table,
        formats=None if settings.export.formats is None else list(settings.export.formats),
        target_reference=target.reference())
    return finish_feature_run(run_dir, sink, exports, before, after, after_tree, table, history,
                              title=f"EAGLE-3 drafter for {target.name}", variant=draft.variant,
                              aux_layers=layers, features=settings.features.source)
