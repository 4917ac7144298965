"""Data-parallel backends for the one training loop: accelerate (one process or DDP) and DeepSpeed ZeRO 1/2/3.

The `dist` config group picks one. The loop talks to a `Runtime` and never to a backend directly, so every
recipe runs unchanged under each of them. Checkpoints hold full, unsharded tensors under every backend
(trainable parameters by name, a torch-AdamW-shaped optimizer state), which is what lets a run resume on a
different number of ranks or switch between DDP and ZeRO.

DeepSpeed is driven directly (`deepspeed.initialize`), not through accelerate's DeepSpeed plugin: on CPU that plugin
silently falls back to DDP or mis-counts processes (measured on this project's CPU machines), and the frozen target
needs an engine of its own for ZeRO-3 partitioning, which the plugin does not give a closure-held module.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from draftkit.errors import UserError

BACKENDS = ("accelerate", "deepspeed")


class DistributedConfigError(UserError):
    """A distributed setting that cannot work; raised before any model is built or any step is taken."""


@dataclass
class DistributedSettings:
    """The `dist` config group (conf/dist/*.yaml)."""

    backend: str = "accelerate"
    """accelerate: one process, or DDP when launched with several; deepspeed: ZeRO (zero_stage 1, 2 or 3)"""
    zero_stage: int = 0
    offload_optimizer: str = "none"
    """none or cpu (ZeRO-Offload; DeepSpeed's CPU Adam replaces torch AdamW, JIT-compiled on first use)"""
    offload_params: str = "none"
    """none or cpu (ZeRO-3 only)"""
    config_file: str | None = None
    """a DeepSpeed JSON whose zero_optimization section (buckets, prefetch, ...) is used; keys that the engine
    settings own (batch sizes, accumulation, precision, clipping) must agree with them, and it may not define
    an optimizer or a scheduler (the loop owns both)"""
    frozen_dtype: str | None = None
    """dtype that frozen modules handed to train(frozen=...) are cast to (bfloat16 halves a target's memory);
    null keeps the dtype the target was loaded in"""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise DistributedConfigError(f"dist.backend={self.backend!r}: use one of {list(BACKENDS)}")
        if self.backend == "deepspeed" and self.zero_stage not in (1, 2, 3):
            raise DistributedConfigError(f"dist.zero_stage={self.zero_stage}: DeepSpeed runs ZeRO stage 1, 2 or 3; "
                                         "for plain data parallelism use dist=ddp")
        if self.backend == "accelerate" and self.zero_stage:
            raise DistributedConfigError(f"dist.zero_stage={self.zero_stage} needs dist.backend=deepspeed "
                                         "(choose dist=zero1, zero2 or zero3)")
        for key in ("offload_optimizer", "offload_params"):
            if getattr(self, key) not in ("none", "cpu"):
                raise DistributedConfigError(f"dist.{key}={getattr(self, key)!r}: use none or cpu")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise DistributedConfigError("dist.offload_params=cpu partitions parameters, which only ZeRO-3 does; "
                                         "use dist=zero3 or dist.offload_params=none")
        if self.offload_optimizer != "none" and self.backend != "deepspeed":
            raise DistributedConfigError("dist.offload_optimizer=cpu is a DeepSpeed ZeRO feature; use dist=zero1/2/3")
        if self.frozen_dtype not in (None, "float32", "bfloat16"):
            raise DistributedConfigError(f"dist.frozen_dtype={self.frozen_dtype!r}: use null, float32 or bfloat16")


def as_settings(value) -> DistributedSettings:
    if isinstance(value, DistributedSettings):
        return value
    unknown = set(value or {}) - set(DistributedSettings.__dataclass_fields__)
    if unknown:
        raise DistributedConfigError(f"unknown dist settings {sorted(unknown)}; valid: "
                                     f"{sorted(DistributedSettings.__dataclass_fields__)}")
    return DistributedSettings(**(value or {}))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def process_index() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of the job (True in a plain single process). Recipes write files only where this holds."""
    return process_index() == 0


def ensure_process_group() -> bool:
    """Join the job's process group if a launcher started several processes; False in a single process."""
    if world_size_from_env() <= 1:
        return False
    if not torch.distributed.is_initialized():
        if not _on_cpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("gloo" if _on_cpu() else "nccl")
    return True


def barrier() -> None:
    if ensure_process_group():
        torch.distributed.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. generating a cached dataset); the other ranks run it afterwards and
    find the cache complete."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed configuration: built from the engine settings, optionally refined by a user file, checked first.

_OWNED_BY_ENGINE = {
    "train_micro_batch_size_per_gpu": "engine.micro_batch_size",
    "gradient_accumulation_steps": "engine.grad_accum",
    "gradient_clipping": "engine.max_grad_norm",
}


def deepspeed_config(dist: DistributedSettings, *, micro_batch_size: int, grad_accum: int, precision: str,
                     max_grad_norm: float | None, world_size: int) -> dict:
    """The DeepSpeed config the loop will run with. Every conflict with the engine settings is an error here,
    so it surfaces in the launcher's preflight and on every rank before a model is loaded."""
    user: dict = {}
    if dist.config_file:
        path = Path(dist.config_file)
        if not path.is_file():
            raise DistributedConfigError(f"dist.config_file={path} does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DistributedConfigError(f"dist.config_file={path} is not valid JSON: {err}") from None
    problems = []
    for key in ("optimizer", "scheduler"):
        if key in user:
            problems.append(f"it defines `{key}`, but draftkit's loop owns the optimizer and LR schedule "
                            f"(set engine.lr / engine.warmup_steps instead and delete `{key}` from the file)")
    if (user.get("fp16") or {}).get("enabled") is True:
        problems.append("fp16 is enabled; draftkit trains in fp32 or bf16 (set engine.precision=bf16 and remove fp16)")
    wanted = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": float(max_grad_norm or 0.0)}
    for key, value in wanted.items():
        if key in user and user[key] != "auto" and float(user[key]) != float(value):
            problems.append(f"{key}={user[key]} but {_OWNED_BY_ENGINE[key]}={value} (make them agree, or set \"auto\")")
    if "train_batch_size" in user and user["train_batch_size"] != "auto":
        global_batch = micro_batch_size * grad_accum * world_size
        if int(user["train_batch_size"]) != global_batch:
            problems.append(f"train_batch_size={user['train_batch_size']} but engine.micro_batch_size x "
                            f"engine.grad_accum x world size = {micro_batch_size} x {grad_accum} x {world_size} = "
                            f"{global_batch}")
    bf16 = (user.get("bf16") or {}).get("enabled")
    if bf16 not in (None, "auto") and bool(bf16) != (precision == "bf16"):
        problems.append(f"bf16.enabled={bf16} but engine.precision={precision}")
    zero = dict(user.get("zero_optimization") or {})
    if "stage" in zero and zero["stage"] != dist.zero_stage:
        problems.append(f"zero_optimization.stage={zero['stage']} but dist.zero_stage={dist.zero_stage} "
                        f"(pick one: dist=zero{zero['stage']}, or drop `stage` from the file)")
    if problems:
        where = f"dist.config_file={dist.config_file}" if dist.config_file else "the DeepSpeed settings"
        raise DistributedConfigError(f"{where} conflicts with the recipe's engine settings:\n  - " + "\n  - ".join(problems))

    zero["stage"] = dist.zero_stage
    if dist.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not _on_cpu()}
    if dist.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": not _on_cpu()}
    config = {k: v for k, v in user.items() if k not in ("zero_optimization", "bf16", *wanted, "train_batch_size")}
    config.update({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    })
    return config


def frozen_config(train_config: dict) -> dict:
    """ZeRO-3 for a module that is only ever run forward: partitioned parameters, no optimizer, no gradients."""
    zero = {k: v for k, v in train_config["zero_optimization"].items() if k != "offload_optimizer"}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "bf16": train_config["bf16"], "steps_per_print": 2**31 - 1}


def validate_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """Parse a DeepSpeed/MPI-style hostfile (`hostname slots=N` per line, # comments) into {host: slots}.
    DeepSpeed's own launcher falls back to the local machine when a hostfile yields nothing, which silently
    turns a multi-node job into a single-node one; this makes every such mistake an error instead."""
    path = Path(path)
    if not path.is_file():
        raise DistributedConfigError(f"hostfile {path} does not exist. Fix: check the path; the file lists `hostname "
                                     "slots=N` per line (launch/hostfile.example)")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *fields = line.split()
        slots = [f for f in fields if f.startswith("slots=")]
        if not slots:
            raise DistributedConfigError(f"hostfile {path} line {number}: {raw.strip()!r} names no slots. "
                                         f"Fix: write `{host} slots=<GPUs on that host>`")
        try:
            count = int(slots[0].split("=", 1)[1])
        except ValueError:
            count = 0
        if count < 1:
            raise DistributedConfigError(f"hostfile {path} line {number}: {raw.strip()!r} needs slots >= 1. "
                                         f"Fix: write `{host} slots=<GPUs on that host>`")
        if host in hosts:
            raise DistributedConfigError(f"hostfile {path} line {number}: host {host} is listed twice. Fix: one line "
                                         "per host, with all its slots")
        hosts[host] = count
    if not hosts:
        raise DistributedConfigError(f"hostfile {path} names no hosts. Fix: one `hostname slots=<GPUs>` line per node")
    return hosts


# ---------------------------------------------------------------------------------------------------------
# Runtimes: what the loop needs from a backend.

class Runtime:
    """One interface over the backends. `model` is what step_fn receives; `module` is the bare nn.Module."""

    device: torch.device
    process_index: int
    num_processes: int
    model: nn.Module
    module: nn.Module

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def autocast(self):
        return nullcontext()


class AccelerateRuntime(Runtime):
    """One process, or DDP under torchrun/accelerate launch; gradients are normalised on `p.grad` directly."""

    def __init__(self, model: nn.Module, optimizer, precision: str):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            raise DistributedConfigError(
                "accelerate launch was given a DeepSpeed accelerate config, but draftkit chooses ZeRO through its "
                "own `dist` group. Fix: launch with launch/accelerate/multi_gpu.yaml (or multi_node.yaml) and add "
                "dist=zero1|zero2|zero3 to the training command")
        mixed = "bf16" if precision == "bf16" else "no"
        # Accelerator state is process-global; a second stage in the same process must not re-create it differently.
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
            AcceleratorState._reset_state()
        # Without cpu=True, accelerate on a machine with no GPU ignores a torchrun launch: every process runs
        # alone (DistributedType.NO) and trains on a slice of the data with no gradient sync.
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=_on_cpu())
        if self.accelerator.num_processes != world_size_from_env():
            raise DistributedConfigError(
                f"launched with WORLD_SIZE={world_size_from_env()} but accelerate runs {self.accelerator.num_processes} "
                "process(es); the ranks would train unsynchronised. Launch with torchrun or accelerate launch")
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.module = self.accelerator.unwrap_model(self.model)
        self.device = self.accelerator.device
        self.process_index = self.accelerator.process_index
        self.num_processes = self.accelerator.num_processes

    def reduce_sum(self, tensor):
        return self.accelerator.reduce(tensor, reduction="sum")

    def autocast(self):
        return self.accelerator.autocast()

    def micro_context(self, last: bool):
        return nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss, last: bool):
        self.accelerator.backward(loss)

    def optimizer_step(self, params, grad_scale: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], grad_scale)
        if max_grad_norm:
            grad_norm = self.accelerator.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def full_state(self, trainable_names: set[str]) -> tuple[dict, dict]:
        trainable = {k: v for k, v in self.module.state_dict().items() if k in trainable_names}
        return trainable, self.optimizer.state_dict()

    def load_full_state(self, model_state: dict, optimizer_state: dict) -> None:
        load_trainable(self.module, model_state)
        self.optimizer.load_state_dict(optimizer_state)

    def finish(self) -> None:
        # With bf16, accelerate rewrote the model's forward to run under autocast, and the rewrite outlives training:
        # evaluation and export would then mix bf16 activations into fp32 code paths (methods other than forward).
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)


def _skip_shm_comm_build() -> None:
    # On the CPU accelerator, DeepSpeed JIT-compiles its shared-memory collective op on the first
    # init_distributed (~85 s measured on a 2-core machine); gloo does the same job. The switch is a private dict.
    try:
        import deepspeed.ops

        if "deepspeed_shm_comm" in getattr(deepspeed.ops, "__compatible_ops__", {}):
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):
        pass


def init_deepspeed_distributed() -> None:
    try:
        import deepspeed
    except ImportError:
        raise DistributedConfigError("dist.backend=deepspeed needs DeepSpeed: pip install 'draftkit[deepspeed]'") from None
    if _on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_comm_build()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            # A single process started without a launcher: DeepSpeed would otherwise look for MPI (mpi4py).
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
            break
    deepspeed.init_distributed(dist_backend="gloo" if _on_cpu() else "nccl")


def _device() -> torch.device:
    if _on_cpu():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class DeepSpeedRuntime(Runtime):
    """ZeRO 1/2/3. The loop's per-token normalisation is applied through the ZeRO optimizer's external loss
    scale: backward runs at scale 1, and just before the optimizer step the scale is set to
    (global token count / world size), which DeepSpeed divides out of its rank-averaged gradients before it
    clips and steps. The result is the same gradient the accelerate path computes."""

    def __init__(self, model: nn.Module, param_groups: list[dict], lr: float, betas, dist: DistributedSettings,
                 config: dict):
        import deepspeed

        init_deepspeed_distributed()
        self.device = _device()
        self.process_index = torch.distributed.get_rank()
        self.num_processes = torch.distributed.get_world_size()
        if dist.offload_optimizer == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(param_groups, lr=lr, betas=tuple(betas), adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas))
        self.base_optimizer = optimizer
        self._group_lengths = [len(g["params"]) for g in param_groups]
        self.params = [p for g in param_groups for p in g["params"]]
        model.to(self.device)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if not hasattr(self.optimizer, "override_loss_scale"):
            raise DistributedConfigError(
                f"DeepSpeed chose {type(self.optimizer).__name__} for this config, which cannot apply draftkit's "
                "per-token gradient normalisation. This happens with bf16 and ZeRO stage 1: use dist=zero2 instead")
        self.module = self.model.module
        self.stage = dist.zero_stage

    def reduce_sum(self, tensor):
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def micro_context(self, last: bool):
        return nullcontext()

    def backward(self, loss, last: bool):
        if not hasattr(self, "_scale_reset"):
            self.optimizer.override_loss_scale(1.0)
            self._scale_reset = True
        self.model.backward(loss, scale_wrt_gas=False)
        if not last:
            self.model.step()  # below the accumulation boundary DeepSpeed only advances its micro-step counter

    def optimizer_step(self, params, grad_scale: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
        self.optimizer.override_loss_scale(float(1.0 / grad_scale))
        self.model.step()
        self.optimizer.override_loss_scale(1.0)
        norm = self.model.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))

    def full_state(self, trainable_names: set[str]) -> tuple[dict, dict]:
        """Unsharded fp32 master weights and Adam moments, shaped like a plain torch AdamW checkpoint. Every
        rank must call this (the gathers are collectives); only the main process needs the result."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        names = {id(p): n for n, p in self.module.named_parameters()}
        model_state, states = {}, {}
        self._link_optimizer_state()
        step = self._optimizer_step_count()
        for index, p in enumerate(self.params):
            full = safe_get_full_fp32_param(p).detach().cpu().clone()
            model_state[names[id(p)]] = full
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
            if all(m is not None for m in moments.values()):
                states[index] = {"step": torch.tensor(float(step)),
                                 **{k: m.detach().cpu().clone() for k, m in moments.items()}}
        groups, start = [], 0
        for group in self.base_optimizer.param_groups:
            count = self._group_lengths[len(groups)]
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + count))})
            start += count
        return model_state, {"state": states, "param_groups": groups}

    def _link_optimizer_state(self) -> None:
        # ZeRO-1/2 link each parameter's view of the Adam moments once, right after the first step of the
        # first param group, when the other groups' lazily created state does not exist yet; relink now.
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _materialize_optimizer_state(self) -> None:
        """Create Adam's (lazily built) state before loading a checkpoint into it: one step at lr 0 with zero
        gradients, which moves no weight (AdamW's decay is lr-scaled too)."""
        groups = self.base_optimizer.param_groups
        flat = [p for g in groups for p in g["params"]]
        if all(self.base_optimizer.state.get(p) for p in flat):
            return
        lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        grads = [p.grad for p in flat]
        for p in flat:
            p.grad = torch.zeros_like(p)
        self.base_optimizer.step()
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
        for p, grad in zip(flat, grads):
            p.grad = grad

    def _optimizer_step_count(self) -> int:
        for state in self.base_optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def load_full_state(self, model_state: dict, optimizer_state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        names = {id(p): n for n, p in self.module.named_parameters()}
        missing = sorted(names[id(p)] for p in self.params if names[id(p)] not in model_state)
        unexpected = sorted(set(model_state) - {names[id(p)] for p in self.params})
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing trainable {missing[:5]}, unexpected "
                               f"{unexpected[:5]}. Fix: resume with the same draft config, or start a fresh run_dir")
        states = {int(k): v for k, v in optimizer_state["state"].items()}
        if states:
            self._materialize_optimizer_state()
            self._link_optimizer_state()
        step = None
        for index, p in enumerate(self.params):
            value = model_state[names[id(p)]].to(self.device, torch.float32)
            safe_set_full_fp32_param(p, value)
            if index in states:
                step = states[index]["step"]
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, states[index][key].to(self.device, torch.float32), key)
        self._copy_into_model({id(p): model_state[names[id(p)]] for p in self.params})
        if step is not None:
            for state in self.base_optimizer.state.values():
                if "step" in state:
                    state["step"] = step.clone() if torch.is_tensor(state["step"]) else float(step)
        for group, saved in zip(self.base_optimizer.param_groups, optimizer_state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})  # lr included: the schedule resumes

    def _copy_into_model(self, values: dict) -> None:
        """The fp32 masters were set above; the model's own (possibly bf16, possibly partitioned) copies are
        separate tensors that DeepSpeed refreshes only after the next step, so set them too."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.params, modifier_rank=0):
                if self.process_index == 0:
                    for p in self.params:
                        p.data.copy_(values[id(p)].to(p.device, p.dtype))
        else:
            with torch.no_grad():
                for p in self.params:
                    p.data.copy_(values[id(p)].to(p.device, p.dtype))

    def finish(self) -> None:
        """Leave `module` as a plain nn.Module holding full weights, so a recipe can evaluate and export it."""
        if self.stage != 3:
            return
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            full = [p.data.detach().clone() for p in params]
        self.model.destroy()
        for p, data in zip(params, full):
            for attr in [a for a in vars(p) if a.startswith("ds_")]:
                delattr(p, attr)
            p.data = data


def load_trainable(model: nn.Module, state: dict) -> None:
    # Checkpoints hold only the trainable tensors, so strict loading would fail; check the keys by hand
    # instead of trusting strict=False, which silently leaves modules at their initial values.
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing_trainable = sorted(trainable & set(missing))
    if unexpected or missing_trainable:
        raise RuntimeError(
            f"checkpoint does not match the model: missing trainable {missing_trainable[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}. Fix: resume with the same draft config, or start a fresh run_dir"
        )


def frozen_dtype(dist: DistributedSettings, precision: str) -> torch.dtype | None:
    """The dtype frozen modules run in: `dist.frozen_dtype` if set; else bf16 under DeepSpeed with bf16 precision,
    whose engine holds the trained weights in bf16 and runs without autocast, so whatever feeds them (a target's
    states, a shared LM head) must be bf16 too; else None (keep the loaded dtype)."""
    if dist.frozen_dtype:
        return getattr(torch, dist.frozen_dtype)
    if dist.backend == "deepspeed" and precision == "bf16":
        return torch.bfloat16
    return None


def prepare_frozen(modules, dist: DistributedSettings, config: dict | None, device, precision: str = "fp32") -> list:
    """Frozen modules (a target) run forward only: no gradients, no optimizer state; cast to dist.frozen_dtype.
    Under ZeRO-3 each becomes a DeepSpeed engine without an optimizer, so its parameters are partitioned across
    ranks and gathered layer by layer during its forward; every rank must then run it in lockstep."""
    engines = []
    for module in modules:
        if "_draftkit_frozen_engine" in module.__dict__:  # already partitioned by an earlier stage
            engines.append(module.__dict__["_draftkit_frozen_engine"])
            continue
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        dtype = frozen_dtype(dist, precision)
        if dtype is not None:
            module.to(dtype)
        if dist.backend == "deepspeed" and dist.zero_stage == 3:
            import deepspeed

            cfg = frozen_config(config)
            if dtype is not None:
                cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
            engine, *_ = deepspeed.initialize(model=module, config=cfg)
            engine.eval()
            # Kept on the module (outside its registered submodules) so a later stage reuses the partitioning.
            module.__dict__["_draftkit_frozen_engine"] = engine
            engines.append(engine)
        else:
            module.to(device)
    return engines


def frozen_param_counts(modules) -> tuple[int, int]:
    """(elements this rank holds, elements in all) over the frozen modules' parameters; under ZeRO-3 a rank holds
    only its partition (`ds_tensor`) of each."""
    params = [p for module in modules for p in module.parameters()]
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return local, total
