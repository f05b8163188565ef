"""Autograd Functions over the launchers: they route tensors and hold no math."""

from __future__ import annotations

import torch

from . import _launch
from .divergences import Canonical


def _as_pq(canon: Canonical, student, teacher):
    """(P, Q) of the canonical divergence from (student, teacher); also maps gradients back."""
    return (student, teacher) if canon.student_is_p else (teacher, student)


class KDLogitsFunction(torch.autograd.Function):
    """Per-row losses [rows] (0 where the mask is False) of [..., V] logits, by the Triton kernels."""

    @staticmethod
    def forward(ctx, student, teacher, mask, canon: Canonical, temperature: float):
        x, y = _as_pq(canon, student, teacher)
        loss, stats = _launch.logits_forward(x, y, canon, 1.0 / temperature)
        ctx.save_for_backward(student, teacher, mask, loss, stats)
        ctx.canon, ctx.temperature = canon, temperature
        return torch.where(mask, loss, 0.0)

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, mask, loss, stats = ctx.saved_tensors
        need_x, need_y = _as_pq(ctx.canon, *ctx.needs_input_grad[:2])
        x, y = _as_pq(ctx.canon, student, teacher)
        row_scale = torch.where(mask, grad_rows, 0.0)
        grad_x, grad_y = _launch.logits_backward(x, y, loss, stats, row_scale, ctx.canon,
                                                 1.0 / ctx.temperature, need_x, need_y)
        grad_student, grad_teacher = _as_pq(ctx.canon, grad_x, grad_y)
        return grad_student, grad_teacher, None, None, None
