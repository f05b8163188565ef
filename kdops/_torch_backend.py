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


class ChunkedKDFunction(torch.autograd.Function):
    """Per-row losses [rows] (0 where the mask is False) of 2-D logits, computed chunk by chunk."""

    @staticmethod
    def forward(ctx, student, teacher, mask, divergence: Divergence, temperature: float, shards=None):
        rows, vocab = student.shape
        # Under vocabulary parallelism each chunk communicates: every rank sizes them for the widest shard.
        width = vocab if shards is None else shards.max_width
        chunk = chunk_rows(width, itemsize=max(4, student.element_size()))
        out = torch.zeros(rows, dtype=compute_dtype(student, teacher), device=student.device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            out[start:end] = _rows(divergence, student[start:end], teacher[start:end], temperature, shards)
        ctx.save_for_backward(student, teacher, mask)
        ctx.divergence, ctx.temperature, ctx.chunk, ctx.shards = divergence, temperature, chunk, shards
        return torch.where(mask, out, 0.0)

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, mask = ctx.saved_tensors
        need_student, need_teacher = ctx.needs_input_grad[:2]
        grad_rows = torch.where(mask, grad_rows, 0.0)
        grad_student = torch.zeros_like(student) if need_student else None
        grad_teacher = torch.zeros_like(teacher) if need_teacher else None
        for start in range(0, student.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, student.shape[0])
            live = mask[start:end]
            if not bool(live.any()):
                continue
            s = student[start:end].detach().requires_grad_(need_student)
            t = teacher[start:end].detach().requires_grad_(need_teacher)
            with torch.enable_grad():
                loss = _rows(ctx.divergence, s, t, ctx.temperature, ctx.shards)
                inputs = [x for x, need in ((s, need_student), (t, need_teacher)) if need]
                # (TAID at t = 0 leaves the teacher out of the graph: a zero gradient)
                grads = list(torch.autograd.grad(loss, inputs, grad_rows[start:end], allow_unused=True,
                                                 materialize_grads=True))
            for out, need in ((grad_student, need_student), (grad_teacher, need_teacher)):
                if need:
                    out[start:end] = torch.where(live[:, None], grads.pop(0), 0.0)
        return grad_student, grad_teacher, None, None, None, None


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
