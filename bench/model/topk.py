"""Sparse teachers (`kdops.topk`): the teacher is its top-k (ids, log-probabilities), the student's side is
counted. `topk_kd_loss` on existing student logits (path "kd_loss-topk"), `fused_linear_topk_kd_loss`
impl="chunked" (path "topk-chunked": the chunked path's plan with one side, the top-k kernels on its float32
logits) and impl="gathered" (path "topk-gathered": the k gathered weight rows only)."""

from __future__ import annotations

import torch

import kdops.launchers.topk
import kdops.paths.chunked

from .chunked import cast_weight_grad, chunks_and_groups, logits_matmuls, plan_text
from .kernels import Ctx, Kernel, cdiv
from .rates import topk_kernel_flops


def _topk_kernels(ctx: Ctx, rows: int, itemsize: int, launches: float, phase: str, grad_itemsize: int) -> list:
    """`kernels/topk.py` over `rows` rows of [rows, V] student logits of `itemsize` bytes: the complement's
    log-sum-exp (logits read once), the small k + 1-outcome loss (the dense kernels on [rows, k + 1]: not
    counted), the gradient (logits read, G written in `grad_itemsize` bytes); each also reads the rows'
    sorted ids."""
    v, k = ctx.shape.vocab, ctx.k
    config = kdops.launchers.topk.topk_config(rows, v, ctx.gpu, ctx.acc_dtype)
    programs = cdiv(rows, config["BLOCK_R"])
    lse_flops, grad_flops = topk_kernel_flops(k, v, config, ctx.softcaps > 0)
    ids = rows * k * 4
    return [Kernel(f"{phase}: complement log-sum-exp", ew_flops=rows * v * lse_flops, programs=programs,
                   launches=launches, items=[("student logits read", rows * v * itemsize), ("sorted ids read", ids)]),
            Kernel(f"{phase}: gradient", ew_flops=rows * v * grad_flops, programs=programs, launches=launches,
                   items=[("student logits read", rows * v * itemsize),
                          ("sorted ids and their gradients read", 2 * ids), ("G written", rows * v * grad_itemsize)])]


def kd_loss_topk(ctx: Ctx):
    n, b = ctx.shape.tokens, ctx.b
    kernels = _topk_kernels(ctx, n, b, 1, "fwd", 0)[:1] + _topk_kernels(ctx, n, b, 1, "bwd", b)[1:]
    extra = n * (ctx.k + 1) * (4 * ctx.acc + 8)
    detail = "the sorted ids, the order and the k + 1 outcomes' columns and gradients per row"
    notes = ("the student's gradient is written once; the teacher's (ids, log-probabilities) are read, not "
             "computed", "topk kernels not measured on a GPU yet: their cost from their SASS (TOPK_LOOP_INSTRUCTIONS)")
    return kernels, extra, detail, notes


def _topk_sides(ctx: Ctx):
    return (kdops.paths.chunked.SideNeeds(ctx.dtype, ctx.shape.hidden_student, True, True),)


def topk_chunked(ctx: Ctx):
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    plan = kdops.paths.chunked.plan(n, v, "triton", ctx.acc_dtype, _topk_sides(ctx), ctx.budget)

    def chunk_kernels(rows, count):  # the student's logits, G straight into the store
        return logits_matmuls(ctx, rows, count, "fwd: logits matmul (float32 out)", acc)[:1] \
            + _topk_kernels(ctx, rows, acc, count, "fwd", b)

    kernels = chunks_and_groups(ctx, plan, chunk_kernels)
    extra = plan.extra_bytes(v, "triton", ctx.acc_dtype, _topk_sides(ctx)) + n * (ctx.k + 1) * (4 * acc + 8)
    detail = plan_text(ctx, plan).replace("kdops.paths.chunked.plan", "kdops.paths.chunked.plan, one side") \
        + ": a float32 [chunk, V] logits buffer, G [group, V] in the weight dtype"
    notes = ("no hard-label term: with one, G is summed in float32 over the logits buffer and copied into the "
             "store (one more pass, not counted here)",
             "topk kernels not measured on a GPU yet: their cost from their SASS (TOPK_LOOP_INSTRUCTIONS)")
    return kernels, extra, detail, notes


def topk_gathered(ctx: Ctx):
    """Per row chunk: W[ids] gathered and upcast ([rows, k, H] float32), s_ids = h·W[ids]ᵀ and dH = G·W[ids] by
    batched float32 products (CUDA cores), dW and db index-added into float32 accumulators, then cast."""
    n, v, h, b, acc, k = ctx.shape.tokens, ctx.shape.vocab, ctx.shape.hidden_student, ctx.b, ctx.acc, ctx.k
    budget = kdops.paths.chunked.MEMORY_BUDGET if ctx.budget is None else ctx.budget
    chunk = max(1, budget // 4 // (k * h * acc))
    launches = cdiv(n, chunk)
    gathered = n * k * h
    kernels = [Kernel("fwd: zero dW's float32 accumulator", items=[("dW zeroed", v * h * acc)]),
               Kernel("fwd: W[ids] gathered, upcast", launches=launches,
                      items=[("W rows read", gathered * b / launches),
                             ("float32 copy written", gathered * acc / launches)]),
               Kernel("fwd: s_ids = h·W[ids]ᵀ (float32)", mm_flops=2.0 * gathered / launches, mm_dtype=torch.float32,
                      launches=launches, items=[("W[ids] read", gathered * acc / launches)]),
               Kernel("fwd: dH = G·W[ids] (float32)", mm_flops=2.0 * gathered / launches, mm_dtype=torch.float32,
                      launches=launches, items=[("W[ids] read", gathered * acc / launches),
                                                ("dH written", n * h * b / launches)]),
               Kernel("fwd: dW index_add of G·h (float32)", ew_flops=gathered / launches, launches=launches,
                      items=[("G·h products written and read", 2 * gathered * acc / launches),
                             ("dW rows read-modify-written", 2 * gathered * acc / launches)])]
    kernels += cast_weight_grad(ctx, True)
    extra = v * h * acc + chunk * k * h * acc * 3
    detail = (f"{launches} chunks of {chunk} rows ([rows, k, H] float32 gathered weights and products: a quarter of "
              f"memory_budget), the float32 [V, H] dW accumulator")
    notes = ("O(N·k·H): the rest of the vocabulary is never read; bandwidth-bound on the gathered float32 rows",)
    return kernels, extra, detail, notes
