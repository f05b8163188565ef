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
    r          ls_y − ls_x, to the precision of its own size (see "Near-identical distributions")
    L          the loss of the row
    aux1..3    the per-row scalars the gradient needs (see `gradient_terms`)

Near-identical distributions. A student close to its teacher has log p − log q of order ε everywhere that
matters while the logits are of order 30, and the divergence is of order ε². Written as
Σ p (x − y) − (X − Y), the loss subtracts numbers of the logits' size and keeps float32's resolution at 30
(~1e-6) as an absolute error: 1e-3 of a row's KL at ε ~ 0.03. So nothing here subtracts large numbers:

* logits are centred on their own running maxima, dx = x − m_x, dy = y − m_y, and log p − log q is
  (dx − dy) + r, with r = ls_y − ls_x = log1p(Σ (e^dy − e^dx) / Σ e^dx) from the sum of the per-element
  differences e^dy − e^dx, each computed without cancellation (`exp_diff`);
* KL is Σ p φ(dx − dy) − ψ(s): φ(d) = e^−d − 1 + d and ψ(s) = s − log1p(s) are non-negative and of order ε²
  (series where small: `exp_tail`, `log1p_excess`), s = Σ (e^dy − e^dx) / Σ e^dx;
* the KL parts of JSD and the skews take log p − log m = −log1p(m/p − 1) per element; JSD sums them as
  Σ p ψ(m/p − 1) ≥ 0, whose first-order terms cancel (`kl_to_mix`).
"""

import math
import os

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

# Whether the kernels run in Triton's interpreter (whose casts to bfloat16 truncate: `logits.as_output`; which
# has no inline PTX: `exp_flushed`); the compile gate refuses to run under it, so every compiled kernel has False.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


# The kernels' float arguments (a temperature's inverse, β or α, the loss weights, softcaps) are declared FLOAT,
# float64 — unannotated, Triton would pass a Python float as float32 and round it before a float64 kernel sees
# it — and taken into the accumulation dtype on entry (`in_acc`: float32 kernels then compute as before).
FLOAT = tl.float64


@triton.jit
def in_acc(x, ACC: tl.constexpr):
    """A FLOAT kernel argument in the accumulation dtype. The interpreter hands the Python float itself, which
    meets tensors weakly typed (it takes their dtype, unrounded in float64): kept as it is there."""
    if not INTERPRETED:  # static
        x = x.to(ACC)
    return x


# Subnormal float32 results (below 1.2e-38) cost the GPU's exponential (`tl.exp`: ex2.approx) three more
# instructions (a range test, a scaling before the MUFU and one after). Where no result can depend on them,
# `exp_flushed` leaves them out (`ex2.approx.ftz`, the same approximation with subnormal results read as 0);
# float64 and the interpreter take `tl.exp`.


@triton.jit
def exp_flushed(x):
    """e^x, with results below float32's smallest normal number (x < −87.3) flushed to 0. For terms that are
    summed with, or added to, a term of at least 1 (a sum's term at its max, the 1 of log(1 + e) or of
    e^z − 1): 1.2e-38 is 31 orders of magnitude below its resolution there, so nothing changes."""
    if x.dtype == tl.float32 and not INTERPRETED:  # static
        result = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                           dtype=tl.float32, is_pure=True, pack=1)
    elif x.dtype == tl.float32:  # static: the interpreter flushes as the GPU does (callers may rely on it)
        result = tl.where(x * 1.4426950408889634 < -126.0, 0.0, tl.exp(x))
    else:
        result = tl.exp(x)
    return result


@triton.jit
def log_approx(x):
    """log x by the GPU's log2 (`lg2.approx.ftz`: one MUFU operation and a multiply, where libdevice's logf,
    `tl.log`, takes about twenty instructions): within 2^-22 of log2 x absolute for x in [½, 2] and 2 ulps
    elsewhere (CUDA's __log2f), normal x > 0. For logarithms away from 0, where that is a few ulps of the result;
    float64 and the interpreter take `tl.log`."""
    if x.dtype == tl.float32 and not INTERPRETED:  # static
        result = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                           is_pure=True, pack=1) * 0.6931471805599453
    else:
        result = tl.log(x)
    return result


@triton.jit
def div_approx(a, b):
    """a / b as a·(1/b) with the GPU's reciprocal (`rcp.approx.ftz`: 1 ulp; one MUFU operation and a multiply,
    where `/`, div.full.f32, adds range tests and scalings for |b| > 2^126 and is good to 2 ulps), for b a
    normal number of moderate size; float64 and the interpreter divide."""
    if a.dtype == tl.float32 and not INTERPRETED:  # static
        result = a * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [b], dtype=tl.float32,
                                               is_pure=True, pack=1)
    else:
        result = a / b
    return result


@triton.jit
def finite_or_zero(m):
    """A running max that is -inf (nothing seen yet) becomes 0, so exp(v - m) never sees -inf - -inf."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def log_mix(lp, lq, w):
    """log(w·p + (1 − w)·q) from log-probabilities, as a log-add-exp: with u = log(w·p), v = log((1 − w)·q),
    max(u, v) + log(1 + e^−|u − v|) (the larger term's exponential is exactly 1: one exponential; w = 0 or
    p = q = 0 are fine)."""
    w = tl.zeros([], lp.dtype) + w  # in the tiles' dtype (a cast of the interpreter's Python float rounds it)
    u = lp + tl.log(w)
    v = lq + tl.log(1.0 - w)
    larger = tl.maximum(u, v)
    mix = larger + log1p_unit(exp_flushed(tl.minimum(u, v) - larger))
    return tl.where(larger == NEG_INF, NEG_INF, mix)


@triton.jit
def sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


# ----------------------------------------------------------------------------------------------------
# Online log-sum-exp, kept as an *excess*.
#
# A row's sum Σ e^(v − m) relative to its running max m is at least 1: every entry at the max adds exactly
# 1. Summed as is, the row's small terms are rounded against that 1 (an absolute error of ulp(1) per
# addition, on any summation order), which a peaked row — a real teacher's — turns into a relative error of
# its log-normalizer, and α-β or TVD gradients into cancellations. So the state is the excess
#
#     u = Σ e^(v − m) − 1      (−1: nothing seen yet;  log-sum = log1p(u))
#
# to which entries at the max add exact counts and the others their (small) terms; rescaling happens only
# when the max grows, and then the whole old sum becomes one of the small terms. Power sums Σ e^(c(v − m))
# (ALPHA_BETA) have the same 1 at the max and are kept the same way.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def flag(cond):
    return tl.where(cond, 1.0, 0.0)


@triton.jit
def log1p(u):
    """log(1 + u), u ≥ −1, to the precision of u itself where u is small (the log-sum of a peaked row).

    In float32, for −½ ≤ u ≤ 1, the series log(1 + u) = 2·atanh(z) = 2(z + z³/3 + … + z¹⁵/15) with
    z = u / (2 + u), |z| ≤ ⅓ (the first term left out is below 2e-9 relative): it needs no accurate
    hardware log near 1. Elsewhere, and in float64 (whose reference rounds its log-sum the same way), the
    plain log(1 + u).
    """
    result = tl.log(1.0 + u)
    if u.dtype != tl.float64:  # static: one branch is compiled
        result = tl.where((u >= -0.5) & (u <= 1.0), log1p_series(u), result)
    return result


@triton.jit
def log1p_unit(e):
    """log(1 + e) for 0 ≤ e ≤ 1: the series of `log1p_series` in float32 (no logarithm: libdevice's logf costs
    about twenty instructions more), the plain log in float64."""
    if e.dtype == tl.float64:  # static
        result = tl.log(1.0 + e)
    else:
        result = log1p_series(e)
    return result


@triton.jit
def log1p_series(u):
    """log(1 + u) = 2·atanh(z) = 2z(1 + z²·`atanh_tail`(z)), z = u / (2 + u): float32's `log1p` for −½ ≤ u ≤ 1."""
    z = div_approx(u, 2.0 + u)
    return 2.0 * z * (1.0 + z * z * atanh_tail(z))


@triton.jit
def atanh_tail(z):
    """(atanh(z) − z) / z³ = 1/3 + z²/5 + … + z¹²/15, by Horner's rule (|z| ≤ ⅓: the first term left out,
    z¹⁴/17, is below 2e-9 relative to the whole)."""
    z2 = z * z
    odd = 1.0 / 13.0 + z2 / 15.0
    odd = 1.0 / 11.0 + z2 * odd
    odd = 1.0 / 9.0 + z2 * odd
    odd = 1.0 / 7.0 + z2 * odd
    odd = 1.0 / 5.0 + z2 * odd
    return 1.0 / 3.0 + z2 * odd


@triton.jit
def epsilon(v):
    """The machine epsilon of v's dtype (float32 or float64)."""
    eps = 1.1920928955078125e-07
    if v.dtype == tl.float64:  # static
        eps = 2.220446049250313e-16
    return eps


@triton.jit
def series_bound(z):
    """|z| below which the series below are used: exact to the dtype's precision there (float32: ½;
    float64: ⅛), and beyond it the plain formulas lose at most a few bits."""
    bound = 0.5
    if z.dtype == tl.float64:  # static
        bound = 0.125
    return bound


@triton.constexpr_function
def inverse_factorial(k):
    """1/k!, a compile-time constant (taken into a tile's dtype by `tl.full`, so float64 keeps all its bits)."""
    return 1.0 / math.factorial(k)


@triton.jit
def horner_exp_tail(z, K: tl.constexpr, TERMS: tl.constexpr):
    """Σ_{K ≤ k < K + TERMS} z^k / k! = z^K · (1/K! + z·(1/(K+1)! + …)), by Horner's rule: one fused multiply-add
    per term."""
    t = tl.full(z.shape, inverse_factorial(K + TERMS - 1), z.dtype)
    for i in tl.static_range(2, TERMS + 1):
        t = t * z + tl.full(z.shape, inverse_factorial(K + TERMS - i), z.dtype)
    t = t * z
    if K == 2:
        t = t * z
    return t


@triton.jit
def exp_tail(z, K: tl.constexpr):
    """Σ_{k ≥ K} z^k / k! for K ∈ {1, 2} and small |z| (`series_bound`): e^z − 1 (K = 1) and e^z − 1 − z
    (K = 2) without their cancellations. Terms kept: 9 in float32 (|z| ≤ ½: the first left out is below
    1e-8 relative), 12 in float64 (|z| ≤ ⅛: below 1e-17)."""
    if z.dtype == tl.float64:  # static
        t = horner_exp_tail(z, K, 12)
    else:
        t = horner_exp_tail(z, K, 9)
    return t


@triton.jit
def expm1(z):
    """e^z − 1 to the precision of the result."""
    return tl.where(tl.abs(z) <= series_bound(z), exp_tail(z, 1), exp_flushed(z) - 1.0)


@triton.jit
def expm1_pair(z, e_up, e_down):
    """(e^z − 1, e^−z − 1), each to the precision of the result, given e_up = e^z and e_down = e^−z. Where |z| is
    small (`series_bound`) both come from one pair of series, sinh z and cosh z − 1 in z² (float32: to z⁹ and
    z⁸, the first terms left out below 3e-9 relative at |z| = ½; float64: `exp_tail` twice):
    e^±z − 1 = (cosh z − 1) ± sinh z, which cancels at most a quarter of the larger term. Elsewhere
    e_up − 1 and e_down − 1."""
    if z.dtype == tl.float64:  # static
        up, down = exp_tail(z, 1), exp_tail(-z, 1)
    else:
        zz = z * z
        odd = z + z * zz * (1.0 / 6.0 + zz * (1.0 / 120.0 + zz * (1.0 / 5040.0 + zz * (1.0 / 362880.0))))
        even = zz * (0.5 + zz * (1.0 / 24.0 + zz * (1.0 / 720.0 + zz * (1.0 / 40320.0))))
        up, down = even + odd, even - odd
    near = tl.abs(z) <= series_bound(z)
    return tl.where(near, up, e_up - 1.0), tl.where(near, down, e_down - 1.0)


@triton.jit
def log1p_excess(s):
    """ψ(s) = s − log1p(s) ≥ 0 (s > −1), to the precision of the result. For small s, from the series of
    `log1p` in z = s / (2 + s): s − 2z = s·z exactly, so ψ(s) = s·z − 2z³(1/3 + z²/5 + … + z^12/15)."""
    # float64: the series is exact to its precision for |s| ≤ 1/100 only (z^16 / 17 left out)
    bound = 0.5
    if s.dtype == tl.float64:  # static
        bound = 0.01
    return tl.where(tl.abs(s) <= bound, log1p_excess_series(s), s - log1p(s))


@triton.jit
def log1p_excess_series(s):
    """ψ(s) by its series in z = s / (2 + s): float32's `log1p_excess` for |s| ≤ ½."""
    z = div_approx(s, 2.0 + s)
    return s * z - 2.0 * z * z * z * atanh_tail(z)


@triton.jit
def log1p_and_excess_small(w):
    """(log1p(w), ψ(w)) where |w| ≤ ½ (elsewhere anything): in float32 the series alone, which is what `log1p`
    and `log1p_excess` take there — no logarithm."""
    if w.dtype == tl.float64:  # static
        result = log1p(w), log1p_excess(w)
    else:
        result = log1p_series(w), log1p_excess_series(w)
    return result


@triton.jit
def exp_diff(ea, eb, a_minus_b):
    """e^a − e^b from ea = e^a, eb = e^b and a − b, to the precision of the difference itself: eb·expm1(a − b)
    by its series where a ≈ b; elsewhere ea − eb, which then cancels at most a few bits (|a − b| > ½ makes
    |ea − eb| > 0.39·max(ea, eb)). Two −inf give 0."""
    return tl.where(tl.abs(a_minus_b) <= series_bound(a_minus_b), eb * exp_tail(a_minus_b, 1), ea - eb)


@triton.jit
def kl_terms(e_x, e_y, d):
    """(e^dx·d, e^dx·φ(d), e^dy − e^dx) for d = dx − dy, e_x = e^dx, e_y = e^dy, φ(d) = e^−d − 1 + d: the
    addends of KL's three sums (`first_pass_update`), from one series where d is small (e^−d − 1 = φ(d) − d
    there). Where e^dx = 0 (p = 0) e^dx·d is 0 (xlogy) and e^dx·φ(d) = e^dy; where e^dy = 0 < e^dx (q = 0,
    p > 0) both are +inf."""
    small = tl.abs(d) <= series_bound(d)
    tail = exp_tail(-d, 2)  # φ(d), where small
    diff = tl.where(small, e_x * (tail - d), e_y - e_x)
    xlogy = tl.where(e_x > 0, e_x * d, 0.0)
    return xlogy, tl.where(small, e_x * tail, xlogy + diff), diff


@triton.jit
def centred_sums_at(KIND: tl.constexpr, acc1, acc2, acc3, s_x, shift_x, shift_y):
    """The sums of `first_pass_update` over elements seen so far (s_x = Σ e^dx of them, 0 if none),
    re-expressed relative to maxima larger by −shift_x, −shift_y (shift ≤ 0, −inf from an empty max).

    Every old dx moves by shift_x and dx − dy by δ = shift_x − shift_y, so (with f = e^shift)
    Σ e^dx·d → f_x (A + δ·s_x),  Σ (e^dy − e^dx) → f_y·acc2 + (f_y − f_x)·s_x, and
    Σ e^dx φ(d) → f_x·acc3 + (f_y − f_x)·acc2 + s_x·f_x φ(δ): the old sum behaves as s_x elements at
    (shift_x, shift_y) plus one cross term (`kl_terms` gives f_x δ, f_x φ(δ), f_y − f_x)."""
    f_x = tl.exp(shift_x)
    f_y = tl.exp(shift_y)
    xlogy, phi, diff = kl_terms(f_x, f_y, shift_x - shift_y)
    seen = s_x > 0
    if KIND == KL:
        acc1 = tl.where(f_x > 0, f_x * acc1, 0.0) + tl.where(seen, s_x * xlogy, 0.0)
        acc3 = tl.where(f_x > 0, f_x * acc3, 0.0) + diff * acc2 + tl.where(seen, s_x * phi, 0.0)
    acc2 = f_y * acc2 + tl.where(seen, s_x * diff, 0.0)
    return acc1, acc2, acc3


@triton.jit
def online_max(m, v):
    """(new running max, its finite reference point, whether it grew, whether the tile holds it) of rows m after
    the tile v."""
    tile_max = tl.max(v, axis=1)
    m_new = tl.maximum(m, tile_max)
    return m_new, finite_or_zero(m_new), m_new > m, tile_max == m_new


@triton.jit
def excess_update(u, grew, factor, e, at_max):
    """Fold a tile's terms e [rows, block] (exactly 1 where at_max) into the excess u [rows]; `factor` =
    e^(c(m_old − m_new)) re-expresses the old sum when the max grew (its 1 then moves to the tile)."""
    held = tl.where(grew, (u + 1.0) * factor, u)
    tile = (tl.sum(flag(at_max), axis=1) - flag(grew)) + tl.sum(tl.where(at_max, 0.0, e), axis=1)
    return held + tile


@triton.jit
def online_lse_update(m, u, v):
    """Fold a tile v [rows, block] into a running log-sum-exp kept as (max m, excess u) [rows]: lse = m + log1p(u)."""
    m_new, ref, grew, _ = online_max(m, v)
    d = v - ref[:, None]
    u = excess_update(u, grew, tl.exp(m - ref), tl.exp(d), d == 0.0)
    return m_new, u


# ----------------------------------------------------------------------------------------------------
# Lanes. A kernel that walks a row's vocabulary in wide tiles may keep its sums per lane — one partial sum per
# column of the tile, [rows, block] — and reduce them over the lanes once, at the end of the row
# (`lanes_excess`, `first_pass_lanes_sum`): a tile then costs elementwise adds instead of one block-wide
# reduction (shuffles and two barriers) per sum. The running maxima stay per row, so every lane's sum is
# relative to the same reference; when a maximum grows the lanes are re-expressed (`any_row`: rarely, after
# a row's first tiles). An excess is kept as small terms u in lanes plus the exact count n [rows] of the terms
# at the max: the row's excess is (n − 1) + Σ u, so no term is ever rounded against a count. Only a tile that
# holds its row's max has terms to count (`lanes_add`, with a block-wide sum); the others add their terms as
# they are. (Counts per lane would cost a thread registers that occupancy needs: bench.loops, bench.compile.)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def any_row(x_rows, y_rows):
    """Whether any row is flagged in x_rows or y_rows [rows]: a scalar, for a branch that the other tiles skip."""
    return tl.max(flag(x_rows | y_rows), axis=0) > 0


@triton.jit
def lanes_rescale(u, n, grew, factor):
    """An excess in lanes (small terms u [rows, block], count n [rows] of the terms at the max) re-expressed at a
    max that grew (rows `grew`): every old term, the counted ones too (into the first lane), becomes a small
    term scaled by `factor` [rows]."""
    return tl.where(grew[:, None], lanes_plain(u, n) * factor[:, None], u), tl.where(grew, 0.0, n)


@triton.jit
def lanes_plain(u, n):
    """Each lane's plain sum of an excess in lanes: its small terms, and the counted ones in the first lane."""
    return u + tl.where((tl.arange(0, u.shape[1]) == 0)[None, :], n[:, None], 0.0)


@triton.jit
def lanes_add(u, n, e, at_max):
    """A tile's terms e into an excess in lanes: counted in n where they sit at the max (exactly 1 there)."""
    return u + tl.where(at_max, 0.0, e), n + tl.sum(flag(at_max), axis=1)


@triton.jit
def lanes_excess(u, n):
    """The excess [rows] of a row's lanes: (n − 1) + Σ u."""
    return (n - 1.0) + tl.sum(u, axis=1)


@triton.jit
def online_lse_update_lanes(m, u, n, v):
    """`online_lse_update` with the excess in lanes (u [rows, block], n [rows])."""
    m_new, ref, grew, holds = online_max(m, v)
    if any_row(grew, grew):
        u, n = lanes_rescale(u, n, grew, tl.exp(m - ref))
    d = v - ref[:, None]
    e = exp_flushed(d)
    if any_row(holds, holds):
        u, n = lanes_add(u, n, e, d == 0.0)
    else:
        u += e
    return m_new, u, n


@triton.jit
def excess_at(u, at_max, factor):
    """A range's excess u as its addend of a sum over ranges, at a max at least its own: u itself where the
    range holds that max, its plain sum (u + 1)·factor elsewhere (factor = e^(c(m − m_max))). Summed over
    the ranges this gives the whole's excess minus k − 1, k the number of ranges that hold the max (so two
    ranges merge as addend + addend + [both hold it])."""
    return tl.where(at_max, u, (u + 1.0) * factor)


# ----------------------------------------------------------------------------------------------------
# First pass: online log-sum-exps of x and y, plus the divergences' centred sums.
#
# u_x, u_y are the excesses of Σ e^dx, Σ e^dy (dx = x − m_x, dy = y − m_y). Every kind but ALPHA_BETA keeps
# acc2 = Σ (e^dy − e^dx), whence r = ls_y − ls_x = log1p(acc2 / Σ e^dx) without cancellation. KL also keeps
# acc1 = Σ e^dx·(dx − dy) and acc3 = Σ e^dx·φ(dx − dy) (see the module docstring). ALPHA_BETA keeps the three
# power sums relative to the bounds α·m_x + β·m_y, (α+β)·m_x and (α+β)·m_y of their exponents (the last two as
# excesses, which share the counts at the maxima with u_x, u_y); that shares the two maxima instead of keeping
# three more log-sum-exps, and what it can lose to underflow is below float resolution of the loss.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def centred_tiles(x, y, m_x, m_y):
    """A tile (x, y) against its rows' running maxima: (new maxima, whether they grew, whether the tile holds
    them, the tile centred on them dx, dy, and the old maxima's shifts shift_x, shift_y ≤ 0 (−inf before the
    first finite logit, when every old sum is 0))."""
    m_x_new, ref_x, grew_x, holds_x = online_max(m_x, x)
    m_y_new, ref_y, grew_y, holds_y = online_max(m_y, y)
    return (m_x_new, m_y_new, grew_x, grew_y, holds_x, holds_y, x - ref_x[:, None], y - ref_y[:, None],
            m_x - ref_x, m_y - ref_y)


@triton.jit
def first_pass_addends(KIND: tl.constexpr, dx, dy, c1, c2):
    """Per element of a centred tile: (e^dx, e^dy, and the addends of acc1..3). ALPHA_BETA: the power sums'
    terms e^(α·dx + β·dy), e^((α+β)·dx), e^((α+β)·dy); the others: `kl_terms` (acc1, acc3 are KL's only)."""
    e_x = exp_flushed(dx)
    e_y = exp_flushed(dy)
    if KIND == ALPHA_BETA:
        a1 = exp_flushed(c1 * dx + c2 * dy)
        a2 = exp_flushed((c1 + c2) * dx)
        a3 = exp_flushed((c1 + c2) * dy)
    else:
        a1, a3, a2 = kl_terms(e_x, e_y, dx - dy)
    return e_x, e_y, a1, a2, a3


@triton.jit
def first_pass_update(KIND: tl.constexpr, x, y, m_x, u_x, m_y, u_y, acc1, acc2, acc3, c1, c2):
    """Fold one tile (x, y) [rows, block] into the running first-pass statistics of its rows."""
    m_x_new, m_y_new, grew_x, grew_y, _, _, dx, dy, shift_x, shift_y = centred_tiles(x, y, m_x, m_y)
    at_x = dx == 0.0
    at_y = dy == 0.0
    e_x, e_y, a1, a2, a3 = first_pass_addends(KIND, dx, dy, c1, c2)
    if KIND == ALPHA_BETA:
        acc1 = acc1 * tl.exp(c1 * shift_x + c2 * shift_y) + tl.sum(a1, axis=1)
        acc2 = excess_update(acc2, grew_x, tl.exp((c1 + c2) * shift_x), a2, at_x)
        acc3 = excess_update(acc3, grew_y, tl.exp((c1 + c2) * shift_y), a3, at_y)
    else:
        acc1, acc2, acc3 = centred_sums_at(KIND, acc1, acc2, acc3, u_x + 1.0, shift_x, shift_y)
        acc2 += tl.sum(a2, axis=1)
        if KIND == KL:
            acc1 += tl.sum(a1, axis=1)
            acc3 += tl.sum(a3, axis=1)
    u_x = excess_update(u_x, grew_x, tl.exp(shift_x), e_x, at_x)
    u_y = excess_update(u_y, grew_y, tl.exp(shift_y), e_y, at_y)
    return m_x_new, u_x, m_y_new, u_y, acc1, acc2, acc3


@triton.jit
def entropy_rescale(h, plain, grew, shift):
    """An entropy sum h = Σ e^d·d [rows, block] (d = v − max, `entropy.py`) re-expressed at a max that grew by
    −shift (rows `grew`; `plain`: the lanes' plain sums Σ e^d at the old max): e^shift·(h + shift·plain); 0 where
    nothing was seen yet (shift = −inf)."""
    factor = tl.exp(shift)[:, None]
    moved = tl.where(factor > 0, factor * (h + shift[:, None] * plain), 0.0)
    return tl.where(grew[:, None], moved, h)


@triton.jit
def entropy_terms(e, d):
    """e^d·d of a centred tile's terms e = e^d: 0 where e is (a −inf logit, or one flushed below float32's range)."""
    return tl.where(e > 0, e * d, 0.0)


@triton.jit
def first_pass_update_lanes(KIND: tl.constexpr, ENTROPY: tl.constexpr, x, y, m_x, u_x, n_x, m_y, u_y, n_y, acc1, acc2,
                            acc3, h_x, h_y, c1, c2):
    """`first_pass_update` with the sums in lanes [rows, block] (the excesses as lanes u and counts n [rows];
    ALPHA_BETA's acc2, acc3 share the counts n_x, n_y of the terms at the maxima); the maxima stay per row. With
    ENTROPY also h_x = Σ e^dx·dx and h_y in lanes (`entropy_terms`, `entropy_rescale`): each side's entropy is
    then ls − h / Σ e^d (`entropy.py`), for one multiply-add per element and side beside the terms e^d already
    made here."""
    m_x_new, m_y_new, grew_x, grew_y, holds_x, holds_y, dx, dy, shift_x, shift_y = centred_tiles(x, y, m_x, m_y)
    if any_row(grew_x, grew_y):
        if ENTROPY:  # before the excesses are re-expressed: their plain sums at the old maxima
            h_x = entropy_rescale(h_x, lanes_plain(u_x, n_x), grew_x, shift_x)
            h_y = entropy_rescale(h_y, lanes_plain(u_y, n_y), grew_y, shift_y)
        # the sums are linear in their old terms: each lane is re-expressed as the whole row's sums are
        if KIND == ALPHA_BETA:
            acc1 = acc1 * tl.exp(c1 * shift_x + c2 * shift_y)[:, None]
            acc2, _ = lanes_rescale(acc2, n_x, grew_x, tl.exp((c1 + c2) * shift_x))
            acc3, _ = lanes_rescale(acc3, n_y, grew_y, tl.exp((c1 + c2) * shift_y))
        else:
            acc1, acc2, acc3 = centred_sums_at(KIND, acc1, acc2, acc3, lanes_plain(u_x, n_x), shift_x[:, None],
                                               shift_y[:, None])
        u_x, n_x = lanes_rescale(u_x, n_x, grew_x, tl.exp(shift_x))
        u_y, n_y = lanes_rescale(u_y, n_y, grew_y, tl.exp(shift_y))
    e_x, e_y, a1, a2, a3 = first_pass_addends(KIND, dx, dy, c1, c2)
    if ENTROPY:
        h_x += entropy_terms(e_x, dx)
        h_y += entropy_terms(e_y, dy)
    if KIND == ALPHA_BETA:
        acc1 += a1
    else:
        acc2 += a2
        if KIND == KL:
            acc1 += a1
            acc3 += a3
    if any_row(holds_x, holds_y):
        # the terms at a max (exactly 1) are counted apart, in the excesses (ALPHA_BETA's power sums too)
        at_x = dx == 0.0
        at_y = dy == 0.0
        u_x, n_x = lanes_add(u_x, n_x, e_x, at_x)
        u_y, n_y = lanes_add(u_y, n_y, e_y, at_y)
        if KIND == ALPHA_BETA:
            acc2 += tl.where(at_x, 0.0, a2)
            acc3 += tl.where(at_y, 0.0, a3)
    else:
        u_x += e_x
        u_y += e_y
        if KIND == ALPHA_BETA:
            acc2 += a2
            acc3 += a3
    return m_x_new, u_x, n_x, m_y_new, u_y, n_y, acc1, acc2, acc3, h_x, h_y


@triton.jit
def first_pass_lanes_sum(KIND: tl.constexpr, u_x, n_x, u_y, n_y, acc1, acc2, acc3):
    """(u_x, u_y, acc1, acc2, acc3) [rows] of `first_pass_update`'s state from its lanes."""
    if KIND == ALPHA_BETA:  # acc2, acc3 are excesses too, with the counts of u_x, u_y
        acc2 = lanes_excess(acc2, n_x)
        acc3 = lanes_excess(acc3, n_y)
    else:
        acc2 = tl.sum(acc2, axis=1)
        acc3 = tl.sum(acc3, axis=1)
    return lanes_excess(u_x, n_x), lanes_excess(u_y, n_y), tl.sum(acc1, axis=1), acc2, acc3


@triton.jit
def first_pass_at(KIND: tl.constexpr, m_x, u_x, m_y, u_y, acc1, acc2, acc3, max_x, max_y, c1, c2):
    """A range's first-pass sums as addends of a sum over ranges at larger maxima (max_x, max_y)
    (`excess_at`; the centred sums by `centred_sums_at`), and whether the range holds each max (1.0 or
    0.0)."""
    shift_x = m_x - finite_or_zero(max_x)
    shift_y = m_y - finite_or_zero(max_y)
    at_x = m_x == max_x
    at_y = m_y == max_y
    if KIND == ALPHA_BETA:
        acc1 = acc1 * tl.exp(c1 * shift_x + c2 * shift_y)
        acc2 = excess_at(acc2, at_x, tl.exp((c1 + c2) * shift_x))
        acc3 = excess_at(acc3, at_y, tl.exp((c1 + c2) * shift_y))
    else:
        acc1, acc2, acc3 = centred_sums_at(KIND, acc1, acc2, acc3, u_x + 1.0, shift_x, shift_y)
    u_x = excess_at(u_x, at_x, tl.exp(shift_x))
    u_y = excess_at(u_y, at_y, tl.exp(shift_y))
    return u_x, u_y, acc1, acc2, acc3, flag(at_x), flag(at_y)


@triton.jit
def first_pass_merge(KIND: tl.constexpr, m_x, u_x, m_y, u_y, acc1, acc2, acc3, n_x, v_x, n_y, v_y, bcc1, bcc2,
                     bcc3, c1, c2):
    """Merge the first-pass statistics of two disjoint vocabulary ranges of the same rows: their addends at
    the merged maxima (`first_pass_at`), plus 1 in each excess whose max both ranges hold (ALPHA_BETA's
    acc2, acc3 are excesses too; the centred sums are plain sums)."""
    max_x = tl.maximum(m_x, n_x)
    max_y = tl.maximum(m_y, n_y)
    u_x, u_y, acc1, acc2, acc3, at_ax, at_ay = first_pass_at(KIND, m_x, u_x, m_y, u_y, acc1, acc2, acc3, max_x,
                                                             max_y, c1, c2)
    v_x, v_y, bcc1, bcc2, bcc3, at_bx, at_by = first_pass_at(KIND, n_x, v_x, n_y, v_y, bcc1, bcc2, bcc3, max_x,
                                                             max_y, c1, c2)
    both_x = at_ax * at_bx
    both_y = at_ay * at_by
    acc2 += bcc2
    acc3 += bcc3
    if KIND == ALPHA_BETA:
        acc2 += both_x
        acc3 += both_y
    return max_x, (u_x + v_x) + both_x, max_y, (u_y + v_y) + both_y, acc1 + bcc1, acc2, acc3


@triton.jit
def first_pass_finish(KIND: tl.constexpr, m_x, u_x, m_y, u_y, acc1, acc2, acc3, c1, c2):
    """(ls_x, ls_y, r, L, aux1, aux2, aux3) of each row: ls = log1p(u) the log-sums, r = ls_y − ls_x to the
    precision of its own size; L and aux only for the one-pass kinds.

    X = m_x + ls_x is kept in two parts: log p = (x − m_x) − ls_x rounds like log_softmax does, where
    x − X with X rounded to float32 would lose the low bits of large logits.
    """
    ls_x = log1p(u_x)
    ls_y = log1p(u_y)
    s_x = u_x + 1.0
    L = tl.zeros_like(ls_x)
    aux1 = tl.zeros_like(ls_x)
    aux2 = tl.zeros_like(ls_x)
    aux3 = tl.zeros_like(ls_x)
    if KIND == ALPHA_BETA:
        r = ls_y - ls_x
        # aux1 = Σ p^α q^β, aux2 = Σ p^(α+β), aux3 = Σ q^(α+β)
        aux1 = acc1 * tl.exp(-c1 * ls_x - c2 * ls_y)
        aux2 = (acc2 + 1.0) * tl.exp(-(c1 + c2) * ls_x)
        aux3 = (acc3 + 1.0) * tl.exp(-(c1 + c2) * ls_y)
        L = -(aux1 - c1 / (c1 + c2) * aux2 - c2 / (c1 + c2) * aux3) / (c1 * c2)
    else:
        s = acc2 / s_x  # Σ e^dy / Σ e^dx − 1
        # log1p(s) is exact to its own size where the rows differ little element by element, and only to
        # that of the terms of acc2 where their maxima sit at different elements (two terms near ±1 cancel);
        # ls_y − ls_x is exact to the log-sums' size. The first where it agrees with the second within the
        # second's own error, the second elsewhere: never worse than either by more than that error.
        r = ls_y - ls_x
        r = tl.where(tl.abs(log1p(s) - r) <= 8.0 * epsilon(r) * tl.maximum(ls_x, ls_y), log1p(s), r)
        if KIND == KL:
            # KL = E_p[dx − dy] + r = E_p[φ] − ψ(s): the second form, of two small non-negative terms, where s
            # is small (near-identical rows); the first elsewhere, where ψ(s) is no longer small.
            L = tl.where(tl.abs(s) <= 0.5, acc3 / s_x - log1p_excess(s), acc1 / s_x + r)
    return ls_x, ls_y, r, L, aux1, aux2, aux3


@triton.jit
def log_probs(x, y, m_x, ls_x, m_y, ls_y, r):
    """(log p, log q, log p − log q) of a tile from its rows' statistics; log p − log q = (dx − dy) + r from
    the centred logits, without the cancellation of x − y at the logits' size."""
    dx = x - m_x[:, None]
    dy = y - m_y[:, None]
    lp = dx - ls_x[:, None]
    lq = dy - ls_y[:, None]
    return lp, lq, (dx - dy) + r[:, None]


@triton.jit
def kl_to_mix(p, q, lpm_far, ratio_m1, w_q):
    """For M = (1 − w_q)·P + w_q·Q, per element: (log p − log m, p·(log p − log m), p·ψ(w)), with
    w = m/p − 1 = w_q·(q/p − 1) and ratio_m1 = q/p − 1 = expm1(log q − log p), to its own precision (`expm1`;
    JSD's two calls take theirs from one `expm1_pair`).

    log p − log m = −log1p(w), to the precision of its own size where w is small (near-identical rows: no
    cancellation of log p and log m, each of the logits' size); elsewhere the caller's lpm_far (JSD: `mix_ratio_log`,
    SKEW: from the log-mixture); 0 where p = 0. The terms p·ψ(w) = p·(log p − log m) + w_q·(q − p) ≥ 0
    (w_q·q where p = 0) also sum to KL(P ‖ M) — their first-order parts w_q·(q − p) sum to zero — without the
    sum's cancellation of order ε on near-identical rows, but they carry the error of the rows' normalizations at
    first order (30 times the reference's error on a peaked teacher row against a flat student). In JSD those
    parts cancel element by element between KL(P ‖ M) and KL(Q ‖ M), and only there are these terms taken."""
    w = w_q * ratio_m1
    small = tl.abs(w) <= 0.5
    log1p_w, psi_w = log1p_and_excess_small(w)
    lpm = tl.where(small, -log1p_w, lpm_far)
    lpm = tl.where(p > 0, lpm, 0.0)
    # elsewhere w_q·(q − p), with q − p from the normalized q and p (JSD's two sides then cancel it element by
    # element; p·(q/p − 1) would not), or p·(q/p − 1) where q − p itself would cancel
    psi = tl.where(small, p * psi_w, p * lpm_far + w_q * tl.where(tl.abs(ratio_m1) <= 0.5, p * ratio_m1, q - p))
    return lpm, p * lpm, tl.where(p > 0, psi, w_q * q)


@triton.jit
def mix_ratio_log(ratio, w_q):
    """log p − log m = −log((1 − w_q) + w_q·q/p) for M = (1 − w_q)·P + w_q·Q, from ratio = q/p: a sum of two
    non-negative terms (no cancellation, whatever w_q) and one logarithm (`log_approx`). For `kl_to_mix` where
    |m/p − 1| > ½, so that |log p − log m| > 0.4: within 4 ulps there, where log p − log m from log-probabilities
    of the logits' size would carry their absolute error. Where p = 0 (ratio may be +inf) it is unused."""
    return -log_approx((1.0 - w_q) + w_q * ratio)


@triton.jit
def jsd_terms(lp, lq, lpq, c1):
    """(p, q, log p − log m, p·ψ, log q − log m, q·ψ, p·(log p − log m), q·(log q − log m)) of `kl_to_mix` for both
    of JSD's KL(P ‖ M) and KL(Q ‖ M), M = c1·P + (1 − c1)·Q, sharing their ratios: e^(lq − lp) = q/p and its
    inverse (each side's m/p from `mix_ratio_log`; their expm1 from one `expm1_pair`)."""
    p = exp_flushed(lp)
    q = exp_flushed(lq)
    q_over_p = exp_flushed(-lpq)
    p_over_q = exp_flushed(lpq)
    q_over_p_m1, p_over_q_m1 = expm1_pair(-lpq, q_over_p, p_over_q)
    lpm, p_lpm, psi_p = kl_to_mix(p, q, mix_ratio_log(q_over_p, 1.0 - c1), q_over_p_m1, 1.0 - c1)
    lqm, q_lqm, psi_q = kl_to_mix(q, p, mix_ratio_log(p_over_q, c1), p_over_q_m1, c1)
    return p, q, lpm, psi_p, lqm, psi_q, p_lpm, q_lqm


@triton.jit
def jsd_given_terms(lp, lq, lpq, c1):
    """JSD's second-pass terms where the statistics came from elsewhere (`kernels/logits.py`, GIVEN): P·ψ and Q·ψ,
    whose sums make L as `second_pass_terms`' do, and P·(log p − log m), Q·(log q − log m), whose plain sums are the
    gradient's aux1, aux2 (`jsd_given_finish`).

    Given log-normalizers and r are exact only to their own size: P and Q are then each normalized to about 1e-6,
    and r = ls_y − ls_x no longer makes Σ Q = Σ P·e^−d to the precision of their difference, as the first pass's r
    does. The ψ terms carry that normalization error at first order (`kl_to_mix`), each side's ~1e-6; in L the two
    sides' errors cancel element by element. The gradient's projection (`gradient_terms`: g = c·p·(lpm − aux1))
    sums to zero only with aux1 = Σ p·lpm of the very p and lpm it weighs, which the plain sums are: with the ψ
    sums instead, G is off by ~1e-6·p per element, which dH = G·W does not cancel (four times the float32
    reference's error on near-identical rows, a divergence of 1e-4). The plain sums cancel at the sums' own size,
    a few ulps of Σ |p·lpm| (the JSD itself is of the order of its square)."""
    _, _, _, psi_p, _, psi_q, p_lpm, q_lqm = jsd_terms(lp, lq, lpq, c1)
    return psi_p, psi_q, p_lpm, q_lqm


@triton.jit
def jsd_given_finish(y1, y2, y3, y4, c1):
    """(L, aux1, aux2, aux3) of each row from the summed `jsd_given_terms`: L = c1·Σ P·ψ + (1 − c1)·Σ Q·ψ, aux1 and
    aux2 the plain sums KL(P ‖ M), KL(Q ‖ M)."""
    return c1 * y1 + (1.0 - c1) * y2, y3, y4, tl.zeros_like(y1)


# ----------------------------------------------------------------------------------------------------
# Second pass (JSD, SKEW, TVD): elementwise terms of log-probabilities lp, lq (`log_probs`), which the
# caller sums over the vocabulary (plain sums: every term is already normalized).
# ----------------------------------------------------------------------------------------------------


@triton.jit
def second_pass_terms(KIND: tl.constexpr, lp, lq, lpq, c1, c2):
    """Elementwise terms of the second-pass sums from log-probabilities lp, lq and lpq = lp − lq (`log_probs`): each
    a probability's multiple, summed over the row (its subnormal probabilities: `exp_flushed`)."""
    p = exp_flushed(lp)
    q = exp_flushed(lq)
    t1 = tl.zeros_like(lp)
    t2 = tl.zeros_like(lp)
    t3 = tl.zeros_like(lp)
    if KIND == JSD:
        _, _, _, t1, _, t2, _, _ = jsd_terms(lp, lq, lpq, c1)  # KL(P ‖ M), KL(Q ‖ M)
    elif KIND == SKEW:
        lm = log_mix(lp, lq, c1)
        _, t1, _ = kl_to_mix(p, q, lp - lm, expm1(-lpq), 1.0 - c1)  # KL(P ‖ M)
        t2 = tl.where(p > 0, tl.exp(lq + lp - lm), 0.0)  # S = Σ q p / M
        t3 = tl.where(p > 0, tl.exp(2.0 * lp - lm), 0.0)  # R = Σ p² / M
    elif KIND == TVD:
        # The masses by sign class, each a sum of non-negative terms (ties counted half on each side):
        # A_q = Σ_{q<p} q + ½Σ_{q=p} q and A_p = Σ_{q>p} p + ½Σ_{q=p} p (`gradient_terms`).
        s = sign(-lpq)  # sgn(q − p)
        t1 = tl.abs(exp_diff(p, q, lpq))
        t2 = q * (0.5 - 0.5 * s)
        t3 = p * (0.5 + 0.5 * s)
    return t1, t2, t3


@triton.jit
def second_pass_add(KIND: tl.constexpr, y1, y2, y3, t1, t2, t3):
    """y += t for the sums of `second_pass_terms` that the kind has (JSD's third term is 0: not summed, so a
    kernel that keeps the sums in lanes keeps two)."""
    y1 += t1
    y2 += t2
    if KIND != JSD:
        y3 += t3
    return y1, y2, y3


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
def gradient_terms(KIND: tl.constexpr, lp, lq, lpq, L, aux1, aux2, aux3, c1, c2):
    """(∂ℓ/∂x, ∂ℓ/∂y) on a tile of log-probabilities (lpq = lp − lq, `log_probs`), given its rows' L and aux."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    L = L[:, None]
    aux1 = aux1[:, None]
    aux2 = aux2[:, None]
    aux3 = aux3[:, None]
    g_x = tl.zeros_like(lp)
    g_y = tl.zeros_like(lp)
    if KIND == KL:
        g_x = tl.where(p > 0, p * (lpq - L), 0.0)
        g_y = exp_diff(q, p, -lpq)  # q − p
    elif KIND == JSD:
        # aux1 = KL(P ‖ M), aux2 = KL(Q ‖ M)
        p, q, lpm, _, lqm, _, _, _ = jsd_terms(lp, lq, lpq, c1)
        g_x = tl.where(p > 0, c1 * p * (lpm - aux1), 0.0)
        g_y = tl.where(q > 0, (1.0 - c1) * q * (lqm - aux2), 0.0)
    elif KIND == SKEW:
        # aux2 = S = Σ q p / M, aux3 = R = Σ p² / M
        lm = log_mix(lp, lq, c1)
        lpm, _, _ = kl_to_mix(p, q, lp - lm, expm1(-lpq), 1.0 - c1)
        # c1·(p²/M − p·R) is 0 at c1 = 0 (M = Q), where p²/M may overflow as q underflows
        cross = tl.where(c1 > 0, c1 * (tl.exp(2.0 * lp - lm) - p * aux3), 0.0)
        g_x = tl.where(p > 0, p * (lpm - L) - cross, 0.0)
        g_y = (1.0 - c1) * (q * aux2 - tl.where(p > 0, tl.exp(lq + lp - lm), 0.0))
    elif KIND == TVD:
        # ∂/∂y_j = ½ q_j (s_j − σ_q) with s = sgn(q − p) and σ_q = Σ q s (likewise for x with −s and σ_p). With
        # A_q, A_p the masses of aux2, aux3 (`second_pass_terms`) and B_q = L + A_p, B_p = L + A_q their
        # complements (Σ_{q>p} (q − p) = L), the factor s − σ_q is 2·A_q, −2·B_q or A_q − B_q for s = 1, −1, 0:
        # sums of non-negative terms, where 1 − σ_q would cancel on a row whose q sits almost all on one side.
        s = sign(-lpq)  # sgn(q − p)
        b_q = L + aux3
        b_p = L + aux2
        g_x = 0.5 * p * tl.where(s > 0, -2.0 * b_p, tl.where(s < 0, 2.0 * aux3, aux3 - b_p))
        g_y = 0.5 * q * tl.where(s > 0, 2.0 * aux2, tl.where(s < 0, -2.0 * b_q, aux2 - b_q))
    elif KIND == ALPHA_BETA:
        # aux1 = Σ p^α q^β, aux2 = Σ p^(α+β), aux3 = Σ q^(α+β)
        cross = tl.exp(c1 * lp + c2 * lq)
        g_x = (tl.exp((c1 + c2) * lp) - cross - p * (aux2 - aux1)) / c2
        g_y = (tl.exp((c1 + c2) * lq) - cross - q * (aux3 - aux1)) / c1
    return g_x, g_y
