"""The student's side of a sparse (top-k) teacher, on logits that exist: row-parallel, vocabulary-blocked.

A teacher row gives k token ids; the student's distribution is q = softmax(s / T) over the whole
vocabulary. The loss needs the student's logits at the ids (a gather, done by the launcher) and, for the
tail modes, the log-mass of everything else,

    R = log Σ_{j ∉ ids} e^(s_j / T)                (lse over the complement; −inf when the ids cover V)

so that the tail q_tail = e^(R − lse(s / T)) is exact to its own size however small it is: it is never
1 − Σ q_ids. The ids of a row arrive sorted (absent entries as V, past every column), so the ids that fall in
a vocabulary tile are the next ones of the row: a window of BLOCK_C of them at a time is compared with the
tile's columns (`member_tile`), and the complement is the tile with those columns at −inf, fed to the same
online log-sum-exp as every other kernel (`divergences.online_lse_update`).

The gradient of ℓ(s_ids / T, R) is one write per element:

    ∂ℓ/∂s_j = (g_R · e^(s_j / T − R) for j ∉ ids;  g_i for j = ids_i) / T.
"""

import triton
import triton.language as tl

from .cross_entropy import hard_label_finish, hard_label_update
from .divergences import FLOAT, NEG_INF, in_acc, log1p, online_lse_update
from .entropy import entropy_finish, entropy_init, entropy_update
from .logits import as_output, load_tile, row_offsets
from .passes import load_labels
from .transforms import softcap, softcap_slope


@triton.jit
def member_tile(ids_ptr, g_ptr, row_base, lo, k, v0, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_C: tl.constexpr, GATHER_G: tl.constexpr, ACC: tl.constexpr):
    """(member [rows, block]: whether column v0 + j of the tile is one of the row's ids, g_tile [rows, block]: the
    gradient g of that id there (0 elsewhere; only with GATHER_G), lo [rows]: the first id of each row past
    this tile). ids_ptr + row_base[r] holds row r's k ids sorted, absent ones as V; lo[r] is the first of
    them not below v0 (every earlier tile consumed its own)."""
    c = tl.arange(0, BLOCK_C)
    cols = v0 + tl.arange(0, BLOCK_V)
    end = v0 + BLOCK_V
    member = tl.zeros([BLOCK_R, BLOCK_V], tl.int32)
    g_tile = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    more = tl.full([], 1, tl.int32)
    while more > 0:
        index = lo[:, None] + c[None, :]
        inside = index < k
        ids = tl.load(ids_ptr + row_base[:, None] + index, mask=inside, other=end)
        here = inside & (ids < end)  # [rows, BLOCK_C]: the window's ids in this tile
        hit = (cols[None, :, None] == ids[:, None, :]) & here[:, None, :]  # [rows, block, BLOCK_C]
        member = tl.maximum(member, tl.max(hit.to(tl.int32), axis=2))
        if GATHER_G:
            g = tl.load(g_ptr + row_base[:, None] + index, mask=here, other=0.0).to(ACC)
            g_tile += tl.sum(tl.where(hit, g[:, None, :], 0.0), axis=2)
        n = tl.sum(here.to(tl.int32), axis=1)
        lo += n
        # A full window may have more ids of this tile after it.
        more = tl.max((n == BLOCK_C).to(tl.int32), axis=0)
    return member > 0, g_tile, lo


@triton.jit
def complement_lse_kernel(
    s_ptr, ids_ptr, out_ptr, parts_ptr, labels_ptr, n_rows, V, k, s_inner, s_stride_outer, s_stride_inner,
    inv_temp: FLOAT, cap: FLOAT, SOFTCAP: tl.constexpr, PARTS: tl.constexpr, HARD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """out[r] = log Σ_{j ∉ ids_r} e^(s_rj / T), ids [rows, k] sorted (absent as V); with SOFTCAP, of the logits
    cap·tanh(s / cap) (`transforms.py`). PARTS also stores parts[r] = (H(softmax(s / T)) over the whole row,
    CE(s at T = 1, label_r) with HARD, else 0), streamed in the same pass (`entropy.py`, `cross_entropy.py`)."""
    inv_temp, cap = in_acc(inv_temp, ACC), in_acc(cap, ACC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    s_off = row_offsets(safe_rows, s_inner, s_stride_outer, s_stride_inner)
    row_base = safe_rows.to(tl.int64) * k
    cols = tl.arange(0, BLOCK_V)
    lo = tl.zeros([BLOCK_R], tl.int32)
    m = tl.full([BLOCK_R], NEG_INF, ACC)
    u = tl.full([BLOCK_R], -1.0, ACC)
    if PARTS:
        m_h, s_h, a_h = entropy_init(BLOCK_R, BLOCK_V, ACC)
        labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_R)
        m_c = tl.full([BLOCK_R], NEG_INF, ACC)
        u_c = tl.full([BLOCK_R], -1.0, ACC)
        s_lab = tl.zeros([BLOCK_R], ACC)
    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + cols < V
        member, _, lo = member_tile(ids_ptr, ids_ptr, row_base, lo, k, v0, BLOCK_R, BLOCK_V, BLOCK_C, False, ACC)
        s = load_tile(s_ptr + v0, s_off, cols, col_ok, ACC)
        if SOFTCAP:
            s = softcap(s, cap)
        # One rounded product per logit, as in `passes.scaled_pq` (never contracted into the max's shift).
        x = tl.fma(s, inv_temp, 0.0)
        m, u = online_lse_update(m, u, tl.where(member, NEG_INF, x))
        if PARTS:
            m_h, s_h, a_h = entropy_update(m_h, s_h, a_h, x)
            m_c, u_c, s_lab = hard_label_update(HARD, s, v0 + cols, labels, m_c, u_c, s_lab)
    tl.store(out_ptr + rows, m + log1p(u), mask=row_ok)
    if PARTS:
        tl.store(parts_ptr + rows.to(tl.int64) * 2, entropy_finish(s_h, a_h), mask=row_ok)
        ce = tl.zeros([BLOCK_R], ACC)
        if HARD:
            _, ce = hard_label_finish(m_c, u_c, s_lab, labels, V)
        tl.store(parts_ptr + rows.to(tl.int64) * 2 + 1, ce, mask=row_ok)


@triton.jit
def topk_student_backward_kernel(
    s_ptr, ids_ptr, g_ids_ptr, lse_rest_ptr, g_rest_ptr, out_ptr, n_rows, V, k, s_inner, s_stride_outer,
    s_stride_inner, inv_temp: FLOAT, cap: FLOAT,
    TAIL: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[r, j] = (g_rest[r]·e^(s_rj / T − R_r) off the ids (only with TAIL), g_ids[r, i] at j = ids[r, i]) / T;
    ids and g_ids [rows, k] in the same (sorted) order; out contiguous [rows, V] in its own dtype. With SOFTCAP
    the loss saw cap·tanh(s / cap) for s: that in the formula, and the result times its slope 1 − tanh²."""
    inv_temp, cap = in_acc(inv_temp, ACC), in_acc(cap, ACC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    s_off = row_offsets(safe_rows, s_inner, s_stride_outer, s_stride_inner)
    row_base = safe_rows.to(tl.int64) * k
    out_off = safe_rows.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)
    lo = tl.zeros([BLOCK_R], tl.int32)
    if TAIL:
        lse_rest = tl.load(lse_rest_ptr + safe_rows).to(ACC)
        g_rest = tl.load(g_rest_ptr + safe_rows).to(ACC)
    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + cols < V
        member, grad, lo = member_tile(ids_ptr, g_ids_ptr, row_base, lo, k, v0, BLOCK_R, BLOCK_V, BLOCK_C, True, ACC)
        if TAIL or SOFTCAP:
            s = load_tile(s_ptr + v0, s_off, cols, col_ok, ACC)
            if SOFTCAP:
                s = softcap(s, cap)
        if TAIL:
            x = tl.fma(s, inv_temp, 0.0)
            # A row with no gradient from its tail (ignored, or an empty complement whose R is −inf) gets
            # exact zeros there, whatever its logits.
            tail = tl.where((g_rest != 0.0)[:, None] & ~member, g_rest[:, None] * tl.exp(x - lse_rest[:, None]), 0.0)
            grad += tail
        grad = grad * inv_temp
        if SOFTCAP:
            grad = grad * softcap_slope(s, cap)
        tl.store(out_ptr + out_off[:, None] + v0 + cols[None, :], as_output(grad, out_ptr),
                 mask=row_ok[:, None] & col_ok[None, :])
