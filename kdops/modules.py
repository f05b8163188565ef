"""nn.Module wrappers: the constructor takes the keyword options, forward the tensors."""

from __future__ import annotations

import torch

from ._validation import BACKENDS, REDUCTIONS, check_choice, check_ignore_index, check_temperature
from .api import kd_loss
from .divergences import as_divergence


def _check_options(temperature, ignore_index, reduction, backend) -> None:
    """Options are checked when the module is built, not at its first forward."""
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)


class KDLoss(torch.nn.Module):
    """`kdops.kd_loss` as a module: ``KDLoss(divergence="reverse_kl", temperature=2.0)(s, t, labels)``."""

    def __init__(self, *, divergence="forward_kl", temperature=1.0, ignore_index=-100, reduction="batchmean",
                 backend="auto"):
        super().__init__()
        self.divergence = as_divergence(divergence)
        _check_options(temperature, ignore_index, reduction, backend)
        self.options = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                            backend=backend)

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None):
        return kd_loss(student_logits, teacher_logits, labels, divergence=self.divergence,
                       num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
