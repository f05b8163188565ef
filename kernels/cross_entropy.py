"""Hard-label cross-entropy of the raw student logits s (T = 1), folded into the divergence's passes.

    CE = lse(s) − s_label          ∂CE/∂s_j = softmax(s)_j − [j = label]      (MATH.md)

lse(s) is one more online log-sum-exp (running max m_c, excess u_c of the rescaled sum) and s_label a gather that
exactly one vocabulary tile contributes to. A label outside [0, V) gives a NaN loss rather than a
silently wrong one (rows whose label is ignore_index are masked out by the caller).
"""

import triton
import triton.language as tl

from .divergences import excess_at, finite_or_zero, flag, log1p, online_lse_update, online_lse_update_lanes


@triton.jit
def is_label(cols, labels):
    """[rows, block] mask of the tile entries that are their row's label."""
    return cols[None, :] == labels[:, None]


@triton.jit
def hard_label_update(HARD: tl.constexpr, s, cols, labels, m_c, u_c, s_lab):
    """Fold a tile of raw student logits into the running (m_c, u_c) of lse(s) (u_c: the excess, as in
    `divergences.py`) and into s_label."""
    if HARD:
        m_c, u_c = online_lse_update(m_c, u_c, s)
        s_lab += tl.sum(tl.where(is_label(cols, labels), s, 0.0), axis=1)
    return m_c, u_c, s_lab


@triton.jit
def hard_label_update_lanes(HARD: tl.constexpr, s, v0, cols, labels, m_c, u_c, n_c, s_lab):
    """`hard_label_update` with the excess of lse(s) in lanes (u_c [rows, block], n_c [rows]: `divergences.py`,
    "Lanes"); s_label gathered only in the tile that holds a row's label (columns cols = v0, v0 + 1, …)."""
    if HARD:
        m_c, u_c, n_c = online_lse_update_lanes(m_c, u_c, n_c, s)
        s_lab = label_logit_update(s, v0, cols, labels, s_lab)
    return m_c, u_c, n_c, s_lab


@triton.jit
def label_logit_update(s, v0, cols, labels, s_lab):
    """s_label gathered from a tile of raw student logits (columns cols = v0, v0 + 1, …), only in the tile that holds a
    row's label."""
    if tl.max(flag((labels >= v0) & (labels < v0 + s.shape[1])), axis=0) > 0:
        s_lab += tl.sum(tl.where(is_label(cols, labels), s, 0.0), axis=1)
    return s_lab


@triton.jit
def hard_label_at(m_c, u_c, max_c):
    """u_c as an addend of a sum over ranges at a larger max (`excess_at`), and whether the range holds it."""
    at = m_c == max_c
    return excess_at(u_c, at, tl.exp(m_c - finite_or_zero(max_c))), flag(at)


@triton.jit
def hard_label_merge(m_c, u_c, s_lab, n_c, v_c, t_lab):
    """Merge the statistics of two disjoint vocabulary ranges of the same rows (as `first_pass_merge`)."""
    max_c = tl.maximum(m_c, n_c)
    u_a, at_a = hard_label_at(m_c, u_c, max_c)
    u_b, at_b = hard_label_at(n_c, v_c, max_c)
    return max_c, (u_a + u_b) + at_a * at_b, s_lab + t_lab


@triton.jit
def hard_label_finish(m_c, u_c, s_lab, labels, V):
    """(log-sum, CE) of each row; lse(s) = m_c + log1p(u_c) is kept in two parts, as for the divergences."""
    ls_c = log1p(u_c)
    return ls_c, hard_label_loss(m_c, ls_c, s_lab, labels, V)


@triton.jit
def hard_label_loss(m_c, ls_c, s_lab, labels, V):
    """CE = (m_c − s_label) + ls_c of each row (NaN for a label outside [0, V))."""
    ce = (m_c - s_lab) + ls_c
    return tl.where((labels >= 0) & (labels < V), ce, float("nan"))


@triton.jit
def hard_label_gradient(s, m_c, ls_c, cols, labels):
    """∂CE/∂s on a tile: softmax(s) − onehot(label)."""
    return tl.exp((s - m_c[:, None]) - ls_c[:, None]) - tl.where(is_label(cols, labels), 1.0, 0.0)
