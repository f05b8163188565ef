"""Log-probabilities of given tokens and the entropy of each row, on logits that exist: row-parallel,
vocabulary-blocked, each logit read once per pass.

A row's raw logits z (a float32 chunk of an lm_head's output) become y = softcap(z) / T (`transforms.py`; no
softcap: z itself). One forward pass keeps, per row, the online log-sum-exp of y and the label's y — the hard-label
cross-entropy's state, `cross_entropy.hard_label_update_lanes` — and one more sum for the entropy:

    lse = m + ls                 m the row's max, ls = log Σ e^(y − m) = log1p(excess)   (`divergences.py`)
    log p(token) = (y_token − m) − ls
    H = −Σ p log p = ls − A / S,  A = Σ e^(y − m)·(y − m) ≤ 0,  S = Σ e^(y − m) = 1 + excess ≥ 1

Both terms of H are non-negative (nothing cancels), and A is centred on the running max like the log-sum: when
the max grows from m to m' every old term moves by δ = m − m' ≤ 0, so A' = e^δ·(A + δ·S). A and the excess are
kept per lane (`divergences.py`, "Lanes") and summed over the lanes once, after the row.

The gradient of g_lp·log p(token) + g_H·H with respect to y is one write per element,

    ∂/∂y_j = g_lp·([j = token] − p_j) − g_H·p_j·(log p_j + H),

then / T and, with a softcap, times its slope (`transforms.softcap_slope`). Statistics per row (NUM_STATS):
0 m, 1 ls, 2 H, 3 y_token (0 where the row's token is not among the columns: another rank's shard, or none).
"""

import triton
import triton.language as tl

from .cross_entropy import hard_label_gradient, hard_label_update_lanes
from .divergences import FLOAT, NEG_INF, any_row, exp_flushed, finite_or_zero, in_acc, lanes_excess, lanes_plain, log1p
from .logits import as_output, load_tile, row_offsets
from .transforms import softcap, softcap_slope

NUM_STATS = tl.constexpr(4)


@triton.jit
def scaled_tile(z_ptr, z_off, cols, col_ok, inv_temp, cap, SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """(y = softcap(z) / T, the capped z) of a tile of raw logits; columns past V are −inf (probability 0). One
    rounded product per logit (never contracted into the max's shift), as `passes.scaled_pq`."""
    z = load_tile(z_ptr, z_off, cols, col_ok, ACC)
    if SOFTCAP:
        z = softcap(z, cap)
    return tl.fma(z, inv_temp, 0.0), z


@triton.jit
def entropy_rescale(a, u, n, m, tile_max):
    """The entropy's lanes a (Σ e^d·d, d = y − m) re-expressed at the max that the tile raises (rows where it
    grows: a' = e^δ·(a + δ·S) per lane, δ = m − m' and S the lane's plain sum of e^d, `lanes_plain`), before the
    log-sum's own state (m; u, n: its excess in lanes) takes the tile."""
    m_new = tl.maximum(m, tile_max)
    grew = m_new > m
    if any_row(grew, grew):
        ref = finite_or_zero(m_new)
        shift = finite_or_zero(m) - ref  # 0 before the first finite logit, when a and S are still 0
        factor = tl.exp(m - ref)
        a = tl.where(grew[:, None], factor[:, None] * (a + shift[:, None] * lanes_plain(u, n)), a)
    return a


@triton.jit
def entropy_add(a, y, m):
    """A tile's terms e^d·d, d = y − m (m the max with the tile in it), into the entropy's lanes; a term whose
    e^d is 0 (a −inf logit, a column past V, an underflow) adds 0."""
    d = y - finite_or_zero(m)[:, None]
    e = exp_flushed(d)
    return a + tl.where(e > 0.0, e * d, 0.0)


@triton.jit
def token_logprobs_forward_kernel(
    z_ptr, labels_ptr, stats_ptr, n_rows, V, z_inner, z_stride_outer, z_stride_inner, inv_temp: FLOAT, cap: FLOAT,
    SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """stats[r] = (m, ls, H, y_label) of row r's y = softcap(z) / T (see the module docstring); labels [rows] are
    column indices (−1, or any value outside [0, V): no column)."""
    inv_temp, cap = in_acc(inv_temp, ACC), in_acc(cap, ACC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)  # rows past the end re-read the last one (never stored)
    z_off = row_offsets(safe_rows, z_inner, z_stride_outer, z_stride_inner)
    labels = tl.load(labels_ptr + safe_rows)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_R], NEG_INF, ACC)
    u = tl.zeros([BLOCK_R, BLOCK_V], ACC)  # the log-sum's excess in lanes, and its count n at the max
    n = tl.zeros([BLOCK_R], ACC)
    a = tl.zeros([BLOCK_R, BLOCK_V], ACC)  # Σ e^d·d in lanes
    y_label = tl.zeros([BLOCK_R], ACC)
    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + cols < V
        y, _ = scaled_tile(z_ptr + v0, z_off, cols, col_ok, inv_temp, cap, SOFTCAP, ACC)
        a = entropy_rescale(a, u, n, m, tl.max(y, axis=1))
        m, u, n, y_label = hard_label_update_lanes(True, y, v0, v0 + cols, labels, m, u, n, y_label)
        a = entropy_add(a, y, m)
    excess = lanes_excess(u, n)
    ls = log1p(excess)
    entropy = ls - tl.sum(a, axis=1) / (1.0 + excess)
    p = stats_ptr + rows.to(tl.int64) * NUM_STATS
    tl.store(p + 0, m, mask=row_ok)
    tl.store(p + 1, ls, mask=row_ok)
    tl.store(p + 2, entropy, mask=row_ok)
    tl.store(p + 3, y_label, mask=row_ok)


@triton.jit
def token_logprobs_backward_kernel(
    z_ptr, labels_ptr, stats_ptr, grad_ptr, out_ptr, n_rows, V, z_inner, z_stride_outer, z_stride_inner,
    inv_temp: FLOAT, cap: FLOAT, SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[r, j] = ∂(g_lp·log p(label) + g_H·H)/∂z_rj, grad[r] = (g_lp, g_H), from the statistics (m, ls, H) of
    the forward (the whole vocabulary's, under vocabulary parallelism); out contiguous [rows, V] in its own dtype,
    possibly z itself (each element is read before it is overwritten, by the same program). A row whose g_lp and
    g_H are both 0 gets exact zeros, whatever its logits."""
    inv_temp, cap = in_acc(inv_temp, ACC), in_acc(cap, ACC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    safe_rows = tl.minimum(rows, n_rows - 1)
    z_off = row_offsets(safe_rows, z_inner, z_stride_outer, z_stride_inner)
    out_off = safe_rows.to(tl.int64) * V
    labels = tl.load(labels_ptr + safe_rows)
    p = stats_ptr + safe_rows.to(tl.int64) * NUM_STATS
    m, ls, entropy = tl.load(p + 0).to(ACC), tl.load(p + 1).to(ACC), tl.load(p + 2).to(ACC)
    g_lp = tl.load(grad_ptr + safe_rows.to(tl.int64) * 2).to(ACC)
    g_h = tl.load(grad_ptr + safe_rows.to(tl.int64) * 2 + 1).to(ACC)
    live = (g_lp != 0.0) | (g_h != 0.0)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + cols < V
        y, capped = scaled_tile(z_ptr + v0, z_off, cols, col_ok, inv_temp, cap, SOFTCAP, ACC)
        log_p = (y - m[:, None]) - ls[:, None]
        prob = tl.exp(log_p)
        # g_lp·(onehot − p): the hard-label cross-entropy's gradient, negated
        grad = -g_lp[:, None] * hard_label_gradient(y, m, ls, v0 + cols, labels)
        grad -= g_h[:, None] * tl.where(prob > 0.0, prob * (log_p + entropy[:, None]), 0.0)
        grad = grad * inv_temp
        if SOFTCAP:
            grad = grad * softcap_slope(capped, cap)
        grad = tl.where(live[:, None], grad, 0.0)
        tl.store(out_ptr + out_off[:, None] + v0 + cols[None, :], as_output(grad, out_ptr),
                 mask=row_ok[:, None] & col_ok[None, :])
