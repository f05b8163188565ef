"""Partial per-row state of a pass over part of the vocabulary, and its merge.

A kernel that sees only part of a row's vocabulary (a split of the fused forward, or a rank's shard under
vocabulary parallelism) writes the row's unfinished state there, NUM_PARTIAL values per (row, part):

    first pass    m_x, u_x, m_y, u_y, acc1..3, m_c, u_c, s_lab   (excesses and sums relative to the
                                                                 maxima, `divergences.py` / `cross_entropy.py`)
    second pass   y1, y2, y3                                    (plain sums of normalized terms)

`merge_tile_statistics_kernel` merges the per-tile maxima and sums of exponentials of the logits GEMM's epilogue
(`kernels/epilogue.py`) into the statistics the one-read gradient takes (`logits.kd_logits_backward_kernel`, LOSS).

`merge_partials_kernel` merges a row's parts (`first_pass_merge`, `hard_label_merge`; second-pass sums
add) and finishes the row's statistics and loss. Across ranks the merge is two all-reduces instead (max
of the maxima, then sum of the sums re-expressed relative to them): its RESCALE mode does the
re-expression. The log-sums are kept as excesses u = Σ − 1 (`divergences.py`), which do not add: the ranks
that hold a max add their excesses and the others their plain sums, and the sum of the flags "holds the
max" (k, usually 1) completes the group's excess, u = Σ addends + (k − 1): no rank's 1 is ever rounded
against its small terms.
"""

import triton
import triton.language as tl

from .cross_entropy import hard_label_at, hard_label_merge
from .divergences import FLOAT, NEG_INF, finite_or_zero, first_pass_at, first_pass_merge, in_acc
from .passes import first_pass_results, load_labels, load_stats, second_pass_results, store_stats

NUM_PARTIAL = tl.constexpr(10)


@triton.jit
def store_partial(part, row_ok, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab):
    """Store a first-pass state at `part` (per-row pointers to NUM_PARTIAL values)."""
    tl.store(part + 0, m_x, mask=row_ok)
    tl.store(part + 1, u_x, mask=row_ok)
    tl.store(part + 2, m_y, mask=row_ok)
    tl.store(part + 3, u_y, mask=row_ok)
    tl.store(part + 4, acc1, mask=row_ok)
    tl.store(part + 5, acc2, mask=row_ok)
    tl.store(part + 6, acc3, mask=row_ok)
    tl.store(part + 7, m_c, mask=row_ok)
    tl.store(part + 8, u_c, mask=row_ok)
    tl.store(part + 9, s_lab, mask=row_ok)


@triton.jit
def store_second_partial(part, row_ok, y1, y2, y3):
    tl.store(part + 0, y1, mask=row_ok)
    tl.store(part + 1, y2, mask=row_ok)
    tl.store(part + 2, y3, mask=row_ok)


@triton.jit
def merge_partials_kernel(
    partial_ptr, maxima_ptr, out_ptr, labels_ptr, loss_ptr, stats_ptr, n_rows, n_parts, V, c1: FLOAT, c2: FLOAT,
    soft: FLOAT, hard: FLOAT,
    KIND: tl.constexpr, SECOND_PASS: tl.constexpr, RESCALE: tl.constexpr, HARD: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Merge each row's n_parts partial states [rows, n_parts, NUM_PARTIAL].

    Default: finish the row: stats[row] and loss[row] (the second pass adds soft·L to the loss). `labels`
    and V are the global ones: they only check the label's range.
    RESCALE (first pass): merge the parts, re-express the state at the maxima (m_x, m_y, m_c) [rows, 3] —
    the group's maxima, at least the row's own — as this rank's addends of the group's sums (`excess_at`),
    and store it to out[row] (NUM_PARTIAL values) with, in place of each max, whether this rank holds it.
    """
    c1, c2, soft, hard = in_acc(c1, ACC), in_acc(c2, ACC), in_acc(soft, ACC), in_acc(hard, ACC)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    part = partial_ptr + safe_rows.to(tl.int64) * n_parts * NUM_PARTIAL
    if SECOND_PASS:
        y1 = tl.zeros([BLOCK_N], ACC)
        y2 = tl.zeros([BLOCK_N], ACC)
        y3 = tl.zeros([BLOCK_N], ACC)
        for j in range(0, n_parts):
            y1 += tl.load(part + j * NUM_PARTIAL + 0)
            y2 += tl.load(part + j * NUM_PARTIAL + 1)
            y3 += tl.load(part + j * NUM_PARTIAL + 2)
        m_x, ls_x, m_y, ls_y, r, _a1, _a2, _a3, _L, m_c, ls_c = load_stats(stats_ptr, safe_rows)
        aux1, aux2, aux3, L = second_pass_results(KIND, y1, y2, y3, c1, c2)
        store_stats(stats_ptr, rows, row_ok, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c)
        tl.store(loss_ptr + rows, tl.load(loss_ptr + safe_rows) + soft * L, mask=row_ok)
    else:
        m_x = tl.load(part + 0)
        u_x = tl.load(part + 1)
        m_y = tl.load(part + 2)
        u_y = tl.load(part + 3)
        acc1 = tl.load(part + 4)
        acc2 = tl.load(part + 5)
        acc3 = tl.load(part + 6)
        m_c = tl.load(part + 7)
        u_c = tl.load(part + 8)
        s_lab = tl.load(part + 9)
        for j in range(1, n_parts):
            p = part + j * NUM_PARTIAL
            m_x, u_x, m_y, u_y, acc1, acc2, acc3 = first_pass_merge(
                KIND, m_x, u_x, m_y, u_y, acc1, acc2, acc3, tl.load(p + 0), tl.load(p + 1), tl.load(p + 2),
                tl.load(p + 3), tl.load(p + 4), tl.load(p + 5), tl.load(p + 6), c1, c2)
            if HARD:
                m_c, u_c, s_lab = hard_label_merge(m_c, u_c, s_lab, tl.load(p + 7), tl.load(p + 8), tl.load(p + 9))
        if RESCALE:
            maxima = maxima_ptr + safe_rows.to(tl.int64) * 3
            u_x, u_y, acc1, acc2, acc3, m_x, m_y = first_pass_at(KIND, m_x, u_x, m_y, u_y, acc1, acc2, acc3,
                                                                 tl.load(maxima + 0), tl.load(maxima + 1), c1, c2)
            if HARD:
                u_c, m_c = hard_label_at(m_c, u_c, tl.load(maxima + 2))
            store_partial(out_ptr + rows.to(tl.int64) * NUM_PARTIAL, row_ok, m_x, u_x, m_y, u_y, acc1, acc2, acc3,
                          m_c, u_c, s_lab)
        else:
            labels = load_labels(HARD, labels_ptr, safe_rows, BLOCK_N)
            ls_x, ls_y, r, aux1, aux2, aux3, L, ls_c, _, loss = first_pass_results(
                KIND, HARD, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab, labels, V, c1, c2, soft, hard)
            store_stats(stats_ptr, rows, row_ok, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c)
            tl.store(loss_ptr + rows, loss, mask=row_ok)


@triton.jit
def tile_sum(top_ptr, sums_ptr, rows, row_ok, n_tiles, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
             ACC: tl.constexpr):
    """(M, S) of `rows` from their per-tile maxima and sums of exponentials [rows, n_tiles] (top_j = max v over the
    tile, sums_j = Σ e^(v − top_j)): M = max_j top_j and S = Σ_j sums_j·e^(top_j − M) ≥ 1, relative to the row's own
    maximum (to the sums' precision); a tile of −inf only (top −inf, sums 0) adds nothing."""
    base = rows.to(tl.int64)[:, None] * n_tiles
    cols = tl.arange(0, BLOCK_T)
    m = tl.full([BLOCK_R], NEG_INF, ACC)
    for j0 in range(0, n_tiles, BLOCK_T):
        ok = row_ok[:, None] & (j0 + cols < n_tiles)[None, :]
        m = tl.maximum(m, tl.max(tl.load(top_ptr + base + j0 + cols[None, :], mask=ok, other=NEG_INF).to(ACC), 1))
    total = tl.zeros([BLOCK_R, BLOCK_T], ACC)
    shift = finite_or_zero(m)[:, None]
    for j0 in range(0, n_tiles, BLOCK_T):
        ok = row_ok[:, None] & (j0 + cols < n_tiles)[None, :]
        top = tl.load(top_ptr + base + j0 + cols[None, :], mask=ok, other=NEG_INF).to(ACC)
        sums = tl.load(sums_ptr + base + j0 + cols[None, :], mask=ok, other=0.0).to(ACC)
        total += tl.where(top == NEG_INF, 0.0, sums * tl.exp(top - shift))
    return m, tl.sum(total, axis=1)


@triton.jit
def merge_tile_statistics_kernel(x_top_ptr, x_sums_ptr, y_top_ptr, y_sums_ptr, c_top_ptr, c_sums_ptr, stats_ptr,
                                 n_rows, n_tiles, CE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                                 ACC: tl.constexpr):
    """stats[r] (`passes.py`) of the two sides' per-tile statistics (x = P, y = Q; c: the student's at T = 1, CE):
    (M, S) of each by `tile_sum`, ls = log S, and r = log(S_y / S_x): ls_y − ls_x to the sums' precision, where the
    difference of the two log-sums, each rounded at its own size (~12), would carry their roundings (5e-7 each;
    the two-pass kinds' second pass and gradient take r as it is). aux1..3 and L are 0 (the second pass or the
    one-read kernel writes or needs none)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    m_x, s_x = tile_sum(x_top_ptr, x_sums_ptr, rows, row_ok, n_tiles, BLOCK_R, BLOCK_T, ACC)
    m_y, s_y = tile_sum(y_top_ptr, y_sums_ptr, rows, row_ok, n_tiles, BLOCK_R, BLOCK_T, ACC)
    zero = tl.zeros([BLOCK_R], ACC)
    m_c = zero
    ls_c = zero
    if CE:
        m_c, s_c = tile_sum(c_top_ptr, c_sums_ptr, rows, row_ok, n_tiles, BLOCK_R, BLOCK_T, ACC)
        ls_c = tl.log(s_c)
    store_stats(stats_ptr, rows, row_ok, m_x, tl.log(s_x), m_y, tl.log(s_y), tl.log(s_y / s_x), zero, zero, zero,
                zero, m_c, ls_c)
