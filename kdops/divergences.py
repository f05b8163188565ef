"""The divergence catalog: what each loss is, its parameters, and how it maps onto the kernels.

Every divergence is one of five canonical kinds D(P ‖ Q) (see `kernels/divergences.py` and
`kdops.torch_math`), with P and Q assigned to teacher and student. Reverse KL is KL with the student as P;
the reverse skew KL is the forward skew with the roles swapped:
KL(q ‖ (1−α)p + αq) = KL(P ‖ αP + (1−α)Q) with P = q, Q = p.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace


class Kind(enum.IntEnum):
    """Canonical divergence kinds; the names match the constants of `kernels/divergences.py`."""

    KL = 0
    JSD = 1
    SKEW = 2
    TVD = 3
    ALPHA_BETA = 4


#: Bits of `Canonical.transform`, the constexpr TRANSFORM of the kernels (`kernels/transforms.py`).
SOFTCAP_STUDENT, SOFTCAP_TEACHER, MIX_TARGET = 1, 2, 4


@dataclass(frozen=True)
class Canonical:
    """How a loss runs on logit tiles: the divergence's kind, whether the student is P (else the target is),
    its parameters c1, c2, and the transforms of the raw tiles before it (`kernels/transforms.py`): the
    softcaps c of the student's and the teacher's logits (c·tanh(z / c); 0 for none) and the teacher's share
    w of a target interpolated in logit space, (1 − w)·sg(student) + w·teacher (TAID; 1: the teacher)."""

    kind: Kind
    student_is_p: bool
    c1: float = 0.0
    c2: float = 0.0
    student_softcap: float = 0.0
    teacher_softcap: float = 0.0
    teacher_share: float = 1.0

    @property
    def transform(self) -> int:
        """The transforms that apply, as the kernels' TRANSFORM bits."""
        return ((SOFTCAP_STUDENT if self.student_softcap else 0) | (SOFTCAP_TEACHER if self.teacher_softcap else 0)
                | (MIX_TARGET if self.teacher_share != 1.0 else 0))

    def transform_args(self) -> tuple[float, float, float]:
        """The kernels' runtime arguments of the transforms (cap_s, cap_t, share)."""
        return float(self.student_softcap), float(self.teacher_softcap), float(self.teacher_share)

    def with_softcaps(self, student: float | None, teacher: float | None) -> Canonical:
        """This loss on softcapped logits (None: no cap on that side)."""
        return replace(self, student_softcap=float(student or 0.0), teacher_softcap=float(teacher or 0.0))


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


@dataclass(frozen=True)
class TAID(Divergence):
    """KL(p_t ‖ q) with the target p_t = softmax(((1 − t)·sg(s) + t·z) / T) interpolated in logit space
    between the student's detached logits s and the teacher's z (TAID, Shing et al., ICLR 2025): t = 0 is
    no loss, t = 1 forward KL; no gradient reaches the student through p_t. `kdops.TAIDSchedule` moves t."""

    t: float = 1.0
    name = "taid"  # not a name `as_divergence` takes (see DIVERGENCES)

    def __post_init__(self):
        _check_range("TAID", "t", self.t, 0.0, 1.0, False, False)

    def canonical(self) -> Canonical:
        return Canonical(Kind.KL, student_is_p=False, teacher_share=float(self.t))


#: The divergences a name selects (with default parameters). TAID is not among them: its t is the point.
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
