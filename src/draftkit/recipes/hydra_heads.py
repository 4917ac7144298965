"""Hydra heads (Ankner et al. 2024) and Hydra++: sequentially dependent heads on the frozen target.

Head i reads the target's final state and the embeddings of the tokens before the one it predicts (teacher forced
from the training text), so a drafted tree conditions each depth on its own path. Hydra++ is three switches:
`hydra_heads.teacher_weight=1 hydra_heads.lm_weight=0` (match the target's distribution instead of the data token),
`hydra_heads.heads.prefix_layer=true` (one decoder layer over the target's states) and deeper heads
(`hydra_heads.heads.num_layers=4`). Acceptance is measured with a chain and a tree; export is draftkit's own format.
`hydra_heads.draft_vocab_size` restricts the heads to the most frequent training labels (drafts/vocab.py); the teacher
term then matches the target's distribution renormalised over those tokens.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from draftkit.drafts import seeded_init
from draftkit.drafts.vocab import draft_rows
from draftkit.export import hydra_heads as hydra_export
from draftkit.objectives.hydra_heads import hydra_loss
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.errors import ConfigError
from draftkit.recipes.common import draft_token_map, frozen_weight, start_run, training_chats
from draftkit.recipes.heads_common import check_heads_settings, label_mapper, teacher_columns, train_measure_export
from draftkit.runtime import hydra_heads as hydra_runtime

FAMILY = hydra_export.FAMILY


def hydra_step(target, shared_lm_head, lm_weight: float, teacher_weight: float, decay: float,
               loss_chunk_size: int | None = None, own_lm_heads=None, token_map=None, teacher_lm_head=None):
    """With loss_chunk_size set, the loss applies the LM head (shared, or each head's own: `own_lm_heads`) that many
    positions at a time, and only to positions it scores, instead of the heads returning every logit; the teacher's
    logits are made the same way from the target's final states and `teacher_lm_head`, the target's LM-head rows
    (default: shared_lm_head, or the target's own rows), never as the target's full logits. With a token_map the
    logits, labels and teacher are all over the draft vocabulary (shared_lm_head, teacher_lm_head: the token_map
    rows)."""
    labels_for = label_mapper(token_map, target.vocab_size)
    if teacher_lm_head is None:
        teacher_lm_head = shared_lm_head
    if teacher_lm_head is None and teacher_weight > 0 and loss_chunk_size is not None:
        teacher_lm_head = draft_rows(target.lm_head.weight, token_map)

    def step(heads, batch):
        chunked = loss_chunk_size is not None
        features = target.features(batch["input_ids"], batch["attention_mask"],
                                   with_logits=teacher_weight > 0 and not chunked)
        if not chunked:
            logits = heads(features.last_hidden, batch["input_ids"], target.embed_tokens, shared_lm_head)
            teacher = teacher_columns(features.logits, token_map)
        else:
            states = heads(features.last_hidden, batch["input_ids"], target.embed_tokens, project=False)
            projections = ([(head.weight, head.bias) for head in own_lm_heads] if own_lm_heads is not None
                           else [(shared_lm_head, None)] * len(states))
            logits = [LinearLogits(state, weight, bias, loss_chunk_size, skip_uncounted=True)
                      for state, (weight, bias) in zip(states, projections)]
            teacher = (LinearLogits(features.last_hidden, teacher_lm_head, chunk_size=loss_chunk_size)
                       if teacher_weight > 0 else None)
        return hydra_loss(logits, labels_for(batch["labels"]), teacher, lm_weight=lm_weight,
                          teacher_weight=teacher_weight, decay=decay)
    return step


def validate(cfg: DictConfig) -> None:
    h = cfg.hydra_heads
    check_heads_settings("hydra_heads", h, h.heads.num_heads)
    if h.lm_weight < 0 or h.teacher_weight < 0 or h.lm_weight + h.teacher_weight == 0:
        raise ConfigError(f"hydra_heads.lm_weight={h.lm_weight}, teacher_weight={h.teacher_weight}: the loss needs "
                          "one of them. Fix: both >= 0, not both 0 (Hydra: lm_weight=1; Hydra++: teacher_weight=1)")


def run(cfg: DictConfig, run_dir: Path) -> Path:
    validate(cfg)
    h = cfg.hydra_heads
    sink, engine, target = start_run(cfg, run_dir)
    chats = training_chats(cfg, target, run_dir, h.labels, engine["seed"])
    token_map = draft_token_map(chats, h.draft_vocab_size, target, run_dir)
    # A partial keeps the target's HF config out of OmegaConf, which would try to convert it.
    build = instantiate(h.heads, _partial_=True)
    with seeded_init(engine["seed"]):
        heads = build(hidden_size=target.hidden_size, vocab_size=target.vocab_size, target_config=target.config,
                      lm_head_weight=target.lm_head.weight, token_map=token_map).to(target.device)
    lm_head = frozen_weight(target.lm_head.weight, engine)
    shared = draft_rows(lm_head, token_map) if heads.lm_heads is None else None
    # Own heads do not hold the target's rows, which the chunked teacher is made from (frozen: ZeRO-3 swaps them).
    teacher_rows = (draft_rows(lm_head, token_map)
                    if shared is None and h.teacher_weight > 0 and h.loss_chunk_size is not None else None)

    def drafter(options):
        return hydra_runtime.drafting(heads, target, options, lm_head=lm_head)

    return train_measure_export(
        cfg, run_dir, family=FAMILY, module=heads, module_cfg=h.heads, chats=chats, make_drafter=drafter,
        write_export=hydra_export.write,
        step=hydra_step(target, shared, h.lm_weight, h.teacher_weight, h.decay, h.loss_chunk_size, heads.lm_heads,
                        token_map, teacher_rows),
        tree_cfg=h.tree, target=target,
        sink=sink, engine=engine, export_dtype=h.export_dtype)
