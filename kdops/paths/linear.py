"""fused_linear_kd_loss's path for one teacher: the implementation `impl` names, prepared from the Problem —
"chunked" (`kdops.paths.chunked`: token chunks of float32 logits, four matmuls), "sliced" (`kdops.paths.sliced`:
vocabulary slices of every row, six matmuls, memory that does not grow with V) or "fused" (`kdops.launchers.linear`:
the logits inside the Triton kernels, tile by tile) — and run through `kdops._autograd.problem_loss`.

"auto" takes "chunked", unless a `memory_budget` was given that even its smallest plan exceeds: then "sliced" (the
default budget is a target: the plan may exceed it where no exact plan fits; one the user gave is a limit). The
torch engine always runs the chunked path with the torch math.

Inside torch.compile ("compiled" mode) the kernels run as the custom op `kdops::fused_linear_kd_rows`, which prepares
the same implementation from the options it carries as a string (`Options.to_text`); the torch engine is traced, its
token chunks under activation checkpointing.
"""

from __future__ import annotations

import torch

from .._autograd import checkpointed_rows, problem_loss
from .._validation import resolve_impl
from ..launchers.linear import FusedProblem
from ..problem import Head, Options, Problem
from ..torch_math import compute_dtype, linear_kd_rows, linear_logits
from .chunked import ChunkedProblem, logits_chunk_rows
from .epilogue import EpilogueProblem
from .sliced import SlicedProblem


def prepare(student: Head, teacher: Head, labels, options: Options, shards=None, parts: bool = False):
    """The prepared inputs of the implementation that `options.impl` (resolved) and `options.engine` select. Under
    `shards`, `options.vocab` is this rank's shard, and the choice of "auto" is the widest shard's, so that every
    rank takes the same path. `parts`: the call asks for its `kdops.LossParts` (the fused and sliced forwards then
    read the labels for the cross-entropy)."""
    o = options
    hs, ws, bs = student.tensors()
    ht, wt, bt = teacher.tensors()
    chunked = ChunkedProblem(hs, ws, bs, ht, wt, bt, labels, o.divergence, o.temperature, o.vocab, o.soft_weight,
                             o.hard_weight, o.ignore_index, o.engine, o.memory_budget, shards, o.softcaps)
    grads = tuple(t is not None and t.requires_grad for t in (hs, ws, bs, ht, wt, bt))
    # The default budget is a target (the plan may exceed it where no exact plan fits); one the user gave is
    # a limit that "auto" keeps by taking the sliced path.
    fits = o.memory_budget is None or chunked.plan_bytes(grads) <= o.memory_budget
    resolved = resolve_impl(o.impl, o.engine, fits)
    canon = o.divergence.canonical().with_softcaps(*o.softcaps)
    if resolved == "fused":
        return FusedProblem(hs, ws, bs, ht, wt, bt, labels, canon, 1.0 / o.temperature, o.vocab, o.soft_weight,
                            o.hard_weight, shards, parts)
    if resolved == "epilogue":
        return EpilogueProblem(hs, ws, bs, ht, wt, bt, labels, o.divergence, o.temperature, o.vocab, o.soft_weight,
                               o.hard_weight, o.ignore_index, o.engine, o.memory_budget, shards, o.softcaps)
    if resolved == "sliced":
        return SlicedProblem(hs, ws, bs, ht, wt, bt, labels, canon, 1.0 / o.temperature, o.vocab, o.soft_weight,
                             o.hard_weight, o.memory_budget, shards, parts)
    return chunked


def compiled_rows(problem: Problem) -> torch.Tensor:
    """The per-row losses inside torch.compile: the custom op, or the torch math traced on float32 chunk logits."""
    o, (teacher,) = problem.options, problem.teachers
    if o.engine == "triton":
        return fused_linear_kd_rows(*problem.tensors(), problem.labels, problem.mask, o.to_text())
    hs, ws, bs = problem.student.tensors()
    ht, wt, bt = teacher.tensors()
    vocab, dtype = o.vocab, compute_dtype(hs, ws, ht, wt)
    n_rows = problem.mask.numel()
    # Chunks as the eager torch engine plans them with no gradient kept (autograd holds what it needs).
    chunk = logits_chunk_rows(n_rows, vocab, "torch", dtype, o.memory_budget)
    # Cast once, outside the chunks: autograd then sums the chunks' weight gradients in float32 and rounds
    # them once, where a cast per chunk would add them up in the weight's own dtype.
    ws, wt = ws[:vocab].to(dtype), wt[:vocab].to(dtype)
    bs, bt = (None if b is None else b[:vocab].to(dtype) for b in (bs, bt))

    def rows(h_s, h_t, y, m):
        s = linear_logits(h_s, ws, bs, vocab, dtype)
        t = linear_logits(h_t, wt, bt, vocab, dtype)
        loss = linear_kd_rows(s, t, y, o.divergence, o.temperature, o.soft_weight, o.hard_weight, o.ignore_index,
                              o.softcaps)
        return torch.where(m, loss, 0.0)

    labels = None if problem.labels is None else problem.labels.reshape(-1)
    return checkpointed_rows(rows, n_rows, chunk, hs.reshape(n_rows, -1), ht.reshape(n_rows, -1), labels,
                             problem.mask)


def loss(problem: Problem) -> torch.Tensor:
    """fused_linear_kd_loss of a Problem whose path is "linear": the prepared implementation through
    `problem_loss`, or inside torch.compile the per-row losses of `compiled_rows`, reduced."""
    if problem.mode == "compiled":
        rows = compiled_rows(problem)
        return problem.reduce(rows)
    o, (teacher,) = problem.options, problem.teachers
    prepared = prepare(problem.student, teacher, problem.labels, o, problem.shards, problem.parts)
    return problem_loss(prepared, problem.tensors(), problem)


# --- inside torch.compile: the Triton paths as a custom op, opaque to Dynamo --------------------------------------

@torch.library.custom_op("kdops::fused_linear_kd_rows", mutates_args=())
def fused_linear_kd_rows(hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None, ht: torch.Tensor,
                         wt: torch.Tensor, bt: torch.Tensor | None, labels: torch.Tensor | None, mask: torch.Tensor,
                         options: str) -> torch.Tensor:
    rows, _ = prepare(Head(hs, ws, bs), Head(ht, wt, bt), labels, Options.from_text(options)).forward()
    return torch.where(mask, rows, 0.0)


@fused_linear_kd_rows.register_fake
def _(hs, ws, bs, ht, wt, bt, labels, mask, options):
    return hs.new_empty(mask.shape, dtype=compute_dtype(hs, ws, ht, wt))


@torch.library.custom_op("kdops::fused_linear_kd_rows_backward", mutates_args=())
def fused_linear_kd_rows_backward(grad_rows: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor,
                                  bs: torch.Tensor | None, ht: torch.Tensor, wt: torch.Tensor,
                                  bt: torch.Tensor | None, labels: torch.Tensor | None, mask: torch.Tensor,
                                  options: str, needs: list[bool]) -> list[torch.Tensor]:
    problem = prepare(Head(hs, ws, bs), Head(ht, wt, bt), labels, Options.from_text(options))
    saved = problem.forward()[1] if not problem.eager else []  # the chunked pass needs no statistics
    grads = problem.backward(saved, torch.where(mask, grad_rows, 0.0), tuple(needs))
    return [hs.new_empty(0) if g is None else g.view(x.shape) for g, x in zip(grads, (hs, ws, bs, ht, wt, bt))]


@fused_linear_kd_rows_backward.register_fake
def _(grad_rows, hs, ws, bs, ht, wt, bt, labels, mask, options, needs):
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) if x is not None and need else hs.new_empty(0)
            for x, need in zip((hs, ws, bs, ht, wt, bt), needs)]


def _fused_setup(ctx, inputs, output):
    *tensors, options = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = options


def _fused_backward(ctx, grad_rows):
    tensors = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = fused_linear_kd_rows_backward(grad_rows, *tensors, ctx.options, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None)


fused_linear_kd_rows.register_autograd(_fused_backward, setup_context=_fused_setup)
