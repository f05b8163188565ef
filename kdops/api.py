"""Public functions: validate, pick a backend, dispatch."""

from __future__ import annotations

import contextlib

import torch

from . import _chunked, parallel
from ._autograd import KDLogitsFunction, problem_loss
from ._fused import FusedProblem
from ._sliced import SlicedProblem
from ._reduction import reduce_rows, row_mask
from ._torch_backend import chunked_kd_rows
from ._validation import (
    check_memory_budget,
    check_fused_inputs,
    check_label_range,
    check_logits_pair,
    check_loss_options,
    check_softcap,
    resolve_backend,
    resolve_impl,
)
from .divergences import Divergence, as_divergence
from .ensemble import MixedChunkedProblem, TeacherMix, as_teachers, check_mix, linear_teachers, mixed_kd_rows
from .parallel import VocabParallel
from .reference import compute_dtype, divergence_rows, linear_kd_rows, linear_logits


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
    vocab_parallel: VocabParallel | None = None,
    teacher_mix: TeacherMix | None = None,
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

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the logits are this rank's shard
    [..., stop − start] of the vocabulary (see `kdops.parallel`): the loss is the whole vocabulary's, the
    same on every rank, and each rank's gradient is that of its shard.

    `teacher_mix`: with a sequence of teachers' logits (each [..., V]), `kdops.Ensemble(weights)` (the target is
    Σ w_i softmax(z_i / T)) or `kdops.LogitSum(weights)` (softmax(Σ w_i z_i / T)); see `kdops.ensemble`. Rows go
    in chunks (`kdops._torch_backend.BUDGET_BYTES`), the mix recomputed in the backward; not with
    `vocab_parallel`, and eager under torch.compile (a graph break).
    """
    divergence = as_divergence(divergence)
    teachers = as_teachers("teacher_logits", teacher_logits)
    mix = check_mix(teacher_mix, len(teachers), "teacher_logits")
    for i, teacher in enumerate(teachers):
        check_logits_pair(student_logits, teacher, "teacher_logits" if mix is None else f"teacher_logits[{i}]")
    leading = student_logits.shape[:-1]
    temperature = check_loss_options(labels, leading, student_logits.device, temperature, ignore_index, reduction,
                                     num_items_in_batch)
    backend = resolve_backend(backend, student_logits.device)

    mask = row_mask(labels, ignore_index, leading, student_logits.device).reshape(-1)
    if mix is not None:
        if vocab_parallel is not None:
            raise ValueError("vocab_parallel with teacher_mix: several teachers are not supported under vocabulary "
                             "parallelism (an Ensemble needs each teacher's normalizer over the group)")
        rows = mixed_kd_rows(student_logits, teachers, mask, mix, divergence, temperature, backend)
        return reduce_rows(rows.view(leading), mask.view(leading), reduction, num_items_in_batch)
    if vocab_parallel is not None:
        options = parallel.options_of(divergence, temperature=temperature, reduction=reduction, backend=backend,
                                      grads=(student_logits.requires_grad, teacher_logits.requires_grad))
        rows = _vocab_parallel_kd_rows(student_logits, teacher_logits, mask, divergence, temperature, backend,
                                       vocab_parallel, options)
    elif torch.compiler.is_compiling():
        rows = _compiled_kd_rows(student_logits, teacher_logits, mask, divergence, temperature, backend)
    else:
        rows = kd_loss_rows_eager(student_logits, teacher_logits, mask, divergence, temperature, backend)
    return reduce_rows(rows.view(leading), mask.view(leading), reduction, num_items_in_batch)


def _compiled_kd_rows(student_logits, teacher_logits, mask, divergence, temperature, backend):
    """kd_loss's per-row losses inside torch.compile: the Triton custom op, or the traced torch backend."""
    from . import _ops
    from ._torch_backend import checkpointed_rows, chunk_rows

    if backend == "triton":
        return _ops.kd_loss_rows(student_logits, teacher_logits, mask, _ops.divergence_repr(divergence), temperature)
    vocab = student_logits.shape[-1]

    def rows(s, t, m):
        return torch.where(m, divergence_rows(divergence, s, t, temperature), 0.0)

    return checkpointed_rows(rows, mask.numel(), chunk_rows(vocab), student_logits.reshape(-1, vocab),
                             teacher_logits.reshape(-1, vocab), mask)


def kd_loss_rows_eager(student_logits, teacher_logits, mask, divergence: Divergence, temperature: float,
                       backend: str, shards=None) -> torch.Tensor:
    """Per-row losses [rows] (0 where the mask is False) of validated inputs, by the chosen backend."""
    if backend == "triton":
        return KDLogitsFunction.apply(student_logits, teacher_logits, mask, divergence.canonical(), temperature,
                                      shards)
    vocab = student_logits.shape[-1]
    return chunked_kd_rows(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), mask, divergence,
                           temperature, shards)


@torch.compiler.disable
def _vocab_parallel_kd_rows(student_logits, teacher_logits, mask, divergence, temperature, backend, vocab_parallel,
                            options):
    """kd_loss's per-row losses over the group's vocabulary (eager: torch.compile breaks the graph here)."""
    shards = parallel.resolve(vocab_parallel, width=student_logits.shape[-1], rows=mask.numel(),
                              device=student_logits.device, options=options)
    return kd_loss_rows_eager(student_logits, teacher_logits, mask, divergence, temperature, backend, shards)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str | Divergence = "forward_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    impl: str = "auto",
    backend: str = "auto",
    memory_budget: int | None = None,
    vocab_parallel: VocabParallel | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    teacher_mix: TeacherMix | None = None,
) -> torch.Tensor:
    """Distillation loss from hidden states and lm_head weights, without the [tokens, V] logits in memory.

    Logits s = student_hidden · student_weightᵀ (+ student_bias) and t likewise for the teacher, over the
    shared vocabulary [0, min(Vs, Vt)) (rows of the larger weight past it are padding). Per row,

        ℓ = soft_weight · D(softmax(t / T), softmax(s / T)) + hard_weight · CE(s, label)   (CE at T = 1)

    masked and reduced like `kd_loss`. `student_softcap` / `teacher_softcap` (a model's
    `final_logit_softcapping`, e.g. Gemma 2's 30): that side's logits are c·tanh(z / c) everywhere above
    (CE included), applied to each logit tile inside the kernels, gradients through the tanh.
    Hidden states are [..., Hs] and [..., Ht] (Hs != Ht is fine),
    weights [V, H]; all logit math is float32 whatever the input dtype. Gradients flow to every input that
    requires grad, and are returned in its dtype.

    `impl`: "fused" computes the logits inside Triton kernels, vocabulary block by block (extra memory
    O(rows) statistics, float32 sums of the hidden gradients, and one vocabulary slice of the logit gradient
    for every row, at most `kdops._fused.GRADIENT_BYTES`); "chunked"
    runs matmuls on token chunks with float32 [chunk, V] logits and the kernels on logits, keeping each
    row's logit gradient in the weight's dtype for the dH and dW matmuls (extra memory about
    `memory_budget` bytes, default `kdops._chunked.MEMORY_BUDGET` = 4 GiB: a larger budget means fewer
    chunks and fewer float32 weight-gradient sums; see `kdops._chunked.plan`); "sliced" runs the matmuls
    on vocabulary slices for every row at once (`kdops._sliced`: float32 [rows, slice] logits, the kernels
    on logits, each slice's logits computed again in the backward; extra memory: the slice's buffers, at
    most `memory_budget` less the float32 dH sums, default `kdops._sliced.SLICE_BYTES` = 64 MiB, plus those
    sums and O(rows) statistics); "auto" takes "chunked" — its four matmuls are cheaper than the six of
    "sliced" and "fused" — unless a `memory_budget` was given that even its smallest plan exceeds: then
    "sliced". `backend="torch"` (the default off CUDA) runs the chunked path with the reference math instead
    of the kernels.

    With reduction "batchmean" or "sum", the chunked paths compute the gradients during the forward
    (the backward multiplies them by the upstream gradient), so the loss supports a single backward.

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the weights (and biases) are this
    rank's shard of the vocabulary, rows [start, stop) (rows past stop − start are padding); hidden states
    and labels (global token ids) are the same on every rank. The loss is the whole vocabulary's, the same
    on every rank; weight and bias gradients are the shard's, and the hidden-state gradients are summed over
    the group unless `VocabParallel(reduce_hidden_grad=False)` (see `kdops.parallel`).

    `teacher_mix`: with sequences `teacher_hidden`, `teacher_weight` (and `teacher_bias`, or None) of one entry
    per teacher — widths may differ, vocabularies may not — `kdops.Ensemble(weights)` or
    `kdops.LogitSum(weights)` (`kdops.ensemble`): the target is the mix of the teachers' (softcapped) logits.
    The chunked path only (every model's chunk logits; "auto" takes it, "fused" and "sliced" raise); not with
    `vocab_parallel`; eager under torch.compile (a graph break).
    """
    divergence = as_divergence(divergence)
    teacher_hidden, teacher_weight, teacher_bias, mix = linear_teachers(teacher_hidden, teacher_weight,
                                                                        teacher_bias, teacher_mix)
    device_type = student_hidden.device.type
    autocast = _autocast_dtype(device_type)
    if autocast is not None:
        # As autocast runs F.linear: every float operand but float64 cast to its dtype (differentiably: float32
        # master weights get their gradients through the casts); the loss itself is computed as without
        # autocast (float32 logits and statistics), which the context below keeps.
        student_hidden, student_weight, student_bias = (_autocast_cast(t, autocast) for t in
                                                        (student_hidden, student_weight, student_bias))
        teacher_hidden, teacher_weight, teacher_bias = (
            _autocast_cast(t, autocast) if mix is None else [_autocast_cast(x, autocast) for x in t]
            for t in (teacher_hidden, teacher_weight, teacher_bias))
    with torch.autocast(device_type, enabled=False) if autocast is not None else contextlib.nullcontext():
        vocab = check_fused_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                   student_bias, teacher_bias, hard_weight, soft_weight, impl)
        leading = student_hidden.shape[:-1]
        device = student_hidden.device
        temperature = check_loss_options(labels, leading, device, temperature, ignore_index, reduction,
                                         num_items_in_batch)
        check_memory_budget(memory_budget)
        softcaps = (check_softcap("student_softcap", student_softcap),
                    check_softcap("teacher_softcap", teacher_softcap))
        backend = resolve_backend(backend, device)
        hard_weight, soft_weight = float(hard_weight), float(soft_weight)
        mask = row_mask(labels, ignore_index, leading, device).reshape(-1)
        options = dict(divergence=divergence, temperature=temperature, vocab=vocab, soft_weight=soft_weight,
                       hard_weight=hard_weight, ignore_index=ignore_index, impl=impl, backend=backend,
                       memory_budget=memory_budget, softcaps=softcaps)
        if mix is not None:
            if hard_weight > 0:
                check_label_range(labels, ignore_index, vocab)
            tensors = (student_hidden, student_weight, student_bias,
                       *[x for teacher in zip(teacher_hidden, teacher_weight, teacher_bias) for x in teacher])
            return _mixed_fused_loss(tensors, labels, mask, dict(options, teacher_mix=mix), reduction,
                                     num_items_in_batch, leading, vocab_parallel)
        tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        if vocab_parallel is not None:
            return _vocab_parallel_fused_loss(tensors, labels, mask, options, reduction, num_items_in_batch, leading,
                                              vocab_parallel)
        if hard_weight > 0:
            check_label_range(labels, ignore_index, vocab)
        if torch.compiler.is_compiling():
            rows = _compiled_fused_rows(tensors, labels, mask, options)
            return reduce_rows(rows.view(leading), mask.view(leading), reduction, num_items_in_batch)
        return _fused_loss_eager(tensors, labels, mask, options, reduction, num_items_in_batch, leading)


@torch.compiler.disable
def _mixed_fused_loss(tensors, labels, mask, options, reduction, num_items_in_batch, leading, vocab_parallel):
    """fused_linear_kd_loss with several teachers: the chunked path (`kdops.ensemble.MixedChunkedProblem`).
    Eager: torch.compile breaks the graph here."""
    if vocab_parallel is not None:
        raise ValueError("vocab_parallel with teacher_mix: several teachers are not supported under vocabulary "
                         "parallelism (an Ensemble needs each teacher's normalizer over the group)")
    if options["impl"] in ("fused", "sliced"):
        raise ValueError(f"impl={options['impl']!r} with teacher_mix: the {options['impl']} path takes one teacher; "
                         "several teachers run the chunked path (impl='chunked' or 'auto')")
    hs, ws, bs, *flat = tensors
    teachers = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
    engine = "triton" if options["backend"] == "triton" else "torch"
    problem = MixedChunkedProblem(hs, ws, bs, teachers, labels, options["divergence"], options["temperature"],
                                  options["vocab"], options["soft_weight"], options["hard_weight"],
                                  options["ignore_index"], engine, options["memory_budget"], options["softcaps"],
                                  options["teacher_mix"])
    return problem_loss(problem, tensors, mask, reduction, num_items_in_batch, leading)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of an active torch.autocast on `device_type`, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError):  # a device type without autocast
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _autocast_cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What autocast does to a lower-precision op's operand: float tensors other than float64 cast to dtype."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype in (dtype, torch.float64):
        return tensor
    return tensor.to(dtype)


def _fused_loss_eager(tensors, labels, mask, options, reduction, num_items_in_batch, leading, shards=None):
    problem = _fused_problem(*tensors, labels, **options, shards=shards)
    return problem_loss(problem, tensors, mask, reduction, num_items_in_batch, leading)


@torch.compiler.disable
def _vocab_parallel_fused_loss(tensors, labels, mask, options, reduction, num_items_in_batch, leading,
                               vocab_parallel):
    """fused_linear_kd_loss over the group's vocabulary (eager: torch.compile breaks the graph here)."""
    hs, ws, _, ht, wt, _ = tensors
    signature = parallel.options_of(**{k: v for k, v in options.items() if k != "vocab"}, reduction=reduction,
                                    grads=tuple(t is not None and t.requires_grad for t in tensors))
    shards = parallel.resolve(vocab_parallel, width=None, weight_rows=(ws.shape[0], wt.shape[0]), rows=mask.numel(),
                              device=hs.device, options=signature)
    if options["hard_weight"] > 0:
        check_label_range(labels, options["ignore_index"], shards.vocab)
    options = dict(options, vocab=shards.width)
    return _fused_loss_eager(tensors, labels, mask, options, reduction, num_items_in_batch, leading, shards)


def _fused_problem(hs, ws, bs, ht, wt, bt, labels, *, divergence, temperature, vocab, soft_weight, hard_weight,
                   ignore_index, impl, backend, memory_budget, softcaps, shards=None):
    """The prepared inputs of the implementation that `impl` (resolved) and `backend` select. Under
    `shards`, `vocab` is this rank's shard, and the choice of "auto" is the widest shard's, so that every
    rank takes the same path."""
    engine = "triton" if backend == "triton" else "torch"
    chunked = _chunked.ChunkedProblem(hs, ws, bs, ht, wt, bt, labels, divergence, temperature, vocab, soft_weight,
                                      hard_weight, ignore_index, engine, memory_budget, shards, softcaps)
    grads = tuple(t is not None and t.requires_grad for t in (hs, ws, bs, ht, wt, bt))
    # The default budget is a target (the plan may exceed it where no exact plan fits); one the user gave is
    # a limit that "auto" keeps by taking the sliced path.
    fits = memory_budget is None or chunked.plan_bytes(grads) <= memory_budget
    resolved = resolve_impl(impl, backend, fits)
    canon = divergence.canonical().with_softcaps(*softcaps)
    if resolved == "fused":
        return FusedProblem(hs, ws, bs, ht, wt, bt, labels, canon, 1.0 / temperature, vocab, soft_weight, hard_weight,
                            shards)
    if resolved == "sliced":
        return SlicedProblem(hs, ws, bs, ht, wt, bt, labels, canon, 1.0 / temperature, vocab, soft_weight,
                             hard_weight, memory_budget, shards)
    return chunked


def _compiled_fused_rows(tensors, labels, mask, options):
    """fused_linear_kd_loss's per-row losses inside torch.compile: the Triton custom op, or the traced torch
    backend (reference math on float32 chunk logits)."""
    from . import _ops
    from ._torch_backend import checkpointed_rows

    if options["backend"] == "triton":
        return _ops.fused_linear_kd_rows(*tensors, labels, mask, _ops.fused_options(options))
    hs, ws, bs, ht, wt, bt = tensors
    vocab, dtype = options["vocab"], compute_dtype(hs, ws, ht, wt)
    n_rows = mask.numel()
    # Chunks as the eager torch engine plans them with no gradient kept (autograd holds what it needs).
    chunk = _chunked.logits_chunk_rows(n_rows, vocab, "torch", dtype, options["memory_budget"])
    # Cast once, outside the chunks: autograd then sums the chunks' weight gradients in float32 and rounds
    # them once, where a cast per chunk would add them up in the weight's own dtype.
    ws, wt = ws[:vocab].to(dtype), wt[:vocab].to(dtype)
    bs, bt = (None if b is None else b[:vocab].to(dtype) for b in (bs, bt))

    def rows(h_s, h_t, y, m):
        s = linear_logits(h_s, ws, bs, vocab, dtype)
        t = linear_logits(h_t, wt, bt, vocab, dtype)
        loss = linear_kd_rows(s, t, y, options["divergence"], options["temperature"], options["soft_weight"],
                              options["hard_weight"], options["ignore_index"], options["softcaps"])
        return torch.where(m, loss, 0.0)

    return checkpointed_rows(rows, n_rows, chunk,
                             hs.reshape(n_rows, -1), ht.reshape(n_rows, -1),
                             None if labels is None else labels.reshape(-1), mask)
