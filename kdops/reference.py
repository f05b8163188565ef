"""Plain-PyTorch reference losses, with the same signatures as kdops' own: what kdops drops in for, and what its
users can compare it with. They check their arguments as kdops does (`kdops.problem`) and compute with the math
every path shares (`kdops.torch_math`) on whole [..., V] tensors: the float32 log-softmax of both models (float64
for float64 inputs), written to be read, not to save memory. `backend`, `impl` and `memory_budget` are checked and
ignored; there is no `vocab_parallel`.
"""

from __future__ import annotations

import math

import torch

from ._reduction import reduce_rows, row_mask
from ._validation import BACKENDS, check_choice, check_topk_teacher
from .divergences import Divergence
from .problem import (
    check_fused_linear,
    check_fused_linear_topk,
    check_kd_loss,
    check_topk,
    check_topk_logprobs,
)
from .logprobs import check_token_logprobs, check_token_range
from .torch_math import (compute_dtype, divergence_rows, linear_kd_rows, linear_logits, softcap, teacher_rest,
                         token_logprob_rows)


def _reduce(rows, labels, ignore_index: int, leading, device, reduction: str, num_items_in_batch, weights=None):
    """The masked rows, times `weights` where given, reduced."""
    mask = row_mask(labels, ignore_index, leading, device)
    if weights is not None:
        rows = rows * weights.detach().to(rows.dtype)
    return reduce_rows(torch.where(mask, rows, 0.0), mask, reduction, num_items_in_batch)


def kd_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl", temperature=1.0,
            ignore_index=-100, reduction="batchmean", num_items_in_batch=None, backend="auto", teacher_mix=None,
            weights=None):
    """Reference for `kdops.kd_loss` (same signature, without `vocab_parallel`). With `teacher_mix`, the mixed
    target's logits over the whole batch, then the same loss."""
    divergence, teachers, mix, leading, temperature = check_kd_loss(
        student_logits, teacher_logits, labels, divergence, temperature, ignore_index, reduction, num_items_in_batch,
        teacher_mix, weights)
    check_choice("backend", backend, BACKENDS)
    teacher_logits = teachers[0] if mix is None else mix.target_logits(
        [t.to(compute_dtype(student_logits, *teachers)) for t in teachers], temperature)
    rows = divergence_rows(divergence, student_logits, teacher_logits, temperature)
    return _reduce(rows, labels, ignore_index, leading, student_logits.device, reduction, num_items_in_batch, weights)


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                         divergence="forward_kl", temperature=1.0, ignore_index=-100, reduction="batchmean",
                         num_items_in_batch=None, student_bias=None, teacher_bias=None, hard_weight=0.0,
                         soft_weight=1.0, impl="auto", backend="auto", memory_budget=None, student_softcap=None,
                         teacher_softcap=None, teacher_mix=None, weights=None):
    """Reference for `kdops.fused_linear_kd_loss`: the logits of both models in float32 over the shared
    vocabulary [0, min(Vs, Vt)), softcapped where a cap is given, then per token soft_weight · D(teacher ‖
    student at T) + hard_weight · CE(student logits at T = 1, label), masked and reduced like `kd_loss`. With
    `teacher_mix`, every teacher's (softcapped) logits, then the mixed target's."""
    divergence, teacher, mix, vocab, leading, temperature, softcaps = check_fused_linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        divergence, temperature, ignore_index, reduction, num_items_in_batch, hard_weight, soft_weight, impl,
        memory_budget, student_softcap, teacher_softcap, teacher_mix, weights)
    check_choice("backend", backend, BACKENDS)
    teacher_hidden, teacher_weight, teacher_bias = teacher
    if mix is None:
        dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
        teacher_logits = linear_logits(teacher_hidden, teacher_weight, teacher_bias, vocab, dtype)
    else:
        dtype = compute_dtype(student_hidden, student_weight, *teacher_hidden, *teacher_weight)
        teacher_logits = mix.target_logits([softcap(linear_logits(h, w, b, vocab, dtype), softcaps[1]) for h, w, b in
                                            zip(teacher_hidden, teacher_weight, teacher_bias)], temperature)
        softcaps = (softcaps[0], None)  # applied to each teacher before the mix
    student_logits = linear_logits(student_hidden, student_weight, student_bias, vocab, dtype)
    rows = linear_kd_rows(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                          None if labels is None else labels.reshape(-1), divergence, temperature, soft_weight,
                          hard_weight, ignore_index, softcaps).view(leading)
    return _reduce(rows, labels, ignore_index, leading, student_hidden.device, reduction, num_items_in_batch, weights)


def topk_kd_loss(student_logits, teacher_ids, teacher_logprobs, labels=None, *, divergence="forward_kl",
                 temperature=1.0, tail="bucket", ignore_index=-100, reduction="batchmean", num_items_in_batch=None,
                 backend="auto", weights=None):
    """Reference for `kdops.topk_kd_loss` (same signature, without `vocab_parallel`)."""
    divergence, leading, temperature = check_topk(student_logits, teacher_ids, teacher_logprobs, labels, divergence,
                                                  temperature, tail, ignore_index, reduction, num_items_in_batch,
                                                  weights)
    check_choice("backend", backend, BACKENDS)
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, student_logits.shape[-1], tail, student_logits.device)
    rows = topk_rows(student_logits, teacher_ids, teacher_logprobs, divergence, temperature, tail)
    return _reduce(rows, labels, ignore_index, leading, student_logits.device, reduction, num_items_in_batch, weights)


def topk_rows(student_logits, teacher_ids, teacher_logprobs, divergence: Divergence, temperature: float,
              tail: str) -> torch.Tensor:
    """Per-row top-k losses [...]: the student's whole log_softmax(s / T) in float32 (float64 for float64
    logits), its entries at the ids and the logsumexp of the others as the tail, then the dense divergence
    between the k (+1)-outcome distributions (`kdops.topk`)."""
    vocab = student_logits.shape[-1]
    leading = student_logits.shape[:-1]
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lp = teacher_logprobs.detach().to(dtype)
    present = lp != -math.inf
    ids = torch.where(present, teacher_ids.long(), 0)
    student = torch.where(present, log_q.gather(-1, ids), -math.inf)
    teacher = lp
    if tail != "renormalize":
        member = torch.zeros_like(log_q, dtype=torch.int32).scatter_add_(-1, ids, present.to(torch.int32)) > 0
        student_rest = torch.logsumexp(log_q.masked_fill(member, -math.inf), dim=-1, keepdim=True)
        if tail == "bucket":
            teacher_rest_ = teacher_rest(lp.reshape(-1, lp.shape[-1]), vocab).view(*leading, 1)
        else:
            teacher_rest_ = torch.full_like(lp[..., :1], -math.inf)
        student = torch.cat([student, student_rest], dim=-1)
        teacher = torch.cat([teacher, teacher_rest_], dim=-1)
    return divergence_rows(divergence, student, teacher, 1.0)


def fused_linear_topk_kd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None, *,
                              divergence="forward_kl", temperature=1.0, tail="bucket", ignore_index=-100,
                              reduction="batchmean", num_items_in_batch=None, student_bias=None, hard_weight=0.0,
                              soft_weight=1.0, impl="auto", backend="auto", memory_budget=None, student_softcap=None,
                              weights=None):
    """Reference for `kdops.fused_linear_topk_kd_loss`: the student's logits in float32 (softcapped by
    `student_softcap`), then per token soft_weight · (the top-k loss) + hard_weight · CE(logits at T = 1, label),
    masked and reduced like `kd_loss`."""
    divergence, leading, temperature, cap = check_fused_linear_topk(
        student_hidden, student_weight, labels, student_bias, divergence, temperature, tail, ignore_index, reduction,
        num_items_in_batch, hard_weight, soft_weight, impl, memory_budget, student_softcap, weights)
    check_choice("backend", backend, BACKENDS)
    vocab = student_weight.shape[0]
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, vocab, tail, student_hidden.device)
    logits = softcap(linear_logits(student_hidden, student_weight, student_bias, vocab,
                                   compute_dtype(student_hidden, student_weight)), cap)
    rows = soft_weight * topk_rows(logits, teacher_ids, teacher_logprobs, divergence, temperature, tail)
    if hard_weight > 0:
        rows = rows + hard_weight * torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index, reduction="none").view(leading)
    return _reduce(rows, labels, ignore_index, leading, student_hidden.device, reduction, num_items_in_batch, weights)


@torch.no_grad()
def topk_logprobs(hidden, weight, k, *, temperature=1.0, bias=None, memory_budget=None):
    """Reference for `kdops.topk_logprobs` (same signature): the whole float32 (float64)
    log_softmax((hidden · weightᵀ + bias) / T), its k largest entries with ties to the smaller id (a stable sort of
    the whole row, largest first)."""
    temperature = check_topk_logprobs(hidden, weight, k, temperature, bias, memory_budget)
    logits = linear_logits(hidden, weight, bias, weight.shape[0], compute_dtype(hidden, weight))
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    order = torch.sort(log_p, dim=-1, descending=True, stable=True).indices[..., :k]
    return order, log_p.gather(-1, order)


def token_logprobs(hidden, weight, token_ids, *, temperature=1.0, bias=None, softcap=None, ignore_index=-100,
                   return_entropy=False, memory_budget=None, backend="auto"):
    """Reference for `kdops.token_logprobs` (same signature, without `vocab_parallel`): the whole float32 (float64)
    logits, softcapped, their log_softmax at T, the token's entry and the row's entropy (0 on ignored rows)."""
    temperature, cap = check_token_logprobs(hidden, weight, token_ids, temperature, bias, softcap, ignore_index,
                                            return_entropy, memory_budget)
    check_choice("backend", backend, BACKENDS)
    vocab = weight.shape[0]
    check_token_range(token_ids, ignore_index, vocab)
    logits = linear_logits(hidden, weight, bias, vocab, compute_dtype(hidden, weight)).reshape(-1, vocab)
    ids = token_ids.reshape(-1)
    counted = ids != ignore_index
    rows = token_logprob_rows(logits, ids, temperature, cap, counted)
    rows = torch.where(counted[:, None], rows, 0.0).view(*token_ids.shape, 2)
    return (rows[..., 0], rows[..., 1]) if return_entropy else rows[..., 0]
