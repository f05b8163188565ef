"""Distillation kernels on logits that already exist: row-parallel, vocabulary-blocked.

Each program owns BLOCK_R rows and walks the vocabulary in BLOCK_V columns. The forward keeps only
per-row statistics (one pass for KL / ALPHA_BETA, two for the others); the backward recomputes the
log-probabilities of each tile from the saved statistics and writes each gradient once, in the dtype of
its output (which may be the logits buffer itself: each element is read before it is overwritten, by the
same program). The math is in `passes.py`; these kernels only move data.

Rows of a [..., V] tensor are addressed as (row // n_inner)·stride_outer + (row % n_inner)·stride_inner,
so two leading dimensions with arbitrary strides (e.g. `logits[:, :-1]`) need no copy.
"""

import triton
import triton.language as tl

from .cross_entropy import label_logit_update
from .divergences import FLOAT, INTERPRETED, NEG_INF, in_acc, jsd_given_finish, second_pass_add
from .entropy import entropy_of_excess, entropy_store_partial
from .partials import NUM_PARTIAL, store_partial, store_second_partial
from .passes import (
    NUM_STATS,  # noqa: F401  (re-exported for the launchers)
    first_pass_lanes_init,
    first_pass_lanes_state,
    first_pass_lanes_tile,
    first_pass_results,
    given_pass_tile,
    gradient_tile,
    hard_label_part,
    load_labels,
    load_stats,
    one_read_results,
    one_read_tile,
    scale_rows,
    second_pass_results,
    second_pass_tile,
    store_stats,
)


@triton.jit
def row_offsets(rows, n_inner, stride_outer, stride_inner):
    rows = rows.to(tl.int64)
    return (rows // n_inner) * stride_outer + (rows % n_inner) * stride_inner


@triton.jit
def load_tile(ptr, row_off, cols, col_ok, ACC: tl.constexpr):
    """A tile of raw logits in the accumulation dtype; columns past V read as -inf (probability 0)."""
    return tl.load(ptr + row_off[:, None] + cols[None, :], mask=col_ok[None, :], other=NEG_INF).to(ACC)


# Stages of the forward kernel: the whole loss, or one pass's partial state over this (vocabulary-shard)
# part of each row, for a merge across ranks (`partials.py`); or, for the JSD, the whole loss from first-pass
# statistics computed elsewhere (GIVEN: the logits GEMMs' epilogue, `launchers/epilogue.py`).
FULL = tl.constexpr(0)
FIRST_PARTIAL = tl.constexpr(1)
SECOND_PARTIAL = tl.constexpr(2)
GIVEN = tl.constexpr(3)


@triton.jit
def kd_logits_forward_kernel(
    s_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, partial_ptr, parts_ptr,
    n_rows, V, s_inner, s_stride_outer, s_stride_inner, t_inner, t_stride_outer, t_stride_inner,
    inv_temp: FLOAT, c1: FLOAT, c2: FLOAT, soft: FLOAT, hard: FLOAT, cap_s: FLOAT, cap_t: FLOAT, share: FLOAT,
    KIND: tl.constexpr, TWO_PASS: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr,
    TRANSFORM: tl.constexpr, STAGE: tl.constexpr, PARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """loss[r] = soft·D(teacher_r ‖ student_r at T) + hard·CE(student_r, label_r); stats[r] as in passes.py.

    FIRST_PARTIAL stores the rows' first-pass state to partial[r] instead; SECOND_PARTIAL reads the merged
    statistics from stats[r] and stores the second-pass sums (y1, y2, y3) to partial[r]. GIVEN (KIND = JSD alone,
    `launchers.logits.second_pass_only`; no tile transform: the given statistics are of the raw logits) reads the
    log-normalizers, r and the cross-entropy's (m_c, ls_c) from stats[r], runs the second pass alone, gathering the
    label's logit on the way, and stores loss[r] and the completed stats[r] as FULL does (in place: each program
    reads its rows before it writes them). PARTS also stores
    parts[r] = (D, CE, H(student at T), H(target at T)) at FULL, the entropies streamed beside the first pass
    from the sums e^d·d of the terms e^d of the first pass's log-sum-exps (`divergences.first_pass_update_lanes`)
    and CE that of HARD (0 without it), and at FIRST_PARTIAL the entropies' partial states (`entropy_store_partial`:
    parts[r] holds six values).
    """
    inv_temp, c1, c2, soft = in_acc(inv_temp, ACC), in_acc(c1, ACC), in_acc(c2, ACC), in_acc(soft, ACC)
    hard, cap_s, cap_t, share = in_acc(hard, ACC), in_acc(cap_s, ACC), in_acc(cap_t, ACC), in_acc(share, ACC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    # Rows past the end re-read the last row (never stored), so no lane ever sees an empty row.
    safe_rows = tl.minimum(rows, n_rows - 1)
    s_off = row_offsets(safe_rows, s_inner, s_stride_outer, s_stride_inner)
    t_off = row_offsets(safe_rows, t_inner, t_stride_outer, t_stride_inner)
    labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_R)
    cols = tl.arange(0, BLOCK_V)
    part = partial_ptr + rows.to(tl.int64) * NUM_PARTIAL

    if STAGE == SECOND_PARTIAL or STAGE == GIVEN:
        m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c = load_stats(stats_ptr, safe_rows)
        s_lab = tl.zeros([BLOCK_R], ACC)  # GIVEN: the label's logit, gathered by the second pass
    else:
        m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, m_c, u_c, n_c, s_lab = first_pass_lanes_init(BLOCK_R, BLOCK_V,
                                                                                                   ACC)
        h_x = 0.0  # the entropy sums (PARTS): lanes, or nothing
        h_y = 0.0
        if PARTS:
            h_x = tl.zeros([BLOCK_R, BLOCK_V], ACC)
            h_y = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        for v0 in range(0, V, BLOCK_V):
            col_ok = v0 + cols < V
            s = load_tile(s_ptr + v0, s_off, cols, col_ok, ACC)
            t = load_tile(t_ptr + v0, t_off, cols, col_ok, ACC)
            m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, h_x, h_y, m_c, u_c, n_c, s_lab = first_pass_lanes_tile(
                KIND, HARD, STUDENT_IS_P, TRANSFORM, PARTS, s, t, v0, v0 + cols, labels, inv_temp, cap_s, cap_t,
                share, m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, h_x, h_y, m_c, u_c, n_c, s_lab, c1, c2)
        m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab = first_pass_lanes_state(
            KIND, m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, m_c, u_c, n_c, s_lab)
        if PARTS:  # (Σ e^d, Σ e^d·d) of each side: the student's and the target's, whichever is P
            h_x = tl.sum(h_x, axis=1)
            h_y = tl.sum(h_y, axis=1)
            u_s, h_s, m_s, u_t, h_t, m_t = as_sides(STUDENT_IS_P, u_x, h_x, m_x, u_y, h_y, m_y)
        if STAGE == FIRST_PARTIAL:
            store_partial(part, row_ok, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab)
            if PARTS:
                entropy_store_partial(parts_ptr + rows.to(tl.int64) * 6, row_ok, m_s, u_s + 1.0, h_s, m_t, u_t + 1.0,
                                      h_t)
        else:
            ls_x, ls_y, r, aux1, aux2, aux3, L, ls_c, ce, loss = first_pass_results(
                KIND, HARD, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab, labels, V, c1, c2, soft, hard)

    if TWO_PASS and STAGE != FIRST_PARTIAL:
        y1 = tl.zeros([BLOCK_R, BLOCK_V], ACC)  # in lanes: summed over them once, after the loop
        y2 = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        y3 = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        y4 = 0.0  # GIVEN: a fourth sum (`jsd_given_terms`)
        if STAGE == GIVEN:
            y4 = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        for v0 in range(0, V, BLOCK_V):
            col_ok = v0 + cols < V
            s = load_tile(s_ptr + v0, s_off, cols, col_ok, ACC)
            t = load_tile(t_ptr + v0, t_off, cols, col_ok, ACC)
            if STAGE == GIVEN:  # the JSD (`launchers.logits.second_pass_only`)
                t1, t2, t3, t4 = given_pass_tile(STUDENT_IS_P, s, t, inv_temp, m_x, ls_x, m_y, ls_y, r, c1)
                y1 += t1
                y2 += t2
                y3 += t3
                y4 += t4
                if HARD:
                    s_lab = label_logit_update(s, v0, v0 + cols, labels, s_lab)
            else:
                t1, t2, t3 = second_pass_tile(KIND, STUDENT_IS_P, TRANSFORM, s, t, inv_temp, cap_s, cap_t, share, m_x,
                                              ls_x, m_y, ls_y, r, c1, c2)
                y1, y2, y3 = second_pass_add(KIND, y1, y2, y3, t1, t2, t3)
        y1 = tl.sum(y1, axis=1)
        y2 = tl.sum(y2, axis=1)
        y3 = tl.sum(y3, axis=1)
        if STAGE == SECOND_PARTIAL:
            store_second_partial(part, row_ok, y1, y2, y3)
        elif STAGE == GIVEN:
            L, aux1, aux2, aux3 = jsd_given_finish(y1, y2, y3, tl.sum(y4, axis=1), c1)
            loss = hard_label_part(HARD, m_c, ls_c, s_lab, labels, V, hard) + soft * L
        else:
            aux1, aux2, aux3, L = second_pass_results(KIND, y1, y2, y3, c1, c2)
            loss += soft * L

    if STAGE == FULL or STAGE == GIVEN:
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        store_stats(stats_ptr, rows, row_ok, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c)
        if PARTS:
            p = parts_ptr + rows.to(tl.int64) * 4
            tl.store(p + 0, L, mask=row_ok)
            tl.store(p + 1, ce, mask=row_ok)
            tl.store(p + 2, entropy_of_excess(u_s, h_s), mask=row_ok)
            tl.store(p + 3, entropy_of_excess(u_t, h_t), mask=row_ok)


@triton.jit
def as_sides(STUDENT_IS_P: tl.constexpr, u_x, h_x, m_x, u_y, h_y, m_y):
    """(the student's, the target's) sums of the canonical sides (P = x, Q = y): the inverse of `passes.as_pq`."""
    if STUDENT_IS_P:
        return u_x, h_x, m_x, u_y, h_y, m_y
    return u_y, h_y, m_y, u_x, h_x, m_x


@triton.jit
def round_to_bf16(x):
    """float32 x rounded to the nearest bfloat16, ties to even, kept as float32: what a GPU's conversion
    does, where the interpreter's truncates (a bias that grows with every product summed)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def as_output(x, out_ptr):
    """x in the dtype of out_ptr's elements, rounded to nearest; 16-bit outputs of float64 values by way of
    float32 (Triton 3.9's interpreter casts float64 to bfloat16 wrongly; on a GPU the two roundings differ
    from one only at ties), and bfloat16 ones rounded explicitly under the interpreter, whose cast truncates."""
    dtype = out_ptr.dtype.element_ty
    if dtype.primitive_bitwidth < 32:  # static
        x = x.to(tl.float32)
        if INTERPRETED and dtype == tl.bfloat16:  # static: compiled for a GPU, the branch does not exist
            x = round_to_bf16(x)
    return x.to(dtype)


@triton.jit
def kd_logits_backward_kernel(
    s_ptr, t_ptr, labels_ptr, grad_s_ptr, grad_t_ptr, stats_ptr, row_scale_ptr, loss_ptr,
    n_rows, V, s_inner, s_stride_outer, s_stride_inner, t_inner, t_stride_outer, t_stride_inner,
    inv_temp: FLOAT, c1: FLOAT, c2: FLOAT, soft: FLOAT, hard: FLOAT, cap_s: FLOAT, cap_t: FLOAT, share: FLOAT,
    KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, LOSS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """grad_s[r] = row_scale[r] · ∂ℓ_r/∂s_r (and grad_t likewise); gradients are contiguous [rows, V].

    A row whose scale is 0 (ignored, or zero upstream gradient) gets exact zeros, whatever its logits.

    LOSS (KL, the student as Q, no teacher gradient: what needs only the log-normalizers) also stores loss[r], from
    KL's sums over the gradient's own log-probabilities (`one_read_tile`): each logit is read once, and no first
    pass runs. For stats[r] that came from elsewhere — the statistics of the logits GEMM's epilogue
    (`launchers/epilogue.py`); only the log-normalizers, r and the cross-entropy's (m_c, ls_c) are read.
    """
    inv_temp, c1, c2, soft = in_acc(inv_temp, ACC), in_acc(c1, ACC), in_acc(c2, ACC), in_acc(soft, ACC)
    hard, cap_s, cap_t, share = in_acc(hard, ACC), in_acc(cap_s, ACC), in_acc(cap_t, ACC), in_acc(share, ACC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    s_off = row_offsets(safe_rows, s_inner, s_stride_outer, s_stride_inner)
    t_off = row_offsets(safe_rows, t_inner, t_stride_outer, t_stride_inner)
    g_off = safe_rows.to(tl.int64) * V
    labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_R)
    cols = tl.arange(0, BLOCK_V)

    m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c = load_stats(stats_ptr, safe_rows)
    scale = tl.load(row_scale_ptr + safe_rows).to(ACC)
    live = scale != 0
    if LOSS:  # KL's sums in lanes, from the gradient's own log-probabilities (`one_read_tile`)
        p_sum = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        acc1 = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        acc2 = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        acc3 = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        s_lab = tl.zeros([BLOCK_R], ACC)

    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + cols < V
        s = load_tile(s_ptr + v0, s_off, cols, col_ok, ACC)
        t = load_tile(t_ptr + v0, t_off, cols, col_ok, ACC)
        if LOSS:
            g_s, g_t, p_sum, acc1, acc2, acc3, s_lab = one_read_tile(
                HARD, STUDENT_IS_P, TRANSFORM, s, t, v0, v0 + cols, labels, inv_temp, cap_s, cap_t, share, m_x, ls_x,
                m_y, ls_y, r, m_c, ls_c, c1, c2, soft, hard, p_sum, acc1, acc2, acc3, s_lab)
        else:
            g_s, g_t = gradient_tile(KIND, HARD, STUDENT_IS_P, TRANSFORM, s, t, v0 + cols, labels, inv_temp, cap_s,
                                     cap_t, share, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c, c1, c2,
                                     soft, hard)
        out_mask = row_ok[:, None] & col_ok[None, :]
        if GRAD_S:
            tl.store(grad_s_ptr + v0 + g_off[:, None] + cols[None, :],
                     as_output(scale_rows(g_s, scale, live), grad_s_ptr), mask=out_mask)
        if GRAD_T:
            tl.store(grad_t_ptr + v0 + g_off[:, None] + cols[None, :],
                     as_output(scale_rows(g_t, scale, live), grad_t_ptr), mask=out_mask)
    if LOSS:
        tl.store(loss_ptr + rows, one_read_results(HARD, p_sum, acc1, acc2, acc3, m_c, ls_c, s_lab, labels, V, c1, c2,
                                                   soft, hard), mask=row_ok)
