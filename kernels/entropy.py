"""Row entropies H = −Σ p log p of softmax(v), v a row of logits at temperature, streamed over vocabulary tiles
beside a loss's first pass (`return_parts`): no pass of their own.

Per row, against its running max m (per row) and with its sums in lanes [rows, block] (`divergences.py`, "Lanes"):

    S = Σ e^(v − m)        A = Σ e^(v − m)·(v − m)  (≤ 0)        H = log S − A / S

since log p = (v − m) − log S and Σ p = 1. Both terms are ≥ 0: no cancellation, whatever the logits' size. When the
max grows by δ = m_old − m_new < 0, every old term moves: S → e^δ·S, A → e^δ·(A + δ·S). A −inf logit adds nothing.
"""

import triton
import triton.language as tl

from .divergences import NEG_INF, any_row, entropy_rescale, entropy_terms, log1p, online_max


@triton.jit
def entropy_init(BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """The empty state (m, S, A) of BLOCK_R rows: the max at −inf, the lanes at 0."""
    lanes = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    return tl.full([BLOCK_R], NEG_INF, ACC), lanes, lanes


@triton.jit
def entropy_update(m, s, a, v):
    """Fold a tile v [rows, block] of logits at temperature into the state (m, S, A)."""
    m_new, ref, grew, _ = online_max(m, v)
    if any_row(grew, grew):
        shift = m - ref  # ≤ 0; −inf before the row's first finite logit, when S = A = 0
        a = entropy_rescale(a, s, grew, shift)
        s = tl.where(grew[:, None], tl.exp(shift)[:, None] * s, s)
    d = v - ref[:, None]
    e = tl.exp(d)
    return m_new, s + e, a + entropy_terms(e, d)


@triton.jit
def entropy_init_rows(BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """The empty state (m, S, A) of BLOCK_R rows with the sums per row (`entropy_update_rows`)."""
    return tl.full([BLOCK_R], NEG_INF, ACC), tl.zeros([BLOCK_R], ACC), tl.zeros([BLOCK_R], ACC)


@triton.jit
def entropy_update_rows(m, s, a, v):
    """`entropy_update` with S and A per row [rows] (a block-wide sum per tile instead of two more [rows, block]
    states: for a kernel whose registers hold matmul tiles, `kernels/linear.py`)."""
    m_new, ref, grew, _ = online_max(m, v)
    shift = m - ref
    factor = tl.exp(shift)
    a = tl.where(grew, tl.where(factor > 0, factor * (a + shift * s), 0.0), a)
    s = tl.where(grew, factor * s, s)
    d = v - ref[:, None]
    e = tl.exp(d)
    return m_new, s + tl.sum(e, axis=1), a + tl.sum(entropy_terms(e, d), axis=1)


@triton.jit
def entropy_of_excess(u, h):
    """H [rows] from a first pass's excess u (Σ e^d = 1 + u, `divergences.py`) and h = Σ e^d·d: log1p(u) − h / (1 + u);
    0 for a row with no finite logit (u = −1)."""
    total = 1.0 + u
    safe = tl.where(total > 0, total, 1.0)
    return tl.where(total > 0, log1p(u) - h / safe, 0.0)


@triton.jit
def entropy_finish(s, a):
    """H [rows] of a complete state's lanes (0 for a row with no finite logit)."""
    total = tl.sum(s, axis=1)
    safe = tl.where(total > 0, total, 1.0)
    return tl.where(total > 0, tl.log(safe) - tl.sum(a, axis=1) / safe, 0.0)


@triton.jit
def entropy_store_partial(p, row_ok, m_hs, s_hs, a_hs, m_ht, s_ht, a_ht):
    """A vocabulary part's entropy states of the student's and the target's rows at p [rows] (six values a row: m,
    S, A of each, S and A [rows] relative to finite_or_zero(m)), for a merge over the parts (and a
    vocabulary-parallel group) on the host: at the larger max M, S → e^(m − M)·S and A → e^(m − M)·(A + (m − M)·S),
    then summed."""
    tl.store(p + 0, m_hs, mask=row_ok)
    tl.store(p + 1, s_hs, mask=row_ok)
    tl.store(p + 2, a_hs, mask=row_ok)
    tl.store(p + 3, m_ht, mask=row_ok)
    tl.store(p + 4, s_ht, mask=row_ok)
    tl.store(p + 5, a_ht, mask=row_ok)
