"""Tile transforms: what the kernels do to raw logit tiles before the divergence's math (`passes.py`) sees
them, and the chain rule that takes its gradients back to the raw logits. A new kind of target is one more
transform here, never a new copy of the math.

TRANSFORM is a constexpr set of bits (`kdops.divergences.Canonical.transform` on the host):

    SOFTCAP_S  s ← c_s·tanh(s / c_s)                 the student's final-logit softcap (Gemma 2)
    SOFTCAP_T  t ← c_t·tanh(t / c_t)                 the teacher's
    MIX        t ← (1 − w)·sg(s) + w·t               TAID's interpolated target, w its t (after the caps)

    ∂ℓ/∂s_raw = ∂ℓ/∂s · (1 − u)(1 + u),  u = s / c_s   (nothing reaches s through the target: sg)
    ∂ℓ/∂t_raw = w · ∂ℓ/∂target · (1 − u)(1 + u),  u = t / c_t   (t the capped teacher, before the mix)

The slope 1 − tanh² is taken from the capped value u = tanh, as PyTorch's tanh backward takes it: the raw tiles
need not stay live through the gradient's math (in the fused backward they would cost the registers of two
more tiles, and spill), and its error is the rounding of u, an absolute ulp of 1 — PyTorch's own accuracy.

A −inf logit (a masked token, a column past the vocabulary) stays −inf under a softcap: an absent token
stays absent (c·tanh(−∞) would be −c, a token with probability e^(−2c) of the row's largest).
"""

import triton
import triton.language as tl

from .divergences import NEG_INF, exp_tail, series_bound

SOFTCAP_S = tl.constexpr(1)
SOFTCAP_T = tl.constexpr(2)
MIX = tl.constexpr(4)


@triton.jit
def tanh(x):
    """tanh(x) to the precision of its own size. For |x| > ¼, from E = e^(−2|x|) ≤ 0.61: tanh(|x|) =
    (1 − E) / (1 + E), with no overflow at any |x| and no cancellation (1 − E ≥ 0.39). For |x| ≤ ¼, the odd
    series (`tanh_series`), where the exponential form would cancel."""
    ax = tl.abs(x)
    E = tl.exp(-2.0 * ax)
    large = (1.0 - E) / (1.0 + E)
    return tl.where(ax <= 0.25, x * tanh_series(x * x), tl.where(x < 0, -large, large))


@triton.jit
def tanh_series(x2):
    """tanh(x) / x = 1 − x²/3 + 2x⁴/15 − 17x⁶/315 + … (coefficients 2^2k (2^2k − 1) B_2k / (2k)!) for x² ≤ 1/16,
    by Horner's rule in x²: to x¹⁰ in float32 (the first term left out is below 3e-10 relative), to x²² in
    float64 (below 1e-19)."""
    t = -0.008863235529902197  # x¹⁰
    if x2.dtype == tl.float64:  # static
        t = -3.927832388331683e-05  # x²²
        t = 9.691537956929451e-05 + x2 * t
        t = -0.00023912911424355248 + x2 * t
        t = 0.000590027440945586 + x2 * t
        t = -0.0014558343870513183 + x2 * t
        t = 0.003592128036572481 + x2 * t
        t = -0.008863235529902197 + x2 * t
    t = 0.021869488536155203 + x2 * t
    t = -0.05396825396825397 + x2 * t
    t = 0.13333333333333333 + x2 * t
    t = -0.3333333333333333 + x2 * t
    return 1.0 + x2 * t


@triton.jit
def softcap(z, cap):
    """cap·tanh(z / cap), −inf kept."""
    return tl.where(z == NEG_INF, NEG_INF, cap * tanh(z / cap))


@triton.jit
def softcap_slope(capped, cap):
    """d(cap·tanh(z / cap))/dz = 1 − u² = (1 − u)(1 + u) from the capped value, u = capped / cap (0 at −inf;
    (1 − u) is exact where u ≥ ½)."""
    u = capped / cap
    return tl.where(capped == NEG_INF, 0.0, (1.0 - u) * (1.0 + u))


@triton.jit
def mixed_target(s, t, share):
    """(1 − w)·s + w·t, w = share ∈ [0, 1], with a zero weight dropping its side exactly (0·−inf is 0 here,
    so w = 0 gives s itself and w = 1 gives t itself, −inf entries included)."""
    on_t = tl.where(share == 0.0, 0.0, share * t)
    on_s = tl.where(share == 1.0, 0.0, (1.0 - share) * s)
    return on_t + on_s


@triton.jit
def transformed_tiles(TRANSFORM: tl.constexpr, s, t, cap_s, cap_t, share):
    """(student, teacher, target) tiles from raw logit tiles s, t: the divergence compares the student with the
    target; the teacher's tile (capped, before any mix) serves its slope in the gradient."""
    if SOFTCAP_S & TRANSFORM:
        s = softcap(s, cap_s)
    if SOFTCAP_T & TRANSFORM:
        t = softcap(t, cap_t)
    target = t
    if MIX & TRANSFORM:
        target = mixed_target(s, t, share)
    return s, t, target


@triton.jit
def raw_gradients(TRANSFORM: tl.constexpr, s, t, g_s, g_t, cap_s, cap_t, share):
    """(∂ℓ/∂s_raw, ∂ℓ/∂t_raw) from g_s = ∂ℓ/∂(student tile), g_t = ∂ℓ/∂(target tile), with s, t the
    transformed student and teacher tiles (`transformed_tiles`' first two)."""
    if MIX & TRANSFORM:
        g_t = g_t * share
    if SOFTCAP_S & TRANSFORM:
        g_s = g_s * softcap_slope(s, cap_s)
    if SOFTCAP_T & TRANSFORM:
        g_t = g_t * softcap_slope(t, cap_t)
    return g_s, g_t
