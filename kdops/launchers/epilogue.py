"""The logits GEMM with row statistics in its epilogue (`kernels/epilogue.py`): one model's float32 logits of a
chunk of rows and, per N tile, the maximum and the sum of exponentials of each row at temperature T (and at
T = 1 for the hard-label cross-entropy), merged here into the statistics the kernels on logits take
(`statistics`), so that `logits_backward(..., loss=...)` reads each logit once.

Two GEMMs keep that contract: `QuackGEMM`, the CuTe DSL kernel (quack-kernels, CUDA compute capability 9.x or
10.x, 16-bit operands of one dtype), and `ReferenceGEMM`, its definition in PyTorch (a float32 matmul, then the
tiles' maxima and sums), which the tests run in its place off the GPU. `gemm_for(device)` says which one a
device gets, or why none.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .common import acc_of, cdiv, empty, kernel_modules, launch, next_pow2, torch_acc
from .matmul import mm_into

#: Compute capabilities (major) whose GEMM the epilogue path has: Hopper (sm_90a) and Blackwell (sm_100a).
ARCHS = (9, 10)

#: The operand dtypes of `QuackGEMM`: 16-bit, whose products the tensor cores sum in float32 exactly as cuBLAS
#: does (float32 operands would go through TF32).
OPERAND_DTYPES = (torch.bfloat16, torch.float16)


class ReferenceGEMM:
    """The epilogue's contract in PyTorch: out = h·Wᵀ in float32 (`mm_into`); per tile of `tile_n` columns
    (the last one ragged), top = max v and sums = Σ e^(v − top) of v = out · inv_temp (and of out itself, `ce`)."""

    def __init__(self, tile_n: int = 192):
        self.tile_n = tile_n

    @staticmethod
    def accepts(hidden, weight) -> bool:
        return True

    def __call__(self, h, weight, out, inv_temp: float, ce: bool) -> dict:
        mm_into(h, weight.t(), out)
        v = out * torch.tensor(inv_temp, dtype=out.dtype)  # one rounded product, as the epilogue's
        partials = dict(zip(("top", "sums"), self._tiles(v)))
        if ce:
            partials.update(zip(("top_ce", "sums_ce"), self._tiles(out)))
        return partials

    def _tiles(self, v):
        rows, n = v.shape
        pad = -n % self.tile_n
        tiles = torch.nn.functional.pad(v, (0, pad), value=float("-inf")).view(rows, -1, self.tile_n)
        top = tiles.amax(-1)
        # a tile of −inf only (masked columns) sums to 0, as the epilogue's guard leaves it
        return top, torch.exp(tiles - torch.where(top == float("-inf"), 0.0, top)[..., None]).sum(-1)


class QuackGEMM:
    """The CuTe DSL GEMM of `kernels/epilogue.py` (quack-kernels), one compiled plan per shape and dtype (quack
    compiles on first sight and keeps the kernel in its own cache)."""

    @staticmethod
    def accepts(hidden, weight) -> bool:
        """16-bit operands of one dtype (`OPERAND_DTYPES`), the weight's rows contiguous (read in place, K-major), and
        the 16-byte aligned rows that the GEMM's TMA copies need: H a multiple of 8 (16-bit operands), V of 4 (the
        float32 logits)."""
        return (hidden.dtype == weight.dtype and hidden.dtype in OPERAND_DTYPES and weight.stride(-1) == 1
                and hidden.shape[-1] % 8 == 0 and weight.shape[0] % 4 == 0)

    def __call__(self, h, weight, out, inv_temp: float, ce: bool) -> dict:
        h = h.contiguous()
        plan = _plan(tuple(h.shape), tuple(weight.shape), h.dtype, ce, h.device.index)
        sinks = {name: torch.empty_like(buf) for name, buf in plan.scratch.items()}
        plan.run(h, weight.t(), out={"D": out}, scratch=sinks, inv_temp=inv_temp)
        return sinks


@functools.lru_cache(maxsize=64)
def _plan(h_shape, w_shape, dtype, ce: bool, device_index):
    from ..kernels import epilogue

    h = torch.empty(h_shape, dtype=dtype, device=torch.device("cuda", device_index))
    weight = torch.empty(w_shape, dtype=dtype, device=h.device)
    out = torch.empty((h_shape[0], w_shape[0]), dtype=torch.float32, device=h.device)
    mod = epilogue.logits_statistics_ce if ce else epilogue.logits_statistics
    return mod.plan(h, weight.t(), out={"D": out}, inv_temp=1.0)


def unavailable(device: torch.device) -> str | None:
    """Why `QuackGEMM` cannot run on `device`, or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        where = f"not on {device.type}" if device.type != "cuda" else "and CUDA is not available here"
        return f"the epilogue path runs on CUDA GPUs of compute capability {' or '.join(f'{a}.x' for a in ARCHS)}, " \
               + where
    major = torch.cuda.get_device_capability(device)[0]
    if major not in ARCHS:
        return f"the epilogue path has GEMMs for compute capability {' and '.join(f'{a}.x' for a in ARCHS)}; " \
               f"this GPU is {major}.x"
    if importlib.util.find_spec("quack") is None:
        return 'the epilogue path needs quack-kernels: pip install "kdops[quack]"'
    return None


def gemm_for(device: torch.device):
    """The GEMM that `device` runs, or a ValueError saying why there is none. KDOPS_EPILOGUE_REFERENCE=1 gives
    `ReferenceGEMM` (its tile width the variable's value when above 1) anywhere: the tests' stand-in."""
    reference = os.environ.get("KDOPS_EPILOGUE_REFERENCE", "")
    if reference not in ("", "0"):
        return ReferenceGEMM(int(reference) if int(reference) > 1 else 192)
    reason = unavailable(device)
    if reason is not None:
        raise ValueError(f"impl='epilogue': {reason}")
    return QuackGEMM()


def merged(top, sums):
    """(M, ls) per row of per-tile (top, sums) [rows, tiles]: M = max_j top_j, ls = log Σ_j sums_j·e^(top_j − M),
    in float64, returned in top's dtype: the definition of `merge_tile_statistics_kernel`'s merge (`statistics`;
    its r is the difference of the two sides' ls before their rounding)."""
    m = top.amax(-1)
    shift = top.double() - torch.where(torch.isfinite(m), m, 0.0).double()[:, None]
    total = (sums.double() * torch.exp(shift)).sum(-1)  # an empty tile (top −inf, sums 0) adds 0
    return m, torch.log(total).to(top.dtype)


def statistics(student: dict, teacher: dict, student_is_p: bool, ce: bool):
    """The statistics [rows, NUM_STATS] (`kernels/passes.py`: m_x, ls_x, m_y, ls_y, r, aux1..3, L, m_c, ls_c) of a
    chunk from its two GEMMs' per-tile sinks, merged by `merge_tile_statistics_kernel` (`merged` is its definition),
    with r = log(S_y / S_x) of the merged sums (not the difference of the rounded log-sums), for the kernels that
    take the log-normalizers only (`logits.one_read`, `logits.second_pass_only`): aux and L are 0. The
    cross-entropy's (m_c, ls_c), with `ce`, are the student's at T = 1: its own sinks, or (at T = 1) those at T."""
    modules = kernel_modules()
    x, y = (student, teacher) if student_is_p else (teacher, student)
    c = (student["top_ce"], student["sums_ce"]) if "top_ce" in student else (student["top"], student["sums"])
    n_rows, n_tiles = x["top"].shape
    acc = acc_of(modules.tl, x["top"])
    stats = empty((n_rows, modules.logits.NUM_STATS.value), torch_acc(acc), x["top"].device)
    if n_rows:
        block_r = min(16, next_pow2(n_rows))
        launch(modules.partials.merge_tile_statistics_kernel, (cdiv(n_rows, block_r),), x["top"], x["sums"],
               y["top"], y["sums"], *c, stats, n_rows, n_tiles, CE=ce, BLOCK_R=block_r,
               BLOCK_T=min(256, next_pow2(n_tiles)), ACC=acc)
    return stats
