"""`fused_linear_kd_loss` impl="sliced" (path "sliced", `kdops.paths.sliced.SlicedProblem`): cuBLAS logits per
vocabulary slice into float32 buffers and the kernels on logits over them (partial states, merged once per
pass); the backward computes each slice's logits again, writes G and makes dW[slice], dH by cuBLAS."""

from __future__ import annotations

import dataclasses

import kdops.launchers.common
import kdops.paths.sliced

from .kernels import Ctx, Kernel, cdiv, chunk_counts, kernel_constants
from .logits import kernels_on_logits
from .slice_backward import dh_sums_rounded, slice_products, zero_grads
from .units import MiB, size_text


def _slice_kernels(ctx: Ctx, n: int, width: int, count: int, phase: str) -> list[Kernel]:
    """Both models' float32 logits of `n` rows over `width` columns by cuBLAS, `count` slices: each slice
    re-reads both hidden states and reads its weight rows once."""
    return [Kernel(phase, mm_flops=2.0 * n * width * h, mm_dtype=ctx.dtype, launches=count,
                   items=[(f"h_{side} re-read per slice", n * h * ctx.b), (f"W_{side} slice read", width * h * ctx.b),
                          ("logits written", n * width * ctx.acc)])
            for side, h in (("s", ctx.shape.hidden_student), ("t", ctx.shape.hidden_teacher))]


def _one_slice(ctx: Ctx, width: int) -> Ctx:
    """The case the kernels on logits see in a slice: a vocabulary of `width` columns."""
    return dataclasses.replace(ctx, shape=dataclasses.replace(ctx.shape, vocab=width))


def _forward(ctx: Ctx, chunk: int, width: int, partial: float) -> list[Kernel]:
    """Per chunk of `chunk` rows and slice of `width` columns, the logits by cuBLAS and the kernels on logits
    (partial states); each pass (the two-pass kinds: two) computes the logits anew; then the merge of the
    `partial` bytes of partial states, once per pass and row chunk."""
    n, v, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.acc
    num_stats, _ = kernel_constants()
    kernels = []
    for rows, chunks in chunk_counts(n, chunk):
        for cols, count in chunk_counts(v, width):
            kernels += _slice_kernels(ctx, rows, cols, count * chunks * ctx.passes,
                                      "fwd: logits matmuls per row chunk, slice and pass")
            kernels += kernels_on_logits(_one_slice(ctx, cols), rows, acc, "logits buffers",
                                         "fwd: kernels on logits (partial states)", False, count * chunks)
    kernels.append(Kernel("fwd: merge partials", launches=ctx.passes * cdiv(n, chunk),
                          programs=cdiv(n, min(128, kdops.launchers.common.next_pow2(n))),
                          items=[("partial states copied and read", 2 * partial),
                                 ("statistics and loss written", n * (num_stats + 1) * acc)]))
    return kernels


def _backward(ctx: Ctx, width: int) -> list[Kernel]:
    """dH and dW zeroed; per slice of `width` columns of every row, its logits by cuBLAS again, the kernel on
    logits writing G in the operands' dtype, and cuBLAS's dW[slice] and dH += G·W_s[slice]."""
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    kernels = [zero_grads(ctx, "bwd: zero dH, dW")]
    for cols, count in chunk_counts(v, width):
        kernels += _slice_kernels(ctx, n, cols, count, "bwd: logits matmuls per slice (again)")
        kernels += kernels_on_logits(_one_slice(ctx, cols), n, acc, "logits buffers",
                                     "bwd: kernel on logits (G per slice)", True, count,
                                     grad_label="G_s written (operands' dtype)", grad_itemsize=b)
        kernels += slice_products(ctx, cols, count)
    return kernels + dh_sums_rounded(ctx)


def sliced_path(ctx: Ctx):
    """`kdops.paths.sliced.SlicedProblem`: the forward in row chunks (FORWARD_ROWS) and vocabulary slices, the
    backward in slices of every row (`kdops.paths.sliced.slice_width`, under the budget less the float32 dH sums)."""
    n, v, b, acc, hs = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc, ctx.shape.hidden_student
    num_stats, num_partial = kernel_constants()
    hidden_sums = n * hs * acc if b < acc else 0
    budget = None if ctx.budget is None else ctx.budget - hidden_sums
    chunk = min(n, kdops.paths.sliced.FORWARD_ROWS)  # the forward's rows per chunk
    fwd_width = kdops.paths.sliced.slice_width(chunk, v, ctx.acc_dtype, (), ctx.budget)
    bwd_width = kdops.paths.sliced.slice_width(n, v, ctx.acc_dtype, (ctx.dtype,), budget)
    partial = chunk * cdiv(v, fwd_width) * num_partial * acc
    kernels = _forward(ctx, chunk, fwd_width, partial) + _backward(ctx, bwd_width)
    buffers = n * bwd_width * (2 * acc + b)
    extra = n * (num_stats * acc + 2 * acc + 1) + max(n * fwd_width * 2 * acc + partial, buffers + hidden_sums)
    detail = (f"statistics per row + max(the forward's float32 logits of a slice and partial states, the backward's "
              f"slice buffers ({buffers / MiB:.0f} MiB) and float32 dH sums ({hidden_sums / MiB:.0f} MiB))")
    notes = (f"forward: {cdiv(n, chunk)} row chunks of {chunk} (FORWARD_ROWS) × {cdiv(v, fwd_width)} slices of "
             f"{fwd_width} columns; backward: {cdiv(v, bwd_width)} slices of "
             f"{bwd_width} (kdops.paths.sliced.slice_width, SLICE_BYTES = {kdops.paths.sliced.SLICE_BYTES // MiB} MiB"
             + ("" if ctx.budget is None else f", memory_budget {size_text(ctx.budget)}") + ")",)
    return kernels, extra, detail, notes
