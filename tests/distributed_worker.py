"""Worker for tests/test_distributed.py, started by torchrun (or as one plain process for the references).

Each scenario trains the same tiny draft with the one training loop; a frozen "target" (another tiny Llama,
held in a closure like a head recipe's target) supplies soft labels, so ZeRO-3's partitioning of a frozen
module is on the path. Rank 0 writes <out>/<scenario>.json with the loss trajectory and a digest of the
trained weights; every rank reports how many target elements it holds locally.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftkit.data.collate import collate
from draftkit.engine.loop import LoopSettings, train
from draftkit.objectives.kl import soft_cross_entropy

VOCAB = 64
STEPS = 6
GLOBAL_MICRO_BATCH = 4


def tiny_llama(seed: int, layers: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def examples(n: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + i % 7  # uneven token counts per micro-batch and per rank
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100 if j < i % 3 else t for j, t in enumerate(ids)]})
    return out


def distill_step(target):
    def step(model, batch):
        with torch.no_grad():
            teacher = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return soft_cross_entropy(student, teacher.float(), batch["labels"] != -100)
    return step


def collate0(batch):
    return collate(batch, pad_token_id=0)


def run_scenario(name: str, stage_dir: Path, world_size: int, steps: int = STEPS, save_every: int = 3,
                 resume: bool = True) -> dict:
    backend, _, stage = name.partition("_zero")
    dist = {"backend": "deepspeed", "zero_stage": int(stage)} if stage else {"backend": "accelerate"}
    settings = LoopSettings(steps=steps, micro_batch_size=GLOBAL_MICRO_BATCH // world_size, lr=1e-2, warmup_steps=2,
                            log_every=1, save_every=save_every, max_grad_norm=1.0, distributed=dist)
    draft, target = tiny_llama(0), tiny_llama(1, layers=2)
    result = train(model=draft, step_fn=distill_step(target), dataset=examples(), collate=collate0, settings=settings,
                   stage_dir=stage_dir, resume=resume, desc=name, frozen=[target])
    local_target = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in target.parameters())
    return {
        "losses": [h["loss"] for h in result.history],
        "grad_norms": [h["grad_norm"] for h in result.history],
        "weight_sum": float(sum(p.detach().double().abs().sum() for p in draft.parameters())),
        "target_elements_total": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in target.parameters()),
        "target_elements_local": local_target,
        "resumed_from": result.resumed_from,
        "draft_forward_ok": bool(torch.isfinite(draft(input_ids=torch.tensor([[5, 6, 7]])).logits).all()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", required=True, help="comma-separated: ddp, ddp_zero2, ddp_zero3, ...")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    for name in args.scenarios.split(","):
        report = run_scenario(name, args.out / name, world, steps=args.steps)
        report["world_size"] = world
        per_rank = args.out / f"{name}.rank{rank}.json"
        per_rank.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
