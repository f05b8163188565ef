"""Launchers of the fused lm_head kernels (`kdops.kernels.linear`): block sizes, vocabulary splits,
scratch groups under a memory budget. They return tensors; the math is in the kernels."""

from __future__ import annotations

import torch

from . import _launch, targets
from ._launch import _cdiv, _empty, _next_pow2, _rows_of, launch
from .divergences import Canonical

#: Bytes of float32 scratch the backward may hold at once for dH (per row group) and dW (per vocabulary
#: group). Gradients whose own dtype is the accumulation dtype are accumulated in place and need none.
SCRATCH_BYTES = 32 * 2**20


def _linear():
    from .kernels import linear

    return linear


# GPU tiles by operand size in bytes: the two logit tiles, their gradient tiles and the per-row statistics
# must fit a thread's 255 registers without spilling, in every specialization (`python -m bench.compile`
# checks them all for sm_90 and sm_80). 16-bit operands go through the tensor cores (BLOCK_H = 64: a few
# wgmma / mma per step). Float32 / float64 ones are exact FMA products on the CUDA cores, whose operand
# fragments hold BLOCK_H values per row and column in registers (hence the narrow BLOCK_H; 16 is the
# least `tl.dot` takes in Triton 3.6), and whose kernels ptxas would otherwise squeeze into 128 registers
# (two blocks per SM) at the price of spills: maxnreg = 255 keeps them whole.
_GPU_TILES = {
    2: dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3),
    4: dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16, num_warps=8, num_stages=3, maxnreg=255),
    8: dict(BLOCK_N=32, BLOCK_V=32, BLOCK_H=16, num_warps=8, num_stages=3, maxnreg=255),
}
# The forward before Hopper (mma.sync, whose accumulator fragments take more registers than wgmma's): 16-bit
# tiles half as wide, where the KL first pass with its centred sums spilled at 64 × 64 on sm_80 (and the
# backward's dW product spills at 64 × 32: it keeps the common tiles).
_PRE_HOPPER_FORWARD_TILES = {2: dict(_GPU_TILES[2], BLOCK_V=32)}
# Generalized JSD holds the most live state per element (both log-probabilities and the mixture's, on both
# sides): with the hard-label term or teacher gradients its 16-bit backward spilled 8–16 B at 64 × 64 and
# its float64 kernels 24–112 B at 32 × 32 (`python -m bench.compile`, both archs). Smaller tiles there: half
# the rows for the 16-bit backward on sm_90, half the columns in float64; the 16-bit forward and float32 fit.
# Before Hopper the 16-bit JSD backward spills at every tile tried (64 × 64: 8–96 B with the hard-label term
# and teacher gradients; 32 × 64 and 32 × 32: in more specializations): it keeps the common tiles.
_JSD_BACKWARD_TILES = {2: dict(_GPU_TILES[2], BLOCK_N=32), 8: dict(_GPU_TILES[8], BLOCK_V=16)}
_JSD_PRE_HOPPER_BACKWARD_TILES = {8: _JSD_BACKWARD_TILES[8]}
_JSD_FORWARD_TILES = {8: _JSD_BACKWARD_TILES[8]}
# The tile transforms (softcaps: a tanh and its slope per element and side) in the 16-bit backward before Hopper:
# the weight-gradient kernel spilled 16 B at 64 × 64 with every optional term (skew reverse KL, sm_80): half the
# rows, as JSD's on sm_90.
_TRANSFORM_PRE_HOPPER_BACKWARD_TILES = {2: dict(_GPU_TILES[2], BLOCK_N=32)}


def fused_config(n_rows: int, vocab: int, gpu: targets.GPU | None, dtype: torch.dtype = torch.bfloat16,
                 forward: bool = False, jsd: bool = False, transform: int = 0) -> dict:
    """Tile sizes and the number of vocabulary splits of the forward for `gpu` (None: the interpreter), whose
    widest matmul operands have `dtype`; the backward takes the same tiles unless `forward`; `jsd`: the
    generalized-JSD kernels; `transform`: the tile transforms (`Canonical.transform`). On GPU: `_GPU_TILES`
    (`_PRE_HOPPER_FORWARD_TILES` first for the forward below sm_90, `_TRANSFORM_PRE_HOPPER_BACKWARD_TILES` for a
    transformed backward there, the `_JSD_*_TILES` for JSD), and enough (row block, split) programs to fill
    the device twice. Under the interpreter: few large tiles, and several splits so that the merge is
    exercised."""
    if gpu is not None:
        size = min(torch.empty((), dtype=dtype).element_size(), 8)
        special = _PRE_HOPPER_FORWARD_TILES if forward and gpu.capability < (9, 0) else {}
        if transform and not forward and gpu.capability < (9, 0):
            special = _TRANSFORM_PRE_HOPPER_BACKWARD_TILES
        if jsd:
            backward = _JSD_BACKWARD_TILES if gpu.capability >= (9, 0) else _JSD_PRE_HOPPER_BACKWARD_TILES
            special = {**special, **(_JSD_FORWARD_TILES if forward else backward)}
        tiles = special.get(size, _GPU_TILES[size])
        programs = 2 * gpu.sm_count
        splits = max(1, programs // _cdiv(n_rows, tiles["BLOCK_N"]))
    else:
        tiles = dict(BLOCK_N=min(32, max(16, _next_pow2(n_rows))), BLOCK_V=128, BLOCK_H=64)
        splits = 3
    split_size = _cdiv(_cdiv(vocab, splits), tiles["BLOCK_V"]) * tiles["BLOCK_V"]
    return dict(tiles, split_size=split_size)


_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
              torch.float64: "float64"}


def _dot_dtype(tl, hidden, weight):
    return getattr(tl, _TL_DTYPES[torch.promote_types(hidden.dtype, weight.dtype)])


def _precision(dot) -> str | None:
    """fp32 / fp64 operands are multiplied exactly ("ieee"), not through TF32; lower ones by default."""
    return "ieee" if dot.primitive_bitwidth >= 32 else None


def _side(tl, hidden, weight, gpu):
    """(hidden, its row layout, weight with unit stride along H, dot dtype, multiply dtype, precision)."""
    hidden, layout = _rows_of(hidden)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    dot = _dot_dtype(tl, hidden, weight)
    # The interpreter's 16-bit dot is wrong (Triton 3.9): multiply the rounded operands in fp32 there.
    mma = tl.float32 if gpu is None and dot.primitive_bitwidth < 32 else dot
    return hidden, layout, weight, dot, mma, _precision(dot)


class FusedProblem:
    """Everything the fused kernels take besides the per-call row scale: the inputs, prepared once."""

    def __init__(self, hs, ws, bs, ht, wt, bt, labels, canon: Canonical, inv_temp: float, vocab: int, soft: float,
                 hard: float, shards=None):
        tl, *_ = _launch._kernels()
        self.n_rows = hs.numel() // hs.shape[-1]
        self.vocab, self.canon = vocab, canon
        self.gpu = targets.of_device(hs.device)
        self.hs, s_layout, self.ws, dot_s, mma_s, prec_s = _side(tl, hs, ws, self.gpu)
        self.ht, t_layout, self.wt, dot_t, mma_t, prec_t = _side(tl, ht, wt, self.gpu)
        self.bs, self.bt = bs, bt
        self.shards = shards
        # Global token ids (the labels' range check), and as indices into this rank's vocabulary shard.
        self.global_labels = _launch.flat_labels(labels, hard)
        self.labels = self.global_labels if shards is None else shards.local_labels(self.global_labels)
        self.acc = _launch._acc(tl, hs, ws, bs, ht, wt, bt)
        # The widest matmul operand dtype of the two sides: it decides the tiles (`fused_config`).
        self.dot_dtype = torch.promote_types(torch.promote_types(hs.dtype, ws.dtype),
                                             torch.promote_types(ht.dtype, wt.dtype))
        kind, self.two_pass = _launch.kind_of(canon)
        self.jsd = canon.kind.name == "JSD"  # its kernels take narrower tiles (`fused_config`)
        self.device = hs.device
        self.shape_args = (self.hs.shape[-1], self.ht.shape[-1])
        self.layout_args = (*s_layout, *t_layout, self.ws.stride(0), self.wt.stride(0))
        self.scalars = (inv_temp, canon.c1, canon.c2, *canon.transform_args())
        self.weights = (soft, hard)
        self.constexprs = dict(KIND=kind, HARD=hard > 0, STUDENT_IS_P=canon.student_is_p, TRANSFORM=canon.transform,
                               HAS_BS=bs is not None,
                               HAS_BT=bt is not None, DOT_S=dot_s, DOT_T=dot_t, MMA_S=mma_s, MMA_T=mma_t,
                               PREC_S=prec_s, PREC_T=prec_t,
                               ACC=self.acc)

    @property
    def acc_dtype(self) -> torch.dtype:
        return _launch._acc_torch(self.acc)

    eager = False  # gradients need the final statistics: they are computed in the backward

    def forward(self):
        loss, stats = fused_forward(self)
        return loss, [stats]

    def backward(self, saved, row_scale, needs):
        return fused_backward(self, saved[0], row_scale, needs)

    def pointers(self, stats):
        """The input pointers, with a stand-in for absent biases and labels (constexpr flags skip them)."""
        return (self.hs, self.ws, stats if self.bs is None else self.bs, self.ht, self.wt,
                stats if self.bt is None else self.bt, stats if self.labels is None else self.labels)


def fused_forward(problem: FusedProblem):
    """Per-row losses soft·D + hard·CE [rows] and statistics [rows, NUM_STATS] (of the group's vocabulary
    under `problem.shards`)."""
    linear = _linear()
    n = problem.n_rows
    config = fused_config(n, problem.vocab, problem.gpu, problem.dot_dtype, forward=True, jsd=problem.jsd,
                          transform=problem.canon.transform)
    split_size = config.pop("split_size")
    n_splits = _cdiv(problem.vocab, split_size)
    *inputs, labels = problem.pointers(problem.hs)

    def launch_pass(second, partial, stats):
        launch(
            linear.fused_forward_kernel, (_cdiv(n, config["BLOCK_N"]), n_splits), *inputs, labels, partial, stats,
            n, problem.vocab, *problem.shape_args, split_size, n_splits, *problem.layout_args, *problem.scalars,
            SECOND_PASS=second, **problem.constexprs, **config,
        )

    shards = problem.shards
    return _launch.staged_forward(launch_pass, n, n_splits, problem.canon, *problem.weights, problem.global_labels,
                                  problem.vocab if shards is None else shards.vocab, problem.constexprs,
                                  problem.device, shards)


def _groups(total: int, block: int, bytes_per_item: int):
    """[start, end) ranges of `total` items, whole blocks each, with scratch of at most SCRATCH_BYTES."""
    per_group = max(block, SCRATCH_BYTES // max(1, bytes_per_item) // block * block)
    return [(start, min(total, start + per_group)) for start in range(0, total, per_group)]


def _scratch(grad: torch.Tensor | None, start: int, end: int, acc_dtype: torch.dtype, device):
    """Where a group's float32 (ACC) sums go: the gradient's own rows when they already have that dtype."""
    if grad is None:
        return None
    if grad.dtype == acc_dtype:
        return grad[start:end]
    return torch.zeros((end - start, *grad.shape[1:]), dtype=acc_dtype, device=device)


def _flush(grad, scratch, start: int, end: int) -> None:
    """Cast a group's sums into the gradient (nothing to do where they were accumulated in place)."""
    if grad is not None and scratch.dtype != grad.dtype:
        grad[start:end].copy_(scratch)


def fused_backward(problem: FusedProblem, stats, row_scale, needs):
    """Gradients (hs, ws, bs, ht, wt, bt) of Σ_r row_scale[r]·loss[r]; `needs` says which (None for the
    others). Weight and bias rows past the shared vocabulary get zeros. Under `problem.shards` the hidden
    gradients are summed over the group while still float32 sums, group by group, and rounded once."""
    linear = _linear()
    need_hs, need_ws, need_bs, need_ht, need_wt, need_bt = needs
    device, acc_dtype = problem.device, problem.acc_dtype
    n, vocab = problem.n_rows, problem.vocab
    (Hs, Ht), hs, ht = problem.shape_args, problem.hs, problem.ht

    def zeros_like(t, need):
        return torch.zeros(t.shape, dtype=t.dtype, device=device) if need else None

    g_hs = torch.zeros((n, Hs), dtype=hs.dtype, device=device) if need_hs else None
    g_ht = torch.zeros((n, Ht), dtype=ht.dtype, device=device) if need_ht else None
    g_ws, g_wt = zeros_like(problem.ws, need_ws), zeros_like(problem.wt, need_wt)
    g_bs = zeros_like(problem.bs, need_bs and problem.bs is not None)
    g_bt = zeros_like(problem.bt, need_bt and problem.bt is not None)
    if n == 0:
        return g_hs, g_ws, g_bs, g_ht, g_wt, g_bt

    config = fused_config(n, vocab, problem.gpu, problem.dot_dtype, jsd=problem.jsd, transform=problem.canon.transform)
    config.pop("split_size")
    row_scale = row_scale.contiguous()
    *inputs, labels = problem.pointers(stats)
    common = (*problem.layout_args, *problem.scalars, *problem.weights)
    if need_hs or need_ht:
        for start, end in _groups(n, config["BLOCK_N"], 4 * (Hs * need_hs + Ht * need_ht)):
            s_hs, s_ht = _scratch(g_hs, start, end, acc_dtype, device), _scratch(g_ht, start, end, acc_dtype, device)
            launch(
                linear.fused_grad_hidden_kernel, (_cdiv(end - start, config["BLOCK_N"]),), *inputs, labels, stats,
                row_scale, stats if s_hs is None else s_hs, stats if s_ht is None else s_ht, start, end, vocab, Hs,
                Ht, *common, GRAD_HS=need_hs, GRAD_HT=need_ht, **problem.constexprs, **config,
            )
            if problem.shards is not None:  # this rank's part of a sum over the vocabulary: summed in float32
                problem.shards.reduce_hidden(s_hs, s_ht)
            _flush(g_hs, s_hs, start, end)
            _flush(g_ht, s_ht, start, end)
            del s_hs, s_ht  # before the next group's: one group's scratch at a time
    # Bias gradients: float32 sums over the rows, rounded once here (a [V] vector: no budget needed).
    s_bs, s_bt = (None if g is None else _scratch(g, 0, g.shape[0], acc_dtype, device) for g in (g_bs, g_bt))
    if need_ws or need_wt or g_bs is not None or g_bt is not None:
        for start, end in _groups(vocab, config["BLOCK_V"], 4 * (Hs * need_ws + Ht * need_wt)):
            s_ws, s_wt = _scratch(g_ws, start, end, acc_dtype, device), _scratch(g_wt, start, end, acc_dtype, device)
            launch(
                linear.fused_grad_weight_kernel, (_cdiv(end - start, config["BLOCK_V"]),), *inputs, labels, stats,
                row_scale, stats if s_ws is None else s_ws, stats if s_bs is None else s_bs,
                stats if s_wt is None else s_wt, stats if s_bt is None else s_bt, start, end, n, Hs, Ht, *common,
                GRAD_WS=need_ws, GRAD_BS=g_bs is not None, GRAD_WT=need_wt, GRAD_BT=g_bt is not None,
                **problem.constexprs, **config,
            )
            _flush(g_ws, s_ws, start, end)
            _flush(g_wt, s_wt, start, end)
            del s_ws, s_wt
    for g, scratch in ((g_bs, s_bs), (g_bt, s_bt)):
        if g is not None:
            _flush(g, scratch, 0, g.shape[0])
    return g_hs, g_ws, g_bs, g_ht, g_wt, g_bt
