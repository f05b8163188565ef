"""The GPU's approximate transcendentals at their documented worst-case errors keep every accuracy bound.

Compiled for a GPU, `kernels/divergences.py` computes some logarithms and quotients with the MUFU's
approximations (`log_approx`: lg2.approx, within 2^-22 of log2 x absolute on [½, 2] and 2 ulps elsewhere;
`div_approx`: rcp.approx, 1 ulp, then a rounded product) and every exponential with ex2.approx (2 ulps).
Triton's interpreter, which CI runs, computes them exactly (numpy), so the accuracy tests alone could not see
what those errors do. Here the interpreted kernels take versions of those functions that err by the bound
itself, in one direction for every element or alternating with the argument's last bit, and the JSD and skew
losses (the users of `log_approx` and `div_approx`) must still meet the SPEC contract against the float64
oracle on realistic rows (`oracle.logit_pair`: randn·4, peaked at +30, −inf entries) and the near-identical
pairs of `test_near_identical.py`.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import kdops
from kdops import reference
from conftest import DEVICE
from oracle import assert_matches_oracle, logit_pair
from test_near_identical import check_near_identical, kd_on_logits, logits_of, near_identical_pair, ref_on_logits

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="compiled kernels run the GPU's own approximations")

ULP = tl.constexpr(2.0 ** -23)  # float32's at 1
ALTERNATE = tl.constexpr(False)  # set by `substitute`


@triton.jit
def _direction(x):
    """+1 for every element, or (ALTERNATE) ±1 by the last bit of x's float32 pattern: an error that does not add up."""
    sign = tl.full(x.shape, 1.0, tl.float32)
    if ALTERNATE:
        sign = tl.where((x.to(tl.float32).to(tl.uint32, bitcast=True) & 1) == 0, 1.0, -1.0)
    return sign


@triton.jit
def log_worst(x):
    """`log_approx` off by lg2.approx's bound: 2^-22 of log2 x absolute on [½, 2], 2 ulps elsewhere."""
    exact = tl.log(x)
    err = tl.where((x >= 0.5) & (x <= 2.0), 2.0 ** -22 * 0.6931471805599453, 2.0 * ULP * tl.abs(exact))
    return exact + _direction(x) * err


@triton.jit
def div_worst(a, b):
    """`div_approx` with rcp.approx's 1 ulp error on the reciprocal (then the product's own rounding)."""
    return a * ((1.0 / b) * (1.0 + _direction(b) * ULP))


@triton.jit
def exp_worst(x):
    """`exp_flushed` (subnormal results flushed) off by ex2.approx's 2 ulps."""
    exact = tl.where(x * 1.4426950408889634 < -126.0, 0.0, tl.exp(x))
    return exact * (1.0 + _direction(x) * 2.0 * ULP)


def substitute(monkeypatch, alternate: bool) -> None:
    """Make the interpreted kernels call the erring versions (they look their callees up when they run)."""
    from kdops.kernels import divergences

    monkeypatch.setitem(globals(), "ALTERNATE", tl.constexpr(alternate))
    monkeypatch.setattr(divergences, "log_approx", log_worst)
    monkeypatch.setattr(divergences, "div_approx", div_worst)
    monkeypatch.setattr(divergences, "exp_flushed", exp_worst)


@pytest.fixture(params=["one-sided", "alternating"])
def worst_case(request, monkeypatch):
    substitute(monkeypatch, request.param == "alternating")
    return request.param


@pytest.mark.parametrize("alternate", [False, True])
def test_the_substitutes_are_called(monkeypatch, alternate):
    """With the substitutes JSD's row losses change (so the kernels call them), by no more than their errors."""
    s, t = logit_pair((5, 301), torch.float32, DEVICE, seed=11)
    exact = kdops.kd_loss(s, t, divergence="generalized_jsd", backend="triton", reduction="none")
    substitute(monkeypatch, alternate)
    erring = kdops.kd_loss(s, t, divergence="generalized_jsd", backend="triton", reduction="none")
    assert not torch.equal(erring, exact)
    torch.testing.assert_close(erring, exact, rtol=1e-5, atol=0)


DIVERGENCES = [kdops.GeneralizedJSD(beta=0.5), kdops.GeneralizedJSD(beta=0.1), kdops.GeneralizedJSD(beta=0.9),
               kdops.SkewForwardKL(alpha=0.1), kdops.SkewReverseKL(alpha=0.3)]


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=repr)
def test_realistic_rows(worst_case, divergence):
    """Peaked, wide and −inf rows at V = 4099 (two tiles and a partial one of the interpreter's blocks)."""
    student, teacher = logit_pair((3, 13, 4099), torch.float32, DEVICE, seed=5)
    assert_matches_oracle(kdops.kd_loss, reference.kd_loss, student, teacher, divergence=divergence,
                          backend="triton", temperature=1.5)


@pytest.mark.parametrize("divergence", [kdops.GeneralizedJSD(beta=0.5), kdops.GeneralizedJSD(beta=0.1)], ids=repr)
def test_near_identical_rows(worst_case, divergence):
    """A student a small perturbation of its teacher (per-row divergence ~1e-4 at logits to ±40)."""
    inputs = list(logits_of(*near_identical_pair(seed=0)))
    check_near_identical(kd_on_logits, ref_on_logits, inputs, f"{divergence!r} {worst_case}", divergence=divergence)
