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
teacher's lp and log(1 − Σp). That pair goes to the dense loss (`kd_loss`'s kernels or reference math,
whichever backend), so each divergence's math stays where it is; what is new is only the student's side —
the gather, R (computed over the complement, so q_tail is exact to its own size however small), and their
gradient, one write per element of the student's logits (`kernels/topk.py`).

This module validates and dispatches; the paths are in `kdops._topk`.
"""

from __future__ import annotations

import math

import torch

from . import _chunked
from ._autograd import problem_loss
from ._reduction import reduce_rows, row_mask
from ._topk import TopKChunkedProblem, TopKGatheredProblem, TopKTeacher, ordered_topk, topk_rows
from ._validation import check_loss_options, check_same_device, check_tensor, resolve_backend
from .divergences import Canonical, Divergence, Kind, as_divergence
from .reference import compute_dtype

TAILS = ("bucket", "renormalize", "zero")
TOPK_IMPLS = ("auto", "chunked", "gathered")
#: Σp may exceed 1 by this much in "bucket" mode (rounding of the teacher's log-probabilities), no more.
MASS_SLACK = 1e-3


def check_tail(tail, canon: Canonical, name: str) -> None:
    """`tail` is one of TAILS, and "zero" only with a divergence that is finite where P̂ = 0 < Q."""
    if not isinstance(tail, str) or tail not in TAILS:
        raise ValueError(f"tail: expected one of {', '.join(map(repr, TAILS))}, got {tail!r}")
    if canon.teacher_share != 1.0:
        raise ValueError(f"divergence {name!r} with a top-k teacher: TAID interpolates the student's and the "
                         "teacher's logits over the whole vocabulary, which a sparse teacher does not have; use "
                         "kdops.kd_loss or kdops.fused_linear_kd_loss with the dense teacher")
    if tail != "zero":
        return
    # Canonical D(P ‖ Q) with the student as P weighs the teacher's zeros by log(q / 0): KL(q ‖ p̂) is infinite,
    # and so is the skew KL(q ‖ αq + (1 − α)p̂) at α = 0. Every other kind stays finite.
    if canon.student_is_p and (canon.kind == Kind.KL or (canon.kind == Kind.SKEW and canon.c1 == 0)):
        raise ValueError(
            f"tail='zero' with divergence {name!r}: the teacher's distribution is 0 outside its ids while the "
            "student's is not, and this divergence weighs that by log(q / 0) = ∞; use tail='bucket' or "
            "'renormalize', or a divergence that stays finite there (forward_kl, generalized_jsd with β < 1, "
            "skew_forward_kl, skew_reverse_kl with α > 0, tvd, alpha_beta)")


def check_topk_teacher(teacher_ids, teacher_logprobs, leading: torch.Size, vocab: int, tail: str,
                       device: torch.device) -> None:
    """Shapes, dtypes and (on the CPU, where it costs no synchronization) values of a top-k teacher."""
    check_tensor("teacher_ids", teacher_ids, floating=False)
    check_tensor("teacher_logprobs", teacher_logprobs)
    if teacher_ids.is_complex() or teacher_ids.dtype == torch.bool or teacher_ids.is_floating_point():
        raise TypeError(f"teacher_ids: expected an integer dtype, got {teacher_ids.dtype}")
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"teacher_ids and teacher_logprobs: expected the same shape [..., k], got "
                         f"{tuple(teacher_ids.shape)} and {tuple(teacher_logprobs.shape)}")
    if teacher_ids.shape[:-1] != leading:
        raise ValueError(f"teacher_ids: expected leading dimensions {tuple(leading)} (the student's), got shape "
                         f"{tuple(teacher_ids.shape)}")
    if teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids: k (the last dimension) is 0, got shape {tuple(teacher_ids.shape)}")
    for name, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (where the student is), got one on {t.device}")
    if device.type != "cpu" or torch.compiler.is_compiling():
        return
    lp = teacher_logprobs.detach()
    present = lp != -math.inf
    if bool(torch.isnan(lp).any()) or bool((lp > 0).any()):
        bad = lp[torch.isnan(lp) | (lp > 0)][0].item()
        raise ValueError(f"teacher_logprobs: expected log-probabilities (≤ 0, or -inf for an absent entry), got {bad!r}")
    ids = teacher_ids[present]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"teacher_ids: expected ids in [0, {vocab}) (the student's vocabulary) where the "
                         f"log-probability is not -inf, got values in [{int(ids.min())}, {int(ids.max())}]")
    flat_ids = torch.where(present, teacher_ids, -1 - torch.arange(teacher_ids.shape[-1], device=device))
    ordered = flat_ids.reshape(-1, flat_ids.shape[-1]).sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        row = int((ordered[:, 1:] == ordered[:, :-1]).any(-1).nonzero()[0])
        raise ValueError(f"teacher_ids: a row lists an id twice (flattened row {row}); each id may appear once")
    if tail == "bucket":
        mass = lp.double().exp().sum(-1)
        if bool((mass > 1 + MASS_SLACK).any()):
            raise ValueError(f"teacher_logprobs: with tail='bucket' a row's probabilities must sum to at most 1 "
                             f"(+{MASS_SLACK:g} for rounding), got {float(mass.max()):.6g}")


def _shards(vocab_parallel, divergence: Divergence, rows: int, device, teacher_ids, width=None, weight_rows=None,
            **options):
    """The group's agreed layout under `vocab_parallel` (`kdops.parallel.resolve`), or None."""
    if vocab_parallel is None:
        return None
    from . import parallel

    options = parallel.options_of(divergence, k=tuple(teacher_ids.shape)[-1:], **options)
    return parallel.resolve(vocab_parallel, width=width, weight_rows=weight_rows, rows=rows, device=device,
                            options=options)


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
) -> torch.Tensor:
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

    `backend`: "triton" (kernels over the vocabulary: extra memory O(rows · k)), "torch" (the reference math
    chunked over rows), "auto" (Triton on CUDA, torch elsewhere).

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the student's logits are this rank's
    shard [..., stop − start] of the vocabulary; the teacher's ids stay global. Each rank's side (the ids in
    its shard, its complement's log-mass) is combined over the group with two all-reduces per call; the loss
    is the whole vocabulary's, the same on every rank, and each rank's gradient is its shard's.
    """
    divergence = as_divergence(divergence)
    check_tensor("student_logits", student_logits)
    vocab = student_logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"student_logits: the vocabulary (last dimension) is empty, got shape "
                         f"{tuple(student_logits.shape)}")
    leading = student_logits.shape[:-1]
    device = student_logits.device
    temperature = check_loss_options(labels, leading, device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    check_tail(tail, divergence.canonical(), divergence.name)
    backend = resolve_backend(backend, device)
    shards = _shards(vocab_parallel, divergence, leading.numel(), device, teacher_ids, width=vocab,
                     temperature=temperature, tail=tail, backend=backend, reduction=reduction)
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, vocab if shards is None else shards.vocab, tail,
                       device)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    teacher = TopKTeacher(teacher_ids, teacher_logprobs, vocab, tail, dtype, shards)
    mask = row_mask(labels, ignore_index, leading, device).reshape(-1)
    rows = topk_rows(student_logits.reshape(-1, vocab), teacher, mask, divergence, temperature, backend, shards)
    return reduce_rows(rows.view(leading), mask.view(leading), reduction, num_items_in_batch)


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
) -> torch.Tensor:
    """`topk_kd_loss` from the student's hidden states [..., H] and lm_head weight [V, H] (+ bias [V]),
    without its [tokens, V] logits: per row,

        ℓ = soft_weight · D(P ‖ Q) (the `tail` mode's k (+1)-outcome pair) + hard_weight · CE(s, label) (T = 1)

    masked and reduced like `kd_loss`. Gradients flow to the hidden states, weight and bias (in their
    dtypes); the teacher's log-probabilities get none. `student_softcap` c: the student's logits are
    c·tanh(z / c) everywhere above (as in `fused_linear_kd_loss`; the teacher's log-probabilities are whatever
    its model gave).

    `impl`: "chunked" (token chunks of float32 logits within `memory_budget` bytes, default
    `kdops._chunked.MEMORY_BUDGET`; the vocabulary-wide passes of `topk_kd_loss` on each chunk), "gathered"
    (tail="renormalize" without the hard-label term only: only the k gathered weight rows are multiplied,
    O(rows·k·H) flops; the weight gradient is summed in a float32 [V, H] accumulator), "auto" (gathered where
    it applies, else chunked). A fused lm_head kernel for sparse teachers does not exist yet ("fused" raises).
    `backend` as in `kd_loss`.

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the weight (and bias) are this rank's
    shard of the vocabulary, rows [start, stop) (rows past stop − start are padding); hidden states, labels
    and the teacher's ids are global. As in `fused_linear_kd_loss`: the loss is the whole vocabulary's on every
    rank, weight and bias gradients are the shard's, hidden-state gradients are summed over the group unless
    `reduce_hidden_grad=False`.
    """
    from ._validation import (
        check_choice,
        check_head,
        check_label_range,
        check_loss_weights,
        check_memory_budget,
        check_softcap,
    )

    divergence = as_divergence(divergence)
    check_head("student_", student_hidden, student_weight, student_bias)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias)
    check_loss_weights(labels, hard_weight, soft_weight)
    check_choice("impl", impl, TOPK_IMPLS)
    check_memory_budget(memory_budget)
    vocab, leading, device = student_weight.shape[0], student_hidden.shape[:-1], student_hidden.device
    temperature = check_loss_options(labels, leading, device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    check_tail(tail, divergence.canonical(), divergence.name)
    cap = check_softcap("student_softcap", student_softcap)
    hard_weight, soft_weight = float(hard_weight), float(soft_weight)
    shards = _shards(vocab_parallel, divergence, leading.numel(), device, teacher_ids,
                     weight_rows=(student_weight.shape[0],), temperature=temperature, tail=tail, impl=impl,
                     backend=backend, reduction=reduction, hard=hard_weight, soft=soft_weight, softcap=cap,
                     grads=tuple(t is not None and t.requires_grad for t in (student_hidden, student_weight,
                                                                              student_bias)))
    if shards is not None:
        vocab = shards.width
    total = vocab if shards is None else shards.vocab
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, total, tail, device)
    if hard_weight > 0:
        check_label_range(labels, ignore_index, total)
    gathered = tail == "renormalize" and hard_weight == 0
    if impl == "gathered" and not gathered:
        raise ValueError("impl='gathered': only tail='renormalize' without the hard-label term reads just the k "
                         f"gathered weight rows; got tail={tail!r}, hard_weight={hard_weight:g}; use impl='chunked' "
                         "or 'auto'")
    backend = resolve_backend(backend, device)
    engine = "triton" if backend == "triton" else "torch"
    dtype = compute_dtype(student_hidden, student_weight)
    teacher = TopKTeacher(teacher_ids, teacher_logprobs, vocab, tail, dtype, shards)
    if gathered and impl != "chunked":
        problem = TopKGatheredProblem(student_hidden, student_weight, student_bias, teacher, divergence, temperature,
                                      soft_weight, engine, memory_budget, shards, cap)
    else:
        problem = TopKChunkedProblem(student_hidden, student_weight, student_bias, teacher, labels, divergence,
                                     temperature, vocab, soft_weight, hard_weight, ignore_index, engine,
                                     memory_budget, shards, cap)
    mask = row_mask(labels, ignore_index, leading, device).reshape(-1)
    return problem_loss(problem, (student_hidden, student_weight, student_bias, None, None, None), mask, reduction,
                        num_items_in_batch, leading)


# --- the teacher's side ------------------------------------------------------------------------------------------

#: Default memory of `topk_logprobs`' float32 [chunk, V] logits and their temporaries, in bytes.
TOPK_LOGPROBS_BUDGET = 256 * 2**20


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, temperature: float = 1.0,
                  bias: torch.Tensor | None = None, memory_budget: int | None = None):
    """The teacher's side of a sparse teacher: (ids [..., k] int64, logprobs [..., k]) of the k most likely
    tokens under softmax((hidden · weightᵀ + bias) / T), most likely first, without the [tokens, V] logits:
    rows go in chunks whose float32 logits and temporaries take at most `memory_budget` bytes (default
    TOPK_LOGPROBS_BUDGET = 256 MiB; at least one row per chunk). Equal to
    ``torch.topk(torch.log_softmax(logits / T, -1), k)`` up to ties, which are broken by the smaller id (in
    which tied entries make the cut, and in their order). Log-probabilities are float32 (float64 for float64
    inputs), at the temperature T: what `topk_kd_loss` takes. No gradients."""
    from ._validation import check_head, check_memory_budget, check_temperature

    check_head("", hidden, weight, bias)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    temperature = check_temperature(temperature)
    check_memory_budget(memory_budget)
    vocab = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k: expected an int in [1, {vocab}] (the vocabulary of the weight), got {k!r}")
    dtype = compute_dtype(hidden, weight)
    side = _chunked._Side(hidden, weight, bias, vocab, dtype)
    n_rows = hidden.numel() // hidden.shape[-1]
    budget = TOPK_LOGPROBS_BUDGET if memory_budget is None else memory_budget
    # the logits, a scaled copy, and topk's and the tie check's temporaries: about four float32 rows per row
    chunk = max(1, budget // (4 * vocab * dtype.itemsize))
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty((n_rows, k), dtype=dtype, device=hidden.device)
    buffer = torch.empty((min(chunk, max(n_rows, 1)), vocab), dtype=dtype, device=hidden.device)
    for r0 in range(0, n_rows, chunk):
        r1 = min(r0 + chunk, n_rows)
        x = side.logits(side.rows(r0, r1), buffer[: r1 - r0])
        if temperature != 1.0:
            x.mul_(1.0 / temperature)
        top = ordered_topk(x, k)
        ids[r0:r1] = top
        logprobs[r0:r1] = x.gather(-1, top) - torch.logsumexp(x, dim=-1, keepdim=True)
    leading = hidden.shape[:-1]
    return ids.view(*leading, k), logprobs.view(*leading, k)
