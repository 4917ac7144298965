"""Hydra heads (Ankner et al. 2024) and Hydra++: sequentially dependent heads on the frozen target.

Head i reads the target's final state and the embeddings of the tokens before the one it predicts (teacher forced
from the training text), so a drafted tree conditions each depth on its own path. Hydra++ is three switches:
`hydra_heads.teacher_weight=1 hydra_heads.lm_weight=0` (match the target's distribution instead of the data token),
`hydra_heads.heads.prefix_layer=true` (one decoder layer over the target's states) and deeper heads
(`hydra_heads.heads.num_layers=4`). Acceptance is measured with a chain and a tree; export is draftkit's own format.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from draftkit.data.collate import collate
from draftkit.engine.checkpoint import write_json_atomic
from draftkit.engine.loop import stage_settings, train
from draftkit.engine.run import record_run
from draftkit.export.heads_dir import export_heads_dir
from draftkit.objectives.hydra import hydra_loss
from draftkit.recipes.heads_common import LABEL_SOURCES, architecture, measure_after_training, measure_heads, training_chats
from draftkit.runtime.heads import HydraDrafter

FAMILY = "hydra_heads"


def hydra_step(target, shared_lm_head, lm_weight: float, teacher_weight: float, decay: float):
    def step(heads, batch):
        features = target.features(batch["input_ids"], batch["attention_mask"], with_logits=teacher_weight > 0)
        logits = heads(features.last_hidden, batch["input_ids"], target.embed_tokens, shared_lm_head)
        return hydra_loss(logits, batch["labels"], features.logits, lm_weight=lm_weight,
                          teacher_weight=teacher_weight, decay=decay)
    return step


def run(cfg: DictConfig, run_dir: Path) -> Path:
    h = cfg.hydra_heads
    if h.labels not in LABEL_SOURCES:
        raise ValueError(f"hydra_heads.labels={h.labels!r}: choose 'selfdistill' or 'data'")
    if h.lm_weight < 0 or h.teacher_weight < 0 or h.lm_weight + h.teacher_weight == 0:
        raise ValueError(f"hydra_heads.lm_weight={h.lm_weight}, teacher_weight={h.teacher_weight}: both >= 0, not both 0")
    record_run(run_dir, cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    sink = instantiate(cfg.logger, _recursive_=False, run_dir=str(run_dir), run_config=config, run_name=run_dir.name)
    engine = OmegaConf.to_container(cfg.engine, resolve=True)

    target = instantiate(cfg.target)
    # A partial keeps the target's HF config out of OmegaConf, which would try to convert it.
    build = instantiate(h.heads, _partial_=True)
    heads = build(hidden_size=target.hidden_size, vocab_size=target.vocab_size, target_config=target.config,
                  lm_head_weight=target.lm_head.weight).to(target.device)
    shared = target.lm_head.weight if heads.lm_heads is None else None
    chats = training_chats(cfg, target, run_dir, h.labels, engine["seed"])

    def drafter(shape):
        return HydraDrafter(heads, target.embed_tokens, shape, shared_lm_head=shared)

    measure = partial(measure_heads, target, drafter, heads, cfg, h.tree, heads.num_heads, run_dir)
    before = measure("before") if cfg.eval.get("before") else {}
    result = train(model=heads, step_fn=hydra_step(target, shared, h.lm_weight, h.teacher_weight, h.decay),
                   dataset=chats, collate=partial(collate, pad_token_id=target.tokenizer.pad_token_id),
                   settings=stage_settings(engine), stage_dir=run_dir / "train", sink=sink, resume=cfg.resume,
                   desc=FAMILY)
    after, table = measure_after_training(result, measure, before, run_dir)
    export = export_heads_dir(heads, run_dir / "export", family=FAMILY, architecture=architecture(h.heads),
                              target_name=target.name, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                              dtype=h.export_dtype, extra_info={"recipe": FAMILY})
    sink.summary({f"tau_after_{name}": r["overall"]["tau"] for name, r in after.items() if r})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": str(export), "before": before, "after": after})
    print(f"\n{table}\n\nHydra heads exported to {export}")
    return export
