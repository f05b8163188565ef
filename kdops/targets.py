"""The GPUs kdops' launch configurations are decided for, described without needing one present.

A `GPU` holds what the launchers read (compute capability, SM count, shared memory and registers) and
what the cost model reads (achievable rates). The launchers take the description of the live device
(`of_device`); the tools that work without a GPU (`python -m bench.compile`, `python -m bench.model`) ask
for a named one instead with `assume(name)`, so that one code path — `kdops.launchers.logits.logits_config` and
`kdops.launchers.linear.fused_config` — decides every configuration, with or without the device.

`None` stands for no GPU: CPU tensors under Triton's interpreter, whose configurations are sized for the
interpreter's per-operation cost instead.

Rates are what a well-tuned kernel reaches, not the data sheet's peaks: dense bf16 / fp16 tensor-core
matmuls at about 80 % of peak (798 TFLOP/s on an H100 SXM, cuBLAS at large shapes), HBM at about 90 % of
its peak bandwidth; float32 "ieee" products run on the CUDA cores (FFMA) and TF32 on the tensor cores.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    """One GPU model: what its launch configurations and its cost model depend on."""

    name: str
    capability: tuple[int, int]  # (major, minor): sm_90 is (9, 0)
    sm_count: int
    shared_memory_per_block: int  # bytes, the opt-in maximum of one block
    registers_per_sm: int
    max_registers_per_thread: int
    hbm_bytes_per_s: float  # achievable
    matmul_flops_16bit: float  # achievable dense bf16 / fp16 tensor-core rate
    matmul_flops_tf32: float
    fp32_flops: float  # FFMA on the CUDA cores (an FMA counted as 2 flops)
    memory_bytes: int

    @property
    def arch(self) -> str:
        """'sm_90', 'sm_80', ..."""
        return f"sm_{self.capability[0]}{self.capability[1]}"

    def matmul_flops(self, dtype: torch.dtype, tf32: bool = False) -> float:
        """The achievable rate of a matmul with operands of `dtype` (float32: "ieee" unless `tf32`)."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.matmul_flops_16bit
        if dtype == torch.float32:
            return self.matmul_flops_tf32 if tf32 else self.fp32_flops
        return self.fp32_flops / 2  # float64 on the CUDA cores of a data-centre part: half the fp32 rate


# Data-sheet peaks (SXM parts): H100 989 TFLOP/s bf16 dense, 494 TF32, 67 FP32, 3.35 TB/s HBM3;
# H200 the same chip with 4.8 TB/s HBM3e and 141 GB; A100 312 bf16, 156 TF32, 19.5 FP32, 2.04 TB/s (80 GB).
H100 = GPU("h100", (9, 0), 132, 227 * 1024, 65536, 255, 0.9 * 3.35e12, 798e12, 0.8 * 494e12, 0.8 * 67e12,
           80 * 10**9)
H200 = GPU("h200", (9, 0), 132, 227 * 1024, 65536, 255, 0.9 * 4.8e12, 798e12, 0.8 * 494e12, 0.8 * 67e12,
           141 * 10**9)
A100 = GPU("a100", (8, 0), 108, 163 * 1024, 65536, 255, 0.9 * 2.039e12, 0.8 * 312e12, 0.8 * 156e12,
           0.8 * 19.5e12, 80 * 10**9)
GPUS = {gpu.name: gpu for gpu in (H100, H200, A100)}

_assumed: list[GPU] = []


def by_name(name: str) -> GPU:
    """The `GPU` called `name` ('h100', 'h200', 'a100'; case-insensitive); ValueError otherwise."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


def assumed() -> GPU | None:
    """The GPU of the innermost `assume` block, or None outside one."""
    return _assumed[-1] if _assumed else None


@contextlib.contextmanager
def assume(gpu: GPU | str):
    """Within the block, every device is taken to be `gpu`: the launchers choose its configurations (for the
    tools that compile or model kernels on a machine without it)."""
    _assumed.append(by_name(gpu) if isinstance(gpu, str) else gpu)
    try:
        yield _assumed[-1]
    finally:
        _assumed.pop()


def _live(index: int) -> GPU:
    """The description of CUDA device `index`: a known model's entry where the name matches, otherwise one
    built from the device's properties (with H100 rates scaled by SM count, for the cost model only)."""
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    for gpu in GPUS.values():
        if gpu.name.upper() in props.name.upper() and gpu.capability == capability:
            return gpu
    shared = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    registers = getattr(props, "regs_per_multiprocessor", 65536)
    scale = props.multi_processor_count / H100.sm_count
    return GPU(props.name, capability, props.multi_processor_count, shared, registers, 255,
               H100.hbm_bytes_per_s * scale, H100.matmul_flops_16bit * scale, H100.matmul_flops_tf32 * scale,
               H100.fp32_flops * scale, props.total_memory)


_live_cache: dict[int, GPU] = {}


def of_device(device: torch.device) -> GPU | None:
    """The GPU whose configurations serve tensors on `device`: the assumed one inside `assume`, the live
    CUDA device's, or None (no GPU: Triton's interpreter)."""
    if _assumed:
        return _assumed[-1]
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _live_cache:
        _live_cache[index] = _live(index)
    return _live_cache[index]
