"""Fused lm_head distillation kernels: logit tiles h · Wᵀ (+ b) are computed inside the kernel, vocabulary
block by vocabulary block, and fed to the per-tile math of `passes.py`; the [rows, V] logits never exist.

Forward (lock-free, deterministic, as in verl's fused log-prob kernel): a grid of row blocks × vocabulary
splits. `fused_forward_kernel` writes each (row, split)'s partial first-pass state; `merge_partials_kernel`
(`partials.py`) merges the splits of each row and finishes its statistics. The two-pass divergences run
both kernels once more with SECOND_PASS, whose partial sums merge by addition.

Backward (`fused_gradient_kernel`), one vocabulary slice at a time: every program recomputes one tile of
both models' logits from the saved statistics and writes its gradient tile G = ∂ℓ/∂logits (row-scaled) into
a [rows, slice] buffer in the operands' dtype; the launcher multiplies each slice by cuBLAS (dW[slice] = Gᵀ·h
over every row at once, dH += G·W[slice] summed in float32). Each gradient element is computed once; no
program owns a [rows, H] or [V, H] accumulator, and nothing is atomic.

Hidden states are addressed by rows like the kernels on logits (two leading dims, arbitrary strides);
weights are [V, H] with unit stride along H. Matmul operands are cast to the side's dot dtype (DOT_S,
DOT_T: bf16/fp16 for tensor cores, or fp32 / fp64 with PRECISION "ieee" so fp32 stays exact; see
`operand` for MMA_S, MMA_T).
"""

import triton
import triton.language as tl

from .divergences import FLOAT, NEG_INF, in_acc, second_pass_add
from .entropy import entropy_init_rows, entropy_store_partial, entropy_update_rows
from .logits import round_to_bf16, row_offsets
from .partials import NUM_PARTIAL, store_partial, store_second_partial
from .passes import (
    first_pass_init,
    first_pass_tile,
    gradient_tile,
    load_labels,
    load_stats,
    scale_rows,
    scaled_pq,
    second_pass_tile,
)
from .transforms import transformed_tiles


@triton.jit
def operand(x, DOT: tl.constexpr, MMA: tl.constexpr):
    """A matmul operand rounded to DOT, multiplied as MMA: MMA is DOT itself except under Triton's
    interpreter, whose bf16 dot is broken; there 16-bit operands are rounded (to nearest, as on a GPU),
    then multiplied in fp32 (the products are exact, so the result is what the GPU computes, up to
    summation order)."""
    if DOT == tl.bfloat16 and MMA == tl.float32:
        return round_to_bf16(x.to(tl.float32))
    return x.to(DOT).to(MMA)


# How a K loop loads its operands (LOADS): by pointers masked along H; by pointers, unmasked, where BLOCK_H divides
# H; or by TMA (tensor descriptors over [rows, H] hidden states and [V, H] weights, Hopper and later), whose
# copies land in shared memory without a register per address and fill what lies outside with zeros.
MASKED_K = tl.constexpr(0)
EVEN_K = tl.constexpr(1)
TMA = tl.constexpr(2)


@triton.jit
def linear_tile(h_ptr, h_off, row0, w_ptr, w_stride, b_ptr, col0, cols, col_ok, H, HAS_BIAS: tl.constexpr,
                LOADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT: tl.constexpr, MMA: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Raw logits h[rows] · W[cols]ᵀ + b[cols] [BLOCK_N, BLOCK_V] in ACC for rows row0 + i and columns
    cols = col0 + j; columns outside (not col_ok) are -inf.

    Pointers: `h_off` must address valid rows (the callers clamp them), and columns outside read the
    weight's row 0, so the loads are masked along H alone (MASKED_K), or not at all (EVEN_K). TMA: h_ptr
    and w_ptr are tensor descriptors with blocks [BLOCK_N, BLOCK_H] and [BLOCK_V, BLOCK_H]."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    w_rows = tl.where(col_ok, cols, 0).to(tl.int64) * w_stride
    for k0 in range(0, H, BLOCK_H):
        if LOADS == TMA:  # row0, col0: 32-bit (a descriptor's coordinates are)
            h = h_ptr.load([row0, k0])
            w = tl.trans(w_ptr.load([col0, k0]))
        else:
            ks = k0 + tl.arange(0, BLOCK_H)
            if LOADS == EVEN_K:
                h = tl.load(h_ptr + h_off[:, None] + ks[None, :])
                w = tl.load(w_ptr + w_rows[None, :] + ks[:, None])
            else:
                k_ok = ks < H
                h = tl.load(h_ptr + h_off[:, None] + ks[None, :], mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + w_rows[None, :] + ks[:, None], mask=k_ok[:, None], other=0.0)
        # out_dtype = the accumulator's: Triton 3.6 asserts it equals the accumulator's dtype and defaults it to
        # float32, so a float64 tile (ACC float64) failed to compile there (not under the interpreter or 3.9).
        acc = tl.dot(operand(h, DOT, MMA), operand(w, DOT, MMA), acc, input_precision=PRECISION,
                     out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return tl.where(col_ok[None, :], acc, NEG_INF)


@triton.jit
def both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row0, col0, cols, col_ok, Hs, Ht,
               ws_stride, wt_stride, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, LOADS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_S: tl.constexpr,
               DOT_T: tl.constexpr, MMA_S: tl.constexpr, MMA_T: tl.constexpr, PREC_S: tl.constexpr,
               PREC_T: tl.constexpr, ACC: tl.constexpr):
    """The raw logit tiles (s, t) of the student and the teacher for the same rows and columns."""
    s = linear_tile(hs_ptr, hs_off, row0, ws_ptr, ws_stride, bs_ptr, col0, cols, col_ok, Hs, HAS_BS, LOADS, BLOCK_N,
                    BLOCK_V, BLOCK_H, DOT_S, MMA_S, PREC_S, ACC)
    t = linear_tile(ht_ptr, ht_off, row0, wt_ptr, wt_stride, bt_ptr, col0, cols, col_ok, Ht, HAS_BT, LOADS, BLOCK_N,
                    BLOCK_V, BLOCK_H, DOT_T, MMA_T, PREC_T, ACC)
    return s, t


@triton.jit
def fused_forward_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, partial_ptr, stats_ptr, parts_ptr,
    n_rows, V, Hs, Ht, split_size, n_splits,
    hs_inner, hs_outer, hs_stride, ht_inner, ht_outer, ht_stride, ws_stride, wt_stride,
    inv_temp: FLOAT, c1: FLOAT, c2: FLOAT, cap_s: FLOAT, cap_t: FLOAT, share: FLOAT,
    KIND: tl.constexpr, SECOND_PASS: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr,
    TRANSFORM: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, LOADS: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr, MMA_S: tl.constexpr,
    MMA_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr, ACC: tl.constexpr,
):
    """partial[row, split] = the pass's state of the row over vocabulary [split·split_size, +split_size).

    SECOND_PASS reads the merged (m_x, ls_x, m_y, r) of the first from `stats` and writes (y1, y2, y3). PARTS
    (first pass) also writes parts[row, split], the split's entropy states of both models (`entropy.py`).
    """
    inv_temp, c1, c2 = in_acc(inv_temp, ACC), in_acc(c1, ACC), in_acc(c2, ACC)
    cap_s, cap_t, share = in_acc(cap_s, ACC), in_acc(cap_t, ACC), in_acc(share, ACC)
    # Splits vary fastest (grid axis 0): the programs in flight cover a few row blocks and every split, so each
    # row block's hidden states are read from HBM about once and then served by L2 while the splits stream
    # the weights.
    pid_s = tl.program_id(0)
    row0 = tl.program_id(1) * BLOCK_N
    safe_rows = tl.minimum(row0 + tl.arange(0, BLOCK_N), n_rows - 1)
    hs_off = row_offsets(safe_rows, hs_inner, hs_outer, hs_stride)
    ht_off = row_offsets(safe_rows, ht_inner, ht_outer, ht_stride)
    v_lo = pid_s * split_size
    v_hi = tl.minimum(V, v_lo + split_size)
    vcols = tl.arange(0, BLOCK_V)

    if SECOND_PASS:
        m_x, ls_x, m_y, ls_y, r, _a1, _a2, _a3, _L, _mc, _lc = load_stats(stats_ptr, safe_rows)
        y1 = tl.zeros([BLOCK_N], ACC)
        y2 = tl.zeros([BLOCK_N], ACC)
        y3 = tl.zeros([BLOCK_N], ACC)
    else:
        labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_N)
        m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab = first_pass_init(BLOCK_N, ACC)
        if PARTS:
            m_hs, s_hs, a_hs = entropy_init_rows(BLOCK_N, ACC)
            m_ht, s_ht, a_ht = entropy_init_rows(BLOCK_N, ACC)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + vcols
        col_ok = cols < v_hi
        s, t = both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row0, v0, cols, col_ok, Hs,
                          Ht, ws_stride, wt_stride, HAS_BS, HAS_BT, LOADS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_S, DOT_T,
                          MMA_S, MMA_T, PREC_S, PREC_T, ACC)
        if SECOND_PASS:
            t1, t2, t3 = second_pass_tile(KIND, STUDENT_IS_P, TRANSFORM, s, t, inv_temp, cap_s, cap_t, share, m_x,
                                          ls_x, m_y, ls_y, r, c1, c2)
            y1, y2, y3 = second_pass_add(KIND, y1, y2, y3, tl.sum(t1, axis=1), tl.sum(t2, axis=1),
                                         tl.sum(t3, axis=1))
        else:
            m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab = first_pass_tile(
                KIND, HARD, STUDENT_IS_P, TRANSFORM, s, t, cols, labels, inv_temp, cap_s, cap_t, share, m_x, u_x, m_y,
                u_y, acc1, acc2, acc3, m_c, u_c, s_lab, c1, c2)
            if PARTS:  # the tiles as the divergence sees them (transformed, at T); columns past v_hi are −inf
                s_tr, _, t_tr = transformed_tiles(TRANSFORM, s, t, cap_s, cap_t, share)
                t_tr, s_tr = scaled_pq(False, s_tr, t_tr, inv_temp)
                m_hs, s_hs, a_hs = entropy_update_rows(m_hs, s_hs, a_hs, s_tr)
                m_ht, s_ht, a_ht = entropy_update_rows(m_ht, s_ht, a_ht, t_tr)
    # (the row addresses made here, after the loop, hold no registers through it)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    part = partial_ptr + (rows.to(tl.int64) * n_splits + pid_s) * NUM_PARTIAL
    if SECOND_PASS:
        store_second_partial(part, row_ok, y1, y2, y3)
    else:
        store_partial(part, row_ok, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab)
        if PARTS:
            entropy_store_partial(parts_ptr + (rows.to(tl.int64) * n_splits + pid_s) * 6, row_ok, m_hs, s_hs, a_hs,
                                  m_ht, s_ht, a_ht)


@triton.jit
def gradient_tiles(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row0, col0, row_ok, cols, col_ok, labels,
    stats_ptr, safe_rows, scale, Hs, Ht, ws_stride, wt_stride, inv_temp, c1, c2, soft, hard, cap_s, cap_t, share,
    KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr, LOADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, MMA_S: tl.constexpr, MMA_T: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, ACC: tl.constexpr,
):
    """Recomputed logit tiles → row-scaled gradient tiles (G_s, G_t), exactly 0 outside rows / cols."""
    s, t = both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row0, col0, cols, col_ok, Hs, Ht,
                      ws_stride, wt_stride, HAS_BS, HAS_BT, LOADS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_S, DOT_T, MMA_S,
                      MMA_T, PREC_S, PREC_T, ACC)
    m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c = load_stats(stats_ptr, safe_rows)
    g_s, g_t = gradient_tile(KIND, HARD, STUDENT_IS_P, TRANSFORM, s, t, cols, labels, inv_temp, cap_s, cap_t, share,
                             m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c, c1, c2, soft, hard)
    live = (scale != 0) & row_ok
    g_s = tl.where(col_ok[None, :], scale_rows(g_s, scale, live), 0.0)
    g_t = tl.where(col_ok[None, :], scale_rows(g_t, scale, live), 0.0)
    return g_s, g_t


@triton.jit
def grouped_tile(pid, n_row_blocks, n_col_tiles, GROUP_ROWS: tl.constexpr):
    """(row block, column tile) of program `pid`, walking GROUP_ROWS row blocks down each column before the
    next column: the programs in flight share their weight tiles and their hidden rows through L2 (the
    grouped ordering of Triton's matmul tutorial). In 64 bits, as every offset derived from them."""
    pid = pid.to(tl.int64)
    per_group = GROUP_ROWS * n_col_tiles.to(tl.int64)
    first_row = (pid // per_group) * GROUP_ROWS
    rows_here = tl.minimum(n_row_blocks - first_row, GROUP_ROWS)
    return first_row + (pid % per_group) % rows_here, (pid % per_group) // rows_here


@triton.jit
def fused_gradient_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, stats_ptr, row_scale_ptr, gs_ptr, gt_ptr,
    n_rows, col_start, col_end, g_stride, Hs, Ht,
    hs_inner, hs_outer, hs_stride, ht_inner, ht_outer, ht_stride, ws_stride, wt_stride,
    inv_temp: FLOAT, c1: FLOAT, c2: FLOAT, cap_s: FLOAT, cap_t: FLOAT, share: FLOAT, soft: FLOAT, hard: FLOAT,
    KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr, LOADS: tl.constexpr, STORE_S: tl.constexpr, STORE_T: tl.constexpr, GROUP_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    MMA_S: tl.constexpr, MMA_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr, ACC: tl.constexpr,
):
    """gs[row, v − col_start] = row_scale[row] · ∂ℓ_row/∂s[row, v] for v in [col_start, col_end) (gt likewise
    for the teacher's logits), rounded to the store's dtype: one vocabulary slice of G for every row.

    Each program recomputes one [BLOCK_N, BLOCK_V] tile of both models' logits and turns it into gradient
    tiles from the saved statistics. The launcher turns each slice into dW[slice] = Gᵀ·h (every row at once:
    one product, rounded once) and dH += G·W[slice] (float32 sums over the slices) with cuBLAS: the gradient
    is computed once per element, and no program owns a [rows, H] or [V, H] accumulator."""
    inv_temp, c1, c2, cap_s = in_acc(inv_temp, ACC), in_acc(c1, ACC), in_acc(c2, ACC), in_acc(cap_s, ACC)
    cap_t, share, soft, hard = in_acc(cap_t, ACC), in_acc(share, ACC), in_acc(soft, ACC), in_acc(hard, ACC)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    row_block, col_tile = grouped_tile(tl.program_id(0), n_row_blocks, tl.cdiv(col_end - col_start, BLOCK_V),
                                       GROUP_ROWS)
    row0 = row_block * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    hs_off = row_offsets(safe_rows, hs_inner, hs_outer, hs_stride)
    ht_off = row_offsets(safe_rows, ht_inner, ht_outer, ht_stride)
    labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_N)
    scale = tl.load(row_scale_ptr + safe_rows).to(ACC)
    col0 = col_start + col_tile * BLOCK_V
    local = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_start + local
    col_ok = cols < col_end
    g_s, g_t = gradient_tiles(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row0.to(tl.int32), col0.to(tl.int32), row_ok,
        cols, col_ok, labels, stats_ptr, safe_rows, scale, Hs, Ht, ws_stride, wt_stride, inv_temp, c1, c2, soft, hard,
        cap_s, cap_t, share, KIND, HARD, STUDENT_IS_P, TRANSFORM, HAS_BS, HAS_BT, LOADS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_S, DOT_T, MMA_S,
        MMA_T, PREC_S, PREC_T, ACC)
    offsets = rows.to(tl.int64)[:, None] * g_stride + local[None, :]
    keep = row_ok[:, None] & col_ok[None, :]
    # Rounded as a GPU rounds (to nearest) also under the interpreter, whose casts to bf16 truncate.
    if STORE_S:
        tl.store(gs_ptr + offsets, operand(g_s, DOT_S, MMA_S).to(gs_ptr.dtype.element_ty), mask=keep)
    if STORE_T:
        tl.store(gt_ptr + offsets, operand(g_t, DOT_T, MMA_T).to(gt_ptr.dtype.element_ty), mask=keep)
