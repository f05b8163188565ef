"""Autograd Functions over the launchers: they route tensors and hold no math."""

from __future__ import annotations

import torch

from . import _launch
from ._reduction import reduce_rows, row_weights, scale_by_upstream
from .divergences import Canonical


class KDLogitsFunction(torch.autograd.Function):
    """Per-row losses [rows] (0 where the mask is False) of [..., V] logits, by the Triton kernels."""

    @staticmethod
    def forward(ctx, student, teacher, mask, canon: Canonical, temperature: float, shards=None):
        loss, stats = _launch.logits_forward(student, teacher, None, canon, 1.0 / temperature, shards=shards)
        ctx.save_for_backward(student, teacher, mask, stats)
        ctx.canon, ctx.temperature = canon, temperature
        return torch.where(mask, loss, 0.0)

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, mask, stats = ctx.saved_tensors
        row_scale = torch.where(mask, grad_rows, 0.0)
        grad_student, grad_teacher = _launch.logits_backward(student, teacher, None, stats, row_scale, ctx.canon,
                                                             1.0 / ctx.temperature, *ctx.needs_input_grad[:2])
        return grad_student, grad_teacher, None, None, None, None


class FusedLinearKDFunction(torch.autograd.Function):
    """The fused-linear loss of a prepared `problem` (`_fused.FusedProblem` or `_chunked.ChunkedProblem`).

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


def problem_loss(problem, tensors, mask, reduction, num_items_in_batch, leading):
    """The reduced loss of a prepared problem (`FusedLinearKDFunction`): with a scalar reduction, an eager
    problem computes its gradients in the forward, already weighted."""
    if problem.eager and reduction != "none":
        weights = row_weights(mask, reduction, num_items_in_batch, problem.acc_dtype)
        return FusedLinearKDFunction.apply(problem, mask, weights, *tensors)
    rows = FusedLinearKDFunction.apply(problem, mask, None, *tensors)
    return reduce_rows(rows.view(leading), mask.view(leading), reduction, num_items_in_batch)
