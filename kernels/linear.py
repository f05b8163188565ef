"""Fused lm_head distillation kernels: logit tiles h · Wᵀ (+ b) are computed inside the kernel, vocabulary
block by vocabulary block, and fed to the per-tile math of `passes.py`; the [rows, V] logits never exist.

Forward (lock-free, deterministic, as in verl's fused log-prob kernel): a grid of row blocks × vocabulary
splits. `fused_forward_kernel` writes each (row, split)'s partial first-pass state; `merge_partials_kernel`
(`partials.py`) merges the splits of each row and finishes its statistics. The two-pass divergences run
both kernels once more with SECOND_PASS, whose partial sums merge by addition.

Backward: every program recomputes its logit tiles from the saved statistics and turns them into
gradient tiles G = ∂ℓ/∂logits (row-scaled). Two ownership patterns keep it free of atomics:
`fused_grad_hidden_kernel` owns row blocks and walks the vocabulary (dH[rows] += G · W[cols]);
`fused_grad_weight_kernel` owns vocabulary blocks and walks the rows (dW[cols] += Gᵀ · h[rows],
db[cols] += Σ_rows G). Both accumulate in float32 scratch that the launcher sizes to a memory budget.

Hidden states are addressed by rows like the kernels on logits (two leading dims, arbitrary strides);
weights are [V, H] with unit stride along H. Matmul operands are cast to the side's dot dtype (DOT_S,
DOT_T: bf16/fp16 for tensor cores, or fp32 / fp64 with PRECISION "ieee" so fp32 stays exact; see
`operand` for MMA_S, MMA_T).
"""

import triton
import triton.language as tl

from .divergences import NEG_INF
from .logits import row_offsets
from .partials import NUM_PARTIAL, store_partial, store_second_partial
from .passes import (
    first_pass_init,
    first_pass_tile,
    gradient_tile,
    load_labels,
    load_stats,
    scale_rows,
    second_pass_tile,
)


@triton.jit
def round_to_bf16(x):
    """float32 x rounded to the nearest bfloat16, ties to even, kept as float32: what a GPU's conversion
    does, where the interpreter's truncates (a bias that grows with every product summed)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def operand(x, DOT: tl.constexpr, MMA: tl.constexpr):
    """A matmul operand rounded to DOT, multiplied as MMA: MMA is DOT itself except under Triton's
    interpreter, whose bf16 dot is broken; there 16-bit operands are rounded (to nearest, as on a GPU),
    then multiplied in fp32 (the products are exact, so the result is what the GPU computes, up to
    summation order)."""
    if DOT == tl.bfloat16 and MMA == tl.float32:
        return round_to_bf16(x.to(tl.float32))
    return x.to(DOT).to(MMA)


@triton.jit
def linear_tile(h_ptr, h_off, row_ok, w_ptr, w_stride, b_ptr, cols, col_ok, H, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT: tl.constexpr,
                MMA: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Raw logits h[rows] · W[cols]ᵀ + b[cols] [BLOCK_N, BLOCK_V] in ACC; columns outside are -inf."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    w_rows = cols.to(tl.int64) * w_stride
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_ptr + h_off[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_rows[None, :] + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(operand(h, DOT, MMA), operand(w, DOT, MMA), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return tl.where(col_ok[None, :], acc, NEG_INF)


@triton.jit
def both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row_ok, cols, col_ok, Hs, Ht,
               ws_stride, wt_stride, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
               MMA_S: tl.constexpr, MMA_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
               ACC: tl.constexpr):
    """The raw logit tiles (s, t) of the student and the teacher for the same rows and columns."""
    s = linear_tile(hs_ptr, hs_off, row_ok, ws_ptr, ws_stride, bs_ptr, cols, col_ok, Hs, HAS_BS, BLOCK_N, BLOCK_V,
                    BLOCK_H, DOT_S, MMA_S, PREC_S, ACC)
    t = linear_tile(ht_ptr, ht_off, row_ok, wt_ptr, wt_stride, bt_ptr, cols, col_ok, Ht, HAS_BT, BLOCK_N, BLOCK_V,
                    BLOCK_H, DOT_T, MMA_T, PREC_T, ACC)
    return s, t


@triton.jit
def add_product(out_ptr, out_off, out_ok, lhs, rhs_ptr, rhs_off, rhs_ok, H, BLOCK_H: tl.constexpr,
                DOT: tl.constexpr, MMA: tl.constexpr, PRECISION: tl.constexpr):
    """out[i, :] += Σ_j lhs[i, j] · rhs[j, :], rhs rows at rhs_ptr + rhs_off[j] (read-modify-write: the
    calling program owns the output rows). dH: lhs = G, rhs = W[cols]; dW: lhs = Gᵀ, rhs = h[rows]."""
    lhs = operand(lhs, DOT, MMA)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        rhs = tl.load(rhs_ptr + rhs_off[:, None] + ks[None, :], mask=rhs_ok[:, None] & k_ok[None, :], other=0.0)
        ptrs = out_ptr + out_off[:, None] + ks[None, :]
        keep = out_ok[:, None] & k_ok[None, :]
        acc = tl.dot(lhs, operand(rhs, DOT, MMA), tl.load(ptrs, mask=keep, other=0.0), input_precision=PRECISION)
        tl.store(ptrs, acc, mask=keep)


@triton.jit
def fused_forward_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, partial_ptr, stats_ptr,
    n_rows, V, Hs, Ht, split_size, n_splits,
    hs_inner, hs_outer, hs_stride, ht_inner, ht_outer, ht_stride, ws_stride, wt_stride,
    inv_temp, c1, c2, cap_s, cap_t, share,
    KIND: tl.constexpr, SECOND_PASS: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr,
    TRANSFORM: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr, MMA_S: tl.constexpr, MMA_T: tl.constexpr,
    PREC_S: tl.constexpr,
    PREC_T: tl.constexpr, ACC: tl.constexpr,
):
    """partial[row, split] = the pass's state of the row over vocabulary [split·split_size, +split_size).

    SECOND_PASS reads the merged (m_x, ls_x, m_y, r) of the first from `stats` and writes (y1, y2, y3).
    """
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    hs_off = row_offsets(safe_rows, hs_inner, hs_outer, hs_stride)
    ht_off = row_offsets(safe_rows, ht_inner, ht_outer, ht_stride)
    v_lo = pid_s * split_size
    v_hi = tl.minimum(V, v_lo + split_size)
    vcols = tl.arange(0, BLOCK_V)
    part = partial_ptr + (rows.to(tl.int64) * n_splits + pid_s) * NUM_PARTIAL

    if SECOND_PASS:
        m_x, ls_x, m_y, ls_y, r, _a1, _a2, _a3, _L, _mc, _lc = load_stats(stats_ptr, safe_rows)
        y1 = tl.zeros([BLOCK_N], ACC)
        y2 = tl.zeros([BLOCK_N], ACC)
        y3 = tl.zeros([BLOCK_N], ACC)
    else:
        labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_N)
        m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab = first_pass_init(BLOCK_N, ACC)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + vcols
        col_ok = cols < v_hi
        s, t = both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row_ok, cols, col_ok, Hs, Ht,
                          ws_stride, wt_stride, HAS_BS, HAS_BT, BLOCK_N, BLOCK_V, BLOCK_H, DOT_S, DOT_T, MMA_S, MMA_T,
                          PREC_S, PREC_T, ACC)
        if SECOND_PASS:
            t1, t2, t3 = second_pass_tile(KIND, STUDENT_IS_P, TRANSFORM, s, t, inv_temp, cap_s, cap_t, share, m_x,
                                          ls_x, m_y, ls_y, r, c1, c2)
            y1 += t1
            y2 += t2
            y3 += t3
        else:
            m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab = first_pass_tile(
                KIND, HARD, STUDENT_IS_P, TRANSFORM, s, t, cols, labels, inv_temp, cap_s, cap_t, share, m_x, u_x, m_y,
                u_y, acc1, acc2, acc3, m_c, u_c, s_lab, c1, c2)
    if SECOND_PASS:
        store_second_partial(part, row_ok, y1, y2, y3)
    else:
        store_partial(part, row_ok, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab)


@triton.jit
def gradient_tiles(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row_ok, cols, col_ok, labels, stats_ptr,
    safe_rows, scale, Hs, Ht, ws_stride, wt_stride, inv_temp, c1, c2, soft, hard, cap_s, cap_t, share,
    KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, MMA_S: tl.constexpr, MMA_T: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, ACC: tl.constexpr,
):
    """Recomputed logit tiles → row-scaled gradient tiles (G_s, G_t), exactly 0 outside rows / cols."""
    s, t = both_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row_ok, cols, col_ok, Hs, Ht,
                      ws_stride, wt_stride, HAS_BS, HAS_BT, BLOCK_N, BLOCK_V, BLOCK_H, DOT_S, DOT_T, MMA_S, MMA_T,
                      PREC_S, PREC_T, ACC)
    m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c = load_stats(stats_ptr, safe_rows)
    g_s, g_t = gradient_tile(KIND, HARD, STUDENT_IS_P, TRANSFORM, s, t, cols, labels, inv_temp, cap_s, cap_t, share,
                             m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c, c1, c2, soft, hard)
    live = (scale != 0) & row_ok
    g_s = tl.where(col_ok[None, :], scale_rows(g_s, scale, live), 0.0)
    g_t = tl.where(col_ok[None, :], scale_rows(g_t, scale, live), 0.0)
    return g_s, g_t


@triton.jit
def fused_grad_hidden_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, stats_ptr, row_scale_ptr, ghs_ptr, ght_ptr,
    row_start, row_end, V, Hs, Ht,
    hs_inner, hs_outer, hs_stride, ht_inner, ht_outer, ht_stride, ws_stride, wt_stride,
    inv_temp, c1, c2, cap_s, cap_t, share, soft, hard,
    KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr, GRAD_HS: tl.constexpr, GRAD_HT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr, MMA_S: tl.constexpr,
    MMA_T: tl.constexpr,     PREC_S: tl.constexpr, PREC_T: tl.constexpr, ACC: tl.constexpr,
):
    """ghs[row − row_start] += Σ_v G_s[row, v] · W_s[v] (and ght likewise) for rows [row_start, row_end)."""
    rows = row_start + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    safe_rows = tl.minimum(rows, row_end - 1)
    hs_off = row_offsets(safe_rows, hs_inner, hs_outer, hs_stride)
    ht_off = row_offsets(safe_rows, ht_inner, ht_outer, ht_stride)
    local = (safe_rows - row_start).to(tl.int64)
    labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_N)
    scale = tl.load(row_scale_ptr + safe_rows).to(ACC)
    vcols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + vcols
        col_ok = cols < V
        g_s, g_t = gradient_tiles(
            hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row_ok, cols, col_ok, labels, stats_ptr,
            safe_rows, scale, Hs, Ht, ws_stride, wt_stride, inv_temp, c1, c2, soft, hard, cap_s, cap_t, share, KIND,
            HARD, STUDENT_IS_P, TRANSFORM, HAS_BS, HAS_BT, BLOCK_N, BLOCK_V, BLOCK_H, DOT_S, DOT_T, MMA_S, MMA_T,
            PREC_S, PREC_T, ACC)
        if GRAD_HS:
            add_product(ghs_ptr, local * Hs, row_ok, g_s, ws_ptr, cols.to(tl.int64) * ws_stride, col_ok, Hs, BLOCK_H,
                        DOT_S, MMA_S, PREC_S)
        if GRAD_HT:
            add_product(ght_ptr, local * Ht, row_ok, g_t, wt_ptr, cols.to(tl.int64) * wt_stride, col_ok, Ht, BLOCK_H,
                        DOT_T, MMA_T, PREC_T)


@triton.jit
def fused_grad_weight_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, stats_ptr, row_scale_ptr,
    gws_ptr, gbs_ptr, gwt_ptr, gbt_ptr,
    col_start, col_end, n_rows, Hs, Ht,
    hs_inner, hs_outer, hs_stride, ht_inner, ht_outer, ht_stride, ws_stride, wt_stride,
    inv_temp, c1, c2, cap_s, cap_t, share, soft, hard,
    KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr, GRAD_WS: tl.constexpr, GRAD_BS: tl.constexpr, GRAD_WT: tl.constexpr,
    GRAD_BT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, MMA_S: tl.constexpr, MMA_T: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, ACC: tl.constexpr,
):
    """gws[v − col_start] += Σ_rows G_s[row, v] · h_s[row], gbs[v] = Σ_rows G_s[row, v] (teacher likewise),
    for vocabulary entries [col_start, col_end). Bias gradients are indexed by v itself."""
    cols = col_start + tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < col_end
    local = (cols - col_start).to(tl.int64)
    db_s = tl.zeros([BLOCK_V], ACC)
    db_t = tl.zeros([BLOCK_V], ACC)
    rvec = tl.arange(0, BLOCK_N)
    for r0 in range(0, n_rows, BLOCK_N):
        rows = r0 + rvec
        row_ok = rows < n_rows
        safe_rows = tl.minimum(rows, n_rows - 1)
        hs_off = row_offsets(safe_rows, hs_inner, hs_outer, hs_stride)
        ht_off = row_offsets(safe_rows, ht_inner, ht_outer, ht_stride)
        labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_N)
        scale = tl.load(row_scale_ptr + safe_rows).to(ACC)
        g_s, g_t = gradient_tiles(
            hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hs_off, ht_off, row_ok, cols, col_ok, labels, stats_ptr,
            safe_rows, scale, Hs, Ht, ws_stride, wt_stride, inv_temp, c1, c2, soft, hard, cap_s, cap_t, share, KIND,
            HARD, STUDENT_IS_P, TRANSFORM, HAS_BS, HAS_BT, BLOCK_N, BLOCK_V, BLOCK_H, DOT_S, DOT_T, MMA_S, MMA_T,
            PREC_S, PREC_T, ACC)
        if GRAD_WS:
            add_product(gws_ptr, local * Hs, col_ok, tl.trans(g_s), hs_ptr, hs_off, row_ok, Hs, BLOCK_H, DOT_S, MMA_S,
                        PREC_S)
        if GRAD_WT:
            add_product(gwt_ptr, local * Ht, col_ok, tl.trans(g_t), ht_ptr, ht_off, row_ok, Ht, BLOCK_H, DOT_T, MMA_T,
                        PREC_T)
        if GRAD_BS:
            db_s += tl.sum(g_s, axis=0)
        if GRAD_BT:
            db_t += tl.sum(g_t, axis=0)
    if GRAD_BS:
        tl.store(gbs_ptr + cols, db_s.to(gbs_ptr.dtype.element_ty), mask=col_ok)
    if GRAD_BT:
        tl.store(gbt_ptr + cols, db_t.to(gbt_ptr.dtype.element_ty), mask=col_ok)
