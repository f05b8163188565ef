"""TRL: `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd, TRL ≥ 0.16 conventions)."""

from __future__ import annotations

import torch

from ..api import kd_loss
from ..divergences import GeneralizedJSD
from ..reference import kl_terms, log_mix

IGNORE_INDEX = -100  # TRL's, fixed


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's generalized JSD: β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = βp + (1 − β)q (β = 0: KL(p ‖ q),
    β = 1: KL(q ‖ p)) over logits / T, tokens whose label is -100 left out, then

    * `num_items_in_batch` given: Σ / num_items_in_batch, whatever the reduction;
    * "batchmean": Σ / max(#valid tokens, 1) with labels, Σ / max(first dim, 1) without (the batch);
    * "sum": Σ; "mean": Σ / (#valid tokens · V) (all elements of the masked [tokens, V] terms);
    * anything else: the elementwise [..., V] terms (masked rows dropped), which are the output itself and
      so are materialized (in float32).
    """
    divergence = GeneralizedJSD(beta)
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        return _elementwise(student_logits, teacher_logits, labels, divergence, temperature)
    total = kd_loss(student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature,
                    ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    valid = None if labels is None else (labels != IGNORE_INDEX).sum()
    if reduction == "batchmean":
        return total / (valid.clamp_min(1) if valid is not None else max(student_logits.shape[0], 1))
    # "mean": torch's mean over every element, NaN when no element is left (as TRL's jsd[mask].mean())
    rows = valid if valid is not None else student_logits.numel() // student_logits.shape[-1]
    return total / (rows * student_logits.shape[-1])


def _elementwise(student_logits, teacher_logits, labels, divergence: GeneralizedJSD, temperature):
    """The per-entry terms of reduction="none", with the reference's conventions (float32)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, -1)
    beta = divergence.beta
    if beta == 0:
        terms = kl_terms(log_p, log_q)
    elif beta == 1:
        terms = kl_terms(log_q, log_p)
    else:
        log_m = log_mix(log_p, log_q, beta)
        terms = beta * kl_terms(log_p, log_m) + (1 - beta) * kl_terms(log_q, log_m)
    return terms if labels is None else terms[labels != IGNORE_INDEX]
