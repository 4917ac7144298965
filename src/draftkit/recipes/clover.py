"""Clover-2 (Xiao et al. 2024): regressive connection, attention decoder and augmenting block on the frozen target.

The model reads the target's pre-norm final state and the next token's embedding, runs two decoder layers copied from
the target's last layer, and drafts each depth from a recurrent state updated with the previous draft token. Loss per
head: feature regression to the target's post-norm state (SmoothL1, weight 10) plus soft CE to the target's
distribution (weight 1), heads weighted 0.7^i. Acceptance is measured with a chain and a tree; export is draftkit's
own format. `clover.draft_vocab_size` scores the heads' features over the most frequent training labels only
(drafts/vocab.py), against the target's distribution renormalised over them; the labels only mark the scored
positions here, so they stay in target ids.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from draftkit.drafts import seeded_init
from draftkit.drafts.vocab import draft_rows
from draftkit.export import clover as clover_export
from draftkit.objectives.clover import clover_loss
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.recipes.common import draft_token_map, frozen_weight, start_run, training_chats
from draftkit.recipes.heads_common import check_heads_settings, teacher_columns, train_measure_export
from draftkit.runtime import clover as clover_runtime

FAMILY = clover_export.FAMILY


def clover_step(target, lm_head, feature_weight: float, token_weight: float, decay: float,
                loss_chunk_size: int | None = None, scoring_head=None, token_map=None):
    """The frozen target gives its pre-norm final state (the model's input) and its post-norm states (the regression
    target) in one pass; `lm_head` is its LM head's weight (it embeds the input tokens), `scoring_head` the rows that
    score the heads' features (default: all of lm_head; with a token_map, its rows). The soft labels are the target's
    distribution over those rows. With loss_chunk_size set, the heads' logits and the target's are both computed
    inside the loss that many positions at a time, the target's only where a head scores them; without it the target
    returns its full logits and the kept columns are selected."""
    scoring_head = lm_head if scoring_head is None else scoring_head

    def step(model, batch):
        features = target.features(batch["input_ids"], batch["attention_mask"], layers=[target.num_layers],
                                   with_logits=loss_chunk_size is None)
        head_features = model(features.hidden[target.num_layers], batch["input_ids"], lm_head)
        if loss_chunk_size is None:
            head_logits = F.linear(head_features, scoring_head)
            teacher = teacher_columns(features.logits, token_map)
        else:
            head_logits = [LinearLogits(state, scoring_head, chunk_size=loss_chunk_size, skip_uncounted=True)
                           for state in head_features]
            # scoring_head is the target's own LM-head rows, so this is the teacher the plain path selects
            teacher = LinearLogits(features.last_hidden, scoring_head, chunk_size=loss_chunk_size)
        return clover_loss(head_features, head_logits, features.last_hidden, teacher,
                           batch["labels"], feature_weight=feature_weight, token_weight=token_weight, decay=decay)
    return step


def validate(cfg: DictConfig) -> None:
    check_heads_settings("clover", cfg.clover, cfg.clover.model.num_heads)


def run(cfg: DictConfig, run_dir: Path) -> Path:
    validate(cfg)
    c = cfg.clover
    sink, engine, target = start_run(cfg, run_dir)
    chats = training_chats(cfg, target, run_dir, c.labels, engine["seed"])
    token_map = draft_token_map(chats, c.draft_vocab_size, target, run_dir)
    decoder = target.model.get_decoder()
    # A partial keeps the target's HF config and modules out of OmegaConf, which would try to convert them.
    with seeded_init(engine["seed"]):
        model = instantiate(c.model, _partial_=True)(
            hidden_size=target.hidden_size, target_config=target.config, init_layer=decoder.layers[-1],
            final_norm=decoder.norm, token_map=token_map).to(target.device)
    lm_head = frozen_weight(target.lm_head.weight, engine)
    scoring_head = draft_rows(lm_head, token_map)

    def drafter(options):
        # Clover's token embeddings are rows of the target's LM head (the reference's frozen copy of it).
        return clover_runtime.drafting(model, target, options, lm_head=lm_head)

    return train_measure_export(
        cfg, run_dir, family=FAMILY, module=model, module_cfg=c.model, chats=chats, make_drafter=drafter,
        write_export=clover_export.write,
        step=clover_step(target, lm_head, c.feature_weight, c.token_weight, c.decay, c.loss_chunk_size, scoring_head,
                         token_map),
        tree_cfg=c.tree, target=target, sink=sink, engine=engine, export_dtype=c.export_dtype)
