"""Liger-Kernel: `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`, running on kdops.fused_linear_kd_loss."""

from __future__ import annotations

import torch

from ..api import fused_linear_kd_loss
from ..divergences import GeneralizedJSD

__all__ = ["LigerFusedLinearJSDLoss"]


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """weight_hard_loss · CE(student, labels) + weight_soft_loss · JSD_β(teacher ‖ student at T), each
    summed over tokens whose label is not ignore_index and divided by their number (at least 1); the
    cross-entropy at T = 1. The teacher gets no gradient (Liger runs it under no_grad).

    `compiled` and `chunk_size` are accepted for compatibility and unused: kdops sizes its own chunks
    (or fuses the matmul). With `return_soft_hard_loss=True` the forward returns (loss, soft, hard), the
    two parts computed by one more gradient-free call. Liger zero-pads the student's logits when the
    teacher's vocabulary is larger; this drop-in requires equal vocabularies instead (use
    `kdops.fused_linear_kd_loss`, which takes the shared vocabulary, for padded teachers).
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False):
        super().__init__()
        assert temperature != 0, "Temperature cannot be 0."
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature
        self.compiled, self.chunk_size, self.return_soft_hard_loss = compiled, chunk_size, return_soft_hard_loss
        self.divergence = GeneralizedJSD(beta)

    def _loss(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
              teacher_bias, hard: float, soft: float):
        return fused_linear_kd_loss(
            student_input, student_weight, teacher_input.detach(), teacher_weight.detach(), true_labels,
            divergence=self.divergence, temperature=self.temperature, ignore_index=self.ignore_index,
            student_bias=student_bias, teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
            hard_weight=hard, soft_weight=soft)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias=None, teacher_bias=None):
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise ValueError(
                f"student_weight and teacher_weight: the Liger drop-in needs one vocabulary size, got "
                f"{student_weight.shape[0]} and {teacher_weight.shape[0]} (Liger zero-pads the student's "
                "logits; kdops.fused_linear_kd_loss takes the shared vocabulary instead)")
        args = (student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                teacher_bias)
        loss = self._loss(*args, self.weight_hard_loss, self.weight_soft_loss)
        if not self.return_soft_hard_loss:
            return loss
        with torch.no_grad():
            soft = self._loss(*args, 0.0, 1.0)
            hard = self._loss(*args, 1.0, 0.0)
        return loss, soft, hard
