"""Plain-PyTorch reference losses: the oracle the kernels are tested against, and what kdops drops in for.

They materialize the float32 log-softmax of both models (float64 for float64 inputs) and are written to
be read. The canonical divergences D(P ‖ Q) of log-probabilities lp, lq (see `kdops.divergences`) are
defined here once; the chunked `backend="torch"` path runs these same functions.

Terms where a probability is 0 contribute 0, and their gradients are 0 too: the masked values are
replaced *before* the arithmetic, so no nan · 0 reaches autograd.
"""

from __future__ import annotations

import math

import torch

from ._reduction import reduce_rows, row_mask
from ._validation import (
    BACKENDS,
    check_choice,
    check_fused_inputs,
    check_memory_budget,
    check_logits_pair,
    check_loss_options,
    check_tensor,
)
from .divergences import Canonical, Divergence, Kind, as_divergence

NEG_INF = float("-inf")


def _log(w: float) -> float:
    return math.log(w) if w > 0 else NEG_INF


def kl_terms(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """The summands p (log p − log q) of KL(P ‖ Q) (0 where p = 0)."""
    seen = lp != NEG_INF  # NaN stays in (it propagates); only exact zeros of p drop out
    lp = torch.where(seen, lp, 0.0)
    lq = torch.where(seen, lq, 0.0)
    return torch.where(seen, lp.exp() * (lp - lq), 0.0)


def kl(lp: torch.Tensor, lq: torch.Tensor, c: Canonical | None = None) -> torch.Tensor:
    """KL(P ‖ Q) = Σ p (log p − log q) over the last dimension (0 where p = 0)."""
    return kl_terms(lp, lq).sum(-1)


def log_mix(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q) as a log-add-exp of log-probabilities."""
    empty = (lp == NEG_INF) & (lq == NEG_INF)
    lp = torch.where(empty, 0.0, lp)
    lq = torch.where(empty, 0.0, lq)
    return torch.where(empty, NEG_INF, torch.logaddexp(lp + _log(w), lq + _log(1.0 - w)))


def jsd(lp: torch.Tensor, lq: torch.Tensor, c: Canonical) -> torch.Tensor:
    """β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M), M = βP + (1 − β)Q, β = c.c1."""
    lm = log_mix(lp, lq, c.c1)
    return c.c1 * kl(lp, lm) + (1.0 - c.c1) * kl(lq, lm)


def skew_kl(lp: torch.Tensor, lq: torch.Tensor, c: Canonical) -> torch.Tensor:
    """KL(P ‖ αP + (1 − α)Q), α = c.c1."""
    return kl(lp, log_mix(lp, lq, c.c1))


def tvd(lp: torch.Tensor, lq: torch.Tensor, c: Canonical | None = None) -> torch.Tensor:
    """½ Σ |p − q|."""
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


def alpha_beta(lp: torch.Tensor, lq: torch.Tensor, c: Canonical) -> torch.Tensor:
    """−1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)), α = c.c1, β = c.c2."""
    a, b = c.c1, c.c2
    terms = (a * lp + b * lq).exp() - a / (a + b) * ((a + b) * lp).exp() - b / (a + b) * ((a + b) * lq).exp()
    return -terms.sum(-1) / (a * b)


CANONICAL = {Kind.KL: kl, Kind.JSD: jsd, Kind.SKEW: skew_kl, Kind.TVD: tvd, Kind.ALPHA_BETA: alpha_beta}


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap·tanh(logits / cap), a model's final-logit softcap (None or 0: the logits as they are). A −inf
    logit (a masked token) stays −inf."""
    if not cap:
        return logits
    return torch.where(logits == NEG_INF, NEG_INF, cap * torch.tanh(logits / cap))


def softcap_slope(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """d softcap(z)/dz = 1 − tanh²(z / cap) (0 at −inf; the tensor of ones without a cap)."""
    if not cap:
        return torch.ones_like(logits)
    return torch.where(logits == NEG_INF, 0.0, torch.cosh(logits / cap).pow(-2))


def mixed_target(student: torch.Tensor, teacher: torch.Tensor, share: float) -> torch.Tensor:
    """(1 − w)·sg(student) + w·teacher, w = share: TAID's target logits (the teacher's own when w = 1). No
    gradient reaches the student through it; a zero weight drops its side exactly (−inf entries included)."""
    if share == 1.0:
        return teacher
    if share == 0.0:
        return student.detach()
    return (1.0 - share) * student.detach() + share * teacher


def loss_logits(c: Canonical, student: torch.Tensor, teacher: torch.Tensor):
    """(student, target) logits that the divergence compares: the raw ones through the transforms of `c`
    (softcaps, then TAID's mixed target), in the order the kernels apply them (`kernels/transforms.py`)."""
    student = softcap(student, c.student_softcap)
    return student, mixed_target(student, softcap(teacher, c.teacher_softcap), c.teacher_share)


def divergence_rows(divergence: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float, softcaps=(None, None)) -> torch.Tensor:
    """Per-row divergence ℓ [...] between softmax(student / T) and softmax(target / T), [..., V] logits; the
    target is the teacher, or TAID's mix; `softcaps` (student, teacher) cap the raw logits first."""
    c = divergence.canonical().with_softcaps(*softcaps)
    dtype = compute_dtype(student_logits, teacher_logits)
    if not c.transform:  # each side's float32 copy is freed as soon as its log-softmax is taken
        log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    else:
        student, target = loss_logits(c, student_logits.to(dtype), teacher_logits.to(dtype))
        if c.teacher_share == 0.0:  # the target is the student itself: D(Q ‖ Q) = 0 and so is its gradient, exactly
            return 0.0 * torch.where(torch.isfinite(student), student, 0.0).sum(-1)
        log_q = torch.log_softmax(student / temperature, dim=-1)
        log_p = torch.log_softmax(target / temperature, dim=-1)
        del student, target
    if c.student_is_p:
        log_p, log_q = log_q, log_p
    return CANONICAL[c.kind](log_p, log_q, c)


def kd_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl", temperature=1.0,
            ignore_index=-100, reduction="batchmean", num_items_in_batch=None, backend="auto", teacher_mix=None):
    """Reference for `kdops.kd_loss` (same signature, without `vocab_parallel`; `backend` is accepted and
    ignored). With `teacher_mix`, the mixed target's logits over the whole batch, then the same loss."""
    from .ensemble import as_teachers, check_mix

    divergence = as_divergence(divergence)
    teachers = as_teachers("teacher_logits", teacher_logits)
    mix = check_mix(teacher_mix, len(teachers), "teacher_logits")
    for i, teacher in enumerate(teachers):
        check_logits_pair(student_logits, teacher, "teacher_logits" if mix is None else f"teacher_logits[{i}]")
    leading = student_logits.shape[:-1]
    temperature = check_loss_options(labels, leading, student_logits.device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    check_choice("backend", backend, BACKENDS)
    teacher_logits = teachers[0] if mix is None else mix.target_logits(
        [t.to(compute_dtype(student_logits, *teachers)) for t in teachers], temperature)
    mask = row_mask(labels, ignore_index, leading, student_logits.device)
    rows = divergence_rows(divergence, student_logits, teacher_logits, temperature)
    return reduce_rows(torch.where(mask, rows, 0.0), mask, reduction, num_items_in_batch)


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """hidden · weight[:vocab]ᵀ + bias[:vocab] in `dtype` (the rows past the shared vocabulary are padding)."""
    bias = None if bias is None else bias[:vocab].to(dtype)
    return torch.nn.functional.linear(hidden.to(dtype), weight[:vocab].to(dtype), bias)


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                         divergence="forward_kl", temperature=1.0, ignore_index=-100, reduction="batchmean",
                         num_items_in_batch=None, student_bias=None, teacher_bias=None, hard_weight=0.0,
                         soft_weight=1.0, impl="auto", backend="auto", memory_budget=None, student_softcap=None,
                         teacher_softcap=None, teacher_mix=None):
    """Reference for `kdops.fused_linear_kd_loss`: the logits of both models in float32 over the shared
    vocabulary [0, min(Vs, Vt)), softcapped where a cap is given, then per token soft_weight · D(teacher ‖
    student at T) + hard_weight · CE(student logits at T = 1, label), masked and reduced like `kd_loss`.
    (`impl`, `backend` and `memory_budget` are checked and ignored.) With `teacher_mix`, every teacher's
    (softcapped) logits, then the mixed target's."""
    from ._validation import check_softcap
    from .ensemble import linear_teachers

    divergence = as_divergence(divergence)
    teacher_hidden, teacher_weight, teacher_bias, mix = linear_teachers(teacher_hidden, teacher_weight,
                                                                        teacher_bias, teacher_mix)
    vocab = check_fused_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                               student_bias, teacher_bias, hard_weight, soft_weight, impl)
    leading = student_hidden.shape[:-1]
    temperature = check_loss_options(labels, leading, student_hidden.device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    check_choice("backend", backend, BACKENDS)
    check_memory_budget(memory_budget)
    softcaps = (check_softcap("student_softcap", student_softcap), check_softcap("teacher_softcap", teacher_softcap))
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
    mask = row_mask(labels, ignore_index, leading, student_hidden.device)
    return reduce_rows(torch.where(mask, rows, 0.0), mask, reduction, num_items_in_batch)


def linear_kd_rows(student_logits, teacher_logits, labels, divergence: Divergence, temperature: float,
                   soft_weight: float, hard_weight: float, ignore_index: int, softcaps=(None, None)) -> torch.Tensor:
    """Per-row soft_weight · D(teacher ‖ student at T) + hard_weight · CE(student at T = 1, label) of float
    logits [rows, V] (CE is 0 where the label is ignore_index), each side's raw logits softcapped first by
    `softcaps` (student, teacher)."""
    rows = soft_weight * divergence_rows(divergence, student_logits, teacher_logits, temperature, softcaps)
    if hard_weight > 0:
        rows = rows + hard_weight * torch.nn.functional.cross_entropy(
            softcap(student_logits, softcaps[0]), labels, ignore_index=ignore_index, reduction="none")
    return rows


def topk_kd_loss(student_logits, teacher_ids, teacher_logprobs, labels=None, *, divergence="forward_kl",
                 temperature=1.0, tail="bucket", ignore_index=-100, reduction="batchmean", num_items_in_batch=None,
                 backend="auto"):
    """Reference for `kdops.topk_kd_loss` (same signature; `backend` is checked and ignored)."""
    from .topk import check_tail, check_topk_teacher

    divergence = as_divergence(divergence)
    check_tensor("student_logits", student_logits)
    leading = student_logits.shape[:-1]
    temperature = check_loss_options(labels, leading, student_logits.device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    check_choice("backend", backend, BACKENDS)
    check_tail(tail, divergence.canonical(), divergence.name)
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, student_logits.shape[-1], tail, student_logits.device)
    rows = topk_rows(student_logits, teacher_ids, teacher_logprobs, divergence, temperature, tail)
    mask = row_mask(labels, ignore_index, leading, student_logits.device)
    return reduce_rows(torch.where(mask, rows, 0.0), mask, reduction, num_items_in_batch)


def topk_rows(student_logits, teacher_ids, teacher_logprobs, divergence: Divergence, temperature: float,
              tail: str) -> torch.Tensor:
    """Per-row top-k losses [...]: the student's whole log_softmax(s / T) in float32 (float64 for float64
    logits), its entries at the ids and the logsumexp of the others as the tail, then the dense divergence
    between the k (+1)-outcome distributions (`kdops.topk`)."""
    from ._topk import teacher_rest

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
                              soft_weight=1.0, impl="auto", backend="auto", memory_budget=None, student_softcap=None):
    """Reference for `kdops.fused_linear_topk_kd_loss`: the student's logits in float32 (softcapped by
    `student_softcap`), then per token
    soft_weight · (the top-k loss) + hard_weight · CE(logits at T = 1, label), masked and reduced like
    `kd_loss`. (`impl`, `backend` and `memory_budget` are checked and ignored.)"""
    from .topk import TOPK_IMPLS, check_tail, check_topk_teacher
    from ._validation import check_head, check_loss_weights, check_softcap

    divergence = as_divergence(divergence)
    check_head("student_", student_hidden, student_weight, student_bias)
    check_loss_weights(labels, hard_weight, soft_weight)
    check_choice("impl", impl, TOPK_IMPLS)
    check_choice("backend", backend, BACKENDS)
    check_memory_budget(memory_budget)
    vocab, leading = student_weight.shape[0], student_hidden.shape[:-1]
    temperature = check_loss_options(labels, leading, student_hidden.device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    check_tail(tail, divergence.canonical(), divergence.name)
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, vocab, tail, student_hidden.device)
    logits = softcap(linear_logits(student_hidden, student_weight, student_bias, vocab,
                                   compute_dtype(student_hidden, student_weight)),
                     check_softcap("student_softcap", student_softcap))
    rows = soft_weight * topk_rows(logits, teacher_ids, teacher_logprobs, divergence, temperature, tail)
    if hard_weight > 0:
        rows = rows + hard_weight * torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index, reduction="none").view(leading)
    mask = row_mask(labels, ignore_index, leading, student_hidden.device)
    return reduce_rows(torch.where(mask, rows, 0.0), mask, reduction, num_items_in_batch)


@torch.no_grad()
def topk_logprobs(hidden, weight, k, *, temperature=1.0, bias=None, memory_budget=None):
    """Reference for `kdops.topk_logprobs` (same signature; `memory_budget` is checked and ignored): the whole
    float32 (float64) log_softmax((hidden · weightᵀ + bias) / T), its k largest entries with ties to the smaller
    id (a stable sort of the whole row, largest first)."""
    from ._validation import check_head, check_temperature

    check_head("", hidden, weight, bias)
    temperature = check_temperature(temperature)
    check_memory_budget(memory_budget)
    vocab = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k: expected an int in [1, {vocab}] (the vocabulary of the weight), got {k!r}")
    logits = linear_logits(hidden, weight, bias, vocab, compute_dtype(hidden, weight))
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    order = torch.sort(log_p, dim=-1, descending=True, stable=True).indices[..., :k]
    return order, log_p.gather(-1, order)
