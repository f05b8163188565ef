"""One vocabulary tile of each pass, for a student and a teacher tile of raw logits: what the kernels on
logits and the fused lm_head kernels share. The math itself is in `divergences.py` (the divergence,
canonical D(P ‖ Q)) and `cross_entropy.py` (the hard-label term); here it is put together for the row
loss

    ℓ = soft · D(teacher ‖ student at temperature T) + hard · CE(student at T = 1, label)

Per-row state of the first pass (10 values): m_x, u_x, m_y, u_y, acc1..3 (divergence, `divergences.py`)
and m_c, u_c, s_lab (cross-entropy). Per-row statistics saved for the gradient (NUM_STATS):

    0 m_x  1 ls_x  2 m_y  3 ls_y  4 r = ls_y − ls_x (`divergences.py`)  5..7 aux1..3  8 L (the divergence
    alone)  9 m_c  10 ls_c
"""

import triton
import triton.language as tl

from .cross_entropy import (
    hard_label_finish,
    hard_label_gradient,
    hard_label_loss,
    hard_label_update,
    hard_label_update_lanes,
    label_logit_update,
)
from .divergences import (
    KL,
    NEG_INF,
    first_pass_finish,
    first_pass_lanes_sum,
    first_pass_update,
    first_pass_update_lanes,
    jsd_given_terms,
    kl_terms,
    lanes_excess,
    gradient_terms,
    log_probs,
    second_pass_finish,
    second_pass_terms,
)
from .transforms import raw_gradients, transformed_tiles

NUM_STATS = tl.constexpr(11)


@triton.jit
def scaled_pq(STUDENT_IS_P: tl.constexpr, s, t, inv_temp):
    """(P side, Q side) of the logits scaled by 1/T, each product rounded to float32 before anything uses it.
    A plain s·(1/T) would let the compiler contract it into the first pass's x − max as one fused
    multiply-add (fma.rn.f32 on sm_90/sm_80): the max's own shift would then be its product's rounding
    error instead of exactly 0, and the excess sums, which count the max's term as exactly 1, would lose
    it to an ex2 rounded against 1 (23 ulps of a peaked row's log-sum, on an H200). An explicit fma with a
    zero addend is one rounded product that no later operation can fuse."""
    return as_pq(STUDENT_IS_P, tl.fma(s, inv_temp, 0.0), tl.fma(t, inv_temp, 0.0))


@triton.jit
def as_pq(STUDENT_IS_P: tl.constexpr, student, teacher):
    """(P side, Q side) of the canonical divergence; the map is its own inverse (gradients go back)."""
    x = teacher
    y = student
    if STUDENT_IS_P:
        x = student
        y = teacher
    return x, y


@triton.jit
def first_pass_init(BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The empty first-pass state of BLOCK rows: m_x, u_x, m_y, u_y, acc1..3, m_c, u_c, s_lab (the excesses
    u and the power sums acc2, acc3 at −1: nothing summed yet)."""
    neg = tl.full([BLOCK], NEG_INF, ACC)
    zero = tl.zeros([BLOCK], ACC)
    empty = tl.full([BLOCK], -1.0, ACC)
    return neg, empty, neg, empty, zero, empty, empty, neg, empty, zero


@triton.jit
def load_labels(HARD: tl.constexpr, labels_ptr, rows, BLOCK: tl.constexpr):
    """The rows' labels where the hard-label term reads them (zeros otherwise: never used)."""
    labels = tl.zeros([BLOCK], tl.int64)
    if HARD:
        labels = tl.load(labels_ptr + rows).to(tl.int64)
    return labels


@triton.jit
def first_pass_tile(KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, s,
                    t, cols, labels, inv_temp, cap_s, cap_t, share, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c,
                    s_lab, c1, c2):
    """Fold raw logit tiles s (student), t (teacher) [rows, block], transformed (`transforms.py`), into the
    first-pass state."""
    s, _, t = transformed_tiles(TRANSFORM, s, t, cap_s, cap_t, share)
    x, y = scaled_pq(STUDENT_IS_P, s, t, inv_temp)
    m_x, u_x, m_y, u_y, acc1, acc2, acc3 = first_pass_update(KIND, x, y, m_x, u_x, m_y, u_y, acc1, acc2, acc3,
                                                             c1, c2)
    m_c, u_c, s_lab = hard_label_update(HARD, s, cols, labels, m_c, u_c, s_lab)
    return m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c, s_lab


@triton.jit
def first_pass_lanes_init(BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """The empty first-pass state of BLOCK_R rows with its sums in BLOCK_V lanes (`divergences.py`, "Lanes"):
    m_x, (u_x, n_x), m_y, (u_y, n_y), acc1..3, m_c, (u_c, n_c), s_lab — the maxima per row at −inf, the lanes
    u and acc 0, the counts n and s_lab per row, 0."""
    neg = tl.full([BLOCK_R], NEG_INF, ACC)
    rows = tl.zeros([BLOCK_R], ACC)
    lanes = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    return neg, lanes, rows, neg, lanes, rows, lanes, lanes, lanes, neg, lanes, rows, rows


@triton.jit
def first_pass_lanes_tile(KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr,
                          TRANSFORM: tl.constexpr, ENTROPY: tl.constexpr, s, t, v0, cols, labels, inv_temp, cap_s,
                          cap_t, share, m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, h_x, h_y, m_c, u_c, n_c, s_lab,
                          c1, c2):
    """`first_pass_tile` into the state of `first_pass_lanes_init` (the tile's columns cols = v0, v0 + 1, …); with
    ENTROPY also the entropy sums h_x, h_y in lanes (`divergences.first_pass_update_lanes`)."""
    s, _, t = transformed_tiles(TRANSFORM, s, t, cap_s, cap_t, share)
    x, y = scaled_pq(STUDENT_IS_P, s, t, inv_temp)
    m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, h_x, h_y = first_pass_update_lanes(
        KIND, ENTROPY, x, y, m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, h_x, h_y, c1, c2)
    m_c, u_c, n_c, s_lab = hard_label_update_lanes(HARD, s, v0, cols, labels, m_c, u_c, n_c, s_lab)
    return m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, h_x, h_y, m_c, u_c, n_c, s_lab


@triton.jit
def first_pass_lanes_state(KIND: tl.constexpr, m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2, acc3, m_c, u_c, n_c, s_lab):
    """The first-pass state per row (as `first_pass_tile` keeps it: m_x, u_x, m_y, u_y, acc1..3, m_c, u_c,
    s_lab) of a state in lanes: its sums over the lanes."""
    u_x, u_y, acc1, acc2, acc3 = first_pass_lanes_sum(KIND, u_x, n_x, u_y, n_y, acc1, acc2, acc3)
    return m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, lanes_excess(u_c, n_c), s_lab


@triton.jit
def first_pass_results(KIND: tl.constexpr, HARD: tl.constexpr, m_x, u_x, m_y, u_y, acc1, acc2, acc3, m_c, u_c,
                       s_lab, labels, V, c1, c2, soft, hard):
    """(ls_x, ls_y, r, aux1..3, L, ls_c, ce, loss) of each row from its complete first-pass state (ce: the
    hard-label cross-entropy, 0 without HARD). For the two-pass kinds L is 0 here and `loss` holds only the
    hard-label part. HARD with hard = 0 (the cross-entropy only reported, `return_parts`) adds nothing to the
    loss, not even the NaN of 0·∞ from a label at a −inf logit."""
    ls_x, ls_y, r, L, aux1, aux2, aux3 = first_pass_finish(KIND, m_x, u_x, m_y, u_y, acc1, acc2, acc3, c1, c2)
    loss = soft * L
    ls_c = tl.zeros_like(ls_x)
    ce = tl.zeros_like(ls_x)
    if HARD:
        ls_c, ce = hard_label_finish(m_c, u_c, s_lab, labels, V)
        loss += tl.where(hard != 0.0, hard * ce, 0.0)
    return ls_x, ls_y, r, aux1, aux2, aux3, L, ls_c, ce, loss


@triton.jit
def second_pass_tile(KIND: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, s, t, inv_temp, cap_s,
                     cap_t, share, m_x, ls_x, m_y, ls_y, r, c1, c2):
    """The second-pass terms (t1, t2, t3) [rows, block] of one pair of raw tiles (summed over the vocabulary)."""
    s, _, t = transformed_tiles(TRANSFORM, s, t, cap_s, cap_t, share)
    x, y = scaled_pq(STUDENT_IS_P, s, t, inv_temp)
    lp, lq, lpq = log_probs(x, y, m_x, ls_x, m_y, ls_y, r)
    return second_pass_terms(KIND, lp, lq, lpq, c1, c2)


@triton.jit
def given_pass_tile(STUDENT_IS_P: tl.constexpr, s, t, inv_temp, m_x, ls_x, m_y, ls_y, r, c1):
    """`jsd_given_terms` [rows, block] of one pair of raw, untransformed tiles, from given statistics."""
    x, y = scaled_pq(STUDENT_IS_P, s, t, inv_temp)
    lp, lq, lpq = log_probs(x, y, m_x, ls_x, m_y, ls_y, r)
    return jsd_given_terms(lp, lq, lpq, c1)


@triton.jit
def second_pass_results(KIND: tl.constexpr, y1, y2, y3, c1, c2):
    """(aux1..3, L) of each row from its summed second-pass terms."""
    L, aux1, aux2, aux3 = second_pass_finish(KIND, y1, y2, y3, c1, c2)
    return aux1, aux2, aux3, L


@triton.jit
def gradient_tile(KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, s, t,
                  cols, labels, inv_temp, cap_s, cap_t, share, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c,
                  c1, c2, soft, hard):
    """(∂ℓ/∂s, ∂ℓ/∂t) on raw logit tiles: soft/T · ∂D/∂(logits/T), + hard · ∂CE/∂s (student), on the
    transformed tiles, then back through the transform (`transforms.raw_gradients`)."""
    g_s, g_t, _, _, _, _ = gradient_and_log_probs(KIND, HARD, STUDENT_IS_P, TRANSFORM, s, t, cols, labels, inv_temp,
                                                  cap_s, cap_t, share, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L,
                                                  m_c, ls_c, c1, c2, soft, hard)
    return g_s, g_t


@triton.jit
def gradient_and_log_probs(KIND: tl.constexpr, HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr,
                           s, t, cols, labels, inv_temp, cap_s, cap_t, share, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3,
                           L, m_c, ls_c, c1, c2, soft, hard):
    """(`gradient_tile`'s two gradients, the tile's log-probabilities lp, lq and lpq = lp − lq (`log_probs`), the
    transformed student tile)."""
    s, t, target = transformed_tiles(TRANSFORM, s, t, cap_s, cap_t, share)
    x, y = scaled_pq(STUDENT_IS_P, s, target, inv_temp)
    lp, lq, lpq = log_probs(x, y, m_x, ls_x, m_y, ls_y, r)
    g_x, g_y = gradient_terms(KIND, lp, lq, lpq, L, aux1, aux2, aux3, c1, c2)
    g_s, g_t = as_pq(STUDENT_IS_P, g_x * (soft * inv_temp), g_y * (soft * inv_temp))
    if HARD:
        g_s += hard * hard_label_gradient(s, m_c, ls_c, cols, labels)
    g_s, g_t = raw_gradients(TRANSFORM, s, t, g_s, g_t, cap_s, cap_t, share)
    return g_s, g_t, lp, lq, lpq, s


@triton.jit
def one_read_tile(HARD: tl.constexpr, STUDENT_IS_P: tl.constexpr, TRANSFORM: tl.constexpr, s, t, v0, cols, labels,
                  inv_temp, cap_s, cap_t, share, m_x, ls_x, m_y, ls_y, r, m_c, ls_c, c1, c2, soft, hard, p_sum, acc1,
                  acc2, acc3, s_lab):
    """`gradient_tile` of KL, and the tile's KL sums folded into lanes [rows, block] from the same log-probabilities:
    Σ P, and `kl_terms`' Σ P·d, Σ P·φ(d), Σ (Q̂ − P) of P = e^lp, Q = e^lq, d = lpq (and s_label, HARD).

    P and Q are normalized by the given statistics only to their precision, but the sums are those of the first
    pass with P in place of e^dx: the loss from them (`one_read_results`) is KL(P / ΣP ‖ Q̂ / ΣQ̂) with Q̂ = P·e^−d,
    exactly — an error in the statistics' log-sums or in r scales P or Q̂ by a constant, which the normalization
    divides out. What remains is the rounding of d per element, as in the first pass."""
    # (L and aux1..3 are read by the gradient of P's side only, which a one-read call does not ask for)
    g_s, g_t, lp, lq, lpq, s = gradient_and_log_probs(KL, HARD, STUDENT_IS_P, TRANSFORM, s, t, cols, labels, inv_temp,
                                                      cap_s, cap_t, share, m_x, ls_x, m_y, ls_y, r, ls_x, ls_x, ls_x,
                                                      ls_x, m_c, ls_c, c1, c2, soft, hard)
    p = tl.exp(lp)  # the gradient's own (`gradient_terms`)
    a1, a3, a2 = kl_terms(p, tl.exp(lq), lpq)
    if HARD:
        s_lab = label_logit_update(s, v0, cols, labels, s_lab)
    return g_s, g_t, p_sum + p, acc1 + a1, acc2 + a2, acc3 + a3, s_lab


@triton.jit
def one_read_results(HARD: tl.constexpr, p_sum, acc1, acc2, acc3, m_c, ls_c, s_lab, labels, V, c1, c2, soft, hard):
    """The rows' losses soft·KL + hard·CE from `one_read_tile`'s lanes: KL by `first_pass_finish` from sums whose
    maxima are the normalizers (Σ e^dx = ΣP, Σ e^dy = ΣP + Σ (Q̂ − P)); CE from the given (m_c, ls_c)."""
    s_x = tl.sum(p_sum, axis=1)
    acc2 = tl.sum(acc2, axis=1)
    zero = tl.zeros_like(s_x)
    L = first_pass_finish(KL, zero, s_x - 1.0, zero, (s_x - 1.0) + acc2, tl.sum(acc1, axis=1), acc2,
                          tl.sum(acc3, axis=1), c1, c2)[3]
    return soft * L + hard_label_part(HARD, m_c, ls_c, s_lab, labels, V, hard)


@triton.jit
def hard_label_part(HARD: tl.constexpr, m_c, ls_c, s_lab, labels, V, hard):
    """hard·CE of each row from the student's (m_c, ls_c) at T = 1 and its label's logit s_lab; 0 without HARD,
    and 0 at hard = 0 (the cross-entropy only reported), not the NaN of 0·∞ from a label at a −inf logit."""
    part = tl.zeros_like(m_c)
    if HARD:
        part = tl.where(hard != 0.0, hard * hard_label_loss(m_c, ls_c, s_lab, labels, V), 0.0)
    return part


@triton.jit
def scale_rows(g, scale, live):
    """g · scale per row, and exact zeros in rows that are not live (ignored, or past the end)."""
    return tl.where(live[:, None], g * scale[:, None], 0.0)


@triton.jit
def load_stats(stats_ptr, rows):
    """The NUM_STATS saved statistics of `rows` (see the module docstring for their order)."""
    p = stats_ptr + rows.to(tl.int64) * NUM_STATS
    return (tl.load(p + 0), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3), tl.load(p + 4), tl.load(p + 5),
            tl.load(p + 6), tl.load(p + 7), tl.load(p + 8), tl.load(p + 9), tl.load(p + 10))


@triton.jit
def store_stats(stats_ptr, rows, row_ok, m_x, ls_x, m_y, ls_y, r, aux1, aux2, aux3, L, m_c, ls_c):
    p = stats_ptr + rows.to(tl.int64) * NUM_STATS
    tl.store(p + 0, m_x, mask=row_ok)
    tl.store(p + 1, ls_x, mask=row_ok)
    tl.store(p + 2, m_y, mask=row_ok)
    tl.store(p + 3, ls_y, mask=row_ok)
    tl.store(p + 4, r, mask=row_ok)
    tl.store(p + 5, aux1, mask=row_ok)
    tl.store(p + 6, aux2, mask=row_ok)
    tl.store(p + 7, aux3, mask=row_ok)
    tl.store(p + 8, L, mask=row_ok)
    tl.store(p + 9, m_c, mask=row_ok)
    tl.store(p + 10, ls_c, mask=row_ok)
