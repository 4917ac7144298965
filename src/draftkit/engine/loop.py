"""The one training loop. Recipes hand it a trainable module, a step function and a dataset.

It owns accumulation, the single loss normalisation, clipping, the LR schedule, logging cadence,
checkpoints and resume. Nothing method-specific lives here.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from draftkit.engine.batches import BatchStream
from draftkit.engine.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    remove_staging,
    save_checkpoint,
)
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
from draftkit.engine.flops import StepFlops
from draftkit.engine.log import NullSink
from draftkit.errors import ConfigError, UserError
from draftkit.io import write_json_atomic
from draftkit.objectives.types import LossOutput

StepFn = Callable[[nn.Module, dict], LossOutput]


class NonFiniteLossError(UserError, RuntimeError):
    """Training diverged: the message names the newest checkpoint with finite weights and how to continue from it."""


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
    keep_checkpoints: int = 2
    """newest checkpoints kept per stage (0: all)"""
    seed: int = 0
    group_by_length: bool = False
    """micro-batches of similar lengths (less padding; engine/batches.py), instead of a plain shuffle"""
    tf32: bool = False
    """fp32 matmuls inside the training steps run in TF32 on GPUs that have it (an fp32 frozen target's forward
    above all); what runs outside the steps (self-distilled answers, feature caches, evaluation) keeps full fp32"""
    count_flops: bool = False
    """count the model FLOPs of the first micro-step (engine/flops.py); log FLOPs per token and achieved TFLOP/s"""
    peak_tflops: float | None = None
    """one device's peak TFLOP/s in the training precision: with count_flops, also log MFU"""
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    """the `dist` group: accelerate (one process / DDP) or DeepSpeed ZeRO 1-3"""

    def __post_init__(self):
        check_loop_values({k: getattr(self, k) for k in _RULES if k in self.__dataclass_fields__})
        if self.peak_tflops is not None and not self.count_flops:
            raise ConfigError(f"engine.peak_tflops={self.peak_tflops}: MFU needs the step's FLOPs counted. Fix: "
                              "engine.count_flops=true and the device's peak, or engine.peak_tflops=null")
        self.betas = tuple(self.betas)
        self.distributed = as_settings(self.distributed)

    def deepspeed_config(self, world_size: int | None = None) -> dict:
        return deepspeed_config(self.distributed, micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum,
                                precision=self.precision, max_grad_norm=self.max_grad_norm,
                                world_size=world_size or world_size_from_env())


def _whole(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"a whole number >= {low}"


def _number(low: float, high: float = math.inf, high_open: bool = False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return low <= v and (v < high if high_open else v <= high)
    bound = f" and {'<' if high_open else '<='} {high}" if math.isfinite(high) else ""
    return ok, f"a number >= {low}{bound}"


# setting -> (check, what it must be, an example value for the fix)
_RULES = {
    "steps": (*_whole(1), 100),
    "micro_batch_size": (*_whole(1), 8),
    "grad_accum": (*_whole(1), 1),
    "lr": (*_number(0.0), 1e-3),
    "warmup_steps": (*_whole(0), 10),
    "min_lr_ratio": (*_number(0.0, 1.0), 0.1),
    "weight_decay": (*_number(0.0), 0.0),
    "betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(0.0, 1.0, True)[0](b) for b in v),
              "two numbers in [0, 1)", "[0.9,0.95]"),
    "max_grad_norm": (lambda v: v is None or (_number(0.0)[0](v) and v > 0), "a number > 0, or null (no clipping)",
                      1.0),
    "precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16", "bf16"),
    "log_every": (*_whole(1), 10),
    "save_every": (*_whole(1), 100),
    "keep_checkpoints": (*_whole(0), 2),
    "seed": (*_whole(0), 0),
    "group_by_length": (lambda v: isinstance(v, bool), "true or false", "true"),
    "tf32": (lambda v: isinstance(v, bool), "true or false", "true"),
    "count_flops": (lambda v: isinstance(v, bool), "true or false", "true"),
    "peak_tflops": (lambda v: v is None or (_number(0.0)[0](v) and v > 0), "a number > 0, or null", 989),
    "max_steps_per_stage": (lambda v: v is None or _whole(1)[0](v), "a whole number >= 1, or null", 3),
}


def check_loop_values(values: dict, name_of: Callable[[str], str] = lambda key: f"engine.{key}") -> None:
    """ConfigError naming the first engine setting whose type or range cannot work (`name_of`: the key as the user
    writes it, e.g. fastdraft.pretrain.engine.steps)."""
    for key, value in values.items():
        if key not in _RULES:
            continue
        ok, what, example = _RULES[key]
        if not ok(value):
            raise ConfigError(f"{name_of(key)}={value!r}: must be {what}. Fix: e.g. {name_of(key)}={example}")


def stage_settings(engine: dict, stage: str | None = None, **stage_overrides) -> LoopSettings:
    """The engine group merged with a recipe stage's overrides (the config node `stage`, e.g. fastdraft.pretrain.engine,
    named in errors); `max_steps_per_stage` caps the result. Which value wins when the user typed both is settled
    when the config is composed (draftkit.config.apply_precedence): here the stage's own value does."""
    merged = {**engine, **stage_overrides}
    unknown = set(merged) - set(LoopSettings.__dataclass_fields__) - {"max_steps_per_stage"}
    if unknown:
        raise ConfigError(f"unknown engine settings {sorted(unknown)}. Fix: use the valid ones: "
                          f"{sorted(LoopSettings.__dataclass_fields__)}")
    check_loop_values(merged, lambda key: f"{stage}.{key}" if stage and key in stage_overrides else f"engine.{key}")
    cap = merged.pop("max_steps_per_stage", None)
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


def _changed_settings(saved: dict, settings: LoopSettings) -> list[str]:
    """`key old -> new` for each setting (cadences and the distributed backend aside) that differs from a checkpoint's."""
    now = json.loads(json.dumps(asdict(settings), default=str))
    quiet = {"distributed", "log_every", "save_every", "keep_checkpoints", "count_flops", "peak_tflops"}
    return [f"{k} {saved[k]} -> {now[k]}" for k in now if k not in quiet and k in saved and saved[k] != now[k]]


def _reschedule(optimizer, scheduler, settings: LoopSettings) -> None:
    """After loading a checkpoint: the schedule of this run's lr (each group's initial_lr) at the resumed step. With the
    checkpoint's own settings this is the value it held, to the bit (same expression)."""
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    factor = cosine_with_warmup(scheduler.last_epoch, settings)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _divergence_message(what: str, step: int, desc: str, ckpt_dir: Path, settings: LoopSettings,
                        resumed_from: int | None) -> str:
    """Where a diverged stage can continue from (every checkpoint is checked finite before it is written) and a fix that
    works from there: resume=force applies a lower lr instead of the checkpoint's. A stage that diverges again before
    its first new checkpoint after resuming is pointed at the checkpoint before, or at a fresh start."""
    found = list_checkpoints(ckpt_dir)
    lower = f"engine.lr={settings.lr / 10:g} resume=force"
    bf16 = " (or engine.precision=fp32)" if settings.precision == "bf16" else ""
    stop = f"{desc}: {what} at step {step}; stopping."
    if not found:
        return (f"{stop} No checkpoint was written before it (the first is due at step {settings.save_every}). Fix: "
                f"rerun with a lower learning rate{bf16}, e.g. {lower} (the stage starts over)")
    newest = found[-1]
    if resumed_from is not None and newest.name == f"step_{resumed_from:06d}":
        older = (f"continue from the checkpoint before it, {found[-2]}, by moving {newest} aside, or " if len(found) > 1
                 else "")
        return (f"{stop} It resumed from {newest} and diverged again before its next checkpoint, so the weights there "
                f"may already be degenerate. Fix: {older}start over in a new run directory, with a lower learning "
                f"rate{bf16} (e.g. {lower})")
    return (f"{stop} The newest checkpoint, with finite weights, is {newest}. Fix: rerun in the same run directory with "
            f"a lower learning rate{bf16} and resume=force, e.g. {lower}, to continue from it with the new value")


def cosine_with_warmup(step: int, settings: LoopSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def fp32_matmul_precision(tf32: bool):
    """TF32 for fp32 matmuls while a micro-step's forward and backward run (tf32=true), and whatever was set before once
    they stop, however they stop: the losslessness checks after training compare greedy outputs token for token, which
    TF32 rounding can flip."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else before)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


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
    model = runtime.model
    stream = BatchStream(dataset, settings.micro_batch_size, collate, seed=settings.seed,
                         rank=runtime.process_index, world_size=runtime.num_processes,
                         group_by_length=settings.group_by_length)

    start_step, history, resumed_from = 0, [], None
    remove_staging(ckpt_dir)
    resume_from = newest_intact_checkpoint(ckpt_dir, warn=runtime.is_main_process) if resume else None
    if resume_from is not None:
        tensors, state = load_checkpoint(resume_from)
        if state["step"] > settings.steps:
            raise ConfigError(f"{desc}: the checkpoint {resume_from} is at step {state['step']}, past steps="
                              f"{settings.steps}. Fix: set the stage's steps to at least {state['step']}, or use a new "
                              "run directory")
        fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
        for saved, fresh in zip(tensors["optimizer"]["param_groups"], fresh_groups):
            saved.update(fresh)  # betas, weight decay, initial lr: this run's settings, not the checkpoint's
        runtime.load_full_state(tensors["model"], tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        _reschedule(optimizer, scheduler, settings)
        stream.load_state_dict(state["data"])
        stream.seed = settings.seed
        torch.set_rng_state(tensors["rng"])
        start_step = resumed_from = state["step"]
        history = state["history"]
        changed = _changed_settings(state["settings"], settings)
        if changed and runtime.is_main_process:
            print(f"[draftkit] note: {desc} resumes at step {start_step} with settings that differ from its "
                  f"checkpoint's ({', '.join(changed)}); the new values apply from here")
        saved_world = state.get("world_size", 1)
        if saved_world != runtime.num_processes and runtime.is_main_process:
            print(f"[draftkit] note: checkpoint written by {saved_world} rank(s), resuming on {runtime.num_processes}")
    if runtime.is_main_process:
        # What this stage runs with, whatever the config file or an older checkpoint says.
        write_json_atomic(stage_dir / "settings.json", {**asdict(settings), "world_size": runtime.num_processes,
                                                        "resumed_from": resumed_from})
        if hasattr(sink, "rewind"):  # rows a killed attempt logged past the checkpoint are logged again
            sink.rewind(desc, start_step)
    if frozen_engines and runtime.is_main_process:  # shows the partitioning in the run's metrics
        local, total = frozen_param_counts(frozen)
        sink.log({f"{desc}/frozen_param_elements_this_rank": local, f"{desc}/frozen_param_elements_total": total},
                 step=0)

    def save(step: int) -> None:
        model_state, optimizer_state = runtime.full_state(trainable_names)  # collective under DeepSpeed
        if not runtime.is_main_process:
            return
        broken = [name for name, t in model_state.items() if t.is_floating_point() and not bool(t.isfinite().all())]
        if broken:  # checked here too: a checkpoint is the point a run resumes from, so it must hold usable weights
            raise NonFiniteLossError(_divergence_message(f"the weights {broken[:3]} are not finite", step, desc,
                                                         ckpt_dir, settings, resumed_from))
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
    flops = StepFlops(runtime.num_processes, settings.peak_tflops) if settings.count_flops else None

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
                what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
                raise NonFiniteLossError(_divergence_message(what, s, desc, ckpt_dir, settings, resumed_from))
            record = {"step": s, "loss": loss, "grad_norm": gnorm, **dict(zip(names, extras))}
            history.append(record)
        last = history[-1]
        tokens_per_s = tokens_since_log / max(elapsed, 1e-9)
        # padding_fraction: the share of computed positions that are padding (time spent on no token); steps_per_s is
        # what sizes a step budget to a time budget (tokens per step vary with the data)
        logged = {**{k: v for k, v in last.items() if k != "step"}, "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens_per_s, "steps_per_s": len(values) / max(elapsed, 1e-9),
                  "padding_fraction": 1 - tokens_since_log / max(positions_since_log, 1)}
        if flops is not None:
            logged.update(flops.rates(tokens_per_s))
        if torch.cuda.is_available():
            logged["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if runtime.is_main_process:
            sink.log({f"{desc}/{k}": v for k, v in logged.items()}, step=step)
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        pending.clear()
        tokens_since_log, positions_since_log, t_log = 0, 0, time.perf_counter()

    try:
        for step in range(start_step, settings.steps):
            loss_sum = torch.zeros((), device=runtime.device)
            count = torch.zeros((), device=runtime.device)
            metric_sums: dict[str, torch.Tensor] = {}
            for micro in range(settings.grad_accum):
                batch = stream.next()
                tokens = int(batch["attention_mask"].sum())  # on the host: no sync
                tokens_since_log += tokens * runtime.num_processes
                positions_since_log += batch["attention_mask"].numel() * runtime.num_processes
                batch = _move(batch, runtime.device)
                last = micro == settings.grad_accum - 1
                # The first micro-step of the run is counted (from shapes: no sync); it runs a little slower for it.
                counting = flops.counting(tokens) if flops is not None and flops.per_token is None else nullcontext()
                with runtime.micro_context(last), runtime.autocast(), counting, \
                        fp32_matmul_precision(settings.tf32):
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
    finally:  # the bar ends its line before any error message is printed
        bar.close()
    if runtime.is_main_process:
        write_json_atomic(stage_dir / "history.json", history)
    runtime.finish()
    del frozen_engines  # frozen modules keep their ZeRO-3 hooks; the engines themselves are not needed
    runtime.module.eval()
    return TrainResult(history=history, steps=settings.steps, resumed_from=resumed_from)
