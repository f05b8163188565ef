"""Several teachers for one student: how their logits make one target (`teacher_mix=` of the losses).

    Ensemble(weights)   the probability mixture   p = Σ_i w_i softmax(z_i / T)       (w_i ≥ 0, Σ w_i = 1)
    LogitSum(weights)   logit arithmetic          p = softmax(Σ_i w_i z_i / T)        (any real w_i)

e.g. ``LogitSum((1 + λ, −λ))`` of a fine-tuned teacher and its base model is "the fine-tuned teacher plus λ
times its shift from the base". Both become *target logits* y with p = softmax(y / T) — y = Σ w_i z_i, or
y = T·log Σ_i w_i softmax(z_i / T) for the mixture (each teacher's log-normalizer first: one more pass over its
logits) — which the divergence's math then takes as it takes one teacher's logits (softcaps apply to each
teacher's logits before the mix, TAID interpolates toward the mixed target). The mix is computed here once, in
PyTorch, on row chunks of logits (never on more than a chunk's rows at a time: `kdops.paths.mixed`), and its
gradient to each teacher by autograd through it.
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
        return (parts[0] if len(parts) == 1 else _logsumexp_of(parts)) * temperature


def _logsumexp_of(parts) -> torch.Tensor:
    """log Σ_i e^(a_i) of same-shape tensors, −inf where every a_i is −inf — with a zero gradient there too
    (torch.logsumexp's is 0/0 = NaN at such entries: a token every teacher masks)."""
    stacked = torch.stack(parts)
    top = stacked.detach().amax(0)
    absent = top == -math.inf
    top = torch.where(absent, 0.0, top)
    total = torch.exp(stacked - top).sum(0)
    return torch.where(absent, -math.inf, torch.log(torch.where(absent, 1.0, total)) + top)


@dataclass(frozen=True)
class LogitSum(TeacherMix):
    """Logit arithmetic: p = softmax(Σ_i w_i z_i / T), any finite real weights."""

    weights: tuple[float, ...]

    def __init__(self, weights):
        object.__setattr__(self, "weights", _weights("LogitSum", weights))

    def target_logits(self, teachers, temperature: float) -> torch.Tensor:
        """y = Σ_i w_i z_i of the teachers' logits [rows, V] (a zero weight drops its teacher). A token that a
        teacher of nonzero weight masks (−inf) stays masked: −inf, where a negative weight would make it +inf."""
        live = [(z, w) for z, w in zip(teachers, self.weights) if w != 0]
        if not live:
            return torch.zeros_like(teachers[0])
        masked, total = None, None
        for z, w in live:
            absent = z == -math.inf
            term = w * torch.where(absent, 0.0, z)
            masked = absent if masked is None else masked | absent
            total = term if total is None else total + term
        return torch.where(masked, -math.inf, total)
