"""Public functions: validate, pick a backend, dispatch."""

from __future__ import annotations

import torch

from ._autograd import KDLogitsFunction
from ._reduction import reduce_rows, row_mask
from ._torch_backend import ChunkedKDFunction
from ._validation import check_logits_pair, check_loss_options, resolve_backend
from .divergences import Divergence, as_divergence


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str | Divergence = "forward_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between student and teacher logits of shape [..., V], in float32.

    Per row, ℓ = D(softmax(teacher / T), softmax(student / T)) for the chosen divergence (a name or a
    `kdops.Divergence`); rows whose label equals `ignore_index` are left out. `reduction`: "batchmean"
    (mean over valid rows, or Σ / num_items_in_batch), "sum", or "none" (per-row, 0 where ignored).
    The loss is not multiplied by T². Gradients flow to the student logits, and to the teacher logits
    when they require grad; they are returned in each input's dtype.

    `backend`: "triton" (vocabulary-blocked kernels: extra memory O(rows)), "torch" (the reference math
    chunked over rows: extra memory bounded by `kdops._torch_backend.BUDGET_BYTES`), "auto" (Triton on
    CUDA, torch elsewhere).
    """
    divergence = as_divergence(divergence)
    check_logits_pair(student_logits, teacher_logits)
    leading = student_logits.shape[:-1]
    temperature = check_loss_options(labels, leading, student_logits.device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    backend = resolve_backend(backend, student_logits.device)

    mask = row_mask(labels, ignore_index, leading, student_logits.device).reshape(-1)
    if backend == "triton":
        rows = KDLogitsFunction.apply(student_logits, teacher_logits, mask, divergence.canonical(), temperature)
    else:
        vocab = student_logits.shape[-1]
        rows = ChunkedKDFunction.apply(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), mask,
                                       divergence, temperature)
    return reduce_rows(rows.view(leading), mask.view(leading), reduction, num_items_in_batch)
