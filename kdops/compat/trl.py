"""TRL: `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd, TRL ≥ 0.16 conventions), and the chunked
loss of TRL 1.16's `DistillationTrainer` (`trl.trainer.distillation_trainer._chunked_divergence_loss`)."""

from __future__ import annotations

import math

import torch

from ..api import fused_linear_kd_loss, kd_loss
from ..divergences import GeneralizedJSD, ReverseKL
from ..torch_math import kl_terms, log_mix

IGNORE_INDEX = -100  # TRL's, fixed

__all__ = ["generalized_jsd_loss", "chunked_divergence_loss", "student_entropy_sum"]


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


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0, *, divergence=None):
    """A drop-in for TRL 1.16's `_chunked_divergence_loss`, same arguments and returns: over the completion
    positions (`completion_mask` != 0) of hidden states [B, K, H] and lm_heads [V, H] (+ bias), TRL's generalized
    JSD with `beta` (0: forward KL, 1: reverse KL) of the logits scale·z (softcapped c·tanh(·/c) where given)
    at `temperature`, by `kdops.fused_linear_kd_loss` — or any kdops `divergence` instead.

    Returns (loss, student-entropy sum, number of valid positions): the loss Σ / num_items_in_batch, or
    Σ / max(valid, 1) without it; the sum of the student's per-token entropy −Σ q log q (nats, no gradient)
    over the valid positions, from one more forward pass of the student's logits (kdops' reverse KL to the
    uniform distribution: H = log V − KL(q ‖ u)).

    Logit scales are folded into the hidden states and biases. FSDP2's DTensor lm_head weights are gathered
    with full_tensor() and cast to the hidden states' dtype, as TRL does.
    """
    divergence = GeneralizedJSD(beta) if divergence is None else divergence
    student_lm_head_weight, student_lm_head_bias = _gathered(student_lm_head_weight, student_lm_head_bias,
                                                             student_hidden_states.dtype)
    teacher_lm_head_weight, teacher_lm_head_bias = _gathered(teacher_lm_head_weight, teacher_lm_head_bias,
                                                             teacher_hidden_states.dtype)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    h_s, b_s = _scaled(h_s, student_lm_head_bias, student_logit_scale)
    h_t, b_t = _scaled(h_t, teacher_lm_head_bias, teacher_logit_scale)
    total = fused_linear_kd_loss(h_s, student_lm_head_weight, h_t, teacher_lm_head_weight, divergence=divergence,
                                 temperature=temperature, reduction="sum", student_bias=b_s, teacher_bias=b_t,
                                 student_softcap=student_final_logit_softcapping,
                                 teacher_softcap=teacher_final_logit_softcapping)
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    entropy_sum = student_entropy_sum(h_s.detach(), student_lm_head_weight.detach(),
                                      None if b_s is None else b_s.detach(), temperature,
                                      student_final_logit_softcapping)
    return loss, entropy_sum, n_valid


def student_entropy_sum(hidden, weight, bias, temperature: float, softcap=None) -> torch.Tensor:
    """Σ over the rows of −Σ_v q log q, q = softmax(softcap(h·Wᵀ + b) / T), without the logits: reverse KL to the
    uniform distribution over V (a teacher whose logits are all 0), H = log V − KL(q ‖ u)."""
    vocab = weight.shape[0]
    if hidden.shape[0] == 0:
        return torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        uniform_hidden = hidden.new_zeros((hidden.shape[0], 1))
        uniform_weight = weight.new_zeros((vocab, 1))
        kl = fused_linear_kd_loss(hidden, weight, uniform_hidden, uniform_weight, divergence=ReverseKL(),
                                  temperature=temperature, reduction="none", student_bias=bias,
                                  student_softcap=softcap)
    return (math.log(vocab) - kl.double()).sum().to(kl.dtype)


def _gathered(weight, bias, dtype):
    """A DTensor lm_head (FSDP2) as one plain tensor in the hidden states' dtype (its bias gathered too)."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and isinstance(weight, dtensor):
        weight = weight.full_tensor().to(dtype)
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


def _scaled(hidden, bias, scale):
    """(scale·h, scale·b): logits scale·(h·Wᵀ + b) as an lm_head of scaled inputs."""
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale
