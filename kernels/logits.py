"""Divergence kernels on logits that already exist: row-parallel, vocabulary-blocked.

Each program owns BLOCK_R rows and walks the vocabulary in BLOCK_V columns. The forward keeps only
per-row statistics (one pass for KL / ALPHA_BETA, two for the others); the backward recomputes the
log-probabilities of each tile from the saved statistics and writes each gradient once, in the dtype of
its logits. The math is in `divergences.py`; these kernels only move data.

Rows of a [..., V] tensor are addressed as (row // n_inner)·stride_outer + (row % n_inner)·stride_inner,
so two leading dimensions with arbitrary strides (e.g. `logits[:, :-1]`) need no copy.
"""

import triton
import triton.language as tl

from .divergences import (
    NEG_INF,
    first_pass_finish,
    first_pass_update,
    gradient_terms,
    log_probs,
    second_pass_finish,
    second_pass_terms,
)

# Per-row statistics saved by the forward for the backward: m_x, ls_x, m_y, ls_y, aux1, aux2, aux3.
NUM_STATS = tl.constexpr(7)


@triton.jit
def row_offsets(rows, n_inner, stride_outer, stride_inner):
    rows = rows.to(tl.int64)
    return (rows // n_inner) * stride_outer + (rows % n_inner) * stride_inner


@triton.jit
def load_scaled(ptr, row_off, cols, col_ok, inv_temp, ACC: tl.constexpr):
    """A tile of logits / T in the accumulation dtype; columns past V read as -inf (probability 0)."""
    tile = tl.load(ptr + row_off[:, None] + cols[None, :], mask=col_ok[None, :], other=NEG_INF)
    return tile.to(ACC) * inv_temp


@triton.jit
def kd_logits_forward_kernel(
    x_ptr, y_ptr, loss_ptr, stats_ptr,
    n_rows, V, x_inner, x_stride_outer, x_stride_inner, y_inner, y_stride_outer, y_stride_inner,
    inv_temp, c1, c2,
    KIND: tl.constexpr, TWO_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """loss[r] = D(softmax(x_r / T) ‖ softmax(y_r / T)); stats[r] = (m_x, ls_x, m_y, ls_y, aux1..3)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    # Rows past the end re-read the last row (never stored), so no lane ever sees an empty row.
    safe_rows = tl.minimum(rows, n_rows - 1)
    x_off = row_offsets(safe_rows, x_inner, x_stride_outer, x_stride_inner)
    y_off = row_offsets(safe_rows, y_inner, y_stride_outer, y_stride_inner)
    cols = tl.arange(0, BLOCK_V)

    m_x = tl.full([BLOCK_R], NEG_INF, ACC)
    m_y = tl.full([BLOCK_R], NEG_INF, ACC)
    s_x = tl.zeros([BLOCK_R], ACC)
    s_y = tl.zeros([BLOCK_R], ACC)
    acc1 = tl.zeros([BLOCK_R], ACC)
    acc2 = tl.zeros([BLOCK_R], ACC)
    acc3 = tl.zeros([BLOCK_R], ACC)
    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + cols < V
        x = load_scaled(x_ptr + v0, x_off, cols, col_ok, inv_temp, ACC)
        y = load_scaled(y_ptr + v0, y_off, cols, col_ok, inv_temp, ACC)
        m_x, s_x, m_y, s_y, acc1, acc2, acc3 = first_pass_update(KIND, x, y, m_x, s_x, m_y, s_y, acc1, acc2,
                                                                 acc3, c1, c2)
    ls_x, ls_y, L, aux1, aux2, aux3 = first_pass_finish(KIND, m_x, s_x, m_y, s_y, acc1, acc2, acc3, c1, c2)

    if TWO_PASS:
        y1 = tl.zeros([BLOCK_R], ACC)
        y2 = tl.zeros([BLOCK_R], ACC)
        y3 = tl.zeros([BLOCK_R], ACC)
        for v0 in range(0, V, BLOCK_V):
            col_ok = v0 + cols < V
            lp = log_probs(load_scaled(x_ptr + v0, x_off, cols, col_ok, inv_temp, ACC), m_x, ls_x)
            lq = log_probs(load_scaled(y_ptr + v0, y_off, cols, col_ok, inv_temp, ACC), m_y, ls_y)
            t1, t2, t3 = second_pass_terms(KIND, lp, lq, c1, c2)
            y1 += tl.sum(t1, axis=1)
            y2 += tl.sum(t2, axis=1)
            y3 += tl.sum(t3, axis=1)
        L, aux1, aux2, aux3 = second_pass_finish(KIND, y1, y2, y3, c1, c2)

    tl.store(loss_ptr + rows, L, mask=row_ok)
    stats = stats_ptr + rows.to(tl.int64) * NUM_STATS
    tl.store(stats + 0, m_x, mask=row_ok)
    tl.store(stats + 1, ls_x, mask=row_ok)
    tl.store(stats + 2, m_y, mask=row_ok)
    tl.store(stats + 3, ls_y, mask=row_ok)
    tl.store(stats + 4, aux1, mask=row_ok)
    tl.store(stats + 5, aux2, mask=row_ok)
    tl.store(stats + 6, aux3, mask=row_ok)


@triton.jit
def kd_logits_backward_kernel(
    x_ptr, y_ptr, grad_x_ptr, grad_y_ptr, loss_ptr, stats_ptr, row_scale_ptr,
    n_rows, V, x_inner, x_stride_outer, x_stride_inner, y_inner, y_stride_outer, y_stride_inner,
    inv_temp, c1, c2,
    KIND: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """grad_x[r] = row_scale[r] / T · ∂ℓ_r/∂x_r (and grad_y likewise); gradients are contiguous [rows, V].

    A row whose scale is 0 (ignored, or zero upstream gradient) gets exact zeros, whatever its logits.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    x_off = row_offsets(safe_rows, x_inner, x_stride_outer, x_stride_inner)
    y_off = row_offsets(safe_rows, y_inner, y_stride_outer, y_stride_inner)
    g_off = safe_rows.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)

    stats = stats_ptr + safe_rows.to(tl.int64) * NUM_STATS
    m_x = tl.load(stats + 0)
    ls_x = tl.load(stats + 1)
    m_y = tl.load(stats + 2)
    ls_y = tl.load(stats + 3)
    aux1 = tl.load(stats + 4)
    aux2 = tl.load(stats + 5)
    aux3 = tl.load(stats + 6)
    L = tl.load(loss_ptr + safe_rows)
    scale = tl.load(row_scale_ptr + safe_rows).to(ACC)
    live = (scale != 0)[:, None]
    scale = (scale * inv_temp)[:, None]

    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + cols < V
        lp = log_probs(load_scaled(x_ptr + v0, x_off, cols, col_ok, inv_temp, ACC), m_x, ls_x)
        lq = log_probs(load_scaled(y_ptr + v0, y_off, cols, col_ok, inv_temp, ACC), m_y, ls_y)
        g_x, g_y = gradient_terms(KIND, lp, lq, L, aux1, aux2, aux3, c1, c2)
        out_mask = row_ok[:, None] & col_ok[None, :]
        if GRAD_X:
            g_x = tl.where(live, g_x * scale, 0.0)
            tl.store(grad_x_ptr + v0 + g_off[:, None] + cols[None, :], g_x.to(grad_x_ptr.dtype.element_ty),
                     mask=out_mask)
        if GRAD_Y:
            g_y = tl.where(live, g_y * scale, 0.0)
            tl.store(grad_y_ptr + v0 + g_off[:, None] + cols[None, :], g_y.to(grad_y_ptr.dtype.element_ty),
                     mask=out_mask)
