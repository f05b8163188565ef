"""Autograd Functions over the launchers: they route tensors and hold no math."""

from __future__ import annotations

import torch

from . import _launch
from .divergences import Canonical


class KDLogitsFunction(torch.autograd.Function):
    """Per-row losses [rows] (0 where the mask is False) of [..., V] logits, by the Triton kernels."""

    @staticmethod
    def forward(ctx, student, teacher, mask, canon: Canonical, temperature: float):
        loss, stats = _launch.logits_forward(student, teacher, None, canon, 1.0 / temperature)
        ctx.save_for_backward(student, teacher, mask, stats)
        ctx.canon, ctx.temperature = canon, temperature
        return torch.where(mask, loss, 0.0)

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, mask, stats = ctx.saved_tensors
        row_scale = torch.where(mask, grad_rows, 0.0)
        grad_student, grad_teacher = _launch.logits_backward(student, teacher, None, stats, row_scale, ctx.canon,
                                                             1.0 / ctx.temperature, *ctx.needs_input_grad[:2])
        return grad_student, grad_teacher, None, None, None
