"""The divergence catalog: what each loss is, its parameters, and how it maps onto the kernels.

Every divergence is one of five canonical kinds D(P ‖ Q) (see `kernels/divergences.py` and
`kdops.reference`), with P and Q assigned to teacher and student. Reverse KL is KL with the student as P;
the reverse skew KL is the forward skew with the roles swapped:
KL(q ‖ (1−α)p + αq) = KL(P ‖ αP + (1−α)Q) with P = q, Q = p.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Kind(enum.IntEnum):
    """Canonical divergence kinds; the names match the constants of `kernels/divergences.py`."""

    KL = 0
    JSD = 1
    SKEW = 2
    TVD = 3
    ALPHA_BETA = 4


@dataclass(frozen=True)
class Canonical:
    """How a divergence runs: kind, whether the student is P (else the teacher is), parameters c1, c2."""

    kind: Kind
    student_is_p: bool
    c1: float = 0.0
    c2: float = 0.0


class Divergence:
    """Base class of the divergences. ``name`` is the string that selects it with default parameters."""

    name: str = ""

    def canonical(self) -> Canonical:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def _check_range(owner: str, param: str, value, low: float, high: float, low_open: bool, high_open: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {param} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        hi_value = "inf" if math.isinf(high) else f"{high:g}"
        raise ValueError(f"{owner}: {param} must be in {lo}{low:g}, {hi_value}{hi}, got {value!r}")


@dataclass(frozen=True)
class ForwardKL(Divergence):
    """KL(p ‖ q) = Σ p (log p − log q), p the teacher's and q the student's distribution (Hinton KD)."""

    name = "forward_kl"

    def canonical(self) -> Canonical:
        return Canonical(Kind.KL, student_is_p=False)


@dataclass(frozen=True)
class ReverseKL(Divergence):
    """KL(q ‖ p) = Σ q (log q − log p) (MiniLLM)."""

    name = "reverse_kl"

    def canonical(self) -> Canonical:
        return Canonical(Kind.KL, student_is_p=True)


@dataclass(frozen=True)
class GeneralizedJSD(Divergence):
    """β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = βp + (1−β)q; β = 0 is forward KL, β = 1 reverse KL (TRL GKD)."""

    beta: float = 0.5
    name = "generalized_jsd"

    def __post_init__(self):
        _check_range("GeneralizedJSD", "beta", self.beta, 0.0, 1.0, False, False)

    def canonical(self) -> Canonical:
        if self.beta == 0:
            return Canonical(Kind.KL, student_is_p=False)
        if self.beta == 1:
            return Canonical(Kind.KL, student_is_p=True)
        return Canonical(Kind.JSD, student_is_p=False, c1=float(self.beta))


@dataclass(frozen=True)
class SkewForwardKL(Divergence):
    """KL(p ‖ αp + (1−α)q) (DistiLLM SKL)."""

    alpha: float = 0.1
    name = "skew_forward_kl"

    def __post_init__(self):
        _check_range("SkewForwardKL", "alpha", self.alpha, 0.0, 1.0, False, True)

    def canonical(self) -> Canonical:
        return Canonical(Kind.SKEW, student_is_p=False, c1=float(self.alpha))


@dataclass(frozen=True)
class SkewReverseKL(Divergence):
    """KL(q ‖ (1−α)p + αq) (DistiLLM SRKL)."""

    alpha: float = 0.1
    name = "skew_reverse_kl"

    def __post_init__(self):
        _check_range("SkewReverseKL", "alpha", self.alpha, 0.0, 1.0, False, True)

    def canonical(self) -> Canonical:
        return Canonical(Kind.SKEW, student_is_p=True, c1=float(self.alpha))


@dataclass(frozen=True)
class TVD(Divergence):
    """Total variation distance ½ Σ |p − q| (f-DISTILL)."""

    name = "tvd"

    def canonical(self) -> Canonical:
        return Canonical(Kind.TVD, student_is_p=False)


@dataclass(frozen=True)
class AlphaBeta(Divergence):
    """−1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)), α > 0, β > 0 (ABKD)."""

    alpha: float = 0.2
    beta: float = 0.7
    name = "alpha_beta"

    def __post_init__(self):
        _check_range("AlphaBeta", "alpha", self.alpha, 0.0, math.inf, True, True)
        _check_range("AlphaBeta", "beta", self.beta, 0.0, math.inf, True, True)

    def canonical(self) -> Canonical:
        return Canonical(Kind.ALPHA_BETA, student_is_p=False, c1=float(self.alpha), c2=float(self.beta))


DIVERGENCES: dict[str, type[Divergence]] = {
    cls.name: cls for cls in (ForwardKL, ReverseKL, GeneralizedJSD, SkewForwardKL, SkewReverseKL, TVD, AlphaBeta)
}


def as_divergence(divergence: str | Divergence) -> Divergence:
    """A Divergence object from a name (default parameters) or an object (returned as is)."""
    if isinstance(divergence, Divergence):
        return divergence
    if isinstance(divergence, str) and divergence in DIVERGENCES:
        return DIVERGENCES[divergence]()
    raise ValueError(
        f"divergence: unknown divergence {divergence!r}; known names are {', '.join(DIVERGENCES)} "
        "(or pass a kdops.Divergence object)"
    )
