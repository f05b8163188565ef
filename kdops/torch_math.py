"""The plain-PyTorch math of every loss, defined once: the canonical divergences D(P ‖ Q) of log-probabilities
lp, lq (see `kdops.divergences`), the logits' transforms (softcaps, TAID's mixed target), the per-row loss of a
pair of logits and of a pair of lm_heads, and the sparse teacher's tail mass. The user-facing reference losses
(`kdops.reference`), the torch engine of every path (`kdops.paths`) and the tests' oracle all compute with these
functions; the Triton kernels compute the same formulas (`kernels/divergences.py`).

They materialize the float32 log-softmax of both sides (float64 for float64 inputs) and are written to be read.
Terms where a probability is 0 contribute 0, and their gradients are 0 too: the masked values are replaced *before*
the arithmetic, so no nan · 0 reaches autograd.
"""

from __future__ import annotations

import math

import torch

from .divergences import Canonical, Divergence, Kind

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


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """hidden · weight[:vocab]ᵀ + bias[:vocab] in `dtype` (the rows past the shared vocabulary are padding)."""
    bias = None if bias is None else bias[:vocab].to(dtype)
    return torch.nn.functional.linear(hidden.to(dtype), weight[:vocab].to(dtype), bias)


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


def teacher_rest(lp: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(1 − Σp) [rows, 1] of log-probabilities lp [rows, k], from a float64 sum: −inf (empty) where the
    listed mass reaches 1, and where the present ids cover the whole vocabulary (k = V), as the student's
    complement is then empty too."""
    present = lp != -math.inf
    mass = lp.double().exp().sum(-1, keepdim=True)
    rest = torch.log1p(-mass.clamp(max=1.0))
    if lp.shape[-1] >= vocab:
        rest = rest.masked_fill(present.sum(-1, keepdim=True) >= vocab, -math.inf)
    return rest.to(lp.dtype)


def token_logprob_rows(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, cap: float | None,
                       counted: torch.Tensor | None = None) -> torch.Tensor:
    """(log p(token), H) [rows, 2] of float logits [rows, V] and token ids [rows]: y = softcap(logits, cap) / T,
    log p = log_softmax(y), H = −Σ p log p (terms where p = 0 contribute 0, and no gradient). Where `counted` is
    False the row's token is not read and its log p is 0 (its entropy is still computed)."""
    log_p = torch.log_softmax(softcap(logits, cap) / temperature, dim=-1)
    if counted is None:
        counted = torch.ones_like(token_ids, dtype=torch.bool)
    picked = log_p.gather(-1, torch.where(counted, token_ids, 0).long()[:, None]).squeeze(-1)
    return torch.stack([torch.where(counted, picked, 0.0), entropy_of(log_p)], dim=-1)


def entropy_of(log_p: torch.Tensor) -> torch.Tensor:
    """−Σ p log p over the last dimension of log-probabilities (a −inf entry, p = 0, contributes 0)."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)


def loss_parts_rows(divergence: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    labels: torch.Tensor | None, temperature: float, softcaps=(None, None)) -> torch.Tensor:
    """The parts of `kdops.LossParts` per row, [rows, 4], without gradients: D(target ‖ student at T)
    (`divergence_rows`), CE(softcapped student at T = 1, label) and H(softmax(student / T))
    (`student_rows_parts`), and H(softmax(target / T)), of the logits the divergence compares (`loss_logits`)."""
    with torch.no_grad():
        c = divergence.canonical().with_softcaps(*softcaps)
        dtype = compute_dtype(student_logits, teacher_logits)
        student, target = loss_logits(c, student_logits.to(dtype), teacher_logits.to(dtype))
        soft = divergence_rows(divergence, student_logits, teacher_logits, temperature, softcaps)
        entropy, hard = student_rows_parts(student, student / temperature, labels).unbind(-1)
        return torch.stack([soft, hard, entropy, entropy_of(torch.log_softmax(target / temperature, -1))], dim=-1)


def student_rows_parts(logits: torch.Tensor, scaled: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(H(softmax(scaled)), CE(logits, label)) [rows, 2] of a student's (softcapped) logits [rows, V] and the same
    at temperature, `scaled` = logits / T; CE at T = 1 is 0 without labels and where a label is outside [0, V)
    (ignore_index among them)."""
    with torch.no_grad():
        entropy = entropy_of(torch.log_softmax(scaled, -1))
        hard = torch.zeros_like(entropy)
        if labels is not None:
            valid = (labels >= 0) & (labels < logits.shape[-1])
            hard = torch.where(valid, torch.nn.functional.cross_entropy(
                logits, torch.where(valid, labels, 0).long(), reduction="none"), 0.0)
        return torch.stack([entropy, hard], dim=-1)
