"""`fused_linear_kd_loss` impl="epilogue" (path "epilogue", `kdops.paths.epilogue`): the chunked path whose logits
GEMMs (quack's CuTe DSL) keep each row's maximum and sum of exponentials per N tile in their epilogue. Without
softcaps, one kernel merges the tiles' statistics, which replace the kernels' first pass: for forward KL one pass
over the logits then writes the loss and G; for the generalized JSD its second pass and the gradient pass follow.
Every other loss runs as the chunked path does."""

from __future__ import annotations

import kdops.launchers.logits

from .chunked import chunked_common, chunked_path, chunked_sides, logit_rows, plan_text
from .kernels import Ctx, Kernel, cdiv, kernel_constants
from .logits import kernels_on_logits
from .rates import logits_kernel_flops, one_read_kernel_flops

#: The epilogue GEMM's N tile per compute capability (major): quack's default configs, 128 × 192 on sm_90 and
#: 256 × 256 on sm_100 (`python -m bench.epilogue`); the sinks hold one (max, sum) pair per row and N tile.
EPILOGUE_TILE_N = {9: 192, 10: 256}


def given_statistics(ctx: Ctx) -> str | None:
    """How the chunks use the epilogue's statistics (`kdops.paths.epilogue.EpilogueProblem.given_statistics`):
    "one read" (`launchers.logits.one_read`), "second pass" (`launchers.logits.second_pass_only`), or None (the
    chunked path)."""
    canon = ctx.divergence.canonical()
    if ctx.softcaps or ctx.mix or ctx.parts or canon.teacher_share != 1.0:
        return None
    if kdops.launchers.logits.one_read(canon):
        return "one read"
    return "second pass" if kdops.launchers.logits.second_pass_only(canon) else None


def epilogue_path(ctx: Ctx):
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    mode = given_statistics(ctx)
    if mode is None:
        kernels, extra, detail, notes = chunked_path(ctx)
        return kernels, extra, detail, notes + (
            f"{ctx.divergence.name}: the chunked path itself (cuBLAS's logits, no statistics kept)",)
    num_stats, _ = kernel_constants()
    tile_n = EPILOGUE_TILE_N.get(ctx.gpu.capability[0], EPILOGUE_TILE_N[9])
    models = 1 + ctx.teachers
    config = kdops.launchers.logits.logits_config(n, v, ctx.gpu, ctx.acc_dtype, forward=True)
    per_element = one_read_kernel_flops(ctx.divergence)
    per_pass, _ = logits_kernel_flops(ctx.divergence)

    def merge(rows, count):
        sinks = models * rows * cdiv(v, tile_n) * 2 * acc
        return Kernel("fwd: the epilogue's statistics merged (merge_tile_statistics_kernel)", launches=count,
                      programs=cdiv(rows, 16), items=[("per-tile (max, sum) written by the GEMMs, read", 2 * sinks),
                                                      ("statistics written", rows * num_stats * acc)])

    def chunk_kernels(rows, count):
        programs = cdiv(rows, config["BLOCK_R"])
        if mode == "second pass":
            return [merge(rows, count),
                    Kernel("fwd: kernel on logits, the second pass from the epilogue's statistics",
                           ew_flops=rows * v * per_pass, programs=programs, launches=count,
                           items=[("both logits buffers read", 2 * rows * v * acc),
                                  ("statistics read and written", 2 * rows * num_stats * acc),
                                  ("loss written", rows * acc)]),
                    *kernels_on_logits(ctx, rows, acc, "logits buffers",
                                       "fwd: kernel on logits (G into the group's store)", True, count,
                                       grad_label="G_s written (weight dtype)", grad_itemsize=b)]
        return [
            merge(rows, count),
            Kernel("fwd: kernel on logits (loss and G in one pass)", ew_flops=rows * v * per_element,
                   programs=programs, launches=count,
                   items=[("both logits buffers read", 2 * rows * v * acc),
                          ("G_s written (weight dtype)", rows * v * b), ("statistics read", rows * num_stats * acc),
                          ("loss written", rows * acc)]),
        ]

    kernels, plan = chunked_common(ctx, "triton", chunk_kernels)
    sides = chunked_sides(ctx)
    tiles = cdiv(v, tile_n)
    extra = plan.extra_bytes(v, "triton", ctx.acc_dtype, sides, logit_rows(ctx)) + n * (2 * acc + 1) \
        + plan.chunk * (num_stats * acc + models * tiles * 2 * acc)
    detail = plan_text(ctx, plan) + (f": two float32 [chunk, V] logits buffers, G [group, V] in the weight dtype, "
                                     f"and per model a (max, sum) pair per row and {tile_n}-column tile")
    notes = ("the epilogue's work (a multiply, a max and an exponential per logit and model) runs while the GEMM's "
             "next tile is multiplied (quack's persistent, ping-pong GEMM): not counted; the GEMM's rate is "
             "cuBLAS's (not measured)",
             "the one-read kernel: rates.one_read_kernel_flops (its SASS: ONE_READ_SASS instructions per element)"
             if mode == "one read" else "the second pass: the chunked path's forward pass rate (two more sums per "
             "element; not measured)")
    return kernels, extra, detail, notes
