"""The divergence math, written once in Triton, for every kernel that needs it.

Every divergence is computed in a *canonical* form D(P ‖ Q) between two distributions over the
vocabulary, P = softmax(x) and Q = softmax(y), where x and y are already temperature-scaled logits in
the accumulation dtype. kdops maps teacher and student onto (P, Q) on the host: forward KL is KL(P ‖ Q)
with P = teacher, reverse KL the same kind with P = student, and likewise for the two skew KLs.

    KIND        D(P ‖ Q)                                         c1, c2
    KL          Σ p (log p − log q)                                -
    JSD         c1·KL(P ‖ M) + (1 − c1)·KL(Q ‖ M), M = c1·P + (1 − c1)·Q     β, -
    SKEW        KL(P ‖ M),  M = c1·P + (1 − c1)·Q                  α, -
    TVD         ½ Σ |p − q|                                        -
    ALPHA_BETA  −1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β))      α, β

KL and ALPHA_BETA need one pass over the vocabulary (online sums rescaled as the running maxima grow);
the others need the log-normalizers X = lse(x), Y = lse(y) first and then one more pass (MATH.md).

All functions work on 2-D tiles [rows, vocab] with per-row vectors [rows], so that the kernels on
existing logits and the fused lm_head kernels share them. Per-row results of a row are

    m_x, ls_x  running max and log-sum of exp(x − m_x): log-normalizer X = m_x + ls_x (and so for y)
    L          the loss of the row
    aux1..3    the per-row scalars the gradient needs (see `gradient_terms`)
"""

import triton
import triton.language as tl

KL = tl.constexpr(0)
JSD = tl.constexpr(1)
SKEW = tl.constexpr(2)
TVD = tl.constexpr(3)
ALPHA_BETA = tl.constexpr(4)

# Kinds whose loss needs normalized probabilities inside a nonlinearity: a second pass.
TWO_PASS_KINDS = (1, 2, 3)

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def finite_or_zero(m):
    """A running max that is -inf (nothing seen yet) becomes 0, so exp(v - m) never sees -inf - -inf."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def log_mix(lp, lq, w):
    """log(w·p + (1 − w)·q) from log-probabilities, as a log-add-exp (w = 0 or p = q = 0 are fine)."""
    w = tl.cast(w, lp.dtype)
    u = lp + tl.log(w)
    v = lq + tl.log(1.0 - w)
    m = finite_or_zero(tl.maximum(u, v))
    return m + tl.log(tl.exp(u - m) + tl.exp(v - m))


@triton.jit
def sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


# ----------------------------------------------------------------------------------------------------
# First pass: online log-sum-exps of x and y, plus the one-pass divergences' weighted sums.
#
# Sums are kept relative to the running maxima (m_x, m_y). KL keeps acc1 = Σ e^(x − m_x)·(x − y), so
# that Σ p (log p − log q) = acc1 / s_x − X + Y. ALPHA_BETA keeps the three power sums relative to the
# bounds α·m_x + β·m_y, (α+β)·m_x and (α+β)·m_y of their exponents; that shares the two maxima instead
# of keeping three more log-sum-exps, and what it can lose to underflow is below float resolution of the
# loss.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def first_pass_rescale(KIND: tl.constexpr, m_x, m_y, new_x, new_y, s_x, s_y, acc1, acc2, acc3, c1, c2):
    """Re-express sums taken relative to maxima (m_x, m_y) relative to new, finite (new_x, new_y)."""
    s_x = s_x * tl.exp(m_x - new_x)
    s_y = s_y * tl.exp(m_y - new_y)
    if KIND == KL:
        acc1 = acc1 * tl.exp(m_x - new_x)
    elif KIND == ALPHA_BETA:
        acc1 = acc1 * tl.exp(c1 * (m_x - new_x) + c2 * (m_y - new_y))
        acc2 = acc2 * tl.exp((c1 + c2) * (m_x - new_x))
        acc3 = acc3 * tl.exp((c1 + c2) * (m_y - new_y))
    return s_x, s_y, acc1, acc2, acc3


@triton.jit
def first_pass_update(KIND: tl.constexpr, x, y, m_x, s_x, m_y, s_y, acc1, acc2, acc3, c1, c2):
    """Fold one tile (x, y) [rows, block] into the running first-pass statistics of its rows."""
    m_x_new = tl.maximum(m_x, tl.max(x, axis=1))
    m_y_new = tl.maximum(m_y, tl.max(y, axis=1))
    ref_x = finite_or_zero(m_x_new)
    ref_y = finite_or_zero(m_y_new)
    s_x, s_y, acc1, acc2, acc3 = first_pass_rescale(KIND, m_x, m_y, ref_x, ref_y, s_x, s_y, acc1, acc2,
                                                    acc3, c1, c2)
    dx = x - ref_x[:, None]
    dy = y - ref_y[:, None]
    e_x = tl.exp(dx)
    s_x += tl.sum(e_x, axis=1)
    s_y += tl.sum(tl.exp(dy), axis=1)
    if KIND == KL:
        # x − y is nan or ±inf only where a logit is -inf; p = 0 there contributes 0 (xlogy).
        acc1 += tl.sum(tl.where(e_x > 0, e_x * (x - y), 0.0), axis=1)
    elif KIND == ALPHA_BETA:
        acc1 += tl.sum(tl.exp(c1 * dx + c2 * dy), axis=1)
        acc2 += tl.sum(tl.exp((c1 + c2) * dx), axis=1)
        acc3 += tl.sum(tl.exp((c1 + c2) * dy), axis=1)
    return m_x_new, s_x, m_y_new, s_y, acc1, acc2, acc3


@triton.jit
def first_pass_merge(KIND: tl.constexpr, m_x, s_x, m_y, s_y, acc1, acc2, acc3, n_x, t_x, n_y, t_y, bcc1, bcc2,
                     bcc3, c1, c2):
    """Merge the first-pass statistics of two disjoint vocabulary ranges of the same rows."""
    m_x_new = tl.maximum(m_x, n_x)
    m_y_new = tl.maximum(m_y, n_y)
    ref_x = finite_or_zero(m_x_new)
    ref_y = finite_or_zero(m_y_new)
    s_x, s_y, acc1, acc2, acc3 = first_pass_rescale(KIND, m_x, m_y, ref_x, ref_y, s_x, s_y, acc1, acc2,
                                                    acc3, c1, c2)
    t_x, t_y, bcc1, bcc2, bcc3 = first_pass_rescale(KIND, n_x, n_y, ref_x, ref_y, t_x, t_y, bcc1, bcc2,
                                                    bcc3, c1, c2)
    return m_x_new, s_x + t_x, m_y_new, s_y + t_y, acc1 + bcc1, acc2 + bcc2, acc3 + bcc3


@triton.jit
def first_pass_finish(KIND: tl.constexpr, m_x, s_x, m_y, s_y, acc1, acc2, acc3, c1, c2):
    """(log s_x, log s_y, L, aux1, aux2, aux3) of each row; L and aux only for the one-pass kinds.

    X = m_x + log s_x is kept in two parts: log p = (x − m_x) − log s_x rounds like log_softmax does,
    where x − X with X rounded to float32 would lose the low bits of large logits.
    """
    ls_x = tl.log(s_x)
    ls_y = tl.log(s_y)
    L = tl.zeros_like(ls_x)
    aux1 = tl.zeros_like(ls_x)
    aux2 = tl.zeros_like(ls_x)
    aux3 = tl.zeros_like(ls_x)
    if KIND == KL:
        L = acc1 / s_x - (m_x - m_y) - (ls_x - ls_y)
    elif KIND == ALPHA_BETA:
        # aux1 = Σ p^α q^β, aux2 = Σ p^(α+β), aux3 = Σ q^(α+β)
        aux1 = acc1 * tl.exp(-c1 * ls_x - c2 * ls_y)
        aux2 = acc2 * tl.exp(-(c1 + c2) * ls_x)
        aux3 = acc3 * tl.exp(-(c1 + c2) * ls_y)
        L = -(aux1 - c1 / (c1 + c2) * aux2 - c2 / (c1 + c2) * aux3) / (c1 * c2)
    return ls_x, ls_y, L, aux1, aux2, aux3


@triton.jit
def log_probs(x, m, ls):
    """log-softmax of a tile from its rows' running max m and log-sum ls."""
    return (x - m[:, None]) - ls[:, None]


# ----------------------------------------------------------------------------------------------------
# Second pass (JSD, SKEW, TVD): elementwise terms of log-probabilities lp, lq (`log_probs`), which the
# caller sums over the vocabulary (plain sums: every term is already normalized).
# ----------------------------------------------------------------------------------------------------


@triton.jit
def second_pass_terms(KIND: tl.constexpr, lp, lq, c1, c2):
    p = tl.exp(lp)
    q = tl.exp(lq)
    t1 = tl.zeros_like(lp)
    t2 = tl.zeros_like(lp)
    t3 = tl.zeros_like(lp)
    if KIND == JSD:
        lm = log_mix(lp, lq, c1)
        t1 = tl.where(p > 0, p * (lp - lm), 0.0)  # KL(P ‖ M)
        t2 = tl.where(q > 0, q * (lq - lm), 0.0)  # KL(Q ‖ M)
    elif KIND == SKEW:
        lm = log_mix(lp, lq, c1)
        t1 = tl.where(p > 0, p * (lp - lm), 0.0)  # KL(P ‖ M)
        t2 = tl.where(p > 0, tl.exp(lq + lp - lm), 0.0)  # S = Σ q p / M
        t3 = tl.where(p > 0, tl.exp(2.0 * lp - lm), 0.0)  # R = Σ p² / M
    elif KIND == TVD:
        s = sign(q - p)
        t1 = tl.abs(p - q)
        t2 = q * s  # σ_q = Σ q sgn(q − p)
        t3 = -p * s  # σ_p = Σ p sgn(p − q)
    return t1, t2, t3


@triton.jit
def second_pass_finish(KIND: tl.constexpr, y1, y2, y3, c1, c2):
    """(L, aux1, aux2, aux3) of each row from the summed second-pass terms."""
    L = y1
    if KIND == JSD:
        L = c1 * y1 + (1.0 - c1) * y2
    elif KIND == TVD:
        L = 0.5 * y1
    return L, y1, y2, y3


# ----------------------------------------------------------------------------------------------------
# Gradients. With G_v = ∂ℓ/∂log q_v, ∂ℓ/∂y_j = G_j − q_j Σ_v G_v (MATH.md), and likewise for x with p.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def gradient_terms(KIND: tl.constexpr, lp, lq, L, aux1, aux2, aux3, c1, c2):
    """(∂ℓ/∂x, ∂ℓ/∂y) on a tile of log-probabilities, given its rows' L and aux [rows]."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    L = L[:, None]
    aux1 = aux1[:, None]
    aux2 = aux2[:, None]
    aux3 = aux3[:, None]
    g_x = tl.zeros_like(lp)
    g_y = tl.zeros_like(lp)
    if KIND == KL:
        g_x = tl.where(p > 0, p * (lp - lq - L), 0.0)
        g_y = q - p
    elif KIND == JSD:
        # aux1 = KL(P ‖ M), aux2 = KL(Q ‖ M)
        lm = log_mix(lp, lq, c1)
        g_x = tl.where(p > 0, c1 * p * (lp - lm - aux1), 0.0)
        g_y = tl.where(q > 0, (1.0 - c1) * q * (lq - lm - aux2), 0.0)
    elif KIND == SKEW:
        # aux2 = S = Σ q p / M, aux3 = R = Σ p² / M
        lm = log_mix(lp, lq, c1)
        g_x = tl.where(p > 0, p * (lp - lm - L) - c1 * (tl.exp(2.0 * lp - lm) - p * aux3), 0.0)
        g_y = (1.0 - c1) * (q * aux2 - tl.where(p > 0, tl.exp(lq + lp - lm), 0.0))
    elif KIND == TVD:
        # aux2 = σ_q, aux3 = σ_p
        s = sign(q - p)
        g_x = 0.5 * p * (-s - aux3)
        g_y = 0.5 * q * (s - aux2)
    elif KIND == ALPHA_BETA:
        # aux1 = Σ p^α q^β, aux2 = Σ p^(α+β), aux3 = Σ q^(α+β)
        cross = tl.exp(c1 * lp + c2 * lq)
        g_x = (tl.exp((c1 + c2) * lp) - cross - p * (aux2 - aux1)) / c2
        g_y = (tl.exp((c1 + c2) * lq) - cross - q * (aux3 - aux1)) / c1
    return g_x, g_y
