"""Sparse teachers: distillation from the teacher's top-k log-probabilities.

A teacher row is k token ids and their log-probabilities at the distillation temperature (`-inf` marks an
absent entry). The student's distribution is q = softmax(s / T) over the whole vocabulary; p_i = e^(lp_i).
`tail` says what becomes of the mass outside the ids:

    "bucket"       P = (p, 1 − Σp) and Q = (q_ids, q_tail) over k + 1 outcomes, q_tail = Σ_{j ∉ ids} q_j
    "renormalize"  P̂ = p / Σp and Q̂ = q_ids / Σ q_ids over the k ids (the rest of the vocabulary is never read)
    "zero"         P̂ = p / Σp on the ids and 0 elsewhere, against the whole q: for the divergences that stay
                   finite where P is 0 and Q is not (`check_tail`), the off-support terms are those of one
                   outcome of mass q_tail against 0, i.e. the bucket of (P̂, 0) and Q

Every mode is thus one divergence between two distributions over k or k + 1 outcomes, whose log-weights
are columns of a small [rows, k (+1)] "logits" pair: the student's s_ids / T (−inf where absent) and its
complement's log-mass R = log Σ_{j ∉ ids} e^(s_j / T) (softmax of the pair is exactly (q_ids, q_tail)), the
teacher's lp and log(1 − Σp). That pair goes to the dense loss (`kd_loss`'s kernels or torch math,
whichever backend), so each divergence's math stays where it is; what is new is only the student's side —
the gather, R (computed over the complement, so q_tail is exact to its own size however small), and their
gradient, one write per element of the student's logits (`kernels/topk.py`).

This module holds the public functions; the paths are `kdops.paths.topk` and `kdops.paths.topk_linear`.
"""

from __future__ import annotations

import torch

from . import paths
from .divergences import Divergence
from .paths.topk_linear import top_logprobs
from .problem import LossParts, check_topk_logprobs, describe_fused_linear_topk, describe_topk


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str | Divergence = "forward_kl",
    temperature: float = 1.0,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    backend: str = "auto",
    vocab_parallel=None,
    weights: torch.Tensor | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
    """Distillation loss against a sparse teacher: its top-k ids [..., k] and log-probabilities [..., k] at
    temperature T (−inf: an absent entry), and the student's logits [..., V], in float32 (float64 for float64
    logits).

    Per row, ℓ = D(P ‖ Q) between the teacher's and the student's distributions as `tail` builds them from
    p = exp(teacher_logprobs) and q = softmax(student / T) over the whole vocabulary (see `kdops.topk`):
    "bucket" (default) adds one outcome holding the rest of each side's mass, 1 − Σp and Σ_{j ∉ ids} q_j;
    "renormalize" compares p / Σp with q_ids / Σ q_ids; "zero" compares p / Σp (0 off the ids) with q. With
    k = V and "bucket" this is `kd_loss` with the teacher's logits. Masking, `reduction` and
    `num_items_in_batch` are those of `kd_loss`; gradients flow to the student logits only, in their dtype.

    Errors name the argument: ids and log-probabilities of different shapes, or of leading dimensions other
    than the student's; non-integer ids; an unknown `tail`; tail="zero" with a divergence that is infinite
    there. On CPU tensors also (free of a device synchronization there): ids outside [0, V) where present, an
    id listed twice in a row, a log-probability > 0 or NaN, and Σp > 1 + 1e-3 with "bucket". On an accelerator
    those are not checked: an id outside [0, V) fails the device-side bounds assertion of the gather that reads
    the student's logit there (CUDA then reports an error and the context is unusable), never a silent read.

    `backend`: "triton" (kernels over the vocabulary: extra memory O(rows · k)), "torch" (the torch math
    chunked over rows), "auto" (Triton on CUDA, torch elsewhere).

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the student's logits are this rank's
    shard [..., stop − start] of the vocabulary; the teacher's ids stay global. Each rank's side (the ids in
    its shard, its complement's log-mass) is combined over the group with two all-reduces per call; the loss
    is the whole vocabulary's, the same on every rank, and each rank's gradient is its shard's.

    `weights`, `return_parts`: as in `kdops.kd_loss` (per-row loss weights; the loss's `kdops.LossParts`).
    """
    return paths.loss(describe_topk(
        student_logits, teacher_ids, teacher_logprobs, labels, divergence=divergence, temperature=temperature,
        tail=tail, ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        backend=backend, vocab_parallel=vocab_parallel, weights=weights, return_parts=return_parts))


def fused_linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str | Divergence = "forward_kl",
    temperature: float = 1.0,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    student_bias: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    impl: str = "auto",
    backend: str = "auto",
    memory_budget: int | None = None,
    vocab_parallel=None,
    student_softcap: float | None = None,
    weights: torch.Tensor | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
    """`topk_kd_loss` from the student's hidden states [..., H] and lm_head weight [V, H] (+ bias [V]),
    without its [tokens, V] logits: per row,

        ℓ = soft_weight · D(P ‖ Q) (the `tail` mode's k (+1)-outcome pair) + hard_weight · CE(s, label) (T = 1)

    masked and reduced like `kd_loss`. Gradients flow to the hidden states, weight and bias (in their
    dtypes); the teacher's log-probabilities get none. `student_softcap` c: the student's logits are
    c·tanh(z / c) everywhere above (as in `fused_linear_kd_loss`; the teacher's log-probabilities are whatever
    its model gave).

    `impl`: "chunked" (token chunks of float32 logits within `memory_budget` bytes, default
    `kdops.paths.chunked.MEMORY_BUDGET`; the vocabulary-wide passes of `topk_kd_loss` on each chunk), "gathered"
    (tail="renormalize" without the hard-label term only: only the k gathered weight rows are multiplied,
    O(rows·k·H) flops; the weight gradient is summed in a float32 [V, H] accumulator), "auto" (gathered where
    it applies, else chunked). A fused lm_head kernel for sparse teachers does not exist yet ("fused" raises).
    `backend` as in `kd_loss`.

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the weight (and bias) are this rank's
    shard of the vocabulary, rows [start, stop) (rows past stop − start are padding); hidden states, labels
    and the teacher's ids are global. As in `fused_linear_kd_loss`: the loss is the whole vocabulary's on every
    rank, weight and bias gradients are the shard's, hidden-state gradients are summed over the group unless
    `reduce_hidden_grad=False`.

    `weights`, `return_parts`: as in `kdops.kd_loss` (per-row loss weights; the loss's `kdops.LossParts`).
    """
    return paths.loss(describe_fused_linear_topk(
        student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, divergence=divergence,
        temperature=temperature, tail=tail, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, student_bias=student_bias, hard_weight=hard_weight,
        soft_weight=soft_weight, impl=impl, backend=backend, memory_budget=memory_budget,
        vocab_parallel=vocab_parallel, student_softcap=student_softcap, weights=weights,
        return_parts=return_parts))


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, temperature: float = 1.0,
                  bias: torch.Tensor | None = None, memory_budget: int | None = None):
    """The teacher's side of a sparse teacher: (ids [..., k] int64, logprobs [..., k]) of the k most likely
    tokens under softmax((hidden · weightᵀ + bias) / T), most likely first, without the [tokens, V] logits:
    rows go in chunks whose float32 logits and temporaries take at most `memory_budget` bytes (default
    `kdops.paths.topk_linear.TOPK_LOGPROBS_BUDGET` = 256 MiB; at least one row per chunk). Equal to
    ``torch.topk(torch.log_softmax(logits / T, -1), k)`` up to ties, which are broken by the smaller id (in
    which tied entries make the cut, and in their order). Log-probabilities are float32 (float64 for float64
    inputs), at the temperature T: what `topk_kd_loss` takes. No gradients."""
    temperature = check_topk_logprobs(hidden, weight, k, temperature, bias, memory_budget)
    return top_logprobs(hidden, weight, bias, k, temperature, memory_budget)
