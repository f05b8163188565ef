"""The fused lm_head kernels (`kernels/linear.py`): their inputs prepared once (`FusedProblem`), block sizes and
vocabulary splits per GPU, the forward's launches and merge, and the backward's gradient kernel with cuBLAS
products over vocabulary slices. They return tensors; the math is in the kernels."""

from __future__ import annotations

import torch

from .. import targets
from ..divergences import Canonical
from .common import acc_of, cdiv, kernel_modules, launch, next_pow2, rows_of, torch_acc
from .logits import flat_labels, kind_of, staged_forward
from .matmul import LMHeadGrads, float32_sums

#: Bytes of the backward's gradient buffers: G = ∂/∂logits for every row over one vocabulary slice, in the
#: dot dtype (16 bits for 16-bit inputs), per side whose gradients are asked for. The float32 sums of dH
#: ([rows, H] per side) come on top, unless the hidden gradient is itself float32 or wider.
GRADIENT_BYTES = 64 * 2**20


#: Row blocks that the forward's programs in flight cover (its splits vary fastest, `fused_config` takes enough of
#: them): their hidden rows, read once from HBM, stay in L2 (8 × 64 rows × (4096 + 4096) × 2 B = 8 MiB at the
#: Llama-3 8B widths) while every split streams its weight tiles.
FORWARD_ROW_BLOCKS_IN_FLIGHT = 8


#: Row blocks that the backward's programs in flight walk down each vocabulary tile together (`grouped_tile`):
#: their hidden rows and weight tiles are shared through L2.
GROUP_ROWS = 8


# GPU tiles by operand size in bytes: the two logit tiles, their gradient tiles and the per-row statistics must fit a
# thread's 255 registers without spilling, in every specialization but the Hopper WIDEST tiles below (`python -m
# bench.compile` checks them all for sm_90 and sm_80). 16-bit operands go through the tensor cores (BLOCK_H = 64: a few
# wgmma / mma per step). Float32 / float64 ones are exact FMA products on the CUDA cores, whose operand fragments hold
# BLOCK_H values per row and column in registers (hence the narrow BLOCK_H; 16 is the least `tl.dot` takes in Triton
# 3.6), and whose kernels ptxas would otherwise squeeze into 128 registers (two blocks per SM) at the price of spills:
# maxnreg = 255 keeps them whole.
_GPU_TILES = {
    2: dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3),
    4: dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16, num_warps=8, num_stages=3, maxnreg=255),
    8: dict(BLOCK_N=32, BLOCK_V=32, BLOCK_H=16, num_warps=8, num_stages=3, maxnreg=255),
}


# Hopper (wgmma), 16-bit: WIDE, 128 rows × 64 columns, halves the re-reads of the weights; WIDEST, 128 × 128, halves
# them again. Measured on an H100 at the headline (8192 × 128256 × 4096, bf16, bench/results/nvidia-h100-campaign/):
# forward KL 190.2 ms at 64 × 64 → 135.7 ms with WIDE → 124.4 ms with the WIDEST gradient; then (0.3.5-wide-tiles/,
# 0.3.4/) the WIDEST forward, TMA loads, every kind: forward KL 66.3 → 44.8 ms, generalized JSD 128.5 → 93.2, skew
# reverse KL 138.3 → 86.1, TVD 137.6 → 78.8, α-β 70.4 → 50.0; with the hard-label term (64 × 64 until then) KL 124.3 →
# 59.4, JSD 250.3 → 108.7; the WIDEST gradient for skew 84.5 → 65.1, α-β 70.8 → 59.9, the hard-label term 84.6 → 58.5.
# Those tiles spill on sm_90 (up to 2008 B a thread in the cases measured, JSD's second pass; 2128 B in the grid,
# `python -m bench.compile`) and win anyway: the halved operand traffic of the K loop outweighs the spills' local-memory
# traffic. The gate keeps their spills under WIDEST_SPILL_LIMIT (bench/compile.py); the specializations not measured (a
# tile transform, the teacher's gradients too, pointer loads) keep the widths that compile without spills.
NARROW, WIDE, WIDEST = 0, 1, 2


_HOPPER_TILES = {WIDE: {2: dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3)},
                 WIDEST: {2: dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)}}


# The forward before Hopper (mma.sync, whose accumulator fragments take more registers than wgmma's): 16-bit
# tiles half as wide, where the KL first pass with its centred sums spilled at 64 × 64 on sm_80; and up to 255
# registers, where ptxas squeezed the JSD and skew second passes into 128 and spilled 8–16 B (sm_80).
_PRE_HOPPER_FORWARD_TILES = {2: dict(_GPU_TILES[2], BLOCK_V=32, maxnreg=255)}


# Generalized JSD holds the most live state per element (both log-probabilities and the mixture's, on both
# sides): its float64 forward spilled 32–128 B at 32 × 32 (`python -m bench.compile`, both archs): half the
# columns there. Its backward (`fused_gradient_kernel`, which keeps no dH / dW product in registers) fits the
# common tiles.
_JSD_FORWARD_TILES = {8: dict(_GPU_TILES[8], BLOCK_V=16)}


# The tile transforms (softcaps: a tanh and its slope per element and side) in the 16-bit backward before Hopper:
# the gradient kernel spilled 8 B at 64 × 64 with every optional term (generalized JSD, sm_80): half the rows.
_TRANSFORM_PRE_HOPPER_BACKWARD_TILES = {2: dict(_GPU_TILES[2], BLOCK_N=32)}


def tile_width(forward: bool, two_pass: bool, hard: float, teacher_bias: bool, transform: int, tma: bool,
               teacher_grads: bool = True) -> int:
    """How wide a 16-bit specialization's Hopper tiles are (`_HOPPER_TILES`).

    WIDEST where TMA loads the operands and no tile transform applies: the forward of every kind, and the
    gradient kernel where it stores the student's gradient alone (measured faster on an H100 in every such
    specialization, spills included: the comment above `_HOPPER_TILES`). Elsewhere the widths that compile
    without spills on sm_90: WIDE for the least live state — a one-pass kind without the hard-label term, the
    teacher's bias or a tile transform — NARROW otherwise."""
    if tma and not transform and (forward or not teacher_grads):
        return WIDEST
    least = hard == 0 and not teacher_bias and not transform and not two_pass
    return WIDE if least else NARROW


def fused_config(n_rows: int, vocab: int, gpu: targets.GPU | None, dtype: torch.dtype = torch.bfloat16,
                 forward: bool = False, jsd: bool = False, transform: int = 0, width: int = NARROW,
                 tma: bool = False, parts: bool = False) -> dict:
    """Tile sizes and the number of vocabulary splits of the forward for `gpu` (None: the interpreter), whose
    widest matmul operands have `dtype`; the backward takes the same tiles unless `forward`; `jsd`: the
    generalized-JSD kernels; `transform`: the tile transforms (`Canonical.transform`); `width`: how wide the
    specialization's 16-bit Hopper tiles may be (`tile_width`). On GPU: `_GPU_TILES` (`_HOPPER_TILES` first on
    sm_90 and later, `_PRE_HOPPER_FORWARD_TILES` for the forward below sm_90, `_TRANSFORM_PRE_HOPPER_BACKWARD_TILES`
    for a transformed backward there, `_JSD_FORWARD_TILES` for JSD's forward), and vocabulary splits enough to
    fill the device twice and to spread the programs in flight over FORWARD_ROW_BLOCKS_IN_FLIGHT row blocks.
    `tma` (the operands allow TMA: `FusedProblem.tma_operands`) is carried in the result, the launchers' switch
    (`FusedProblem.operands`), so that a caller can turn it off. `parts`: the forward's PARTS specialization
    (`return_parts`), whose float64 tiles take 16 rows. Under the interpreter: few large tiles, several splits so
    that the merge is exercised."""
    if gpu is not None:
        size = min(torch.empty((), dtype=dtype).element_size(), 8)
        special = _PRE_HOPPER_FORWARD_TILES if forward and gpu.capability < (9, 0) else {}
        if width and gpu.capability >= (9, 0):
            special = _HOPPER_TILES[width]
        if transform and not forward and gpu.capability < (9, 0):
            special = _TRANSFORM_PRE_HOPPER_BACKWARD_TILES
        if jsd and forward:
            special = {**special, **_JSD_FORWARD_TILES}
        tiles = special.get(size, _GPU_TILES[size])
        if parts and forward and size == 8:  # return_parts' entropy sums: 32 float64 rows spill 8 B on sm_90
            tiles = dict(tiles, BLOCK_N=16)
        splits = max(2 * gpu.sm_count // cdiv(n_rows, tiles["BLOCK_N"]), gpu.sm_count // FORWARD_ROW_BLOCKS_IN_FLIGHT)
    else:
        tiles = dict(BLOCK_N=min(32, max(16, next_pow2(n_rows))), BLOCK_V=128, BLOCK_H=64)
        splits = 3
    split_size = cdiv(cdiv(vocab, splits), tiles["BLOCK_V"]) * tiles["BLOCK_V"]
    return dict(tiles, split_size=split_size, tma=tma)


_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
              torch.float64: "float64"}


def _dot_dtype(tl, hidden, weight):
    return getattr(tl, _TL_DTYPES[torch.promote_types(hidden.dtype, weight.dtype)])


def _precision(dot) -> str | None:
    """fp32 / fp64 operands are multiplied exactly ("ieee"), not through TF32; lower ones by default."""
    return "ieee" if dot.primitive_bitwidth >= 32 else None


def _side(tl, hidden, weight, gpu):
    """(hidden, its row layout, weight with unit stride along H, dot dtype, multiply dtype, precision)."""
    hidden, layout = rows_of(hidden)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    dot = _dot_dtype(tl, hidden, weight)
    # The interpreter's 16-bit dot is wrong (Triton 3.9): multiply the rounded operands in fp32 there.
    mma = tl.float32 if gpu is None and dot.primitive_bitwidth < 32 else dot
    return hidden, layout, weight, dot, mma, _precision(dot)


class FusedProblem:
    """Everything the fused kernels take besides the per-call row scale: the inputs, prepared once."""

    #: Where the forward writes the rows' `kdops.LossParts` [rows, 4] (`return_parts`), or None.
    row_parts = None

    def __init__(self, hs, ws, bs, ht, wt, bt, labels, canon: Canonical, inv_temp: float, vocab: int, soft: float,
                 hard: float, shards=None, parts: bool = False):
        tl = kernel_modules().tl
        self.n_rows = hs.numel() // hs.shape[-1]
        self.vocab, self.canon = vocab, canon
        self.gpu = targets.of_device(hs.device)
        self.hs, s_layout, self.ws, dot_s, mma_s, prec_s = _side(tl, hs, ws, self.gpu)
        self.ht, t_layout, self.wt, dot_t, mma_t, prec_t = _side(tl, ht, wt, self.gpu)
        self.bs, self.bt = bs, bt
        self.shards = shards
        # Global token ids (the labels' range check), and as indices into this rank's vocabulary shard.
        # With `parts` the forward reads the labels for the cross-entropy even at hard = 0 (`forward_hard`).
        self.parts = parts
        self.forward_hard = hard > 0 or (parts and labels is not None)
        self.global_labels = flat_labels(labels, 1.0 if self.forward_hard else 0.0)
        self.labels = self.global_labels if shards is None else shards.local_labels(self.global_labels)
        self.acc = acc_of(tl, hs, ws, bs, ht, wt, bt)
        # The widest matmul operand dtype of the two sides: it decides the tiles (`fused_config`).
        self.dot_dtypes = (torch.promote_types(hs.dtype, ws.dtype), torch.promote_types(ht.dtype, wt.dtype))
        self.dot_dtype = torch.promote_types(*self.dot_dtypes)
        kind, self.two_pass = kind_of(canon)
        self.jsd = canon.kind.name == "JSD"  # its kernels take narrower tiles (`fused_config`)
        self.device = hs.device
        self.shape_args = (self.hs.shape[-1], self.ht.shape[-1])
        self.layout_args = (*s_layout, *t_layout, self.ws.stride(0), self.wt.stride(0))
        self.scalars = (inv_temp, canon.c1, canon.c2, *canon.transform_args())
        self.weights = (soft, hard)
        # The four matmul operands (hs, ws, ht, wt) as the 2-D views tensor descriptors cover, where TMA can load
        # every one of them (`_tma_matrix`); else None. `config` asks for TMA on Hopper and later.
        dots = (self.dot_dtypes[0], self.dot_dtypes[0], self.dot_dtypes[1], self.dot_dtypes[1])
        matrices = [_tma_matrix(x, dot) for x, dot in zip((self.hs, self.ws, self.ht, self.wt), dots)]
        self.tma_operands = None if any(m is None for m in matrices) else matrices
        self.constexprs = dict(KIND=kind, HARD=hard > 0, STUDENT_IS_P=canon.student_is_p, TRANSFORM=canon.transform,
                               HAS_BS=bs is not None,
                               HAS_BT=bt is not None, DOT_S=dot_s, DOT_T=dot_t, MMA_S=mma_s, MMA_T=mma_t,
                               PREC_S=prec_s, PREC_T=prec_t,
                               ACC=self.acc)

    def config(self, forward: bool, teacher_grads: bool = True) -> dict:
        """`fused_config` for this problem's forward or backward (`tile_width`: how wide its tiles may be)."""
        tma = self.gpu is not None and self.gpu.capability >= (9, 0) and self.tma_operands is not None
        width = tile_width(forward, self.two_pass, self.weights[1], self.bt is not None, self.canon.transform, tma,
                           teacher_grads)
        return fused_config(self.n_rows, self.vocab, self.gpu, self.dot_dtype, forward=forward, jsd=self.jsd,
                            transform=self.canon.transform, width=width, tma=tma, parts=self.parts)

    def operands(self, config: dict) -> tuple[int, tuple]:
        """How the kernels' K loops load for `config` (LOADS, `kernels/linear.py`) and the four matmul operands
        (hs, ws, ht, wt) as they take them: tensor descriptors (TMA) where `config["tma"]` asks for them and
        every operand allows them (`tma_operands`), else the tensors, read without masks where BLOCK_H divides
        both hidden sizes."""
        linear = kernel_modules().linear
        block_n, block_v, block_h = config["BLOCK_N"], config["BLOCK_V"], config["BLOCK_H"]
        matrices = self.tma_operands if config.get("tma") else None
        if matrices is not None:
            from triton.tools.tensor_descriptor import TensorDescriptor

            blocks = ([block_n, block_h], [block_v, block_h]) * 2
            return linear.TMA.value, tuple(TensorDescriptor.from_tensor(m, b) for m, b in zip(matrices, blocks))
        even = all(h % block_h == 0 for h in self.shape_args)
        return (linear.EVEN_K if even else linear.MASKED_K).value, (self.hs, self.ws, self.ht, self.wt)

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch_acc(self.acc)

    eager = False  # gradients need the final statistics: they are computed in the backward

    def forward(self):
        loss, stats, *row_parts = fused_forward(self, parts=self.row_parts is not None)
        if row_parts:
            self.row_parts.copy_(row_parts[0])
        return loss, [stats]

    def backward(self, saved, row_scale, needs):
        return fused_backward(self, saved[0], row_scale, needs)

    def pointers(self, stats, operands):
        """The kernels' inputs (hs, ws, bs, ht, wt, bt) with the matmul operands as `operands` gives them, and
        the labels; a stand-in for absent biases and labels (constexpr flags skip them)."""
        hs, ws, ht, wt = operands
        return ((hs, ws, stats if self.bs is None else self.bs, ht, wt, stats if self.bt is None else self.bt),
                stats if self.labels is None else self.labels)


def _tma_matrix(x: torch.Tensor, dot: torch.dtype) -> torch.Tensor | None:
    """x ([rows, H] hidden states, any leading dims; or a [V, H] weight) as the 2-D view a tensor descriptor
    covers, or None where TMA cannot load it: operands that are not 16-bit or not already in the dot dtype,
    a view that is not 2-D with unit stride along H, or a base or row stride that is not a multiple of 16
    bytes (what the copy engine requires)."""
    if x.dtype != dot or x.element_size() != 2:
        return None
    try:
        m = x.view(-1, x.shape[-1])
    except RuntimeError:
        return None
    aligned = m.data_ptr() % 16 == 0 and (m.stride(0) * m.element_size()) % 16 == 0
    return m if m.stride(-1) == 1 and aligned and m.shape[0] > 0 else None


def fused_forward(problem: FusedProblem, parts: bool = False):
    """Per-row losses soft·D + hard·CE [rows] and statistics [rows, NUM_STATS] (of the group's vocabulary
    under `problem.shards`); with `parts`, the rows' parts [rows, 4] too (`staged_forward`)."""
    linear = kernel_modules().linear
    n = problem.n_rows
    config = problem.config(forward=True)
    loads, operands = problem.operands(config)
    split_size = config.pop("split_size")
    config.pop("tma", None)
    n_splits = cdiv(problem.vocab, split_size)
    inputs, labels = problem.pointers(problem.hs, operands)

    constexprs = dict(problem.constexprs, HARD=problem.forward_hard)

    def launch_pass(second, partial, stats, entropy=None):
        launch(
            linear.fused_forward_kernel, (n_splits, cdiv(n, config["BLOCK_N"])), *inputs, labels, partial, stats,
            stats if entropy is None else entropy, n, problem.vocab, *problem.shape_args, split_size, n_splits,
            *problem.layout_args, *problem.scalars, SECOND_PASS=second, LOADS=loads, PARTS=entropy is not None,
            **constexprs, **config,
        )

    shards = problem.shards
    return staged_forward(launch_pass, n, n_splits, problem.canon, *problem.weights, problem.global_labels,
                          problem.vocab if shards is None else shards.vocab, constexprs, problem.device, shards,
                          parts)


def slice_columns(n_rows: int, vocab: int, block_v: int, bytes_per_column_row: int) -> int:
    """Vocabulary columns per backward slice: whole BLOCK_V tiles whose G buffers ([rows, slice] for each side
    whose gradients are asked for, `bytes_per_column_row` bytes per row and column) take at most
    GRADIENT_BYTES; at least one tile."""
    columns = GRADIENT_BYTES // max(1, n_rows * bytes_per_column_row) // block_v * block_v
    return min(max(block_v, columns), cdiv(vocab, block_v) * block_v)


def fused_backward(problem: FusedProblem, stats, row_scale, needs):
    """Gradients (hs, ws, bs, ht, wt, bt) of Σ_r row_scale[r]·loss[r]; `needs` says which (None for the
    others). Weight and bias rows past the shared vocabulary get zeros.

    Slice by slice of the vocabulary, `fused_gradient_kernel` writes G = ∂/∂logits for every row into a
    [rows, slice] buffer in the side's dot dtype; then dW[slice] = Gᵀ·h is one cuBLAS product over every row
    (summed in float32, rounded once), db[slice] = Σ_rows G, and dH += G·W[slice] is summed over the slices in
    float32 (the gradient itself when it is float32 or wider). Under `problem.shards` the hidden gradients
    are summed over the group while still float32 sums and rounded once."""
    linear = kernel_modules().linear
    device, acc_dtype = problem.device, problem.acc_dtype
    n, vocab = problem.n_rows, problem.vocab
    sides = LMHeadGrads.both((problem.hs, problem.ht), (problem.ws, problem.wt), (problem.bs, problem.bt), n, needs,
                             problem.dot_dtypes, acc_dtype)
    if n == 0 or not any(side.any for side in sides):
        return tuple(g for side in sides for g in side.results())

    config = problem.config(forward=False, teacher_grads=sides[1].any)
    loads, operands = problem.operands(config)
    config.pop("split_size")
    config.pop("tma", None)
    block_n, block_v = config["BLOCK_N"], config["BLOCK_V"]
    width = slice_columns(n, vocab, block_v, sum(side.dot.itemsize for side in sides if side.any))
    buffers = [torch.empty((n, width), dtype=side.dot, device=device) if side.any else None for side in sides]
    row_scale = row_scale.contiguous()
    inputs, labels = problem.pointers(stats, operands)
    for start in range(0, vocab, width):
        end = min(vocab, start + width)
        grid = (cdiv(n, block_n) * cdiv(end - start, block_v),)
        launch(linear.fused_gradient_kernel, grid, *inputs, labels, stats, row_scale,
               *(stats if b is None else b for b in buffers), n, start, end, width, *problem.shape_args,
               *problem.layout_args, *problem.scalars, *problem.weights, STORE_S=sides[0].any, STORE_T=sides[1].any,
               GROUP_ROWS=GROUP_ROWS, LOADS=loads, **problem.constexprs, **config)
        with float32_sums():
            for side, g in zip(sides, buffers):
                if side.any:
                    side.add_slice(g[:, :end - start], start, end)
    if problem.shards is not None:  # this rank's part of a sum over the vocabulary: summed in float32
        problem.shards.reduce_hidden(sides[0].hidden_sums, sides[1].hidden_sums)
    return tuple(g for side in sides for g in side.results())
