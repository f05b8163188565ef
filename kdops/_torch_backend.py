"""backend="torch": the reference math, chunked over rows so that temporaries stay within a budget.

The forward runs the reference per-row divergence chunk by chunk without a graph; the backward recomputes
each chunk under autograd and writes its slice of the gradient. Peak extra memory is one chunk's float32
temporaries, never proportional to the batch.
"""

from __future__ import annotations

import torch

from .divergences import Divergence
from .parallel import vocab_parallel_rows
from .reference import compute_dtype, divergence_rows

#: Default budget for one chunk's temporaries, in bytes (`chunk_rows` sizes chunks from it).
BUDGET_BYTES = 256 * 2**20

# Upper bound on the number of [chunk, V] float32 temporaries alive at once while a chunk is recomputed
# and differentiated: the worst divergence, JSD, peaks at 14 (tests/test_memory.py checks the bound).
TEMPORARIES_PER_ELEMENT = 16


def chunk_rows(vocab_size: int, itemsize: int = 4, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that the chunk's temporaries fit in `budget_bytes` (default BUDGET_BYTES)."""
    budget = BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (vocab_size * itemsize * TEMPORARIES_PER_ELEMENT))


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


def chunked_kd_rows(student, teacher, mask, divergence: Divergence, temperature: float, shards=None):
    """The torch backend of `kd_loss` on 2-D logits: the reference per-row divergence, chunk by chunk
    (`ChunkedRowsFunction`). Under vocabulary parallelism each chunk communicates: every rank sizes them for
    the widest shard."""
    width = student.shape[1] if shards is None else shards.max_width
    chunk = chunk_rows(width, itemsize=max(4, student.element_size()))
    return ChunkedRowsFunction.apply(lambda s, t: _rows(divergence, s, t, temperature, shards), chunk, mask,
                                     student, teacher)


def _rows(divergence: Divergence, student, teacher, temperature: float, shards):
    """The reference per-row divergence, over the group's vocabulary under `shards`."""
    if shards is None:
        return divergence_rows(divergence, student, teacher, temperature)
    return vocab_parallel_rows(shards, student, teacher, None, divergence, temperature)


def checkpointed_rows(fn, rows: int, chunk: int, *row_tensors) -> torch.Tensor:
    """torch.cat of fn(*chunk_slices) over row chunks, each under activation checkpointing: what the torch
    backend runs inside torch.compile, where the autograd Functions above cannot be traced. Only the
    chunks' inputs are kept for the backward, which recomputes one chunk at a time."""
    from torch.utils.checkpoint import checkpoint

    parts = []
    for start in range(0, rows, chunk):
        sliced = [None if t is None else t[start:start + chunk] for t in row_tensors]
        parts.append(checkpoint(fn, *sliced, use_reentrant=False))
    return torch.cat(parts)
