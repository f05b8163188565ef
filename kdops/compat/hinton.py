"""Hinton's distillation loss as it is usually written, in one call."""

from __future__ import annotations

import torch

from ..api import kd_loss


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                   *, backend: str = "auto") -> torch.Tensor:
    """``F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2``.

    That is Σ_rows KL(p ‖ q) / s.shape[0] · T²: F.kl_div's "batchmean" divides by the first dimension,
    which for [B, L, V] logits is the batch, not the number of tokens. No row is ignored.
    """
    total = kd_loss(student_logits, teacher_logits, divergence="forward_kl", temperature=temperature,
                    reduction="sum", backend=backend)
    return total * (float(temperature) ** 2 / student_logits.shape[0])
