"""torchtune: the KD losses of `torchtune.modules.loss` (0.6), same constructors and forward arguments.

Their values, for finite logits: `ForwardKLLoss` is the cross-entropy −Σ p log q = KL(p ‖ q) + H(p)
(not the KL: the teacher's entropy is included), `ReverseKLLoss` is KL(q ‖ p), `SymmetricKLLoss` is
r·ForwardKLLoss + (1 − r)·ReverseKLLoss; no temperature; summed over tokens whose label is not
ignore_index and divided by their number (0 when there is none), or just summed with normalize=False.
The `...WithChunkedOutputLoss` forms take lists of [B, L/k, V] logit chunks and [B, L] labels.

Where a logit is ±inf, torchtune zeroes the affected terms (its masked_fill); kdops follows the xlogy
convention of kdops (a -inf student logit under a teacher probability > 0 gives an infinite loss).
The teacher's entropy is computed by PyTorch in row chunks of bounded memory (recomputed in the backward
when the teacher requires grad); the divergences by `kdops.kd_loss`.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..paths.torch_engine import chunk_rows
from ..api import kd_loss

__all__ = [
    "ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss", "ForwardKLWithChunkedOutputLoss",
    "ReverseKLWithChunkedOutputLoss", "SymmetricKLWithChunkedOutputLoss",
]


def _entropy_sum(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_rows mask · H(softmax(logits)) of one chunk, in float32 (0·log 0 = 0)."""
    log_p = torch.log_softmax(logits.float(), -1)
    seen = log_p != float("-inf")
    log_p = torch.where(seen, log_p, 0.0)
    terms = torch.where(seen, log_p.exp() * log_p, 0.0)
    return -(terms.sum(-1) * mask).sum()


def teacher_entropy_sum(teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over rows of mask · H(p), chunk by chunk (checkpointed when the teacher requires grad)."""
    vocab = teacher_logits.shape[-1]
    flat, mask = teacher_logits.reshape(-1, vocab), mask.reshape(-1).float()
    step = chunk_rows(vocab)
    total = torch.zeros((), device=flat.device)
    for start in range(0, flat.shape[0], step):
        rows, weights = flat[start:start + step], mask[start:start + step]
        if rows.requires_grad:
            total = total + checkpoint(_entropy_sum, rows, weights, use_reentrant=False)
        else:
            with torch.no_grad():
                total = total + _entropy_sum(rows, weights)
    return total


def _masked_sum(kind: str, student_logits, teacher_logits, labels, ignore_index: int) -> torch.Tensor:
    """Σ over valid tokens of torchtune's per-token value for `kind` ("forward" or "reverse")."""
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    labels = labels.reshape(-1)
    divergence = "forward_kl" if kind == "forward" else "reverse_kl"
    total = kd_loss(student, teacher, labels, divergence=divergence, ignore_index=ignore_index, reduction="sum")
    if kind == "forward":
        total = total + teacher_entropy_sum(teacher, labels != ignore_index)
    return total


def _normalized(total: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    count = (labels != ignore_index).sum()
    if count == 0:  # torchtune's own guard (it synchronizes too)
        return torch.tensor(0.0, device=total.device)
    return total / count


class _KLLoss(torch.nn.Module):
    kind = "forward"

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits, teacher_logits, labels, normalize: bool = True):
        total = _masked_sum(self.kind, student_logits, teacher_logits, labels, self.ignore_index)
        return _normalized(total, labels, self.ignore_index) if normalize else total


class ForwardKLLoss(_KLLoss):
    """−Σ p log q per token (the cross-entropy form torchtune calls forward KL), masked mean."""

    kind = "forward"


class ReverseKLLoss(_KLLoss):
    """KL(q ‖ p) per token, masked mean."""

    kind = "reverse"


class SymmetricKLLoss(torch.nn.Module):
    """sym_kd_ratio · ForwardKLLoss + (1 − sym_kd_ratio) · ReverseKLLoss."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.ignore_index, self.sym_kd_ratio = ignore_index, _check_ratio(sym_kd_ratio)
        self.fkl, self.rkl = ForwardKLLoss(ignore_index), ReverseKLLoss(ignore_index)

    def forward(self, student_logits, teacher_logits, labels, normalize: bool = True):
        return (self.sym_kd_ratio * self.fkl(student_logits, teacher_logits, labels, normalize)
                + (1 - self.sym_kd_ratio) * self.rkl(student_logits, teacher_logits, labels, normalize))


def _mixed_sum(forward_ratio: float, student, teacher, labels, ignore_index: int):
    """r · (forward sum) + (1 − r) · (reverse sum), computing only the terms whose weight is not 0."""
    total = 0.0
    if forward_ratio != 0:
        total = total + forward_ratio * _masked_sum("forward", student, teacher, labels, ignore_index)
    if forward_ratio != 1:
        total = total + (1 - forward_ratio) * _masked_sum("reverse", student, teacher, labels, ignore_index)
    return total


def _check_ratio(sym_kd_ratio: float) -> float:
    if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
        raise ValueError("sym_kd_ratio must be in the range [0, 1]")
    return sym_kd_ratio


class _ChunkedOutputLoss(torch.nn.Module):
    """The loss summed over lists of [B, L/k, V] logit chunks, divided by the valid tokens of [B, L] labels;
    `forward_ratio` weighs the forward (cross-entropy) form against the reverse KL."""

    forward_ratio = 1.0

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100):
        super().__init__()
        self.num_output_chunks, self.ignore_index = num_output_chunks, ignore_index

    def forward(self, student_logits, teacher_logits, labels):
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        total = sum(_mixed_sum(self.forward_ratio, s, t, y, self.ignore_index)
                    for s, t, y in zip(student_logits, teacher_logits, label_chunks))
        if (labels != self.ignore_index).sum() == 0:
            return torch.tensor(0.0, device=student_logits[0].device)
        return total / (labels != self.ignore_index).sum()


class ForwardKLWithChunkedOutputLoss(_ChunkedOutputLoss):
    forward_ratio = 1.0


class ReverseKLWithChunkedOutputLoss(_ChunkedOutputLoss):
    forward_ratio = 0.0


class SymmetricKLWithChunkedOutputLoss(_ChunkedOutputLoss):
    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__(num_output_chunks, ignore_index)
        self.sym_kd_ratio = self.forward_ratio = _check_ratio(sym_kd_ratio)
