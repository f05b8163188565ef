"""TAID's schedule of the interpolation parameter t (Temporally Adaptive Interpolated Distillation, Shing et
al., ICLR 2025). The loss itself is the divergence `kdops.TAID(t)`; this object only moves t.

Per update with the training loss L (the first call only records it):

    rel = (L_prev − L) / L_prev                            (0 when L_prev = 0)
    m   ← β·m + (1 − β)·rel                                (m starts at 0)
    t   ← min(t_end, max(t_linear(step), t + α·sigmoid(m)·(1 − t)))
    L_prev ← L

where t_linear(step) = t_start + (t_end − t_start)·min(1, step / num_steps) is the linear schedule that t
never falls behind, and `step` the number of updates made so far, this one included (or the step the
caller passes). t starts at t_start: the target starts close to the student and moves toward the teacher
as fast as the loss keeps falling.
"""

from __future__ import annotations

import math
import numbers

import torch

from .divergences import TAID


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"TAIDSchedule: {name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"TAIDSchedule: {name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


class TAIDSchedule:
    """t of `kdops.TAID(t)` over training: ``schedule.divergence`` is the loss to use at the current step,
    ``schedule.update(loss)`` moves t after it (once per optimizer step). ``state_dict`` / ``load_state_dict``
    save and restore it with a checkpoint."""

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99, *,
                 num_steps: int):
        self.t_start = _number("t_start", t_start, 0.0, 1.0)
        self.t_end = _number("t_end", t_end, self.t_start, 1.0)
        self.alpha = _number("alpha", alpha, 0.0, 1.0)
        self.beta = _number("beta", beta, 0.0, 1.0)
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"TAIDSchedule: num_steps must be a positive int, got {num_steps!r}")
        self.num_steps = int(num_steps)
        self.t = self.t_start
        self.momentum = 0.0
        self.previous_loss: float | None = None
        self.step = 0

    @property
    def divergence(self) -> TAID:
        """The divergence at the current t."""
        return TAID(self.t)

    def linear_t(self, step: int) -> float:
        """t_linear(step): t_start to t_end over num_steps, then t_end."""
        return self.t_start + (self.t_end - self.t_start) * min(1.0, step / self.num_steps)

    def update(self, loss, step: int | None = None) -> float:
        """Move t after a step whose loss was `loss` (a number or a one-element tensor); returns the new t.
        `step`: the number of updates so far, this one included (default: counted here)."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().item()
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"TAIDSchedule.update: the loss must be finite, got {loss!r}")
        self.step = self.step + 1 if step is None else int(step)
        if self.previous_loss is None:
            self.previous_loss = loss
            return self.t
        rel = (self.previous_loss - loss) / self.previous_loss if self.previous_loss != 0 else 0.0
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
        adaptive = self.t + self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
        self.t = min(self.t_end, max(self.linear_t(self.step), adaptive))
        self.previous_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return dict(t_start=self.t_start, t_end=self.t_end, alpha=self.alpha, beta=self.beta,
                    num_steps=self.num_steps, t=self.t, momentum=self.momentum, previous_loss=self.previous_loss,
                    step=self.step)

    def load_state_dict(self, state: dict) -> None:
        for key in ("t_start", "t_end", "alpha", "beta", "num_steps", "t", "momentum", "previous_loss", "step"):
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        return (f"TAIDSchedule(t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, beta={self.beta}, "
                f"num_steps={self.num_steps}; t={self.t:.6g}, step={self.step})")
