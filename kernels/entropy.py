"""Row entropies H = −Σ p log p of softmax(v), v a row of logits at temperature, streamed over vocabulary tiles
beside a loss's first pass (`return_parts`): no pass of their own.

Per row, against its running max m (per row) and with its sums in lanes [rows, block] (`divergences.py`, "Lanes"):

    S = Σ e^(v − m)        A = Σ e^(v − m)·(v − m)  (≤ 0)        H = log S − A / S

since log p = (v − m) − log S and Σ p = 1. Both terms are ≥ 0: no cancellation, whatever the logits' size. When the
max grows by δ = m_old − m_new < 0, every old term moves: S → e^δ·S, A → e^δ·(A + δ·S). A −inf logit adds nothing.
"""

import triton
import triton.language as tl

from .divergences import NEG_INF, any_row, online_max


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
        shift = (m - ref)[:, None]  # ≤ 0; −inf before the row's first finite logit, when S = A = 0
        factor = tl.exp(shift)
        moved = tl.where(factor > 0, factor * (a + shift * s), 0.0)
        a = tl.where(grew[:, None], moved, a)
        s = tl.where(grew[:, None], factor * s, s)
    d = v - ref[:, None]
    e = tl.exp(d)
    s += e
    a += tl.where(e > 0, e * d, 0.0)
    return m_new, s, a


@triton.jit
def entropy_finish(s, a):
    """H [rows] of a complete state's lanes (0 for a row with no finite logit)."""
    total = tl.sum(s, axis=1)
    safe = tl.where(total > 0, total, 1.0)
    return tl.where(total > 0, tl.log(safe) - tl.sum(a, axis=1) / safe, 0.0)
