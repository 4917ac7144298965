"""Model FLOPs of a training step, counted as the step executes them, and the rates the loop logs from them.

torch's FLOP counter (torch.utils.flop_counter) counts matrix multiplications and attention kernels, forward and
backward, from the shapes each one is called with: no host sync and no change to the arithmetic. Counting one real
micro-step gives the model FLOPs per token (everything the step runs: a frozen target's forward, the draft's forward
and backward, the LM-head work of a loss); the loop's tokens/s then gives the achieved FLOP/s, and a device's peak
gives the model FLOPs utilization (MFU). Attention counts the full T x T square (the PaLM/Megatron convention; a causal
kernel does about half of it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _as_many_heads_as(query_shape, shape):
    """Grouped-query attention hands SDPA keys and values with fewer heads than the query (enable_gqa); each query
    head still does the full work, so count them as if keys and values had the query's head count."""
    return (*shape[:-3], query_shape[-3], *shape[-2:])


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, _as_many_heads_as(query_shape, key_shape),
                           _as_many_heads_as(query_shape, value_shape))


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                         **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, _as_many_heads_as(query_shape, key_shape),
                                    _as_many_heads_as(query_shape, value_shape))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with the SDPA kernels counted for grouped-query attention (torch's own count asserts
    that keys have the query's head count) and the CPU flash-attention kernels it does not know added (so CPU counts
    include attention exactly as GPU counts do)."""
    mapping = {}
    for kernel in ("flash", "efficient", "cudnn", "flash_attention_for_cpu"):
        name = f"_scaled_dot_product_{kernel}" if kernel.endswith("cpu") else f"_scaled_dot_product_{kernel}_attention"
        for op_name, fn in ((name, _sdpa_flops), (f"{name}_backward", _sdpa_backward_flops)):
            if hasattr(torch.ops.aten, op_name):
                mapping[getattr(torch.ops.aten, op_name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (matmuls and attention, forward and backward) that calling fn() executes."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


class StepFlops:
    """The model FLOPs per token of one counted micro-step, and the rates they give at a measured tokens/s.

    num_devices: the processes the tokens/s is summed over (the loop logs tokens/s of all ranks together);
    peak_tflops: one device's peak in TFLOP/s, for MFU (None: no MFU)."""

    def __init__(self, num_devices: int = 1, peak_tflops: float | None = None):
        self.num_devices = num_devices
        self.peak_tflops = peak_tflops
        self.per_token: float | None = None

    @contextmanager
    def counting(self, tokens: int) -> Iterator[None]:
        """Count what runs inside (one micro-step, forward and backward, of `tokens` input tokens on this rank)."""
        with flop_counter() as counter:
            yield
        self.per_token = counter.get_total_flops() / max(tokens, 1)

    def rates(self, tokens_per_s: float) -> dict[str, float]:
        """flops_per_token, tflops_per_device and, with a peak, mfu; nothing before a step was counted."""
        if self.per_token is None:
            return {}
        per_device = self.per_token * tokens_per_s / self.num_devices
        rates = {"flops_per_token": self.per_token, "tflops_per_device": per_device / 1e12}
        if self.peak_tflops:
            rates["mfu"] = per_device / (self.peak_tflops * 1e12)
        return rates
