"""The one training loop. Recipes hand it a trainable module, a step function and a dataset.

It owns accumulation, the single loss normalisation, clipping, the LR schedule, logging cadence,
checkpoints and resume. Nothing method-specific lives here.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from draftkit.engine.batches import BatchStream
from draftkit.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from draftkit.io import write_json_atomic
from draftkit.engine.distributed import (
    AccelerateRuntime,
    DeepSpeedRuntime,
    DistributedSettings,
    as_settings,
    deepspeed_config,
    frozen_param_counts,
    prepare_frozen,
    world_size_from_env,
)
from draftkit.engine.log import NullSink
from draftkit.objectives.types import LossOutput

StepFn = Callable[[nn.Module, dict], LossOutput]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopSettings:
    """Engine settings shared by every recipe (the `engine` config group)."""

    steps: int = 100
    """optimizer steps"""
    micro_batch_size: int = 8
    """examples per rank per forward"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """cosine decays to lr * min_lr_ratio"""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    """fp32 or bf16 (autocast; master weights stay fp32)"""
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 1
    """checkpoints kept per stage, newest first (<= 0: all); one is enough to resume, since each is written whole before
    the previous is removed"""
    seed: int = 0
    group_by_length: bool = False
    """micro-batches of similar lengths (less padding; engine/batches.py), instead of a plain shuffle"""
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    """the `dist` group: accelerate (one process / DDP) or DeepSpeed ZeRO 1-3"""

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"engine.precision={self.precision!r}: use fp32 or bf16")
        self.distributed = as_settings(self.distributed)

    def deepspeed_config(self, world_size: int | None = None) -> dict:
        return deepspeed_config(self.distributed, micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum,
                                precision=self.precision, max_grad_norm=self.max_grad_norm,
                                world_size=world_size or world_size_from_env())


def stage_settings(engine: dict, **stage_overrides) -> LoopSettings:
    """The engine group merged with a recipe stage's overrides; `max_steps_per_stage` caps the result."""
    merged = {**engine, **stage_overrides}
    cap = merged.pop("max_steps_per_stage", None)
    unknown = set(merged) - set(LoopSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown engine settings {sorted(unknown)}; valid: {sorted(LoopSettings.__dataclass_fields__)}")
    settings = LoopSettings(**merged)
    if cap is not None and settings.steps > cap:
        settings.steps = cap
        settings.warmup_steps = min(settings.warmup_steps, cap)
    return settings


@dataclass
class TrainResult:
    history: list[dict]
    steps: int
    resumed_from: int | None


def cosine_with_warmup(step: int, settings: LoopSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _move(batch: dict, device) -> dict:
    """To the device without stalling the host: a copy from pageable memory waits for the GPU to drain the work
    queued before it, so the next batch could not be prepared while the current step runs; from pinned memory it is
    queued like a kernel."""
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
            if torch.is_tensor(v) else v for k, v in batch.items()}


def _param_groups(model: nn.Module, settings: LoopSettings) -> list[dict]:
    """Weight decay on matrices only. A model may define `lr_scale(parameter_name) -> float` to train parts of itself
    at a multiple of the scheduled lr (Medusa-2 trains its heads 4x faster than the target's LoRA weights)."""
    scale_of = getattr(model, "lr_scale", lambda name: 1.0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for scale in sorted({scale_of(n) for n, _ in named}):
        chosen = [p for n, p in named if scale_of(n) == scale]
        groups += [
            {"params": [p for p in chosen if p.ndim >= 2], "weight_decay": settings.weight_decay, "lr": settings.lr * scale},
            {"params": [p for p in chosen if p.ndim < 2], "weight_decay": 0.0, "lr": settings.lr * scale},
        ]
    return groups


def train(
    *,
    model: nn.Module,
    step_fn: StepFn,
    dataset: Sequence,
    collate: Callable[[list], dict],
    settings: LoopSettings,
    stage_dir: Path,
    sink=None,
    resume: bool = True,
    desc: str = "train",
    frozen: Sequence[nn.Module] = (),
) -> TrainResult:
    """Train the parameters of `model` that require grad. Checkpoints go to `stage_dir/checkpoints/`.

    Loss normalisation: each micro-batch backpropagates its *summed* loss; after the last micro-batch the
    gradients are scaled by world_size / (global token count), i.e. exactly the gradient of the mean over
    every counted token of the optimizer step, whatever the micro-batching, data parallelism or ZeRO stage.

    `frozen`: modules step_fn runs but never trains (a target held in a closure). They get no gradients and
    no optimizer state, are cast to `dist.frozen_dtype`, and under ZeRO-3 their parameters are partitioned
    across ranks. Under ZeRO-3 `model` itself is partitioned while training and whole again on return.
    """
    sink = sink or NullSink()
    stage_dir = Path(stage_dir)
    ckpt_dir = stage_dir / "checkpoints"
    dist = settings.distributed
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    param_groups = _param_groups(model, settings)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    if dist.backend == "deepspeed":
        runtime = DeepSpeedRuntime(model, param_groups, settings.lr, settings.betas, dist,
                                   settings.deepspeed_config(world_size_from_env()))
        optimizer = runtime.base_optimizer
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=settings.lr, betas=tuple(settings.betas))
        runtime = AccelerateRuntime(model, optimizer, settings.precision)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, settings))
    frozen_engines = prepare_frozen(
        frozen, dist, settings.deepspeed_config(runtime.num_processes) if dist.backend == "deepspeed" else None,
        runtime.device, settings.precision)
    if frozen_engines and runtime.is_main_process:  # shows the partitioning in the run's metrics
        local, total = frozen_param_counts(frozen)
        sink.log({f"{desc}/frozen_param_elements_this_rank": local, f"{desc}/frozen_param_elements_total": total},
                 step=0)
    model = runtime.model
    stream = BatchStream(dataset, settings.micro_batch_size, collate, seed=settings.seed,
                         rank=runtime.process_index, world_size=runtime.num_processes,
                         group_by_length=settings.group_by_length)

    start_step, history, resumed_from = 0, [], None
    existing = list_checkpoints(ckpt_dir) if resume else []
    if existing:
        tensors, state = load_checkpoint(existing[-1])
        runtime.load_full_state(tensors["model"], tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        stream.load_state_dict(state["data"])
        torch.set_rng_state(tensors["rng"])
        start_step = resumed_from = state["step"]
        history = state["history"]
        if state["settings"]["steps"] != settings.steps:
            print(f"[draftkit] note: resuming a run planned for {state['settings']['steps']} steps with "
                  f"steps={settings.steps}; the LR schedule follows the new value")
        saved_world = state.get("world_size", 1)
        if saved_world != runtime.num_processes and runtime.is_main_process:
            print(f"[draftkit] note: checkpoint written by {saved_world} rank(s), resuming on {runtime.num_processes}")

    def save(step: int) -> None:
        model_state, optimizer_state = runtime.full_state(trainable_names)  # collective under DeepSpeed
        if not runtime.is_main_process:
            return
        save_checkpoint(
            ckpt_dir, step,
            {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state()},
            {"step": step, "data": stream.state_dict(), "history": history, "settings": asdict(settings),
             "world_size": runtime.num_processes},
            keep=settings.keep_checkpoints,
        )

    model.train()
    pending: list[tuple[int, torch.Tensor, torch.Tensor, dict]] = []
    tokens_since_log, positions_since_log, t_log = 0, 0, time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start_step, desc=desc, disable=not runtime.is_main_process,
               dynamic_ncols=True)

    grad_norm_measured = dist.backend != "deepspeed" or bool(settings.max_grad_norm)

    def flush(step: int) -> None:
        """One host sync per log interval: turn the pending loss tensors into numbers, check them, log them."""
        nonlocal tokens_since_log, positions_since_log, t_log
        if not pending:
            return
        names = sorted(pending[0][3])
        values = torch.stack([torch.stack([loss, gnorm.to(loss.device), *(extra[k].float() for k in names)])
                              for _, loss, gnorm, extra in pending]).tolist()
        elapsed = time.perf_counter() - t_log
        for (s, _, _, _), (loss, gnorm, *extras) in zip(pending, values):
            # A finite loss can still backpropagate inf/nan (bf16 overflow): that step's update has already made the
            # weights non-finite, so it stops the run before they reach a checkpoint. DeepSpeed reports no norm
            # without clipping (nan by convention), which is no evidence either way.
            bad_gradient = not math.isfinite(gnorm) and grad_norm_measured
            if not math.isfinite(loss) or bad_gradient:
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm}"
                raise NonFiniteLossError(
                    f"{what} at step {s}; stopping. The last good checkpoint is kept in {ckpt_dir}. "
                    "Fix: lower engine.lr, use engine.precision=fp32, or check the data for empty/degenerate batches"
                )
            record = {"step": s, "loss": loss, "grad_norm": gnorm, **dict(zip(names, extras))}
            history.append(record)
        last = history[-1]
        tokens_per_s = tokens_since_log / max(elapsed, 1e-9)
        # padding_fraction: the share of computed positions that are padding (time spent on no token)
        logged = {**{k: v for k, v in last.items() if k != "step"}, "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens_per_s, "padding_fraction": 1 - tokens_since_log / max(positions_since_log, 1)}
        if torch.cuda.is_available():
            logged["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if runtime.is_main_process:
            sink.log({f"{desc}/{k}": v for k, v in logged.items()}, step=step)
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        pending.clear()
        tokens_since_log, positions_since_log, t_log = 0, 0, time.perf_counter()

    for step in range(start_step, settings.steps):
        loss_sum = torch.zeros((), device=runtime.device)
        count = torch.zeros((), device=runtime.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro in range(settings.grad_accum):
            batch = stream.next()
            tokens_since_log += int(batch["attention_mask"].sum()) * runtime.num_processes  # on the host: no sync
            positions_since_log += batch["attention_mask"].numel() * runtime.num_processes
            batch = _move(batch, runtime.device)
            last = micro == settings.grad_accum - 1
            with runtime.micro_context(last), runtime.autocast():
                out = step_fn(model, batch)
                runtime.backward(out.loss_sum, last)
            loss_sum += out.loss_sum.detach().float()
            count += out.count
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach()
        global_count = runtime.reduce_sum(count)
        global_loss = runtime.reduce_sum(loss_sum)
        scale = runtime.num_processes / global_count.clamp(min=1)
        grad_norm = runtime.optimizer_step(params, scale, settings.max_grad_norm)
        scheduler.step()
        extra = {k: runtime.reduce_sum(v) / global_count.clamp(min=1) for k, v in metric_sums.items()}
        extra["tokens"] = global_count
        pending.append((step + 1, global_loss / global_count.clamp(min=1), grad_norm.detach().float(), extra))
        bar.update(1)
        done = step + 1 == settings.steps
        if (step + 1) % settings.log_every == 0 or done or (step + 1) % settings.save_every == 0:
            flush(step + 1)  # also validates every loss since the last flush before a checkpoint is written
        if (step + 1) % settings.save_every == 0 or done:
            save(step + 1)
    bar.close()
    if runtime.is_main_process:
        write_json_atomic(stage_dir / "history.json", history)
    runtime.finish()
    del frozen_engines  # frozen modules keep their ZeRO-3 hooks; the engines themselves are not needed
    runtime.module.eval()
    return TrainResult(history=history, steps=settings.steps, resumed_from=resumed_from)
