"""The autograd Functions over the launchers and the paths' prepared problems: they route tensors and hold no
math. Per-row losses of logits by the kernels (`KDLogitsFunction`), of a prepared fused-linear problem
(`FusedLinearKDFunction`, `problem_loss`), and of any per-row function of row chunks, recomputed chunk by chunk in
the backward (`ChunkedRowsFunction`) or under activation checkpointing inside torch.compile (`checkpointed_rows`)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ._reduction import scale_by_upstream
from .divergences import Canonical
from .launchers.logits import logits_backward, logits_forward
from .torch_math import compute_dtype


class KDLogitsFunction(torch.autograd.Function):
    """Per-row losses [rows] (0 where the mask is False) of [..., V] logits, by the Triton kernels; with `parts`,
    also the rows' parts [rows, 4] from the same pass (`kdops.launchers.logits.logits_forward`; no gradient),
    the cross-entropy against `labels` where given."""

    @staticmethod
    def forward(ctx, student, teacher, mask, canon: Canonical, temperature: float, shards=None, labels=None,
                parts=False):
        loss, stats, *row_parts = logits_forward(student, teacher, labels if parts else None, canon,
                                                 1.0 / temperature, shards=shards, parts=parts)
        ctx.save_for_backward(student, teacher, mask, stats)
        ctx.canon, ctx.temperature = canon, temperature
        if not parts:
            return torch.where(mask, loss, 0.0)
        ctx.mark_non_differentiable(row_parts[0])
        return torch.where(mask, loss, 0.0), torch.where(mask[:, None], row_parts[0], 0.0)

    @staticmethod
    def backward(ctx, grad_rows, grad_parts=None):
        student, teacher, mask, stats = ctx.saved_tensors
        row_scale = torch.where(mask, grad_rows, 0.0)
        grad_student, grad_teacher = logits_backward(student, teacher, None, stats, row_scale, ctx.canon,
                                                     1.0 / ctx.temperature, *ctx.needs_input_grad[:2])
        return grad_student, grad_teacher, None, None, None, None, None, None


class FusedLinearKDFunction(torch.autograd.Function):
    """The fused-linear loss of a prepared `problem` (`kdops.launchers.linear.FusedProblem`, or a path's own:
    `kdops.paths`).

    Returns the per-row losses [rows] (0 where the mask is False), whose gradients the backward computes
    with the upstream gradient as row scale. With `row_weight` (an eager problem and a scalar reduction)
    it returns Σ_r w_r ℓ_r instead: the gradients are computed in the forward, while the chunk's logits
    exist, and the backward only multiplies them by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, problem, mask, row_weight, *tensors):
        # tensors: (hidden, weight, bias) of the student, then of each teacher (None where absent)
        needs = tuple(ctx.needs_input_grad[3:])
        ctx.problem, ctx.needs, ctx.shapes = problem, needs, [None if x is None else x.shape for x in tensors]
        ctx.eager = row_weight is not None
        if ctx.eager:
            rows, ctx.eager_grads = problem.loss_and_grads(row_weight if any(needs) else None, needs)
            return (torch.where(mask, rows, 0.0) * row_weight).sum()
        rows, saved = problem.forward()
        ctx.save_for_backward(mask, *saved)
        return torch.where(mask, rows, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.eager:
            grads = ctx.__dict__.pop("eager_grads", None)
            if grads is None:
                raise RuntimeError("kdops: this loss's gradients were computed in its forward and have been used; "
                                   "a second backward through it (retain_graph=True) is not supported")
            grads = scale_by_upstream(grads, grad_out, ctx.problem.engine == "triton")
        else:
            mask, *saved = ctx.saved_tensors
            grads = ctx.problem.backward(saved, torch.where(mask, grad_out, 0.0), ctx.needs)
        grads = [None if g is None else g.view(shape) for g, shape in zip(grads, ctx.shapes)]
        return (None, None, None, *grads)


def problem_loss(prepared, tensors, problem):
    """The reduced loss of a prepared problem (`FusedLinearKDFunction`) for the `kdops.problem.Problem` it came from
    (its mask, weights and reduction): with a scalar reduction, an eager problem computes its gradients in the
    forward, already weighted. With `problem.parts`, (loss, `kdops.LossParts`): a chunked problem's chunks write
    their parts (`row_parts`) in the forward's pass over their logits."""
    if not problem.parts:
        return _reduced_loss(prepared, tensors, problem)
    assert getattr(prepared, "row_parts", False) is None, f"{type(prepared).__name__} reports no parts"
    prepared.row_parts = torch.empty((problem.mask.numel(), 4), dtype=prepared.acc_dtype, device=problem.device)
    loss = _reduced_loss(prepared, tensors, problem)
    parts, prepared.row_parts = prepared.row_parts, None
    return loss, problem.parts_of(parts)


def _reduced_loss(prepared, tensors, problem):
    if prepared.eager and problem.options.reduction != "none":
        return FusedLinearKDFunction.apply(prepared, problem.mask, problem.row_weights(prepared.acc_dtype), *tensors)
    rows = FusedLinearKDFunction.apply(prepared, problem.mask, None, *tensors)
    return problem.reduce(rows)


class ChunkedRowsFunction(torch.autograd.Function):
    """Per-row losses [rows] (0 where the mask is False) of `rows_fn` over row chunks of 2-D tensors.

    The forward runs rows_fn(*chunk_slices) chunk by chunk without a graph; the backward recomputes each chunk
    under autograd and writes its slices of the gradients (of the tensors that require them): one chunk's
    temporaries at a time, never a [rows, V] one beyond the gradients themselves.
    """

    @staticmethod
    def forward(ctx, rows_fn, chunk: int, mask, *tensors):
        rows = tensors[0].shape[0]
        out = None
        for start in range(0, rows, chunk):
            part = rows_fn(*(t[start:start + chunk] for t in tensors))
            if out is None:
                out = torch.zeros(rows, dtype=part.dtype, device=part.device)
            out[start:start + chunk] = part
        if out is None:
            out = torch.zeros(0, dtype=compute_dtype(*tensors), device=mask.device)
        ctx.save_for_backward(mask, *tensors)
        ctx.rows_fn, ctx.chunk = rows_fn, chunk
        return torch.where(mask, out, 0.0)

    @staticmethod
    def backward(ctx, grad_rows):
        mask, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        grad_rows = torch.where(mask, grad_rows, 0.0)
        grads = [torch.zeros_like(t) if need else None for t, need in zip(tensors, needs)]
        for start in range(0, mask.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, mask.shape[0])
            live = mask[start:end]
            if not bool(live.any()):
                continue
            leaves = [t[start:end].detach().requires_grad_(need) for t, need in zip(tensors, needs)]
            with torch.enable_grad():
                loss = ctx.rows_fn(*leaves)
                # (a teacher may drop out of the graph — TAID at t = 0, a zero weight: a zero gradient)
                parts = list(torch.autograd.grad(loss, [x for x in leaves if x.requires_grad], grad_rows[start:end],
                                                 allow_unused=True, materialize_grads=True))
            del loss, leaves
            for grad, need in zip(grads, needs):
                if need:  # popped: no chunk gradient outlives its copy into the whole one
                    grad[start:end] = torch.where(live[:, None], parts.pop(0), 0.0)
        return (None, None, None, *grads)


def checkpointed_rows(fn, rows: int, chunk: int, *row_tensors) -> torch.Tensor:
    """torch.cat of fn(*chunk_slices) over row chunks, each under activation checkpointing: what the torch
    backend runs inside torch.compile, where the autograd Functions above cannot be traced. Only the
    chunks' inputs are kept for the backward, which recomputes one chunk at a time."""
    parts = []
    for start in range(0, rows, chunk):
        sliced = [None if t is None else t[start:start + chunk] for t in row_tensors]
        parts.append(checkpoint(fn, *sliced, use_reentrant=False))
    return torch.cat(parts)


class TokenLogprobsFunction(torch.autograd.Function):
    """(log p(token), entropy) [2, rows] of a prepared `kdops.paths.token_logprobs.TokenLogprobsProblem`: the forward
    runs its row chunks without a graph (keeping per-row statistics at most), the backward recomputes each chunk's
    logits and returns the gradients of hidden, weight and bias that are asked for."""

    @staticmethod
    def forward(ctx, problem, hidden, weight, bias):
        out, saved = problem.forward()
        ctx.problem = problem
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.problem.backward(ctx.saved_tensors, grad, tuple(ctx.needs_input_grad[1:4])))
