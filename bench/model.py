"""The paper cost model: predicted time, HBM traffic and extra memory of every path, before any GPU runs.

    python -m bench.model [--shape TOKENSxHSxHTxVOCAB ...] [--gpu h100|h200|a100] [--divergence D ...]
                          [--dtype bf16|fp16|fp32] [--tf32] [--json] [--markdown PATH]

For each path (`PATHS`) and each kernel it launches, the model counts the matmul flops, the elementwise
flops and the HBM bytes (named: weights re-read per chunk or per row block, logits buffers written and read
per pass, gradient scratch read-modify-writes, ...), and takes a roofline per kernel:

    seconds(kernel) = max(LAUNCH_S,  mm_flops / (matmul rate · f) + elementwise flops / (fp32 rate · f),
                          bytes / HBM bandwidth)

summed over the kernels. f = min(1, programs / SMs) is the share of the GPU a launch with fewer programs
than SMs can use (it limits the compute rates, not the bandwidth). The rates are `kdops.targets`' achievable
ones. Launch configurations come from the code itself — `kdops._fused.fused_config`, `kdops._fused.slice_columns`
(G buffers under `GRADIENT_BYTES`), `kdops._launch.logits_config`, `kdops._chunked.chunk_rows /
bytes_per_row`, `kdops._torch_backend.chunk_rows` — so the model follows the code when they change.

Assumptions (see MODEL.md for the numbers they give):
* The fused Triton kernels as the H100 measured them (FUSED_L2_BYTES_PER_S, FUSED_FORWARD_TILE_S): their
  matmuls, elementwise work, tile loads from L2 and the forward's per-tile reductions one after the other,
  each operand read from HBM once per launch. (Until the H100 campaign the model took every tile load from
  HBM, an upper bound 1.3–2.1 × the measured times.) Elsewhere `total_l2_s` is the variant where the float32
  scratch stays in L2. cuBLAS matmuls read each operand once (their rate is cuBLAS's achievable one).
* Elementwise work of kdops' Triton kernels: LOGITS_KERNEL_FLOPS per (row, vocabulary) element of both
  models' values, per forward pass and for the gradient, calibrated on the H100 campaign and scaled by the
  kernels' SASS counts since (LOGITS_KERNEL_SASS), FUSED_TILE_FLOPS for the fused kernels (the H200's), at
  the CUDA-core fp32 rate; PyTorch's and the peers' elementwise kernels ELEMENTWISE_FLOPS per element and
  pass.
* The torch paths (kd_loss backend="torch", fused_linear_kd_loss backend="torch", the references) are counted
  by running their code on the CPU at a small probe shape under a dispatch mode that records every aten
  operator: each reads its inputs once and writes its outputs once (no fusion), elementwise operators are
  bandwidth-bound, matmuls are rooflined; the probe's dimensions are mapped to the real ones. An estimate.
* Liger's and TRL's losses are modelled from their sources (liger-kernel 0.8.5, trl 1.16.0); see
  `_liger_chunked` and `_trl_chunked` for what was read and what was assumed.
* The floor is `bench.floor.floor_work`: 2·N·V·(3·Hs + Ht) matmul flops at the input dtype's matmul rate
  (frozen teacher) for the fused API, 3·N·V·b bytes at the HBM rate for `kd_loss`.

As a library: `predict(path, shape, gpu, divergence, dtype)` → `Prediction`; `predict_all(...)`;
`record_fields(case, competitor, gpu)` gives the `predicted_*` fields the bench stores beside each GPU
measurement (bench/report.py), so the first GPU run calibrates the model.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import weakref
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kdops
from kdops import _chunked, _fused, _launch, _sliced, _torch_backend, targets
from kdops.divergences import Divergence, GeneralizedJSD

from .cases import FUSED, FUSED_TOPK, KD_LOSS, TOPK, Case
from .floor import floor_work

#: Elementwise flops per (row, vocabulary) element per pass of a PyTorch-level kernel over both models'
#: values (the compiled reference's and the peers' fused elementwise kernels): exponentials, online sums.
ELEMENTWISE_FLOPS = 64
#: The kernels on logits' flop-equivalents per (row, vocabulary) element of both models' values, per pass of the
#: forward and for the gradient: each kernel's profiled time × the H100's fp32 rate (kdops.targets) ÷ the
#: elements, in the chunked path's 2048-row float32 chunks at 8192 × 128256. First calibrated on the first H100
#: campaign (bench/results/nvidia-h100-campaign, code fcf6a3d): forward KL 3.87 ms per pass and 4.81 ms for its
#: gradient, generalized JSD 5.10 ms per pass and 4.18 ms (197 / 245 and 260 / 213). Now on the 0.3.4 campaign
#: (nvidia-h100-campaign/0.3.4 and 0.3.5-wide-tiles, the same kernels on logits; means of the two profiles):
#: forward KL 3.48 ms per pass (1024 columns, 4 warps) and 4.79 ms, generalized JSD 4.04 ms per pass and 3.66 ms
#: (its shared ratios and MUFU approximations: −21 % and −12 %, where their SASS counts fell 28 % and 41 %: these
#: kernels move both float32 logits at about 2.1–2.4 TB/s, near what bandwidth they reach, not at their SASS
#: counts' compute bound). On bf16 logits (kd_loss) they take less (the first campaign's tune: 1.81 + 1.12 ms
#: for forward KL at 4096 × 128256). Kinds not measured take the larger figures.
LOGITS_KERNEL_FLOPS = {"kl": (177, 244), "jsd": (206, 187)}
#: The fused kernels' elementwise work per element (their tiles reduce per tile, row by row), calibrated on the
#: H200 campaign (bench/results/nvidia-h200-after, 64 × 64 tiles): forward KL 272 / 172, generalized JSD 305 per
#: pass / 322.
FUSED_TILE_FLOPS = {"kl": (272, 172), "jsd": (305, 322)}
#: The fused kernels as the H100 ran them (bench/results/nvidia-h100-campaign: the profile at 64 × 64 tiles and
#: tune-headline at 128 × 64 and 128 × 128, forward KL and generalized JSD at 8192 × 128256 × 4096, bf16): their
#: matmuls (at the cuBLAS rate), elementwise work (FUSED_TILE_FLOPS), tile loads and the forward's per-tile
#: reductions take turns rather than overlap. The tile loads come from L2 at an effective 16 TB/s (the gradient
#: kernels: 15.1, 16.6, 16.8 TB/s at the three tilings); the forward's per-tile reductions cost, over the whole GPU,
#: 0.226 µs a tile of 64 rows (forward KL 57.9 ms, generalized JSD 58.6 ms per pass beyond the rest at 64 × 64)
#: and about 0.09 µs one of 128 (0.095 at 128 × 64, 0.086 at 128 × 128). Other GPUs: scaled by their tensor-core
#: rate against the H100's.
FUSED_L2_BYTES_PER_S = 16e12
FUSED_FORWARD_TILE_S = {64: 0.226e-6, 128: 0.09e-6}
H100_MATMUL_RATE = targets.H100.matmul_flops_16bit
#: The kernels on logits' SASS instructions per element of their vocabulary loops (`python -m bench.loops`: sm_90,
#: bf16, the headline's launch configuration and alignment; a kind's forward passes summed, then its gradient):
#: for the code the campaign measured (LOGITS_KERNEL_FLOPS) and for the code now. The model scales the measured
#: figures by now / then, so that a change to these kernels moves the prediction before a GPU measures it;
#: `python -m bench.loops --check` (a test) fails where "now" is no longer the code's. History: the H200
#: campaign measured 93.8 / 46.2 (KL) and 255.4 / 148.9 (JSD) instructions; the sums kept in lanes, flushed
#: exponentials and series-only logarithms (kernels/divergences.py) brought them to 47.6 / 39.1 and
#: 181.4 / 97.2, which the first H100 campaign measured; JSD's shared ratios and MUFU approximations
#: (`jsd_terms`, `log_approx`, `div_approx`) to 130.9 / 56.9, which the 0.3.4 campaign measured (a scaling
#: by counts would have predicted twice the gain the GPU gave: see LOGITS_KERNEL_FLOPS).
LOGITS_KERNEL_SASS = {"kl": ((47.1, 39.1), (47.1, 39.1)), "jsd": ((130.9, 56.9), (130.9, 56.9))}


#: The tile transforms (`kernels/transforms.py`): instructions they add per element to a forward pass and to the
#: gradient, from the sm_90 SASS of the kernels on logits (bf16, BLOCK_V = 2048, 8 warps; forward KL, and
#: generalized JSD where it differs): a softcapped side (its tanh: one exponential, one division, the
#: small-argument series; in the gradient also its slope) and TAID's mixed target. Not measured on a GPU yet:
#: turned into flop-equivalents at FLOPS_PER_INSTRUCTION, like the sparse teacher's kernels.
SOFTCAP_INSTRUCTIONS = (30, 39)
TAID_INSTRUCTIONS = (5, 6)


def logits_kernel_flops(divergence: Divergence, softcaps: int = 0, lanes: bool = True) -> tuple[float, float]:
    """(per forward pass, gradient) flop-equivalents per element of the kernels on `divergence`'s kind, with
    `softcaps` softcapped sides (0, 1 or 2) and TAID's mixed target where `divergence` is TAID. `lanes`: the
    kernels on logits (LOGITS_KERNEL_FLOPS scaled by LOGITS_KERNEL_SASS); otherwise the fused kernels, whose
    tiles still reduce per tile (FUSED_TILE_FLOPS)."""
    kind = {0: "kl", 1: "jsd"}.get(int(_launch.kind_of(divergence.canonical())[0]))
    measured = LOGITS_KERNEL_FLOPS if lanes else FUSED_TILE_FLOPS
    per_pass, per_gradient = measured.get(kind, tuple(max(figures) for figures in zip(*measured.values())))
    if lanes:
        (then_pass, then_gradient), (now_pass, now_gradient) = LOGITS_KERNEL_SASS.get(kind, LOGITS_KERNEL_SASS["jsd"])
        per_pass, per_gradient = per_pass * now_pass / then_pass, per_gradient * now_gradient / then_gradient
    extra = [softcaps * n for n in SOFTCAP_INSTRUCTIONS]
    if divergence.canonical().teacher_share != 1.0:
        extra = [e + n for e, n in zip(extra, TAID_INSTRUCTIONS)]
    return per_pass + FLOPS_PER_INSTRUCTION * extra[0], per_gradient + FLOPS_PER_INSTRUCTION * extra[1]
#: The sparse teacher's kernels (`kernels/topk.py`): instructions per element of their vocabulary loops in the
#: sm_90 SASS (`bench.compile`'s cubins at BLOCK_V = 2048, 8 warps, one id per window): (the loop with its
#: first window, each further window) for the complement's log-sum-exp and for the gradient. Not measured on a
#: GPU yet: turned into flop-equivalents at the forward-KL statistics kernel's measured ratio, 272
#: flop-equivalents for its 94 instructions per element.
TOPK_LOOP_INSTRUCTIONS = ((38.4, 4.6), (32.5, 7.4))
FLOPS_PER_INSTRUCTION = 272 / 94


def topk_kernel_flops(k: int, vocab: int, config: dict, softcap: bool = False) -> tuple[float, float]:
    """(complement, gradient) flop-equivalents per element: the loop, plus one more window per id a tile holds
    on average (k·BLOCK_V / V), plus the student's softcap (SOFTCAP_INSTRUCTIONS) where it has one."""
    windows = k * config["BLOCK_V"] / vocab / config["BLOCK_C"]
    return tuple(FLOPS_PER_INSTRUCTION * (loop + windows * window + (cap if softcap else 0))
                 for (loop, window), cap in zip(TOPK_LOOP_INSTRUCTIONS, SOFTCAP_INSTRUCTIONS))


#: The sparse teacher's k in the model's top-k paths unless `predict(..., k=)` says otherwise.
DEFAULT_K = 32

#: The least time a launch takes (the host's launch overhead of an eager op or a Triton kernel).
LAUNCH_S = 5e-6

PATHS = ("kd_loss-triton", "kd_loss-torch", "kd_loss-reference", "fused", "chunked", "sliced", "fused-torch",
         "reference", "liger-chunked", "trl-chunked")
KD_PATHS = PATHS[:3]
DESCRIPTIONS = {
    "kd_loss-triton": "kd_loss, Triton kernels on existing [N, V] logits",
    "kd_loss-torch": "kd_loss, backend=\"torch\" (reference math over row chunks; estimate)",
    "kd_loss-reference": "kdops.reference.kd_loss on [N, V] logits (estimate)",
    "fused": "fused_linear_kd_loss impl=\"fused\" (logit tiles recomputed in Triton kernels)",
    "chunked": "fused_linear_kd_loss impl=\"chunked\" (token chunks, float32 logits, kernels on logits)",
    "sliced": "fused_linear_kd_loss impl=\"sliced\" (vocabulary slices of every row, float32 logits, kernels on "
              "logits, the logits again in the backward)",
    "fused-torch": "fused_linear_kd_loss backend=\"torch\" (chunks, reference math under autograd; estimate)",
    "reference": "kdops.reference.fused_linear_kd_loss (float32 [N, V] logits; estimate)",
    "liger-chunked": "Liger LigerFusedLinearJSDLoss (1024-token chunks, torch.compile; estimate)",
    "trl-chunked": "TRL 1.16 _chunked_divergence_loss (4096 × 32768 float32 tiles)",
}

#: The paths that take several teachers (`teacher_mix`) in the model.
MIX_PATHS = ("kd_loss-triton", "chunked")

#: The sparse-teacher paths (`kdops.topk`); predicted with `k` (the teacher's top-k), not in PATHS' tables.
TOPK_PATHS = ("kd_loss-topk", "topk-chunked", "topk-gathered")
DESCRIPTIONS.update({
    "kd_loss-topk": "topk_kd_loss, Triton kernels on existing [N, V] student logits (tail bucket)",
    "topk-chunked": "fused_linear_topk_kd_loss impl=\"chunked\" (token chunks, float32 student logits, top-k kernels)",
    "topk-gathered": "fused_linear_topk_kd_loss impl=\"gathered\" (tail renormalize: the k gathered weight rows only)",
})

HEADLINE = "8192x4096x4096x128256"
STANDARD_SHAPES = (("Llama-3 8B widths", HEADLINE), ("Qwen2.5 1.5B → 7B", "8192x1536x3584x151936"),
                   ("Gemma-2 2B → 9B", "8192x2304x3584x256000"))
DEFAULT_DIVERGENCES = ("forward_kl", "generalized_jsd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GB = 1e9
MiB = 2**20


# --- what is predicted ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """N tokens, student / teacher hidden widths, vocabulary (`parse("8192x4096x4096x128256")`)."""

    tokens: int
    hidden_student: int
    hidden_teacher: int
    vocab: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        parts = text.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 1:
            raise ValueError(f"shape: expected TOKENSxHSxHTxVOCAB such as {HEADLINE}, got {text!r}")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.tokens}x{self.hidden_student}x{self.hidden_teacher}x{self.vocab}"


@dataclass(frozen=True)
class Phase:
    """One kernel (or a group of identical launches) of a path: matmul flops, HBM bytes, predicted seconds.
    `items` names the bytes; `*_l2` are the L2-reuse variant (equal to the others outside the fused kernels)."""

    name: str
    flops: float
    bytes: float
    seconds: float
    detail: str = ""
    elementwise_flops: float = 0.0
    launches: float = 0.0
    bytes_l2: float = 0.0
    seconds_l2: float = 0.0
    items: tuple = ()

    @property
    def forward(self) -> bool:
        return self.name.startswith("fwd")


@dataclass(frozen=True)
class Prediction:
    path: str
    shape: Shape
    gpu: str
    divergence: str
    dtype: str
    tf32: bool
    phases: tuple
    floor_s: float
    extra_bytes: float
    extra_detail: str = ""
    notes: tuple = ()

    @property
    def forward_s(self) -> float:
        return sum(p.seconds for p in self.phases if p.forward)

    @property
    def backward_s(self) -> float:
        return sum(p.seconds for p in self.phases if not p.forward)

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def total_l2_s(self) -> float:
        return sum(p.seconds_l2 for p in self.phases)

    @property
    def ratio_to_floor(self) -> float:
        return self.total_s / self.floor_s

    @property
    def hbm_bytes(self) -> float:
        return sum(p.bytes for p in self.phases)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    def as_record(self) -> dict:
        """The flat `predicted_*` fields stored beside a measurement."""
        return {"predicted_path": self.path, "predicted_forward_ms": self.forward_s * 1e3,
                "predicted_backward_ms": self.backward_s * 1e3, "predicted_total_ms": self.total_s * 1e3,
                "predicted_total_l2_ms": self.total_l2_s * 1e3, "predicted_ratio_floor": self.ratio_to_floor,
                "predicted_extra_bytes": int(self.extra_bytes)}

    def as_json(self) -> dict:
        return {"path": self.path, "shape": str(self.shape), "gpu": self.gpu, "divergence": self.divergence,
                "dtype": self.dtype, "tf32": self.tf32, **self.as_record(),
                "floor_ms": self.floor_s * 1e3,
                "hbm_bytes": self.hbm_bytes, "matmul_flops": self.flops, "extra_detail": self.extra_detail,
                "notes": list(self.notes),
                "phases": [{"name": p.name, "flops": p.flops, "elementwise_flops": p.elementwise_flops,
                            "bytes": p.bytes, "seconds": p.seconds, "bytes_l2": p.bytes_l2,
                            "seconds_l2": p.seconds_l2, "launches": p.launches, "detail": p.detail}
                           for p in self.phases]}


#: The fields of `Prediction.as_record`, as bench records store them (bench/report.py: PREDICTED_FIELDS).
RECORD_FIELDS = ("predicted_path", "predicted_forward_ms", "predicted_backward_ms", "predicted_total_ms",
                 "predicted_total_l2_ms", "predicted_ratio_floor", "predicted_extra_bytes")


# --- kernels and their roofline -----------------------------------------------------------------------------

@dataclass
class _Kernel:
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


def _phases(kernels: list[_Kernel], gpu: targets.GPU, tf32: bool) -> tuple:
    """Kernels grouped by phase name (first-seen order), totals over launches, with a named-bytes detail."""
    order: dict[str, list[_Kernel]] = {}
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
        detail = "; ".join(f"{label} {_traffic(b)}" for label, b in named.items() if label and b)
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


def _traffic(nbytes: float) -> str:
    return f"{nbytes / GB:,.2f} GB" if nbytes >= 0.01 * GB else f"{nbytes / 1e6:,.2f} MB"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    """(chunk size, how many) of `total` rows in chunks of `size`, the last one shorter."""
    full, rest = divmod(total, size)
    return [(size, full)] * (full > 0) + [(rest, 1)] * (rest > 0)


def _kernel_constants():
    """(NUM_STATS, NUM_PARTIAL) of the kernels (imported lazily: importing them imports triton)."""
    from kdops.kernels import partials, passes

    return int(passes.NUM_STATS.value), int(partials.NUM_PARTIAL.value)


@dataclass(frozen=True)
class _Ctx:
    shape: Shape
    gpu: targets.GPU
    divergence: Divergence
    dtype: torch.dtype
    tf32: bool
    budget: int | None = None  # the chunked paths' memory_budget (None: kdops._chunked.MEMORY_BUDGET)
    k: int = DEFAULT_K  # the sparse teacher's top-k (the top-k paths only)
    softcaps: int = 0  # how many sides' logits are softcapped (the student's only on the top-k paths)
    teachers: int = 1  # teachers mixed into one target (`kdops.ensemble`; kd_loss-triton and chunked)
    mix: str = ""  # "ensemble" or "logit_sum" with several teachers

    @property
    def b(self) -> int:
        return _itemsize(self.dtype)

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def acc(self) -> int:
        return _itemsize(self.acc_dtype)

    @property
    def transform(self) -> int:
        """The kernels' TRANSFORM bits (`Canonical.transform`) of this divergence with `softcaps` capped sides."""
        return self.divergence.canonical().with_softcaps(*((30.0, 30.0)[:self.softcaps] + (None, None))[:2]).transform

    @property
    def two_pass(self) -> bool:
        return _launch.kind_of(self.divergence.canonical())[1]

    @property
    def passes(self) -> int:
        return 2 if self.two_pass else 1


# --- kd_loss, Triton --------------------------------------------------------------------------------------------

def _kernels_on_logits(ctx: _Ctx, rows: int, itemsize: int, label: str, phase: str, write_grad: bool,
                       launches: float = 1.0, grad_label: str = "student gradient written",
                       grad_itemsize: int | None = None) -> list[_Kernel]:
    """The kernels on logits (`kernels/logits.py`) over `rows` rows of both [rows, V] logits of `itemsize`
    bytes: the forward's passes (both logits read per pass), or the backward (read both, write G_s in
    `grad_itemsize` bytes, by default the logits')."""
    v, gpu = ctx.shape.vocab, ctx.gpu
    num_stats, _ = _kernel_constants()
    config = _launch.logits_config(rows, v, gpu, ctx.acc_dtype)
    programs = _cdiv(rows, config["BLOCK_R"])
    both = 2 * rows * v * itemsize
    stats = rows * num_stats * ctx.acc
    per_pass, per_gradient = logits_kernel_flops(ctx.divergence, ctx.softcaps)
    if write_grad:
        return [_Kernel(phase, ew_flops=rows * v * per_gradient, programs=programs, launches=launches,
                        items=[(f"both {label} read", both),
                               (grad_label, rows * v * (itemsize if grad_itemsize is None else grad_itemsize)),
                               ("statistics read", stats)])]
    kernels = []
    for p in range(ctx.passes):
        kernels.append(_Kernel(f"{phase} pass {p + 1}", ew_flops=rows * v * per_pass, programs=programs,
                               launches=launches,
                               items=[(f"both {label} read", both),
                                      ("statistics and loss written" if p == ctx.passes - 1 else "", stats)]))
    return kernels


#: float32 [rows, V] reads and writes of a chunk's mix of several teachers (`kdops.ensemble`, PyTorch operators,
#: bandwidth-bound): (per teacher, once) — the mixture: each teacher's log-softmax (read twice, write), its
#: weight added, the stack, then the logsumexp and the temperature; the logit sum: a masked multiply-add per
#: teacher and the mask. Counted from the code, not measured.
MIX_PASSES = {"ensemble": (6, 3), "logit_sum": (4, 2)}


def _mix_kernel(ctx: _Ctx, rows: int, launches: float, phase: str, teacher_itemsize: int) -> _Kernel:
    """The mix of ctx.teachers teachers' logits of `rows` rows into one float32 target (`kdops.ensemble`)."""
    per_teacher, once = MIX_PASSES[ctx.mix]
    v = ctx.shape.vocab
    return _Kernel(phase, launches=launches,
                   items=[("the teachers' logits read", ctx.teachers * rows * v * teacher_itemsize),
                          ("the mix's float32 passes", (per_teacher * ctx.teachers + once) * rows * v * 4)])


def _kd_triton(ctx: _Ctx):
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    num_stats, _ = _kernel_constants()
    if ctx.mix:
        return _kd_triton_mixed(ctx)
    kernels = _kernels_on_logits(ctx, n, b, "logits", "fwd: kernels on logits", False)
    kernels += _kernels_on_logits(ctx, n, b, "logits", "bwd: kernel on logits (gradient)", True)
    # Saved statistics, the per-row losses, their masked copy, the mask.
    extra = n * (num_stats * ctx.acc + 2 * ctx.acc + 1)
    detail = f"{num_stats} statistics + 2 losses per row in float32 and the mask: {extra / n:.0f} B per token"
    notes = ("one program per row (BLOCK_R = 1): the forward reads both logits once per pass "
             f"({ctx.passes} for {ctx.divergence.name}), the backward reads both and writes the student's gradient",)
    return kernels, extra, detail, notes


def _kd_triton_mixed(ctx: _Ctx):
    """kd_loss with several teachers (`kdops.ensemble.mixed_kd_rows`): per row chunk the mix into a float32
    target and the kernels on (student, target); the backward recomputes the mix and the forward passes of each
    chunk before the gradient kernel."""
    from kdops import ensemble

    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    chunk = min(n, ensemble.mixed_chunk_rows(v, ctx.teachers, "triton"))
    pair = (b + 4) / 2  # the student's logits in their dtype, the target in float32
    kernels = []
    for rows, count in _chunks(n, chunk):
        for stage in ("fwd", "bwd"):
            kernels.append(_mix_kernel(ctx, rows, count, f"{stage}: mix of the teachers (torch)", b))
            kernels += _kernels_on_logits(ctx, rows, pair, "student and target", f"{stage}: kernels on logits",
                                          False, count)
        kernels += _kernels_on_logits(ctx, rows, pair, "student and target", "bwd: kernel on logits (gradient)",
                                      True, count, grad_itemsize=b)
    peak_chunk = chunk * v * 4 * (5 + ensemble.MIX_TEMPORARIES * ctx.teachers)
    detail = (f"{_cdiv(n, chunk)} chunks of {chunk} rows (kdops._torch_backend.BUDGET_BYTES): one chunk's target "
              "and mix temporaries at a time")
    notes = (f"{ctx.teachers} teachers ({ctx.mix}): the mix in PyTorch (MIX_PASSES, an estimate), recomputed in "
             "the backward with the chunk's forward passes",)
    return kernels, min(peak_chunk, _torch_backend.BUDGET_BYTES), detail, notes


# --- probes: the torch paths, counted op by op ---------------------------------------------------------------------

# Probe dimensions: distinct values, so that every dimension of every tensor the code makes is identified.
_P_ROWS, _P_CHUNK, _P_VOCAB, _P_HS, _P_HT = 36, 12, 1000, 40, 56
_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "lift_fresh", "_to_copy_noop"}
_WRITE_ONLY = {"fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros",
               "new_ones", "new_full", "scalar_tensor", "arange"}


@dataclass
class _Op:
    stage: str
    name: str
    reads: list  # (shape, itemsize)
    writes: list
    mm: tuple | None  # probe dims (m, k, n) and the operand dtype of a matmul
    chunked: bool = False


class _Probe(TorchDispatchMode):
    """Records every aten operator (inputs read, outputs written, matmul dims) and every allocation (for the
    peak of live bytes), at the probe's shapes; `_Probe.replay` maps them to a real shape."""

    def __init__(self):
        super().__init__()
        self.stage = "fwd"
        self.ops: list[_Op] = []
        self.events: list[tuple] = []  # ("alloc", key, shape, itemsize) / ("free", key)
        self._live: set[int] = set()

    def _free(self, key: int) -> None:
        self._live.discard(key)
        self.events.append(("free", key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _NO_TRAFFIC:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name == "copy_":
            inputs = inputs[1:]  # the destination is written, not read
        elif name in _WRITE_ONLY:
            inputs = []
        reads = [(tuple(t.shape), t.element_size()) for t in inputs]
        writes = [(tuple(t.shape), t.element_size()) for t in outputs]
        mm = None
        if name in _MATMULS:
            a, w = inputs[-2], inputs[-1]
            mm = (tuple(a.shape), tuple(w.shape), a.dtype)
        self.ops.append(_Op(self.stage, name, reads, writes, mm))
        seen = {id(t.untyped_storage()) for t in inputs}
        for t in outputs:
            storage = t.untyped_storage()
            key = id(storage)
            if key in seen or key in self._live:
                continue  # in place, or a view of a new storage already counted
            self._live.add(key)
            self.events.append(("alloc", key, tuple(t.shape), t.element_size()))
            weakref.finalize(storage, self._free, key)
        return out


def _numel(shape, dims: dict) -> int:
    return math.prod(dims.get(d, d) for d in shape)


def _mm_flops(mm, dims: dict) -> float:
    a, w, _ = mm
    return 2.0 * _numel(a, dims) * dims.get(w[-1], w[-1])


def _replay(probe: _Probe, dims: dict, stage_names: dict, per_chunk: float = 1.0, every_op: bool = False
            ) -> list[_Kernel]:
    """The probe's operators as kernels at the real shape: `dims` maps probe dimensions to real ones;
    operators on chunk-sized tensors (a dimension `_P_CHUNK`), or all of them with `every_op`, run
    `per_chunk` times as often."""
    kernels = []
    for op in probe.ops:
        shapes = [s for s, _ in op.reads + op.writes]
        launches = per_chunk if every_op or any(_P_CHUNK in s for s in shapes) else 1.0
        if op.mm is not None:
            phase = stage_names[(op.stage, "mm")]
            read = sum(_numel(s, dims) * i for s, i in op.reads)
            kernels.append(_Kernel(phase, mm_flops=_mm_flops(op.mm, dims), mm_dtype=op.mm[2], launches=launches,
                                   items=[("matmul operands read", read),
                                          ("matmul outputs written", sum(_numel(s, dims) * i for s, i in op.writes))]))
            continue
        phase = stage_names[(op.stage, "ew")]
        kernels.append(_Kernel(phase, launches=launches,
                               items=[("tensors read", sum(_numel(s, dims) * i for s, i in op.reads)),
                                      ("tensors written", sum(_numel(s, dims) * i for s, i in op.writes))]))
    return kernels


def _peak(probe: _Probe, dims: dict) -> int:
    """The most bytes live at once during the probe, at the real shape."""
    live = peak = 0
    sizes = {}
    for event in probe.events:
        if event[0] == "alloc":
            _, key, shape, itemsize = event
            sizes[key] = _numel(shape, dims) * itemsize
            live += sizes[key]
            peak = max(peak, live)
        else:
            live -= sizes.pop(event[1], 0)
    return peak


@functools.lru_cache(maxsize=None)
def _probe(path: str, divergence: Divergence, dtype: torch.dtype, softcaps: int = 0) -> _Probe:
    """Run `path`'s torch code once at the probe shape on the CPU, recording it (with `softcaps` of the two
    sides' logits softcapped on the fused-API paths)."""
    gen = torch.Generator().manual_seed(0)
    caps = ((30.0, 50.0)[:softcaps] + (None, None))[:2]

    def randn(*shape, dtype=dtype, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(grad)

    probe = _Probe()
    if path in ("kd_loss-torch", "kd_loss-reference"):
        student = randn(_P_ROWS, _P_VOCAB, scale=4.0, grad=True)
        teacher = randn(_P_ROWS, _P_VOCAB, scale=4.0)
        if path == "kd_loss-torch":
            # Chunks of _P_CHUNK rows: the budget that gives them, through the code's own chunk_rows.
            budget = _P_CHUNK * _P_VOCAB * max(4, student.element_size()) * _torch_backend.TEMPORARIES_PER_ELEMENT
            saved, _torch_backend.BUDGET_BYTES = _torch_backend.BUDGET_BYTES, budget
            try:
                assert _torch_backend.chunk_rows(_P_VOCAB, max(4, student.element_size())) == _P_CHUNK
                with probe:
                    loss = kdops.kd_loss(student, teacher, divergence=divergence, backend="torch")
                    probe.stage = "bwd"
                    loss.backward()
            finally:
                _torch_backend.BUDGET_BYTES = saved
        else:
            with probe:
                loss = kdops.reference.kd_loss(student, teacher, divergence=divergence)
                probe.stage = "bwd"
                loss.backward()
    elif path == "reference":
        hs, ws = randn(_P_ROWS, _P_HS, grad=True), randn(_P_VOCAB, _P_HS, scale=_P_HS ** -0.5, grad=True)
        ht, wt = randn(_P_ROWS, _P_HT), randn(_P_VOCAB, _P_HT, scale=_P_HT ** -0.5)
        with probe:
            loss = kdops.reference.fused_linear_kd_loss(hs, ws, ht, wt, divergence=divergence,
                                                        student_softcap=caps[0], teacher_softcap=caps[1])
            probe.stage = "bwd"
            loss.backward()
    elif path == "fused-torch":
        # The per-chunk math of ChunkedProblem (engine "torch") on one chunk's float32 logits buffers; the
        # matmuls around it are counted like the chunked path's.
        hs, ws = randn(_P_CHUNK, _P_HS), randn(_P_VOCAB, _P_HS)
        ht, wt = randn(_P_CHUNK, _P_HT), randn(_P_VOCAB, _P_HT)
        problem = _chunked.ChunkedProblem(hs, ws, None, ht, wt, None, None, divergence, 1.0, _P_VOCAB, 1.0, 0.0,
                                          -100, "torch", None, softcaps=caps)
        zs = randn(_P_CHUNK, _P_VOCAB, dtype=problem.acc_dtype, scale=4.0)
        zt = randn(_P_CHUNK, _P_VOCAB, dtype=problem.acc_dtype, scale=4.0)
        scale = torch.full((_P_CHUNK,), 1.0 / _P_CHUNK, dtype=problem.acc_dtype)
        with probe:
            problem._loss_and_logit_grads(zs, zt, None, scale, True, False)
    else:
        raise ValueError(path)
    return probe


def _torch_kernels(ctx: _Ctx, path: str, dims: dict, stage_names: dict, per_chunk: float = 1.0,
                   every_op: bool = False):
    probe = _probe(path, ctx.divergence, ctx.dtype, ctx.softcaps)
    return _replay(probe, dims, stage_names, per_chunk, every_op), _peak(probe, dims), len(probe.ops)


def _kd_torch(ctx: _Ctx):
    n, v = ctx.shape.tokens, ctx.shape.vocab
    chunk = min(n, _torch_backend.chunk_rows(v, itemsize=max(4, ctx.b)))
    dims = {_P_ROWS: n, _P_CHUNK: chunk, _P_VOCAB: v}
    names = {("fwd", "ew"): "fwd: reference math, chunk by chunk (no graph)",
             ("bwd", "ew"): "bwd: recompute each chunk under autograd, write its gradient",
             ("fwd", "mm"): "fwd: matmuls", ("bwd", "mm"): "bwd: matmuls"}
    # The probe ran 3 chunks (36 rows in chunks of 12); the real call runs n / chunk.
    kernels, peak, count = _torch_kernels(ctx, "kd_loss-torch", dims, names, per_chunk=n / chunk / 3)
    extra = peak - n * v * ctx.b  # the gradient it returns is part of the peak
    detail = (f"{chunk}-row chunks (kdops._torch_backend.chunk_rows: {_torch_backend.BUDGET_BYTES // MiB} MiB "
              f"budget), the temporaries of one chunk")
    notes = (f"estimate: {count} aten operators at the probe shape, each reading its inputs and writing its outputs "
             f"once; {_cdiv(n, chunk)} chunks",)
    return kernels, extra, detail, notes


def _kd_reference(ctx: _Ctx):
    n, v = ctx.shape.tokens, ctx.shape.vocab
    dims = {_P_ROWS: n, _P_VOCAB: v}
    names = {("fwd", "ew"): "fwd: reference math on [N, V] (float32 softmaxes)",
             ("bwd", "ew"): "bwd: autograd of the reference math", ("fwd", "mm"): "fwd: matmuls",
             ("bwd", "mm"): "bwd: matmuls"}
    kernels, peak, count = _torch_kernels(ctx, "kd_loss-reference", dims, names)
    extra = peak - n * v * ctx.b
    return kernels, extra, f"{extra / (n * v * 4):.2f} float32 [N, V] matrices", (
        f"estimate: {count} aten operators, each reading its inputs and writing its outputs once",)


# --- fused_linear_kd_loss: shared pieces --------------------------------------------------------------------------

def _zero_grads(ctx: _Ctx, phase: str) -> _Kernel:
    """dH zeroed in its dtype, dW's float32 accumulator (`kdops._chunked`) zeroed."""
    n, v, hs = ctx.shape.tokens, ctx.shape.vocab, ctx.shape.hidden_student
    return _Kernel(phase, launches=2, items=[("dH and dW zeroed", n * hs * ctx.b / 2 + v * hs * ctx.acc / 2)])


def chunked_plan(ctx: _Ctx, engine: str = "triton") -> "_chunked.Plan":
    """`kdops._chunked.plan` for the student's gradients (dH, dW; frozen teachers), as ChunkedProblem (or, with
    several teachers, MixedChunkedProblem) plans."""
    return _chunked.plan(ctx.shape.tokens, ctx.shape.vocab, engine, ctx.acc_dtype, _chunked_sides(ctx), ctx.budget,
                         _logit_rows(ctx))


def _logit_rows(ctx: _Ctx) -> int:
    """float32 [chunk, V] rows per chunk row: both models' logits, or `kdops.ensemble.MixedChunkedProblem`'s."""
    from kdops import ensemble

    if not ctx.mix:
        return 2
    return 1 + ctx.teachers + 2 + ensemble.MIX_TEMPORARIES * ctx.teachers


def _chunked_sides(ctx: _Ctx):
    """The plan's sides: the student's gradients (dH, dW), frozen teachers."""
    return (_chunked.SideNeeds(ctx.dtype, ctx.shape.hidden_student, True, True),
            *[_chunked.SideNeeds(ctx.dtype, ctx.shape.hidden_teacher, False, False)] * ctx.teachers)


def _group_backprop(ctx: _Ctx, rows: int, launches: float, accumulate: bool) -> list[_Kernel]:
    """`kdops._chunked._Side.backprop` of one group of `rows` rows (student; frozen teacher), by cuBLAS: dH = G·W
    (G kept in the weight dtype), and dW += Gᵀ·h into the float32 accumulator (`accumulate`: several groups,
    read-modify-written per group), or dW = Gᵀ·h summed in float32 and rounded once by cuBLAS (one group)."""
    v, hs, b, acc = ctx.shape.vocab, ctx.shape.hidden_student, ctx.b, ctx.acc
    kernels = [_Kernel("fwd: dH matmul, per group", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
                       launches=launches, items=[("G read", rows * v * b), ("W_s re-read per group", v * hs * b),
                                                 ("dH written", rows * hs * b)])]
    if accumulate or b == acc:
        kernels.append(_Kernel("fwd: dW matmul (addmm_), per group", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
                               launches=launches,
                               items=[("G read", rows * v * b), ("h_s read", rows * hs * b),
                                      ("dW (float32) read-modify-write per group" if accumulate else "dW written",
                                       (2 if accumulate else 1) * v * hs * acc)]))
        return kernels
    kernels.append(_Kernel("fwd: dW matmul (one group: float32 sums, rounded once)", mm_flops=2.0 * rows * v * hs,
                           mm_dtype=ctx.dtype, launches=launches,
                           items=[("G read", rows * v * b), ("h_s read", rows * hs * b), ("dW written", v * hs * b)]))
    return kernels


def _cast_weight_grad(ctx: _Ctx, accumulate: bool) -> list[_Kernel]:
    """The float32 dW accumulator rounded once to the weight dtype, after the last group."""
    v, hs, b, acc = ctx.shape.vocab, ctx.shape.hidden_student, ctx.b, ctx.acc
    if b == acc or not accumulate:
        return []
    return [_Kernel("fwd: cast dW to the weight dtype", items=[("dW read (float32)", v * hs * acc),
                                                                 ("dW written", v * hs * b)])]


def _logits_matmuls(ctx: _Ctx, rows: int, launches: float, phase: str, out_itemsize: int) -> list[_Kernel]:
    """Every model's logits of a chunk of `rows` rows by cuBLAS, the weights re-read for every chunk."""
    v = ctx.shape.vocab
    kernels = []
    teachers = [("t", ctx.shape.hidden_teacher)] if ctx.teachers == 1 else [
        (f"t{i}", ctx.shape.hidden_teacher) for i in range(ctx.teachers)]
    for side, h in (("s", ctx.shape.hidden_student), *teachers):
        kernels.append(_Kernel(phase, mm_flops=2.0 * rows * v * h, mm_dtype=ctx.dtype, launches=launches,
                               items=[(f"W_{side} re-read per chunk", v * h * ctx.b),
                                      (f"h_{side} read", rows * h * ctx.b),
                                      ("logits written", rows * v * out_itemsize)]))
    return kernels


def chunked_rows(shape: Shape, dtype: torch.dtype, engine: str = "triton", budget: int | None = None) -> int:
    """Rows per chunk of `impl="chunked"` (engine "triton") or of backend="torch", as ChunkedProblem plans them
    for the student's gradients."""
    return chunked_plan(_Ctx(shape, targets.H100, kdops.as_divergence("forward_kl"), dtype, False, budget),
                        engine).chunk


# --- chunked ----------------------------------------------------------------------------------------------------------

def _chunked_common(ctx: _Ctx, engine: str, chunk_kernels) -> tuple:
    """The chunked paths' phases: per chunk, both logits matmuls and `chunk_kernels(rows, count)` (the loss and
    G into the group's store); per group, the dH and dW matmuls; then the accumulator's cast. The backward
    has nothing left to do under loss.backward() (an upstream 1: `kdops._autograd` skips the scaling).
    Returns (kernels, plan)."""
    n = ctx.shape.tokens
    plan = chunked_plan(ctx, engine)
    kernels = [_Kernel("fwd: zero dW's float32 accumulator", items=[("dW zeroed", ctx.shape.vocab
                                                                       * ctx.shape.hidden_student * ctx.acc)])] \
        if plan.accumulate else []
    for group_rows, groups in _chunks(n, plan.group):
        for rows, count in _chunks(group_rows, plan.chunk):
            kernels += _logits_matmuls(ctx, rows, count * groups, "fwd: logits matmuls (float32 out)", ctx.acc)
            kernels += chunk_kernels(rows, count * groups)
        kernels += _group_backprop(ctx, group_rows, groups, plan.accumulate)
    kernels += _cast_weight_grad(ctx, plan.accumulate)
    return kernels, plan


def _plan_text(ctx: _Ctx, plan) -> str:
    budget = _chunked.MEMORY_BUDGET if ctx.budget is None else ctx.budget
    groups = _cdiv(ctx.shape.tokens, plan.group)
    return (f"{_cdiv(ctx.shape.tokens, plan.chunk)} chunks of {plan.chunk} rows, "
            + (f"{groups} groups of {plan.group} rows (dW summed in a float32 accumulator)" if plan.accumulate
               else "one group (G of every row kept; dW one product, no accumulator)")
            + f" (kdops._chunked.plan, memory_budget {_size(budget)})")


def _chunked_path(ctx: _Ctx):
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    num_stats, _ = _kernel_constants()

    def chunk_kernels(rows, count):
        # (several teachers: their mix into the target's buffer first) G written straight into the group's store,
        # in the weight's dtype
        mix = [_mix_kernel(ctx, rows, count, "fwd: mix of the teachers (torch)", acc)] if ctx.mix else []
        return mix + (_kernels_on_logits(ctx, rows, acc, "logits buffers", "fwd: kernels on logits", False, count)
                + _kernels_on_logits(ctx, rows, acc, "logits buffers", "fwd: kernel on logits (G into the group's store)",
                                     True, count, grad_label="G_s written (weight dtype)", grad_itemsize=b))

    kernels, plan = _chunked_common(ctx, "triton", chunk_kernels)
    extra = plan.extra_bytes(v, "triton", ctx.acc_dtype, _chunked_sides(ctx), _logit_rows(ctx)) \
        + n * (2 * acc + 1) + plan.chunk * num_stats * acc
    buffers = "two" if not ctx.mix else f"{_logit_rows(ctx)} (every model's logits, the target, the mix's temporaries)"
    detail = _plan_text(ctx, plan) + f": {buffers} float32 [chunk, V] logits buffers + G [group, V] in the weight dtype"
    notes = ("batchmean: the gradients are computed in the forward; the backward scales them by an upstream "
             "gradient other than 1 (one pass over dH and dW, not counted; at 1, loss.backward()'s, a kernel reads "
             "it and stops: no host synchronization)",)
    return kernels, extra, detail, notes


# --- the backward by vocabulary slices (fused and sliced: `kdops._fused._SideGrads`) ---------------------------------

def _slice_products(ctx: _Ctx, width: int, count: int) -> list[_Kernel]:
    """cuBLAS's products of `count` slices' G [rows, width]: dW[slice] = Gᵀ·h_s over every row, and
    dH += G·W_s[slice] into float32 sums (the hidden gradient itself when it is float32 or wider)."""
    n, b, acc, hs = ctx.shape.tokens, ctx.b, ctx.acc, ctx.shape.hidden_student
    flops = 2.0 * n * width * hs
    return [_Kernel("bwd: dW[slice] = Gᵀ·h_s (cuBLAS)", mm_flops=flops, mm_dtype=ctx.dtype, launches=count,
                    items=[("G read", n * width * b), ("h_s read", n * hs * b), ("dW written", width * hs * b)]),
            _Kernel("bwd: dH += G·W_s[slice] (cuBLAS, float32 sums)", mm_flops=flops, mm_dtype=ctx.dtype,
                    launches=count, items=[("G read", n * width * b), ("W_s slice read", width * hs * b),
                                           ("dH sums read-modify-write", 2 * n * hs * max(acc, b))])]


def _dh_sums_rounded(ctx: _Ctx) -> list[_Kernel]:
    """The float32 dH sums rounded into a 16-bit hidden gradient (none when it is float32 or wider)."""
    n, b, acc, hs = ctx.shape.tokens, ctx.b, ctx.acc, ctx.shape.hidden_student
    return [_Kernel("bwd: dH sums rounded", items=[("dH sums read, dH written", n * hs * (acc + b))])] if b < acc else []


# --- fused (Triton, logit tiles recomputed) -------------------------------------------------------------------------

def _fused_path(ctx: _Ctx):
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    hs, ht = ctx.shape.hidden_student, ctx.shape.hidden_teacher
    num_stats, num_partial = _kernel_constants()
    jsd = ctx.divergence.canonical().kind.name == "JSD"
    # no hard label, no biases here; TMA for 16-bit operands on Hopper (`FusedProblem.config`)
    tma = ctx.gpu.capability >= (9, 0) and ctx.b == 2

    def width(forward):
        return _fused.tile_width(forward, ctx.passes > 1, 0.0, False, ctx.transform, tma,
                                 teacher_grads=False)  # a frozen teacher, as every modelled case

    config = _fused.fused_config(n, v, ctx.gpu, ctx.dtype, forward=True, jsd=jsd, transform=ctx.transform,
                                 width=width(True))
    bn, bv, bh, split = config["BLOCK_N"], config["BLOCK_V"], config["BLOCK_H"], config["split_size"]
    n_splits = _cdiv(v, split)
    hs_p, ht_p = _cdiv(hs, bh) * bh, _cdiv(ht, bh) * bh
    row_blocks = _cdiv(n, bn)
    v_tiles = sum(_cdiv(min(v, lo + split) - lo, bv) for lo in range(0, v, split))  # tiles over all splits
    tile_mm = 2.0 * bn * bv * (hs_p + ht_p)  # both logit tiles of one (row block, vocabulary tile)
    per_pass, per_gradient = logits_kernel_flops(ctx.divergence, ctx.softcaps, lanes=False)
    tile_ew = bn * bv * per_pass
    partial = n * n_splits * num_partial * acc
    kernels = []
    for p in range(ctx.passes):
        visits = row_blocks * v_tiles
        kernels.append(_Kernel(
            f"fwd: fused forward kernel pass {p + 1}", mm_flops=visits * tile_mm, mm_dtype=ctx.dtype,
            ew_flops=visits * tile_ew, programs=row_blocks * n_splits, tiles=visits, block_n=bn, forward=True,
            items=[("W_s, W_t re-read per row block", row_blocks * v_tiles * bv * (hs + ht) * b),
                   ("h_s, h_t re-read per vocabulary tile", visits * bn * (hs + ht) * b),
                   ("partial states written", partial), ("statistics read", n * num_stats * acc * p)],
            bytes_l2=v * (hs + ht) * b + n * (hs + ht) * b + partial + n * num_stats * acc * p))
        kernels.append(_Kernel(f"fwd: merge partials pass {p + 1}", programs=_cdiv(n, min(128, _launch._next_pow2(n))),
                               items=[("partial states read", partial),
                                      ("statistics and loss written", n * (num_stats + 1) * acc)]))
    kernels.append(_zero_grads(ctx, "bwd: zero dH, dW"))
    # The backward (`kdops._fused.fused_backward`): vocabulary slices of G for every row (GRADIENT_BYTES), each
    # a launch of the gradient kernel (one program per tile, recomputing both logit tiles), then cuBLAS:
    # dW[slice] = Gᵀ·h_s and dH += G·W_s[slice] into float32 sums.
    bwd = _fused.fused_config(n, v, ctx.gpu, ctx.dtype, jsd=jsd, transform=ctx.transform, width=width(False))
    gn, gv = bwd["BLOCK_N"], bwd["BLOCK_V"]
    width = _fused.slice_columns(n, v, gv, b)
    slices = [(lo, min(v, lo + width)) for lo in range(0, v, width)]
    g_tile_mm = 2.0 * gn * gv * (_cdiv(hs, bh) * bh + _cdiv(ht, bh) * bh)
    sums = b < acc  # dH summed in a float32 buffer, unless the hidden gradient is float32 itself
    for lo, hi in slices:
        w = hi - lo
        visits = _cdiv(n, gn) * _cdiv(w, gv)
        kernels.append(_Kernel(
            "bwd: fused gradient kernel (recompute tiles, G written per slice)", mm_flops=visits * g_tile_mm,
            mm_dtype=ctx.dtype, ew_flops=visits * gn * gv * per_gradient, programs=visits, tiles=visits, block_n=gn,
            items=[("h_s, h_t re-read per tile", visits * gn * (hs + ht) * b),
                   ("W_s, W_t re-read per tile", visits * gv * (hs + ht) * b), ("G written", n * w * b)],
            bytes_l2=n * (hs + ht) * b + w * (hs + ht) * b + n * w * b))
        kernels += _slice_products(ctx, w, 1)
    kernels += _dh_sums_rounded(ctx)
    buffers = n * width * b
    hidden_sums = n * hs * acc if sums else 0
    extra = n * (num_stats * acc + 2 * acc + 1) + max(partial, buffers + hidden_sums)
    detail = (f"statistics per row + max(the forward's partial states, the backward's G buffer "
              f"({buffers / MiB:.0f} MiB) and float32 dH sums ({hidden_sums / MiB:.0f} MiB))")
    notes = (f"fused_config: BLOCK_N={bn}, BLOCK_V={bv}, BLOCK_H={bh}, {n_splits} vocabulary splits of {split} "
             f"({row_blocks * n_splits} forward programs); backward: {len(slices)} vocabulary slices of {width} "
             f"columns (GRADIENT_BYTES = {_fused.GRADIENT_BYTES // MiB} MiB), {gn} × {gv} gradient tiles",
             "no L2 reuse: every tile load is an HBM read (total_l2_s: operands once per launch)")
    return kernels, extra, detail, notes


# --- sliced (cuBLAS logits per vocabulary slice, kernels on logits) ----------------------------------------------

def _slice_kernels(ctx: _Ctx, n: int, width: int, count: int, phase: str) -> list[_Kernel]:
    """Both models' float32 logits of `n` rows over `width` columns by cuBLAS, `count` slices: each slice
    re-reads both hidden states and reads its weight rows once."""
    return [_Kernel(phase, mm_flops=2.0 * n * width * h, mm_dtype=ctx.dtype, launches=count,
                    items=[(f"h_{side} re-read per slice", n * h * ctx.b), (f"W_{side} slice read", width * h * ctx.b),
                           ("logits written", n * width * ctx.acc)])
            for side, h in (("s", ctx.shape.hidden_student), ("t", ctx.shape.hidden_teacher))]


def _sliced_path(ctx: _Ctx):
    """`kdops._sliced.SlicedProblem`: per slice, the logits by cuBLAS and the kernels on logits (partial states,
    merged once per pass); the backward computes the logits again, writes G and makes dW[slice], dH by cuBLAS."""
    n, v, b, acc, hs = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc, ctx.shape.hidden_student
    num_stats, num_partial = _kernel_constants()
    sums = b < acc
    hidden_sums = n * hs * acc if sums else 0
    budget = None if ctx.budget is None else ctx.budget - hidden_sums
    chunk = min(n, _sliced.FORWARD_ROWS)  # the forward's rows per chunk
    fwd_width = _sliced.slice_width(chunk, v, ctx.acc_dtype, (), ctx.budget)
    bwd_width = _sliced.slice_width(n, v, ctx.acc_dtype, (ctx.dtype,), budget)
    partial = chunk * _cdiv(v, fwd_width) * num_partial * acc
    kernels = []

    def sliced(width):  # the kernels on logits see a vocabulary of one slice
        return dataclasses.replace(ctx, shape=dataclasses.replace(ctx.shape, vocab=width))

    for rows, chunks in _chunks(n, chunk):
        for width, count in _chunks(v, fwd_width):  # each pass (the two-pass kinds: two) computes the logits anew
            kernels += _slice_kernels(ctx, rows, width, count * chunks * ctx.passes,
                                      "fwd: logits matmuls per row chunk, slice and pass")
            kernels += _kernels_on_logits(sliced(width), rows, acc, "logits buffers",
                                          "fwd: kernels on logits (partial states)", False, count * chunks)
    kernels.append(_Kernel("fwd: merge partials", launches=ctx.passes * _cdiv(n, chunk),
                           programs=_cdiv(n, min(128, _launch._next_pow2(n))),
                           items=[("partial states copied and read", 2 * partial),
                                  ("statistics and loss written", n * (num_stats + 1) * acc)]))
    kernels.append(_zero_grads(ctx, "bwd: zero dH, dW"))
    for width, count in _chunks(v, bwd_width):
        kernels += _slice_kernels(ctx, n, width, count, "bwd: logits matmuls per slice (again)")
        kernels += _kernels_on_logits(sliced(width), n, acc, "logits buffers", "bwd: kernel on logits (G per slice)",
                                      True, count,
                                      grad_label="G_s written (operands' dtype)", grad_itemsize=b)
        kernels += _slice_products(ctx, width, count)
    kernels += _dh_sums_rounded(ctx)
    buffers = n * bwd_width * (2 * acc + b)
    extra = n * (num_stats * acc + 2 * acc + 1) + max(n * fwd_width * 2 * acc + partial, buffers + hidden_sums)
    detail = (f"statistics per row + max(the forward's float32 logits of a slice and partial states, the backward's "
              f"slice buffers ({buffers / MiB:.0f} MiB) and float32 dH sums ({hidden_sums / MiB:.0f} MiB))")
    notes = (f"forward: {_cdiv(n, chunk)} row chunks of {chunk} (FORWARD_ROWS) × {_cdiv(v, fwd_width)} slices of "
             f"{fwd_width} columns; backward: {_cdiv(v, bwd_width)} slices of "
             f"{bwd_width} (kdops._sliced.slice_width, SLICE_BYTES = {_sliced.SLICE_BYTES // MiB} MiB"
             + ("" if ctx.budget is None else f", memory_budget {_size(ctx.budget)}") + ")",)
    return kernels, extra, detail, notes


# --- fused_linear_kd_loss backend="torch" -------------------------------------------------------------------

def _fused_torch(ctx: _Ctx):
    n, v, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.acc
    names = {("fwd", "ew"): "fwd: reference math under autograd (per chunk)", ("fwd", "mm"): "fwd: matmuls in the math"}
    probed = {"peak": 0, "ops": 0}

    def chunk_kernels(rows, count):
        math_kernels, math_peak, ops = _torch_kernels(ctx, "fused-torch", {_P_CHUNK: rows, _P_VOCAB: v}, names, count,
                                                       every_op=True)
        probed["peak"], probed["ops"] = max(probed["peak"], math_peak), ops
        return math_kernels + [_Kernel("fwd: G copied into the group's store", launches=count,
                                       items=[("G read (float32)", rows * v * acc), ("G written", rows * v * ctx.b)])]

    kernels, plan = _chunked_common(ctx, "torch", chunk_kernels)
    extra = (2 * plan.chunk * v * acc + probed["peak"] + plan.group * v * ctx.b + n * (2 * acc + 1)
             + (_chunked.accumulator_bytes(v, ctx.acc_dtype, _chunked_sides(ctx)) if plan.accumulate else 0))
    detail = (_plan_text(ctx, plan) + f", with {_chunked.TORCH_TEMPORARIES} autograd temporaries per logit: two "
              f"float32 buffers + the math's temporaries ({probed['peak'] / MiB:.0f} MiB, probed) + G in the weight dtype")
    notes = (f"estimate: the chunk's math is {probed['ops']} aten operators (probed), each reading its inputs and "
             f"writing its outputs once; each chunk re-reads both weights",)
    return kernels, extra, detail, notes


# --- the reference ----------------------------------------------------------------------------------------------------

def _reference(ctx: _Ctx):
    n, v, hs, ht = ctx.shape.tokens, ctx.shape.vocab, ctx.shape.hidden_student, ctx.shape.hidden_teacher
    dims = {_P_ROWS: n, _P_VOCAB: v, _P_HS: hs, _P_HT: ht}
    names = {("fwd", "ew"): "fwd: casts to float32 and the reference math",
             ("fwd", "mm"): "fwd: logits matmuls (float32 operands)",
             ("bwd", "ew"): "bwd: autograd of the math and of the casts",
             ("bwd", "mm"): "bwd: dH, dW matmuls (float32 operands)"}
    kernels, peak, count = _torch_kernels(ctx, "reference", dims, names)
    extra = peak - (n * hs + v * hs) * ctx.b
    detail = f"float32 logits, weights and temporaries: {extra / (n * v * 4):.2f} float32 [N, V] matrices"
    notes = (f"estimate: {count} aten operators; the matmuls take float32 operands (CUDA cores unless TF32 is "
             f"allowed: torch's default is not)",)
    return kernels, extra, detail, notes


# --- Liger ------------------------------------------------------------------------------------------------------------

#: LigerFusedLinearJSDLoss's default chunk_size (liger-kernel 0.8.5, chunked_loss/jsd_loss.py).
LIGER_CHUNK_SIZE = 1024


def _liger_chunks(n: int) -> list[tuple[int, int]]:
    """torch.chunk(x, max(1, n // LIGER_CHUNK_SIZE)) sizes (fused_linear_distillation.py)."""
    pieces = max(1, n // LIGER_CHUNK_SIZE)
    size = _cdiv(n, pieces)
    return _chunks(n, size)


def _liger_chunked(ctx: _Ctx):
    """LigerFusedLinearDistillationBase.forward (liger-kernel 0.8.5), read from its source: per chunk of tokens,
    inside one torch.compile'd function, student and teacher logits h·Wᵀ in the input dtype, log_softmax of
    each, the JSD (kl_div for β ∈ {0, 1}), and torch.func.grad_and_value for the chunk's grad_input and
    grad_weight; grad_weight.add_(chunk grad) across chunks, torch.cat of the grad_inputs at the end; the
    backward only scales them (not at all when the upstream gradient is 1).
    Assumed (not read): inductor fuses the elementwise math into row-wise kernels that read both logits twice
    in the forward and twice (JSD: three times) in the backward and write G once, in the input dtype; no
    float32 [chunk, V] intermediates; the chunk's dW product and the add_ stay two kernels."""
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    hs = ctx.shape.hidden_student
    beta = _jsd_beta(ctx.divergence)
    reads_bwd = 2 if beta in (0.0, 1.0) else 3
    kernels = []
    for rows, count in _liger_chunks(n):
        kernels += _logits_matmuls(ctx, rows, count, "fwd: logits matmuls (input dtype out)", b)
        kernels.append(_Kernel("fwd: compiled log_softmax + JSD (forward)", ew_flops=rows * v * 2 * ELEMENTWISE_FLOPS,
                               launches=count, items=[("both logits read twice", 4 * rows * v * b)]))
        kernels.append(_Kernel("fwd: compiled JSD gradient (G)", ew_flops=rows * v * reads_bwd * ELEMENTWISE_FLOPS,
                               launches=count, items=[(f"both logits read {reads_bwd}×", 2 * reads_bwd * rows * v * b),
                                                      ("G written", rows * v * b)]))
        kernels.append(_Kernel("fwd: grad_input = G·W_s", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
                               launches=count, items=[("G read", rows * v * b), ("W_s re-read per chunk", v * hs * b),
                                                      ("grad_input written", rows * hs * b)]))
        kernels.append(_Kernel("fwd: chunk grad_weight = Gᵀ·h_s", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
                               launches=count, items=[("G read", rows * v * b), ("h_s read", rows * hs * b),
                                                      ("chunk dW written", v * hs * b)]))
        kernels.append(_Kernel("fwd: grad_weight.add_(chunk grad)", launches=count,
                               items=[("dW and chunk dW read, dW written", 3 * v * hs * b)]))
    kernels.insert(0, _Kernel("fwd: zero grad_weight", items=[("dW zeroed", v * hs * b)]))
    kernels.append(_Kernel("fwd: torch.cat(grad_inputs)", items=[("grad_input read and written", 2 * n * hs * b)]))
    kernels.append(_Kernel("bwd: compare the upstream gradient with 1", items=[("scalar", 4)]))
    chunk = _liger_chunks(n)[0][0]
    extra = 3 * chunk * v * b + v * hs * b + n * hs * b
    detail = (f"{chunk}-token chunks: both logits and G in the input dtype, a chunk's dW, the grad_input list "
              f"(estimate)")
    notes = (f"{sum(c for _, c in _liger_chunks(n))} chunks of {chunk} tokens (chunk_size = {LIGER_CHUNK_SIZE}); "
             "estimate of the compiled elementwise traffic; the gradients are computed in the forward",
             "the chunk-size rule 2^ceil(log2(ceil(N / ceil(V / H)))) is Liger's Triton LigerFusedLinearJSD "
             "(ops/fused_linear_jsd.py), not this chunked loss")
    return kernels, extra, detail, notes


def _jsd_beta(divergence: Divergence) -> float | None:
    """β of the generalized JSD (mixture β·teacher + (1 − β)·student) equal to `divergence`, or None."""
    if isinstance(divergence, GeneralizedJSD):
        return float(divergence.beta)
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence.name)


# --- TRL ---------------------------------------------------------------------------------------------------------

#: trl 1.16.0, trl/kernels/chunked_divergence.py: the projections run on tiles of these sizes.
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768


def _trl_chunked(ctx: _Ctx):
    """ChunkedDivergenceFunction (trl 1.16.0, kernels/chunked_divergence.py), read from its source. Forward: the
    valid rows gathered (h[valid]); per tile of ≤ 4096 tokens × 32768 vocabulary rows, both projections by
    torch.mm into float32 buffers, then a Triton kernel (one program per token) folding the tile into online
    statistics; β ∉ {0, 1} runs the projections and a second kernel again for the JSD sums. Backward: per
    tile, both projections again, a kernel writing G over the student tile (float32), G cast to the input
    dtype, grad_hidden and grad_weight accumulated by float32-output addmm (read-modify-write of float32
    accumulators), finally cast to the input dtype."""
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    hs, ht = ctx.shape.hidden_student, ctx.shape.hidden_teacher
    beta = _jsd_beta(ctx.divergence)
    passes = 1 if beta in (0.0, 1.0) else 2
    tiles = [(rows, rc, cols, cc) for rows, rc in _chunks(n, TRL_TOKEN_CHUNK)
             for cols, cc in _chunks(v, TRL_VOCAB_CHUNK)]
    kernels = [_Kernel("fwd: gather the valid rows (h[valid])", launches=2,
                       items=[("h_s, h_t read and written", n * (hs + ht) * b)])]

    def projections(phase, rows, cols, count):
        out = []
        for side, h in (("s", hs), ("t", ht)):
            out.append(_Kernel(phase, mm_flops=2.0 * rows * cols * h, mm_dtype=ctx.dtype, launches=count,
                               items=[(f"W_{side} re-read per token chunk", cols * h * b),
                                      (f"h_{side} read", rows * h * b),
                                      ("tile written (float32)", rows * cols * 4)]))
        return out

    for p in range(passes):
        for rows, rc, cols, cc in tiles:
            kernels += projections(f"fwd: projections pass {p + 1}", rows, cols, rc * cc)
            kernels.append(_Kernel(f"fwd: {'statistics' if p == 0 else 'JSD'} kernel pass {p + 1}",
                                   ew_flops=rows * cols * ELEMENTWISE_FLOPS, programs=rows, launches=rc * cc,
                                   items=[("both tiles read", 2 * rows * cols * 4)]))
    kernels.append(_Kernel("bwd: zero float32 grad_hidden, grad_weight",
                           items=[("accumulators zeroed", (n * hs + v * hs) * 4)]))
    for rows, rc, cols, cc in tiles:
        count = rc * cc
        kernels += projections("bwd: projections (recomputed)", rows, cols, count)
        kernels.append(_Kernel("bwd: gradient kernel (G over the student tile)",
                               ew_flops=rows * cols * ELEMENTWISE_FLOPS, launches=count,
                               items=[("both tiles read", 2 * rows * cols * 4),
                                      ("G written (float32)", rows * cols * 4)]))
        if b != 4:
            kernels.append(_Kernel("bwd: cast G to the input dtype", launches=count,
                                   items=[("G read and written", rows * cols * (4 + b))]))
        kernels.append(_Kernel("bwd: grad_hidden addmm (float32 out)", mm_flops=2.0 * rows * cols * hs,
                               mm_dtype=ctx.dtype, launches=count,
                               items=[("G read", rows * cols * b),
                                      ("W_s re-read per token chunk", cols * hs * b),
                                      ("float32 dH read-modify-write per vocabulary chunk", 2 * rows * hs * 4)]))
        kernels.append(_Kernel("bwd: grad_weight addmm (float32 out)", mm_flops=2.0 * rows * cols * hs,
                               mm_dtype=ctx.dtype, launches=count,
                               items=[("G read", rows * cols * b), ("h_s read", rows * hs * b),
                                      ("float32 dW read-modify-write per token chunk", 2 * cols * hs * 4)]))
    kernels.append(_Kernel("bwd: cast grad_hidden, grad_weight", launches=2,
                           items=[("float32 read, input dtype written", (n * hs + v * hs) * (4 + b) / 2)]))
    rows = min(n, TRL_TOKEN_CHUNK)
    extra = 2 * rows * TRL_VOCAB_CHUNK * 4 + n * (hs + ht) * b + (n * hs + v * hs) * 4 + rows * TRL_VOCAB_CHUNK * b
    detail = ("two float32 [4096, 32768] tiles, the gathered hidden states (saved for the backward), float32 "
              "grad_hidden and grad_weight, G in the input dtype")
    notes = (f"{_cdiv(n, TRL_TOKEN_CHUNK)} token chunk(s) × {_cdiv(v, TRL_VOCAB_CHUNK)} vocabulary chunks; "
             f"{passes} projection pass{'es' if passes > 1 else ''} in the forward, one more in the backward",)
    return kernels, extra, detail, notes


# --- sparse teachers (kdops.topk) -------------------------------------------------------------------------------

def _topk_kernels(ctx: _Ctx, rows: int, itemsize: int, launches: float, phase: str, grad_itemsize: int) -> list:
    """`kernels/topk.py` over `rows` rows of [rows, V] student logits of `itemsize` bytes: the complement's
    log-sum-exp (logits read once), the small k + 1-outcome loss (the dense kernels on [rows, k + 1]: not
    counted), the gradient (logits read, G written in `grad_itemsize` bytes); each also reads the rows'
    sorted ids."""
    v, k = ctx.shape.vocab, ctx.k
    config = _launch.topk_config(rows, v, ctx.gpu, ctx.acc_dtype)
    programs = _cdiv(rows, config["BLOCK_R"])
    lse_flops, grad_flops = topk_kernel_flops(k, v, config, ctx.softcaps > 0)
    ids = rows * k * 4
    return [_Kernel(f"{phase}: complement log-sum-exp", ew_flops=rows * v * lse_flops, programs=programs,
                    launches=launches, items=[("student logits read", rows * v * itemsize), ("sorted ids read", ids)]),
            _Kernel(f"{phase}: gradient", ew_flops=rows * v * grad_flops, programs=programs, launches=launches,
                    items=[("student logits read", rows * v * itemsize), ("sorted ids and their gradients read", 2 * ids),
                           ("G written", rows * v * grad_itemsize)])]


def _kd_topk(ctx: _Ctx):
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    kernels = _topk_kernels(ctx, n, b, 1, "fwd", 0)[:1] + _topk_kernels(ctx, n, b, 1, "bwd", b)[1:]
    extra = n * (ctx.k + 1) * (4 * ctx.acc + 8)
    detail = "the sorted ids, the order and the k + 1 outcomes' columns and gradients per row"
    notes = ("the student's gradient is written once; the teacher's (ids, log-probabilities) are read, not "
             "computed", "topk kernels not measured on a GPU yet: their cost from their SASS (TOPK_LOOP_INSTRUCTIONS)")
    return kernels, extra, detail, notes


def _topk_sides(ctx: _Ctx):
    return (_chunked.SideNeeds(ctx.dtype, ctx.shape.hidden_student, True, True),)


def _topk_chunked(ctx: _Ctx):
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    plan = _chunked.plan(n, v, "triton", ctx.acc_dtype, _topk_sides(ctx), ctx.budget)
    kernels = [_Kernel("fwd: zero dW's float32 accumulator", items=[("dW zeroed", v * ctx.shape.hidden_student * acc)])] \
        if plan.accumulate else []
    for group_rows, groups in _chunks(n, plan.group):
        for rows, count in _chunks(group_rows, plan.chunk):
            kernels += _logits_matmuls(ctx, rows, count * groups, "fwd: logits matmul (float32 out)", acc)[:1]
            kernels += _topk_kernels(ctx, rows, acc, count * groups, "fwd", b)  # G straight into the store
        kernels += _group_backprop(ctx, group_rows, groups, plan.accumulate)
    kernels += _cast_weight_grad(ctx, plan.accumulate)
    extra = plan.extra_bytes(v, "triton", ctx.acc_dtype, _topk_sides(ctx)) + n * (ctx.k + 1) * (4 * acc + 8)
    detail = _plan_text(ctx, plan).replace("kdops._chunked.plan", "kdops._chunked.plan, one side") \
        + ": a float32 [chunk, V] logits buffer, G [group, V] in the weight dtype"
    notes = ("no hard-label term: with one, G is summed in float32 over the logits buffer and copied into the "
             "store (one more pass, not counted here)",
             "topk kernels not measured on a GPU yet: their cost from their SASS (TOPK_LOOP_INSTRUCTIONS)")
    return kernels, extra, detail, notes


def _topk_gathered(ctx: _Ctx):
    """Per row chunk: W[ids] gathered and upcast ([rows, k, H] float32), s_ids = h·W[ids]ᵀ and dH = G·W[ids] by
    batched float32 products (CUDA cores), dW and db index-added into float32 accumulators, then cast."""
    n, v, h, b, acc, k = ctx.shape.tokens, ctx.shape.vocab, ctx.shape.hidden_student, ctx.b, ctx.acc, ctx.k
    budget = _chunked.MEMORY_BUDGET if ctx.budget is None else ctx.budget
    chunk = max(1, budget // 4 // (k * h * acc))
    launches = _cdiv(n, chunk)
    gathered = n * k * h
    kernels = [_Kernel("fwd: zero dW's float32 accumulator", items=[("dW zeroed", v * h * acc)]),
               _Kernel("fwd: W[ids] gathered, upcast", launches=launches,
                       items=[("W rows read", gathered * b / launches), ("float32 copy written", gathered * acc / launches)]),
               _Kernel("fwd: s_ids = h·W[ids]ᵀ (float32)", mm_flops=2.0 * gathered / launches, mm_dtype=torch.float32,
                       launches=launches, items=[("W[ids] read", gathered * acc / launches)]),
               _Kernel("fwd: dH = G·W[ids] (float32)", mm_flops=2.0 * gathered / launches, mm_dtype=torch.float32,
                       launches=launches, items=[("W[ids] read", gathered * acc / launches),
                                                 ("dH written", n * h * b / launches)]),
               _Kernel("fwd: dW index_add of G·h (float32)", ew_flops=gathered / launches, launches=launches,
                       items=[("G·h products written and read", 2 * gathered * acc / launches),
                              ("dW rows read-modify-written", 2 * gathered * acc / launches)])]
    kernels += _cast_weight_grad(ctx, True)
    extra = v * h * acc + chunk * k * h * acc * 3
    detail = (f"{launches} chunks of {chunk} rows ([rows, k, H] float32 gathered weights and products: a quarter of "
              f"memory_budget), the float32 [V, H] dW accumulator")
    notes = ("O(N·k·H): the rest of the vocabulary is never read; bandwidth-bound on the gathered float32 rows",)
    return kernels, extra, detail, notes


# --- predict -----------------------------------------------------------------------------------------------------

_BUILDERS = {"kd_loss-triton": _kd_triton, "kd_loss-torch": _kd_torch, "kd_loss-reference": _kd_reference,
             "fused": _fused_path, "chunked": _chunked_path, "sliced": _sliced_path, "fused-torch": _fused_torch, "reference": _reference,
             "liger-chunked": _liger_chunked, "trl-chunked": _trl_chunked, "kd_loss-topk": _kd_topk,
             "topk-chunked": _topk_chunked, "topk-gathered": _topk_gathered}


def applies(path: str, divergence) -> bool:
    """Whether `path` computes `divergence` (Liger and TRL: the generalized JSD family only)."""
    if path in ("liger-chunked", "trl-chunked"):
        return _jsd_beta(kdops.as_divergence(divergence)) is not None
    return path in _BUILDERS


def floor_seconds(path: str, shape: Shape, gpu: targets.GPU, dtype: torch.dtype) -> float:
    """`bench.floor.floor_work` of the path's function, at the dtype's matmul rate or the HBM rate."""
    function = {"kd_loss-topk": TOPK, "topk-chunked": FUSED_TOPK, "topk-gathered": FUSED_TOPK}.get(
        path, KD_LOSS if path in KD_PATHS else FUSED)
    dtype_name = str(dtype).removeprefix("torch.")
    work = floor_work(Case(function, "forward_kl", shape.tokens, shape.vocab, shape.hidden_student,
                           0 if function == FUSED_TOPK else shape.hidden_teacher, dtype_name))
    return work.total / (gpu.matmul_flops(dtype) if work.unit == "flop" else gpu.hbm_bytes_per_s)


#: The paths that cast their operands under torch.autocast (kdops' fused API).
AUTOCAST_PATHS = ("fused", "chunked", "sliced", "fused-torch")


def _autocast_casts(ctx: _Ctx) -> tuple[list[_Kernel], int]:
    """kdops under torch.autocast with float32 master weights (`kdops.api`): both weights cast to the
    autocast dtype before the loss, and the student's weight gradient cast back to float32 by autograd
    (the hidden states come from autocast's own layers in its dtype). Returns (kernels, extra bytes)."""
    v, hs, ht, b = ctx.shape.vocab, ctx.shape.hidden_student, ctx.shape.hidden_teacher, ctx.b
    kernels = [_Kernel("fwd: autocast: weights cast from float32", launches=2,
                       items=[("W_s, W_t read (float32)", v * (hs + ht) * 4 / 2), ("cast copies written", v * (hs + ht) * b / 2)]),
               _Kernel("bwd: autocast: dW cast to float32", items=[("dW read", v * hs * b), ("dW written (float32)", v * hs * 4)])]
    return kernels, v * (hs + ht) * b + v * hs * b


def predict(path: str, shape: Shape, gpu: targets.GPU | str = targets.H100, divergence="forward_kl",
            dtype: torch.dtype = torch.bfloat16, tf32: bool = False, budget: int | None = None,
            autocast: bool = False, k: int = DEFAULT_K, softcaps: int = 0, teachers: int = 1,
            mix: str | None = None) -> Prediction:
    """The predicted phases, time, ratio to the floor and extra memory of `path` at `shape` on `gpu`; with
    `tf32`, float32 matmuls at the TF32 rate instead of exact ("ieee") float32 products; `budget`, the
    chunked paths' memory_budget (default kdops._chunked.MEMORY_BUDGET); `autocast`, kdops' paths under
    torch.autocast of `dtype` with float32 master weights (the casts added); `k`, the sparse teacher's top-k
    (TOPK_PATHS: the student's side only, the floor is its matmuls or its logits' bytes); `softcaps`, how many
    sides' logits are softcapped (fused-API paths: 0, 1 or 2; top-k paths from hidden states: the student's, 0
    or 1). TAID is a `divergence` (`kdops.TAID(t)`). `teachers` > 1 with `mix` ("ensemble" or "logit_sum"):
    several teachers mixed into one target (`kdops.ensemble`), on MIX_PATHS."""
    if path not in _BUILDERS:
        raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS + TOPK_PATHS)}")
    gpu = targets.by_name(gpu) if isinstance(gpu, str) else gpu
    divergence = kdops.as_divergence(divergence)
    if not applies(path, divergence):
        raise ValueError(f"{path} has no {divergence.name}")
    most = 0 if path in KD_PATHS or path == "kd_loss-topk" else 1 if path in TOPK_PATHS else 2
    if not (isinstance(softcaps, int) and 0 <= softcaps <= most):
        raise ValueError(f"softcaps: {path} has at most {most} softcapped side(s), got {softcaps!r}")
    if mix is not None and mix not in MIX_PASSES:
        raise ValueError(f"mix: expected one of {', '.join(MIX_PASSES)}, got {mix!r}")
    if (teachers != 1 or mix) and (path not in MIX_PATHS or not mix or teachers < 1):
        raise ValueError(f"teachers={teachers}, mix={mix!r}: several teachers are modelled on {', '.join(MIX_PATHS)} "
                         "with a mix")
    ctx = _Ctx(shape, gpu, divergence, dtype, tf32, budget, k, softcaps, teachers, mix or "")
    kernels, extra, detail, notes = _BUILDERS[path](ctx)
    if autocast:
        if path not in AUTOCAST_PATHS or dtype.itemsize != 2:
            raise ValueError(f"autocast: kdops' fused-API paths ({', '.join(AUTOCAST_PATHS)}) in a 16-bit dtype")
        casts, cast_bytes = _autocast_casts(ctx)
        kernels, extra = kernels + casts, extra + cast_bytes
        detail += " + the autocast copies of both weights (and of dW before its float32 cast)"
    return Prediction(path, shape, gpu.name, divergence.name, str(dtype).removeprefix("torch."), tf32,
                      _phases(kernels, gpu, tf32), floor_seconds(path, shape, gpu, dtype), float(extra), detail,
                      tuple(notes))


def predict_all(shape: Shape, gpu: targets.GPU | str = targets.H100, divergence="forward_kl",
                dtype: torch.dtype = torch.bfloat16, tf32: bool = False) -> dict[str, Prediction]:
    """`predict` of every path that computes `divergence`."""
    return {path: predict(path, shape, gpu, divergence, dtype, tf32) for path in PATHS if applies(path, divergence)}


# --- the bench's records ------------------------------------------------------------------------------------------

#: Which path each bench competitor runs, per function ("kdops" on the fused API: impl="auto", resolved).
COMPETITOR_PATHS = {
    (KD_LOSS, "kdops"): "kd_loss-triton", (KD_LOSS, "kdops-torch"): "kd_loss-torch",
    (KD_LOSS, "reference"): "kd_loss-reference",
    (FUSED, "kdops-fused"): "fused", (FUSED, "kdops-chunked"): "chunked", (FUSED, "kdops-sliced"): "sliced",
    (FUSED, "kdops-torch"): "fused-torch",
    (FUSED, "reference"): "reference", (FUSED, "liger-chunked-jsd"): "liger-chunked",
    (FUSED, "trl-chunked-jsd"): "trl-chunked",
}


def auto_path(shape: Shape, dtype: torch.dtype, budget: int | None = None) -> str:
    """The path impl="auto" (backend "triton") takes, by the rule of `kdops.api._fused_problem`: chunked,
    unless a given `budget` is below its smallest plan (then sliced)."""
    from kdops._validation import resolve_impl

    ctx = _Ctx(shape, targets.H100, kdops.as_divergence("forward_kl"), dtype, False, budget)
    fits = budget is None or chunked_plan(ctx).extra_bytes(shape.vocab, "triton", ctx.acc_dtype,
                                                           _chunked_sides(ctx)) <= budget
    return resolve_impl("auto", "triton", fits)


def competitor_path(case: Case, competitor: str) -> str | None:
    if case.function == FUSED and competitor == "kdops":
        return auto_path(Shape(case.tokens, case.hidden_student, case.hidden_teacher, case.vocab), case.torch_dtype)
    return COMPETITOR_PATHS.get((case.function, competitor))


def record_fields(case: Case, competitor: str, gpu: targets.GPU | None) -> dict:
    """The `predicted_*` fields of a bench record (None where there is no GPU or no modelled path)."""
    fields = dict.fromkeys(RECORD_FIELDS)
    path = None if gpu is None else competitor_path(case, competitor)
    if path is None or not applies(path, case.divergence):
        return fields
    shape = Shape(case.tokens, case.hidden_student or 1, case.hidden_teacher or 1, case.vocab)
    return predict(path, shape, gpu, case.divergence, case.torch_dtype).as_record()


# --- output ------------------------------------------------------------------------------------------------------

def _size(nbytes: float) -> str:
    if abs(nbytes) >= 2**30:
        return f"{nbytes / 2**30:,.2f} GiB"
    if abs(nbytes) >= MiB:
        return f"{nbytes / MiB:,.0f} MiB"
    return f"{nbytes / 1024:,.0f} KiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}" if seconds >= 0.01 else f"{seconds * 1e3:,.2f}"


def format_table(predictions: dict[str, Prediction]) -> str:
    """A plain-text table of predictions (one shape, divergence, dtype)."""
    rows = [("path", "fwd ms", "bwd ms", "total ms", "×floor", "L2 ms", "HBM GB", "extra")]
    for path, p in predictions.items():
        rows.append((path, _ms(p.forward_s), _ms(p.backward_s), _ms(p.total_s), f"{p.ratio_to_floor:.2f}",
                     _ms(p.total_l2_s), f"{p.hbm_bytes / GB:,.1f}", _size(p.extra_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _md_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _floor_label(p: Prediction) -> str:
    return "logits floor" if p.path in KD_PATHS + ("kd_loss-topk",) else "matmul floor"


_HOW_TO_READ = (
    "**How to read it.** Each path's forward and backward are split into the kernels they launch; each kernel "
    "gets a roofline, max(matmul flops / matmul rate + elementwise flops / CUDA-core rate, HBM bytes / "
    "bandwidth, {launch} µs per launch), and the path's time is their sum. \"× floor\" divides by the floor of "
    "the path's function (`bench/floor.py`): for `fused_linear_kd_loss` the matmuls 2·N·V·(3·Hs + Ht) at the "
    "input dtype's matmul rate (frozen teacher); for the `kd_loss-*` paths, which start from existing logits, "
    "one read of both logits and one write of the gradient, 3·N·V·b bytes at the HBM rate. \"L2 reuse\" is "
    "the same model with each operand of a fused Triton kernel read from HBM once per launch (and its float32 "
    "scratch kept in L2) instead of once per tile; the two bracket what a GPU should measure. \"extra\" is "
    "the memory beyond the inputs and the gradients the loss must return.")

_ASSUMPTIONS = (
    "The fused Triton kernels as the H100 measured them: matmuls at the cuBLAS rate, elementwise work, tile "
    "loads from L2 at an effective 16 TB/s and (forward) per-tile reductions ({tile}) one after the other; HBM "
    "reads each operand once per launch. cuBLAS matmuls read each operand once, at cuBLAS's achievable rate.",
    "A launch with fewer programs than SMs gets that share of the matmul and CUDA-core rates (not of the "
    "bandwidth); wave quantization is ignored.",
    "Elementwise work inside kdops' kernels on logits, calibrated on the H100 campaign "
    "(bench/results/nvidia-h100-campaign: profiled kernel time × the fp32 rate ÷ elements): {kernels} "
    "flop-equivalents per (row, vocabulary) element of both models' values, per forward pass / for the "
    "gradient (other kinds: the larger), at the CUDA-core rate, scaled by their SASS instruction counts "
    "since (`python -m bench.loops`); the fused kernels' from the H200 campaign ({fused}); PyTorch's and the "
    "peers' elementwise kernels {ew} per element and pass.",
    "The torch paths (`kd_loss-torch`, `kd_loss-reference`, `fused-torch`, `reference`) are estimates: their "
    "code runs once on the CPU at a small probe shape under a dispatch mode that records every aten operator; "
    "each operator reads its inputs and writes its outputs once (no fusion), and the probe's dimensions are "
    "mapped to the real ones. Their memory is the probe's peak of live tensors at the real sizes (it "
    "reproduces bench/results/MEMORY.md: 6.75 and 12.25 float32 [N, V] matrices for the kd_loss reference).",
    "`liger-chunked` (liger-kernel 0.8.5 `LigerFusedLinearJSDLoss`, read from its source: 1024-token chunks, "
    "logits in the input dtype, the JSD and its gradient by `torch.func.grad_and_value` under torch.compile, "
    "gradients computed in the forward) assumes inductor reads both logits twice in the forward and twice "
    "(JSD: three times) for the gradient, with no float32 [chunk, V] intermediates.",
    "`trl-chunked` follows trl 1.16.0's `ChunkedDivergenceFunction` (kernels/chunked_divergence.py): tiles "
    "of 4096 tokens × 32768 vocabulary rows projected into float32 buffers, a second projection pass for "
    "the JSD, the projections recomputed in the backward, float32 dH and dW accumulators.",
    "Frozen teacher, no hard-label term, temperature 1, every row counted, batchmean: the bench's setting.",
)


def _headline_table(preds: dict, paths, divergences) -> list[str]:
    header = ["path"]
    for d in divergences:
        header += [f"{d} ms", "× floor", "L2 reuse ms"]
    header.append("extra memory (" + " / ".join(divergences) + ")")
    rows = []
    for path in paths:
        if not any(path in preds[d] for d in divergences):
            continue
        row = [f"`{path}`"]
        for d in divergences:
            p = preds[d].get(path)
            row += ["—"] * 3 if p is None else [_ms(p.total_s), f"{p.ratio_to_floor:.2f}", _ms(p.total_l2_s)]
        row.append(" / ".join(_size(preds[d][path].extra_bytes) if path in preds[d] else "—" for d in divergences))
        rows.append(row)
    return _md_rows(header, rows)


def _phase_table(p: Prediction) -> list[str]:
    rows = [[ph.name, f"{ph.flops / 1e12:,.2f}", f"{ph.bytes / GB:,.2f}", _ms(ph.seconds), _ms(ph.seconds_l2),
             ph.detail] for ph in p.phases]
    return _md_rows(["phase", "matmul TFLOP", "HBM GB", "ms", "L2 reuse ms", "what the bytes are"], rows)


def markdown(shapes: list[tuple[str, Shape]], gpu: targets.GPU, divergences=DEFAULT_DIVERGENCES,
             dtype: torch.dtype = torch.bfloat16) -> str:
    """The MODEL.md report: how to read it, rates and assumptions, the headline (the first shape), a table per
    shape, the phases at the first shape, and float32 inputs with exact products and with TF32."""
    dtype_name = str(dtype).removeprefix("torch.")
    title, first = shapes[0]
    lines = [
        "# The paper cost model: predicted time and memory per path", "",
        "Generated by `python -m bench.model --markdown bench/results/MODEL.md` (`bench/model.py`) from the "
        "launch configurations in the code; do not edit by hand (`tests/test_model.py` checks that it is "
        "current). Every GPU bench record stores the prediction for its case beside the measurement "
        "(`predicted_*` fields), so the first GPU run calibrates the model.", "",
        _HOW_TO_READ.format(launch=f"{LAUNCH_S * 1e6:.0f}"), "",
        f"**GPU: {gpu.name.upper()}** ({gpu.sm_count} SMs), achievable rates from `kdops.targets`: dense "
        f"16-bit matmul {gpu.matmul_flops_16bit / 1e12:,.0f} TFLOP/s, TF32 {gpu.matmul_flops_tf32 / 1e12:,.0f}, "
        f"float32 on the CUDA cores {gpu.fp32_flops / 1e12:,.1f}, HBM {gpu.hbm_bytes_per_s / 1e12:,.2f} TB/s.", "",
        "**Assumptions.**", "",
    ]
    kernels, fused = (", ".join(f"{kind.upper()} {a} / {b}" for kind, (a, b) in table.items())
                      for table in (LOGITS_KERNEL_FLOPS, FUSED_TILE_FLOPS))
    tile = ", ".join(f"{t * 1e6:.3f} µs a tile of {rows} rows" for rows, t in FUSED_FORWARD_TILE_S.items())
    lines += [f"* {a.format(ew=ELEMENTWISE_FLOPS, kernels=kernels, fused=fused, tile=tile)}" for a in _ASSUMPTIONS]
    preds = {d: predict_all(first, gpu, d, dtype) for d in divergences}
    fused_floor = floor_seconds("fused", first, gpu, dtype)
    logits_floor = floor_seconds("kd_loss-triton", first, gpu, dtype)
    lines += ["", f"## Headline: {first.tokens} tokens × {first.vocab} vocabulary, Hs = {first.hidden_student}, "
              f"Ht = {first.hidden_teacher} ({title}), {dtype_name}, {gpu.name.upper()}", "",
              f"`fused_linear_kd_loss` and its competitors; floor {_ms(fused_floor)} ms "
              f"({2 * first.tokens * first.vocab * (3 * first.hidden_student + first.hidden_teacher) / 1e12:,.1f} "
              f"TFLOP of matmuls):", ""]
    lines += _headline_table(preds, [p for p in PATHS if p not in KD_PATHS], divergences)
    lines += ["", f"`kd_loss` on the same N × V logits (no matmuls); floor {_ms(logits_floor)} ms (3·N·V·b bytes):",
              ""]
    lines += _headline_table(preds, KD_PATHS, divergences)
    lines += ["", "The paths:", ""]
    lines += [f"* `{path}`: {DESCRIPTIONS[path]}." for path in PATHS]
    lines += ["", f"Where the time goes ({divergences[0]}; the phases are tabulated below):", ""]
    for path, p in preds[divergences[0]].items():
        if path in KD_PATHS:
            continue
        top = sorted(p.phases, key=lambda ph: -ph.seconds)[:3]
        lines.append(f"* `{path}`: {p.flops / 1e12:,.1f} TFLOP of matmuls, {p.hbm_bytes / GB:,.0f} GB of HBM traffic; "
                     "largest phases " + ", ".join(f"{ph.name} ({_ms(ph.seconds)} ms)" for ph in top)
                     + ". " + "; ".join(p.notes) + ".")
    for label, shape in shapes:
        lines += ["", f"## {label}: {shape} ({dtype_name}, {gpu.name.upper()})"]
        for d in divergences:
            rows = [[f"`{path}`", _ms(p.forward_s), _ms(p.backward_s), _ms(p.total_s),
                     f"{p.ratio_to_floor:.2f} ({_floor_label(p)})", _ms(p.total_l2_s), f"{p.hbm_bytes / GB:,.1f}",
                     f"{p.flops / 1e12:,.1f}", _size(p.extra_bytes)]
                    for path, p in predict_all(shape, gpu, d, dtype).items()]
            lines += ["", f"**{d}**", ""]
            lines += _md_rows(["path", "fwd ms", "bwd ms", "total ms", "× floor", "L2 reuse ms", "HBM GB",
                               "matmul TFLOP", "extra"], rows)
    lines += ["", f"## Phases at {first} ({dtype_name}, {gpu.name.upper()})", "",
              f"Every path at {divergences[0]}; at the other divergences, the paths whose kernels differ."]
    for d in divergences:
        for path, p in preds[d].items():
            if d != divergences[0]:
                base = preds[divergences[0]].get(path)
                if base is not None and [ph.name for ph in base.phases] == [ph.name for ph in p.phases]:
                    continue
            lines += ["", f"**`{path}`, {d}**: {_ms(p.total_s)} ms, {p.ratio_to_floor:.2f} × floor; extra memory "
                      f"{_size(p.extra_bytes)}: {p.extra_detail}. " + "; ".join(p.notes) + ".", ""]
            lines += _phase_table(p)
    lines += ["", f"## float32 inputs at {first}: exact products or TF32 ({gpu.name.upper()})", "",
              "The fused kernels multiply float32 operands exactly (`input_precision=\"ieee\"`, on the CUDA cores), "
              "and so do cuBLAS and the reference unless `torch.backends.cuda.matmul.allow_tf32` is set; the floor "
              "is the exact float32 matmuls. What TF32 would buy:", ""]
    rows = []
    for d in divergences:
        for path in ("fused", "chunked", "sliced", "fused-torch", "reference", "trl-chunked"):
            if not applies(path, d):
                continue
            ieee = predict(path, first, gpu, d, torch.float32)
            fast = predict(path, first, gpu, d, torch.float32, tf32=True)
            rows.append([f"`{path}`", d, _ms(ieee.total_s), f"{ieee.ratio_to_floor:.2f}", _ms(fast.total_s),
                         f"{fast.ratio_to_floor:.2f}", f"{ieee.total_s / fast.total_s:.1f}×"])
    lines += _md_rows(["path", "divergence", "ieee ms", "× floor", "TF32 ms", "× floor", "TF32 speed-up"], rows)
    lines += ["", f"## Mixed precision at {first}: float32 master weights ({gpu.name.upper()})", "",
              "Under `torch.autocast(dtype=bfloat16)` (the HF Trainer's `bf16=True`) the hidden states are bf16 "
              "and the lm_head weights float32: kdops casts every operand to bf16 as autocast's `F.linear` does "
              "(tensor cores; the weights' gradients come back in float32 through the casts), where without "
              "autocast float32 operands are multiplied exactly in float32:", ""]
    rows = []
    for d in divergences:
        for path in AUTOCAST_PATHS:
            if not applies(path, d):
                continue
            mixed = predict(path, first, gpu, d, torch.bfloat16, autocast=True)
            exact = predict(path, first, gpu, d, torch.float32)
            rows.append([f"`{path}`", d, _ms(mixed.total_s), f"{mixed.ratio_to_floor:.2f}", _size(mixed.extra_bytes),
                         _ms(exact.total_s), _size(exact.extra_bytes)])
    lines += _md_rows(["path", "divergence", "autocast bf16 ms", "× bf16 floor", "extra", "float32 ms", "extra"], rows)
    lines += _topk_section(first, gpu, divergences[0], dtype)
    lines += _transforms_section(first, gpu, dtype)
    lines += _mix_section(first, gpu, dtype)
    lines.append("")
    return "\n".join(lines)


def _mix_section(shape: Shape, gpu: targets.GPU, dtype: torch.dtype) -> list[str]:
    """MODEL.md's table of several teachers (`teacher_mix`) on the paths that take them."""
    lines = ["", f"## Several teachers at {shape} (forward_kl, {str(dtype).removeprefix('torch.')}, "
             f"{gpu.name.upper()})", "",
             "Every teacher's logits (a matmul per teacher and chunk on `chunked`), their mix into one float32 target "
             "in PyTorch (`MIX_PASSES`: bandwidth-bound passes over the chunk, an estimate), then the loss of "
             "(student, target) by the kernels. `kd_loss` goes in row chunks of `kdops._torch_backend.BUDGET_BYTES` "
             "and recomputes each chunk's mix and forward in the backward. Each teacher's Ht is the shape's.", ""]
    rows = []
    for path in MIX_PATHS:
        plain = predict(path, shape, gpu, "forward_kl", dtype)
        rows.append([f"`{path}`", "1", "—", _ms(plain.total_s), f"{plain.ratio_to_floor:.2f}", "1.00",
                     _size(plain.extra_bytes)])
        for count, mix in ((2, "ensemble"), (3, "ensemble"), (2, "logit_sum")):
            p = predict(path, shape, gpu, "forward_kl", dtype, teachers=count, mix=mix)
            rows.append([f"`{path}`", str(count), mix, _ms(p.total_s), f"{p.ratio_to_floor:.2f}",
                         f"{p.total_s / plain.total_s:.2f}", _size(p.extra_bytes)])
    lines += _md_rows(["path", "teachers", "mix", "total ms", "× one-teacher floor", "× one teacher", "extra"], rows)
    return lines


def _transforms_section(shape: Shape, gpu: targets.GPU, dtype: torch.dtype) -> list[str]:
    """MODEL.md's table of the tile transforms: softcapped logits (both sides) and TAID's target, beside the
    plain loss, on the paths that compute them."""
    lines = ["", f"## Softcaps and TAID at {shape} ({str(dtype).removeprefix('torch.')}, {gpu.name.upper()})", "",
             "Tile transforms inside the kernels' passes (`kernels/transforms.py`): no bytes move that the plain "
             "loss does not move; each softcapped side adds its tanh to every element of every pass and its slope "
             "to the gradient, TAID its mixed target (`SOFTCAP_INSTRUCTIONS`, `TAID_INSTRUCTIONS`, from the sm_90 "
             "SASS; not measured on a GPU yet). The torch paths run the reference's `torch.tanh` and its autograd "
             "(counted by the probe).", ""]
    variants = [("forward_kl", 0), ("forward_kl", 2), (kdops.TAID(0.5), 0), (kdops.TAID(0.5), 2),
                ("generalized_jsd", 0), ("generalized_jsd", 2)]
    rows = []
    for path in ("chunked", "fused", "fused-torch", "reference", "kd_loss-triton"):
        for divergence, caps in variants:
            if path == "kd_loss-triton" and caps:
                continue
            p = predict(path, shape, gpu, divergence, dtype, softcaps=caps)
            plain = predict(path, shape, gpu, "forward_kl" if isinstance(divergence, kdops.TAID) else divergence,
                            dtype)
            name = divergence if isinstance(divergence, str) else f"TAID(t={divergence.t})"
            rows.append([f"`{path}`", name, str(caps), _ms(p.total_s), f"{p.ratio_to_floor:.2f}",
                         f"{p.total_s / plain.total_s:.2f}"])
    lines += _md_rows(["path", "divergence", "softcapped sides", "total ms", "× floor", "× plain"], rows)
    return lines


def _topk_section(shape: Shape, gpu: targets.GPU, divergence: str, dtype: torch.dtype) -> list[str]:
    """MODEL.md's sparse-teacher table: the TOPK_PATHS at k = 1, 32, 128 beside the dense chunked path."""
    lines = ["", f"## Sparse teachers (top-k) at {shape} ({divergence}, {str(dtype).removeprefix('torch.')}, "
             f"{gpu.name.upper()})", "",
             "The student's side only: the teacher is its (ids, log-probabilities). Floors: the student's matmuls "
             "(2·N·V·Hs forward, 4·N·V·Hs backward) from hidden states, the student's logits read and written on "
             "logits. The top-k kernels are not measured yet (`TOPK_LOOP_INSTRUCTIONS`, from their SASS).", ""]
    rows = []
    for path in TOPK_PATHS:
        for k in (1, 32, 128):
            p = predict(path, shape, gpu, divergence, dtype, k=k)
            rows.append([f"`{path}`", str(k), _ms(p.total_s), f"{p.ratio_to_floor:.2f} ({_floor_label(p)})",
                         f"{p.hbm_bytes / GB:,.1f}", f"{p.flops / 1e12:,.2f}", _size(p.extra_bytes)])
    lines += _md_rows(["path", "k", "total ms", "× floor", "HBM GB", "matmul TFLOP", "extra"], rows)
    lines += ["", "The paths:", ""] + [f"* `{path}`: {DESCRIPTIONS[path]}." for path in TOPK_PATHS]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=Shape.parse, metavar="TOKENSxHSxHTxVOCAB",
                        help=f"repeatable; default {HEADLINE} (with --markdown: the headline, Qwen2.5 and Gemma "
                             "widths)")
    parser.add_argument("--gpu", default="h100", choices=sorted(targets.GPUS))
    parser.add_argument("--divergence", action="append", nargs="+", metavar="D",
                        help=f"default {' '.join(DEFAULT_DIVERGENCES)}")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--tf32", action="store_true", help="float32 matmuls at the TF32 rate")
    parser.add_argument("--autocast", action="store_true",
                        help="kdops' paths under torch.autocast of --dtype with float32 master weights")
    parser.add_argument("--path", action="append", choices=PATHS, help="only these paths (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON document: every prediction with its phases")
    parser.add_argument("--markdown", metavar="PATH", help="write the MODEL.md report to PATH")
    args = parser.parse_args(argv)
    gpu, dtype = targets.by_name(args.gpu), DTYPES[args.dtype]
    divergences = [d for group in args.divergence for d in group] if args.divergence else list(DEFAULT_DIVERGENCES)
    try:
        divergences = [kdops.as_divergence(d).name for d in divergences]
    except ValueError as error:
        parser.error(str(error))
    if args.markdown:
        shapes = ([(str(s), s) for s in args.shape] if args.shape
                  else [(label, Shape.parse(text)) for label, text in STANDARD_SHAPES])
        Path(args.markdown).write_text(markdown(shapes, gpu, tuple(divergences), dtype))
        print(f"wrote {args.markdown}")
        return 0
    shapes = args.shape or [Shape.parse(HEADLINE)]
    results = []
    for shape in shapes:
        for d in divergences:
            if args.autocast:
                predictions = {path: predict(path, shape, gpu, d, dtype, autocast=True) for path in AUTOCAST_PATHS
                               if applies(path, d)}
            else:
                predictions = predict_all(shape, gpu, d, dtype, args.tf32)
            if args.path:
                predictions = {k: v for k, v in predictions.items() if k in args.path}
            if args.json:
                results += [p.as_json() for p in predictions.values()]
            else:
                mode = " tf32" if args.tf32 else " autocast (float32 master weights)" if args.autocast else ""
                print(f"# {shape} {d} {args.dtype}{mode} on {gpu.name}: floor "
                      f"{_ms(floor_seconds('fused', shape, gpu, dtype))} ms (matmuls), "
                      f"{_ms(floor_seconds('kd_loss-triton', shape, gpu, dtype))} ms (logits, kd_loss-*)")
                print(format_table(predictions))
                print()
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
