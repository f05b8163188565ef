"""`kd_loss` on existing [N, V] logits with kdops' Triton kernels (path "kd_loss-triton"), and the kernels on
logits (`kernels/logits.py`) that the fused API's chunked and sliced paths launch over their float32 buffers;
with several teachers, their mix into one target (`kdops.paths.mixed`)."""

from __future__ import annotations

import kdops.launchers.logits
import kdops.paths.mixed
import kdops.paths.torch_engine

from .kernels import Ctx, Kernel, cdiv, chunk_counts, kernel_constants
from .rates import logits_kernel_flops, parts_kernel_flops


def kernels_on_logits(ctx: Ctx, rows: int, itemsize: int, label: str, phase: str, write_grad: bool,
                      launches: float = 1.0, grad_label: str = "student gradient written",
                      grad_itemsize: int | None = None) -> list[Kernel]:
    """The kernels on logits (`kernels/logits.py`) over `rows` rows of both [rows, V] logits of `itemsize`
    bytes: the forward's passes (both logits read per pass), or the backward (read both, write G_s in
    `grad_itemsize` bytes, by default the logits')."""
    v, gpu = ctx.shape.vocab, ctx.gpu
    num_stats, _ = kernel_constants()
    config = kdops.launchers.logits.logits_config(rows, v, gpu, ctx.acc_dtype)
    programs = cdiv(rows, config["BLOCK_R"])
    both = 2 * rows * v * itemsize
    stats = rows * num_stats * ctx.acc
    per_pass, per_gradient = logits_kernel_flops(ctx.divergence, ctx.softcaps)
    if write_grad:
        return [Kernel(phase, ew_flops=rows * v * per_gradient, programs=programs, launches=launches,
                       items=[(f"both {label} read", both),
                              (grad_label, rows * v * (itemsize if grad_itemsize is None else grad_itemsize)),
                              ("statistics read", stats)])]
    kernels = []
    for p in range(ctx.passes):
        # return_parts adds its sums to the first pass, and [rows, 4] parts written: no more reads of the logits
        parts = ctx.parts and p == 0
        kernels.append(Kernel(f"{phase} pass {p + 1}", ew_flops=rows * v * (per_pass + (parts_kernel_flops(
            ctx.divergence) if parts else 0.0)), programs=programs, launches=launches,
                              items=[(f"both {label} read", both),
                                     ("statistics and loss written" if p == ctx.passes - 1 else "", stats),
                                     ("parts written" if parts else "", rows * 4 * ctx.acc if parts else 0)]))
    return kernels


#: float32 [rows, V] reads and writes of a chunk's mix of several teachers (`kdops.ensemble`, PyTorch operators,
#: bandwidth-bound): (per teacher, once) — the mixture: each teacher's log-softmax (read twice, write), its
#: weight added, the stack, then the logsumexp and the temperature; the logit sum: a masked multiply-add per
#: teacher and the mask. Counted from the code, not measured.
MIX_PASSES = {"ensemble": (6, 3), "logit_sum": (4, 2)}


def mix_kernel(ctx: Ctx, rows: int, launches: float, phase: str, teacher_itemsize: int) -> Kernel:
    """The mix of ctx.teachers teachers' logits of `rows` rows into one float32 target (`kdops.ensemble`)."""
    per_teacher, once = MIX_PASSES[ctx.mix]
    v = ctx.shape.vocab
    return Kernel(phase, launches=launches,
                  items=[("the teachers' logits read", ctx.teachers * rows * v * teacher_itemsize),
                         ("the mix's float32 passes", (per_teacher * ctx.teachers + once) * rows * v * 4)])


def kd_loss_triton(ctx: Ctx):
    n, b = ctx.shape.tokens, ctx.b
    num_stats, _ = kernel_constants()
    if ctx.mix:
        return _kd_triton_mixed(ctx)
    kernels = kernels_on_logits(ctx, n, b, "logits", "fwd: kernels on logits", False)
    kernels += kernels_on_logits(ctx, n, b, "logits", "bwd: kernel on logits (gradient)", True)
    # Saved statistics, the per-row losses, their masked copy, the mask.
    extra = n * (num_stats * ctx.acc + 2 * ctx.acc + 1)
    detail = f"{num_stats} statistics + 2 losses per row in float32 and the mask: {extra / n:.0f} B per token"
    notes = ("one program per row (BLOCK_R = 1): the forward reads both logits once per pass "
             f"({ctx.passes} for {ctx.divergence.name}), the backward reads both and writes the student's gradient",)
    return kernels, extra, detail, notes


def _kd_triton_mixed(ctx: Ctx):
    """kd_loss with several teachers (`kdops.paths.mixed.mixed_kd_rows`): per row chunk the mix into a float32
    target and the kernels on (student, target); the backward recomputes the mix and the forward passes of each
    chunk before the gradient kernel."""
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    chunk = min(n, kdops.paths.mixed.mixed_chunk_rows(v, ctx.teachers, "triton"))
    pair = (b + 4) / 2  # the student's logits in their dtype, the target in float32
    kernels = []
    for rows, count in chunk_counts(n, chunk):
        for stage in ("fwd", "bwd"):
            kernels.append(mix_kernel(ctx, rows, count, f"{stage}: mix of the teachers (torch)", b))
            kernels += kernels_on_logits(ctx, rows, pair, "student and target", f"{stage}: kernels on logits",
                                         False, count)
        kernels += kernels_on_logits(ctx, rows, pair, "student and target", "bwd: kernel on logits (gradient)",
                                     True, count, grad_itemsize=b)
    peak_chunk = chunk * v * 4 * (5 + kdops.paths.mixed.MIX_TEMPORARIES * ctx.teachers)
    detail = (f"{cdiv(n, chunk)} chunks of {chunk} rows (kdops.paths.torch_engine.BUDGET_BYTES): one chunk's target "
              "and mix temporaries at a time")
    notes = (f"{ctx.teachers} teachers ({ctx.mix}): the mix in PyTorch (MIX_PASSES, an estimate), recomputed in "
             "the backward with the chunk's forward passes",)
    return kernels, min(peak_chunk, kdops.paths.torch_engine.BUDGET_BYTES), detail, notes
