"""Kernels and their roofline: a path is a list of `Kernel`s (flops, named HBM bytes, launches), each timed by

    seconds = launches · max(LAUNCH_S, mm_flops / (matmul rate · f) + ew_flops / (fp32 rate · f), bytes / HBM rate)

with f = min(1, programs / SMs) (a fused kernel: its parts one after the other, `Kernel.seconds`), and grouped
into `Phase`s by name. `Ctx` is the case a path is counted for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdops import targets
import kdops.launchers.logits
import kdops.paths.chunked
from kdops.divergences import Divergence

from .paths import DEFAULT_K
from .prediction import Phase, Shape
from .rates import FUSED_FORWARD_TILE_S, FUSED_L2_BYTES_PER_S, H100_MATMUL_RATE, LAUNCH_S
from .units import traffic_text


@dataclass
class Kernel:
    """`launches` identical launches of one kernel; flops and bytes are per launch. `programs` None: the launch
    fills the GPU. `items`: (name, bytes per launch) of the traffic; `bytes_l2` None: the same as `bytes`.
    `tiles`: a fused kernel (`FUSED_L2_BYTES_PER_S`) visiting that many tiles of `block_n` rows per launch."""

    phase: str
    mm_flops: float = 0.0
    mm_dtype: torch.dtype | None = None
    ew_flops: float = 0.0
    items: list = field(default_factory=list)
    bytes_l2: float | None = None
    programs: int | None = None
    launches: float = 1.0
    tiles: int = 0
    block_n: int = 0
    forward: bool = False

    @property
    def bytes(self) -> float:
        return sum(b for _, b in self.items)

    @property
    def hbm_bytes(self) -> float:
        """HBM traffic per launch: a fused kernel's tile loads come from L2 (`bytes_l2` from HBM)."""
        return self.bytes_l2 if self.tiles and self.bytes_l2 is not None else self.bytes

    def seconds(self, gpu: targets.GPU, tf32: bool, l2: bool = False) -> float:
        share = 1.0 if self.programs is None else min(1.0, self.programs / gpu.sm_count)
        compute = self.ew_flops / (gpu.fp32_flops * share)
        if self.mm_flops:
            compute += self.mm_flops / (gpu.matmul_flops(self.mm_dtype, tf32=tf32) * share)
        if self.tiles:
            # A fused kernel: its matmuls, elementwise work, tile loads (from L2) and, in the forward, per-tile
            # reductions one after the other; HBM reads each operand once per launch (`bytes_l2`).
            scale = H100_MATMUL_RATE / gpu.matmul_flops_16bit  # other GPUs: by their tensor-core rate
            tile_s = FUSED_FORWARD_TILE_S.get(self.block_n, FUSED_FORWARD_TILE_S[64]) if self.forward else 0.0
            serial = compute + scale * (self.bytes / FUSED_L2_BYTES_PER_S + self.tiles * tile_s)
            return self.launches * max(LAUNCH_S, serial, self.bytes_l2 / gpu.hbm_bytes_per_s)
        traffic = self.bytes_l2 if l2 and self.bytes_l2 is not None else self.bytes
        return self.launches * max(LAUNCH_S, compute, traffic / gpu.hbm_bytes_per_s)


def to_phases(kernels: list[Kernel], gpu: targets.GPU, tf32: bool) -> tuple:
    """Kernels grouped by phase name (first-seen order), totals over launches, with a named-bytes detail."""
    order: dict[str, list[Kernel]] = {}
    for k in kernels:
        order.setdefault(k.phase, []).append(k)
    phases = []
    for name, group in order.items():
        named: dict[str, float] = {}
        for k in group:
            for label, b in k.items:
                named[label] = named.get(label, 0.0) + b * k.launches
        launches = sum(k.launches for k in group)
        programs = sorted({k.programs for k in group if k.programs is not None})
        detail = "; ".join(f"{label} {traffic_text(b)}" for label, b in named.items() if label and b)
        if programs:
            detail += f"; {'/'.join(map(str, programs))} programs per launch"
        detail += f"; {launches:,.0f} launches" if launches != 1 else ""
        phases.append(Phase(
            name=name, flops=sum(k.mm_flops * k.launches for k in group),
            bytes=sum(k.hbm_bytes * k.launches for k in group), seconds=sum(k.seconds(gpu, tf32) for k in group),
            detail=detail.lstrip("; "), elementwise_flops=sum(k.ew_flops * k.launches for k in group),
            launches=launches,
            bytes_l2=sum((k.bytes if k.bytes_l2 is None else k.bytes_l2) * k.launches for k in group),
            seconds_l2=sum(k.seconds(gpu, tf32, l2=True) for k in group), items=tuple(named.items())))
    return tuple(phases)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def chunk_counts(total: int, size: int) -> list[tuple[int, int]]:
    """(chunk size, how many) of `total` rows in chunks of `size`, the last one shorter."""
    full, rest = divmod(total, size)
    return [(size, full)] * (full > 0) + [(rest, 1)] * (rest > 0)


def kernel_constants():
    """(NUM_STATS, NUM_PARTIAL) of the kernels (imported lazily: importing them imports triton)."""
    from kdops.kernels import partials, passes

    return int(passes.NUM_STATS.value), int(partials.NUM_PARTIAL.value)


@dataclass(frozen=True)
class Ctx:
    """The case a path's kernels are counted for: shape, GPU, divergence, dtype and `predict`'s options."""

    shape: Shape
    gpu: targets.GPU
    divergence: Divergence
    dtype: torch.dtype
    tf32: bool
    budget: int | None = None  # the chunked paths' memory_budget (None: kdops.paths.chunked.MEMORY_BUDGET)
    k: int = DEFAULT_K  # the sparse teacher's top-k (the top-k paths only)
    softcaps: int = 0  # how many sides' logits are softcapped (the student's only on the top-k paths)
    teachers: int = 1  # teachers mixed into one target (`kdops.ensemble`; kd_loss-triton and chunked)
    mix: str = ""  # "ensemble" or "logit_sum" with several teachers
    parts: bool = False  # return_parts: the kernels on logits' PARTS specialization (`rates.parts_kernel_flops`)

    @property
    def b(self) -> int:
        return itemsize(self.dtype)

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def acc(self) -> int:
        return itemsize(self.acc_dtype)

    @property
    def transform(self) -> int:
        """The kernels' TRANSFORM bits (`Canonical.transform`) of this divergence with `softcaps` capped sides."""
        return self.divergence.canonical().with_softcaps(*((30.0, 30.0)[:self.softcaps] + (None, None))[:2]).transform

    @property
    def two_pass(self) -> bool:
        return kdops.launchers.logits.kind_of(self.divergence.canonical())[1]

    @property
    def passes(self) -> int:
        return 2 if self.two_pass else 1
