"""`fused_linear_kd_loss` impl="chunked" (path "chunked"): token chunks of float32 logits by cuBLAS, the kernels
on logits writing G into a group's store, dH and dW by cuBLAS per group (`kdops.paths.chunked.plan`). Its pieces
(the plan, the logits matmuls, the per-group backprop) serve the other chunked paths too: backend="torch",
the sparse teacher's, Liger's."""

from __future__ import annotations

import torch

import kdops
import kdops.paths.chunked
import kdops.paths.mixed
from kdops import targets

from .kernels import Ctx, Kernel, cdiv, chunk_counts, kernel_constants
from .logits import kernels_on_logits, mix_kernel
from .prediction import Shape
from .units import size_text


def chunked_plan(ctx: Ctx, engine: str = "triton") -> "kdops.paths.chunked.Plan":
    """`kdops.paths.chunked.plan` for the student's gradients (dH, dW; frozen teachers), as ChunkedProblem (or, with
    several teachers, MixedChunkedProblem) plans."""
    return kdops.paths.chunked.plan(ctx.shape.tokens, ctx.shape.vocab, engine, ctx.acc_dtype, chunked_sides(ctx),
                                    ctx.budget,
                                    logit_rows(ctx))


def logit_rows(ctx: Ctx) -> int:
    """float32 [chunk, V] rows per chunk row: both models' logits, or `kdops.paths.mixed.MixedChunkedProblem`'s."""
    if not ctx.mix:
        return 2
    return 1 + ctx.teachers + 2 + kdops.paths.mixed.MIX_TEMPORARIES * ctx.teachers


def chunked_sides(ctx: Ctx):
    """The plan's sides: the student's gradients (dH, dW), frozen teachers."""
    return (kdops.paths.chunked.SideNeeds(ctx.dtype, ctx.shape.hidden_student, True, True),
            *[kdops.paths.chunked.SideNeeds(ctx.dtype, ctx.shape.hidden_teacher, False, False)] * ctx.teachers)


def group_backprop(ctx: Ctx, rows: int, launches: float, accumulate: bool) -> list[Kernel]:
    """`kdops.launchers.matmul.LMHead.backprop` of one group of `rows` rows (student; frozen teacher), by cuBLAS: dH =
    G·W
    (G kept in the weight dtype), and dW += Gᵀ·h into the float32 accumulator (`accumulate`: several groups,
    read-modify-written per group), or dW = Gᵀ·h summed in float32 and rounded once by cuBLAS (one group)."""
    v, hs, b, acc = ctx.shape.vocab, ctx.shape.hidden_student, ctx.b, ctx.acc
    kernels = [Kernel("fwd: dH matmul, per group", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
                      launches=launches, items=[("G read", rows * v * b), ("W_s re-read per group", v * hs * b),
                                                ("dH written", rows * hs * b)])]
    if accumulate or b == acc:
        kernels.append(Kernel("fwd: dW matmul (addmm_), per group", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
                              launches=launches,
                              items=[("G read", rows * v * b), ("h_s read", rows * hs * b),
                                     ("dW (float32) read-modify-write per group" if accumulate else "dW written",
                                      (2 if accumulate else 1) * v * hs * acc)]))
        return kernels
    kernels.append(Kernel("fwd: dW matmul (one group: float32 sums, rounded once)", mm_flops=2.0 * rows * v * hs,
                          mm_dtype=ctx.dtype, launches=launches,
                          items=[("G read", rows * v * b), ("h_s read", rows * hs * b), ("dW written", v * hs * b)]))
    return kernels


def cast_weight_grad(ctx: Ctx, accumulate: bool) -> list[Kernel]:
    """The float32 dW accumulator rounded once to the weight dtype, after the last group."""
    v, hs, b, acc = ctx.shape.vocab, ctx.shape.hidden_student, ctx.b, ctx.acc
    if b == acc or not accumulate:
        return []
    return [Kernel("fwd: cast dW to the weight dtype", items=[("dW read (float32)", v * hs * acc),
                                                              ("dW written", v * hs * b)])]


def logits_matmuls(ctx: Ctx, rows: int, launches: float, phase: str, out_itemsize: int) -> list[Kernel]:
    """Every model's logits of a chunk of `rows` rows by cuBLAS, the weights re-read for every chunk."""
    v = ctx.shape.vocab
    kernels = []
    teachers = [("t", ctx.shape.hidden_teacher)] if ctx.teachers == 1 else [
        (f"t{i}", ctx.shape.hidden_teacher) for i in range(ctx.teachers)]
    for side, h in (("s", ctx.shape.hidden_student), *teachers):
        kernels.append(Kernel(phase, mm_flops=2.0 * rows * v * h, mm_dtype=ctx.dtype, launches=launches,
                              items=[(f"W_{side} re-read per chunk", v * h * ctx.b),
                                     (f"h_{side} read", rows * h * ctx.b),
                                     ("logits written", rows * v * out_itemsize)]))
    return kernels


def chunked_rows(shape: Shape, dtype: torch.dtype, engine: str = "triton", budget: int | None = None) -> int:
    """Rows per chunk of `impl="chunked"` (engine "triton") or of backend="torch", as ChunkedProblem plans them
    for the student's gradients."""
    return chunked_plan(Ctx(shape, targets.H100, kdops.as_divergence("forward_kl"), dtype, False, budget),
                        engine).chunk


def chunks_and_groups(ctx: Ctx, plan, chunk_kernels) -> list[Kernel]:
    """A chunked plan's kernels: per chunk, `chunk_kernels(rows, count)` (its logits matmuls, the loss and G into
    the group's store); per group, the dH and dW matmuls; dW's float32 accumulator zeroed first and cast last
    where the plan has one."""
    kernels = [Kernel("fwd: zero dW's float32 accumulator", items=[("dW zeroed", ctx.shape.vocab
                                                                    * ctx.shape.hidden_student * ctx.acc)])] \
        if plan.accumulate else []
    for group_rows, groups in chunk_counts(ctx.shape.tokens, plan.group):
        for rows, count in chunk_counts(group_rows, plan.chunk):
            kernels += chunk_kernels(rows, count * groups)
        kernels += group_backprop(ctx, group_rows, groups, plan.accumulate)
    return kernels + cast_weight_grad(ctx, plan.accumulate)


def chunked_common(ctx: Ctx, engine: str, chunk_kernels) -> tuple:
    """The chunked paths' phases (`chunks_and_groups`): per chunk, both logits matmuls and
    `chunk_kernels(rows, count)` (the loss and G into the group's store). The backward has nothing left to do
    under loss.backward() (an upstream 1: `kdops._autograd` skips the scaling). Returns (kernels, plan)."""
    plan = chunked_plan(ctx, engine)

    def matmuls_and_loss(rows, count):
        return logits_matmuls(ctx, rows, count, "fwd: logits matmuls (float32 out)", ctx.acc) \
            + chunk_kernels(rows, count)

    return chunks_and_groups(ctx, plan, matmuls_and_loss), plan


def plan_text(ctx: Ctx, plan) -> str:
    """The plan in words: its chunks, its groups and the memory budget it was made for."""
    budget = kdops.paths.chunked.MEMORY_BUDGET if ctx.budget is None else ctx.budget
    groups = cdiv(ctx.shape.tokens, plan.group)
    return (f"{cdiv(ctx.shape.tokens, plan.chunk)} chunks of {plan.chunk} rows, "
            + (f"{groups} groups of {plan.group} rows (dW summed in a float32 accumulator)" if plan.accumulate
               else "one group (G of every row kept; dW one product, no accumulator)")
            + f" (kdops.paths.chunked.plan, memory_budget {size_text(budget)})")


def chunked_path(ctx: Ctx):
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    num_stats, _ = kernel_constants()

    def chunk_kernels(rows, count):
        # (several teachers: their mix into the target's buffer first) G written straight into the group's store,
        # in the weight's dtype
        mix = [mix_kernel(ctx, rows, count, "fwd: mix of the teachers (torch)", acc)] if ctx.mix else []
        forward = kernels_on_logits(ctx, rows, acc, "logits buffers", "fwd: kernels on logits", False, count)
        gradient = kernels_on_logits(ctx, rows, acc, "logits buffers",
                                     "fwd: kernel on logits (G into the group's store)", True, count,
                                     grad_label="G_s written (weight dtype)", grad_itemsize=b)
        return mix + forward + gradient

    kernels, plan = chunked_common(ctx, "triton", chunk_kernels)
    extra = plan.extra_bytes(v, "triton", ctx.acc_dtype, chunked_sides(ctx), logit_rows(ctx)) \
        + n * (2 * acc + 1) + plan.chunk * num_stats * acc
    buffers = "two" if not ctx.mix else f"{logit_rows(ctx)} (every model's logits, the target, the mix's temporaries)"
    detail = plan_text(ctx, plan) + f": {buffers} float32 [chunk, V] logits buffers + G [group, V] in the weight dtype"
    notes = ("batchmean: the gradients are computed in the forward; the backward scales them by an upstream "
             "gradient other than 1 (one pass over dH and dW, not counted; at 1, loss.backward()'s, a kernel reads "
             "it and stops: no host synchronization)",)
    return kernels, extra, detail, notes
