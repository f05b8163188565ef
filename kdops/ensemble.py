"""Several teachers for one student: how their logits make one target (`teacher_mix=` of the losses).

    Ensemble(weights)   the probability mixture   p = Σ_i w_i softmax(z_i / T)       (w_i ≥ 0, Σ w_i = 1)
    LogitSum(weights)   logit arithmetic          p = softmax(Σ_i w_i z_i / T)        (any real w_i)

e.g. ``LogitSum((1 + λ, −λ))`` of a fine-tuned teacher and its base model is "the fine-tuned teacher plus λ
times its shift from the base". Both become *target logits* y with p = softmax(y / T) — y = Σ w_i z_i, or
y = T·log Σ_i w_i softmax(z_i / T) for the mixture (each teacher's log-normalizer first: one more pass over its
logits) — which the divergence's math then takes as it takes one teacher's logits (softcaps apply to each
teacher's logits before the mix, TAID interpolates toward the mixed target). The mix is computed here once, in
PyTorch, on row chunks of logits (never on more than a chunk's rows at a time, `kdops.api` and
`kdops._chunked`), and its gradient to each teacher by autograd through it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def _weights(owner: str, weights) -> tuple[float, ...]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{owner}: weights must be a sequence of numbers, one per teacher, got {weights!r}")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{owner}: weights must be finite numbers, got {tuple(weights)!r}")
        out.append(float(w))
    if not out:
        raise ValueError(f"{owner}: weights must name at least one teacher, got ()")
    return tuple(out)


class TeacherMix:
    """Base class of the ways several teachers' logits make one target."""

    weights: tuple[float, ...]

    def target_logits(self, teachers, temperature: float) -> torch.Tensor:  # pragma: no cover - subclasses
        raise NotImplementedError


@dataclass(frozen=True)
class Ensemble(TeacherMix):
    """The probability mixture p = Σ_i w_i softmax(z_i / T); weights ≥ 0 summing to 1 (a zero weight drops
    its teacher)."""

    weights: tuple[float, ...]

    def __init__(self, weights):
        weights = _weights("Ensemble", weights)
        if any(w < 0 for w in weights):
            raise ValueError(f"Ensemble: weights must be ≥ 0 (a probability mixture), got {weights!r}")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"Ensemble: weights must sum to 1 (a probability mixture), got {weights!r} "
                             f"(sum {sum(weights):.9g})")
        object.__setattr__(self, "weights", weights)

    def target_logits(self, teachers, temperature: float) -> torch.Tensor:
        """y = T·log Σ_i w_i softmax(z_i / T) of the teachers' logits [rows, V] (float32 or float64), so that
        softmax(y / T) is the mixture; −inf where every teacher with weight has probability 0."""
        parts = [torch.log_softmax(z / temperature, dim=-1) + math.log(w)
                 for z, w in zip(teachers, self.weights) if w > 0]
        log_p = parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), dim=0)
        return log_p * temperature


@dataclass(frozen=True)
class LogitSum(TeacherMix):
    """Logit arithmetic: p = softmax(Σ_i w_i z_i / T), any finite real weights."""

    weights: tuple[float, ...]

    def __init__(self, weights):
        object.__setattr__(self, "weights", _weights("LogitSum", weights))

    def target_logits(self, teachers, temperature: float) -> torch.Tensor:
        """y = Σ_i w_i z_i of the teachers' logits [rows, V] (a zero weight drops its teacher, −inf included)."""
        terms = [w * z for z, w in zip(teachers, self.weights) if w != 0]
        if not terms:
            return torch.zeros_like(teachers[0])
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


def as_teachers(name: str, teachers) -> list:
    """A tensor (one teacher) or a sequence of tensors, as a list (elements may be None only for biases)."""
    if teachers is None or isinstance(teachers, torch.Tensor):
        return [teachers]
    if isinstance(teachers, (list, tuple)):
        if not teachers:
            raise ValueError(f"{name}: expected a tensor or a non-empty sequence of tensors, got an empty sequence")
        return list(teachers)
    raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(teachers).__name__}")


def check_mix(mix, count: int, name: str) -> TeacherMix | None:
    """`teacher_mix` for `count` teachers given as `name`: None for one teacher, else a TeacherMix with one
    weight per teacher."""
    if mix is None:
        if count != 1:
            raise ValueError(f"{name}: {count} teachers need teacher_mix=kdops.Ensemble(weights) or "
                             "kdops.LogitSum(weights) to say how they make one target")
        return None
    if not isinstance(mix, TeacherMix):
        raise TypeError(f"teacher_mix: expected kdops.Ensemble or kdops.LogitSum, got {type(mix).__name__}")
    if len(mix.weights) != count:
        raise ValueError(f"teacher_mix: {len(mix.weights)} weights for {count} teachers ({name}); give one weight "
                         "per teacher")
    return mix
