"""The torch backend, counted op by op (`probes`): `kd_loss` backend="torch" (path "kd_loss-torch": the
reference math over row chunks of `kdops.paths.torch_engine.chunk_rows`, recomputed under autograd in the
backward) and `fused_linear_kd_loss` backend="torch" (path "fused-torch": the chunked path's plan and matmuls
around the per-chunk math under autograd). Estimates."""

from __future__ import annotations

import kdops.paths.chunked
import kdops.paths.torch_engine

from .chunked import chunked_common, chunked_sides, plan_text
from .kernels import Ctx, Kernel, cdiv
from .probes import PROBE_CHUNK, PROBE_ROWS, PROBE_VOCAB, torch_kernels
from .units import MiB


def kd_loss_torch(ctx: Ctx):
    n, v = ctx.shape.tokens, ctx.shape.vocab
    chunk = min(n, kdops.paths.torch_engine.chunk_rows(v, itemsize=max(4, ctx.b)))
    dims = {PROBE_ROWS: n, PROBE_CHUNK: chunk, PROBE_VOCAB: v}
    names = {("fwd", "ew"): "fwd: reference math, chunk by chunk (no graph)",
             ("bwd", "ew"): "bwd: recompute each chunk under autograd, write its gradient",
             ("fwd", "mm"): "fwd: matmuls", ("bwd", "mm"): "bwd: matmuls"}
    # The probe ran 3 chunks (36 rows in chunks of 12); the real call runs n / chunk.
    kernels, peak, count = torch_kernels(ctx, "kd_loss-torch", dims, names, per_chunk=n / chunk / 3)
    extra = peak - n * v * ctx.b  # the gradient it returns is part of the peak
    budget = kdops.paths.torch_engine.BUDGET_BYTES
    detail = (f"{chunk}-row chunks (kdops.paths.torch_engine.chunk_rows: {budget // MiB} MiB budget), the "
              "temporaries of one chunk")
    notes = (f"estimate: {count} aten operators at the probe shape, each reading its inputs and writing its outputs "
             f"once; {cdiv(n, chunk)} chunks",)
    return kernels, extra, detail, notes


def fused_torch(ctx: Ctx):
    n, v, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.acc
    names = {("fwd", "ew"): "fwd: reference math under autograd (per chunk)", ("fwd", "mm"): "fwd: matmuls in the math"}
    probed = {"peak": 0, "ops": 0}

    def chunk_kernels(rows, count):
        math_kernels, math_peak, ops = torch_kernels(ctx, "fused-torch", {PROBE_CHUNK: rows, PROBE_VOCAB: v}, names,
                                                     count, every_op=True)
        probed["peak"], probed["ops"] = max(probed["peak"], math_peak), ops
        return math_kernels + [Kernel("fwd: G copied into the group's store", launches=count,
                                      items=[("G read (float32)", rows * v * acc), ("G written", rows * v * ctx.b)])]

    kernels, plan = chunked_common(ctx, "torch", chunk_kernels)
    extra = (2 * plan.chunk * v * acc + probed["peak"] + plan.group * v * ctx.b + n * (2 * acc + 1)
             + (kdops.paths.chunked.accumulator_bytes(v, ctx.acc_dtype, chunked_sides(ctx)) if plan.accumulate else 0))
    detail = (plan_text(ctx,
                        plan) + f", with {kdops.paths.chunked.TORCH_TEMPORARIES} autograd temporaries per logit: two "
              f"float32 buffers + the math's temporaries ({probed['peak'] / MiB:.0f} MiB, probed) + G in the weight "
              "dtype")
    notes = (f"estimate: the chunk's math is {probed['ops']} aten operators (probed), each reading its inputs and "
             f"writing its outputs once; each chunk re-reads both weights",)
    return kernels, extra, detail, notes
