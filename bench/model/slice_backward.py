"""The backward by vocabulary slices that the fused and sliced paths share (`kdops.launchers.matmul.LMHeadGrads`): dH
and
dW zeroed, then per slice of G over every row cuBLAS's dW[slice] and dH += G·W_s[slice] into float32 sums,
rounded once at the end."""

from __future__ import annotations

from .kernels import Ctx, Kernel


def zero_grads(ctx: Ctx, phase: str) -> Kernel:
    """dH zeroed in its dtype, dW's float32 accumulator (`kdops.paths.chunked`) zeroed."""
    n, v, hs = ctx.shape.tokens, ctx.shape.vocab, ctx.shape.hidden_student
    return Kernel(phase, launches=2, items=[("dH and dW zeroed", n * hs * ctx.b / 2 + v * hs * ctx.acc / 2)])


def slice_products(ctx: Ctx, width: int, count: int) -> list[Kernel]:
    """cuBLAS's products of `count` slices' G [rows, width]: dW[slice] = Gᵀ·h_s over every row, and
    dH += G·W_s[slice] into float32 sums (the hidden gradient itself when it is float32 or wider)."""
    n, b, acc, hs = ctx.shape.tokens, ctx.b, ctx.acc, ctx.shape.hidden_student
    flops = 2.0 * n * width * hs
    return [Kernel("bwd: dW[slice] = Gᵀ·h_s (cuBLAS)", mm_flops=flops, mm_dtype=ctx.dtype, launches=count,
                   items=[("G read", n * width * b), ("h_s read", n * hs * b), ("dW written", width * hs * b)]),
            Kernel("bwd: dH += G·W_s[slice] (cuBLAS, float32 sums)", mm_flops=flops, mm_dtype=ctx.dtype,
                   launches=count, items=[("G read", n * width * b), ("W_s slice read", width * hs * b),
                                          ("dH sums read-modify-write", 2 * n * hs * max(acc, b))])]


def dh_sums_rounded(ctx: Ctx) -> list[Kernel]:
    """The float32 dH sums rounded into a 16-bit hidden gradient (none when it is float32 or wider)."""
    n, b, acc, hs = ctx.shape.tokens, ctx.b, ctx.acc, ctx.shape.hidden_student
    return [Kernel("bwd: dH sums rounded", items=[("dH sums read, dH written", n * hs * (acc + b))])] if b < acc else []
