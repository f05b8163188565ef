"""`kdops.token_logprobs` backend="triton" (path "token-logprobs"): log p(token) and the entropy of every row from
the student's hidden states, in row chunks of float32 logits (`kdops.paths.token_logprobs`). Forward: per chunk the
logits matmul and the statistics kernel (the logits read once). Backward: per chunk the logits matmul again, the
gradient kernel (the logits read, G written in the weight dtype), dH = G·W and dW += Gᵀ·h by cuBLAS — dW summed
in a float32 accumulator over the chunks when there are several (a 16-bit weight)."""

from __future__ import annotations

from dataclasses import replace

import kdops.launchers.logits
import kdops.paths.token_logprobs
from kdops.launchers.token_logprobs import NUM_STATS

from .chunked import cast_weight_grad, group_backprop, logits_matmuls
from .kernels import Ctx, Kernel, cdiv, chunk_counts
from .rates import token_logprobs_kernel_flops
from .units import size_text


def _kernel(ctx: Ctx, rows: int, count: float, gradient: bool) -> Kernel:
    """The statistics kernel or the gradient kernel over `rows` rows of float32 logits."""
    v, acc = ctx.shape.vocab, ctx.acc
    config = kdops.launchers.logits.logits_config(rows, v, ctx.gpu, ctx.acc_dtype, ctx.softcaps, forward=not gradient)
    flops = token_logprobs_kernel_flops(ctx.softcaps > 0)[gradient]
    items = [("logits read", rows * v * acc), ("token ids read", rows * 4)]
    if gradient:
        items += [("statistics and upstream read", rows * (NUM_STATS + 2) * acc), ("G written", rows * v * ctx.b)]
        name = "bwd: gradient kernel (G into the weight dtype)"
    else:
        items += [("statistics written", rows * NUM_STATS * acc)]
        name = "fwd: statistics kernel"
    return Kernel(name, ew_flops=rows * v * flops, programs=cdiv(rows, config["BLOCK_R"]), launches=count,
                  items=items)


def token_logprobs_path(ctx: Ctx):
    n, v, h, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.shape.hidden_student, ctx.b, ctx.acc
    chunk = min(n, kdops.paths.token_logprobs.logprobs_chunk_rows(v, "triton", ctx.acc_dtype, ctx.dtype, ctx.budget))
    several = chunk < n
    accumulate = several or b == acc  # a float32 weight's gradient is its own accumulator
    kernels = [Kernel("bwd: zero dW's float32 accumulator", items=[("dW zeroed", v * h * acc)])] if accumulate else []
    for rows, count in chunk_counts(n, chunk):
        kernels += logits_matmuls(ctx, rows, count, "fwd: logits matmul (float32 out)", acc)[:1]
        kernels.append(_kernel(ctx, rows, count, False))
        kernels += logits_matmuls(ctx, rows, count, "bwd: logits matmul again (float32 out)", acc)[:1]
        kernels.append(_kernel(ctx, rows, count, True))
        kernels += [replace(k, phase=k.phase.replace("fwd:", "bwd:").replace("group", "chunk"))
                    for k in group_backprop(ctx, rows, count, accumulate)]
    kernels += [replace(k, phase=k.phase.replace("fwd:", "bwd:")) for k in cast_weight_grad(ctx, several)]
    budget = kdops.paths.token_logprobs.TOKEN_LOGPROBS_BUDGET if ctx.budget is None else ctx.budget
    store = v * b if b != acc else 0
    extra = chunk * (v * acc + store) + n * (NUM_STATS + 4) * acc + (v * h * acc if several and b != acc else 0)
    detail = (f"{cdiv(n, chunk)} chunks of {chunk} rows (kdops.paths.token_logprobs.logprobs_chunk_rows, memory_budget "
              f"{size_text(budget)}): a float32 [chunk, V] logits buffer"
              + (" + G [chunk, V] in the weight dtype" if store else "")
              + (", the float32 [V, H] dW accumulator" if several and b != acc else "")
              + ", the per-row statistics and outputs")
    notes = ("the logits are computed twice (forward and backward); the hidden states' and weight's gradients of "
             "both outputs in one gradient kernel", "token_logprobs kernels not measured on a GPU yet: their cost "
             "from their SASS (TOKEN_LOGPROBS_INSTRUCTIONS)")
    return kernels, extra, detail, notes
