"""`fused_linear_kd_loss` impl="fused" (path "fused"): the forward's Triton kernels recompute both models' logit
tiles from the hidden states (`kdops.launchers.linear.fused_config`: row blocks × vocabulary splits, partial states
merged once per pass); the backward, by vocabulary slices of G (`kdops.launchers.linear.slice_columns`), recomputes the
tiles in the gradient kernel, then cuBLAS makes dW[slice] and dH."""

from __future__ import annotations

from kdops.launchers import linear as fused_launchers
from kdops.launchers.common import next_pow2

from .kernels import Ctx, Kernel, cdiv, kernel_constants
from .rates import logits_kernel_flops
from .slice_backward import dh_sums_rounded, slice_products, zero_grads
from .units import MiB


def _configs(ctx: Ctx) -> tuple[dict, dict]:
    """`kdops.launchers.linear.fused_config` of the forward kernel and of the gradient kernel, as `FusedProblem.config`
    makes them here: no hard label, no biases, a frozen teacher (every modelled case); TMA for 16-bit operands on
    Hopper."""
    jsd = ctx.divergence.canonical().kind.name == "JSD"
    tma = ctx.gpu.capability >= (9, 0) and ctx.b == 2

    def width(forward):
        return fused_launchers.tile_width(forward, ctx.passes > 1, 0.0, False, ctx.transform, tma, teacher_grads=False)

    return (fused_launchers.fused_config(ctx.shape.tokens, ctx.shape.vocab, ctx.gpu, ctx.dtype, forward=True, jsd=jsd,
                                         transform=ctx.transform, width=width(True)),
            fused_launchers.fused_config(ctx.shape.tokens, ctx.shape.vocab, ctx.gpu, ctx.dtype, jsd=jsd,
                                         transform=ctx.transform, width=width(False)))


def _forward(ctx: Ctx, config: dict) -> tuple[list[Kernel], float]:
    """Per pass, the forward kernel (a program per row block and vocabulary split, walking the split's tiles and
    recomputing both logit tiles: its hidden rows re-read per tile, the weights per row block) and the merge of
    its partial states. Returns (kernels, bytes of partial states)."""
    n, v, b, acc = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.acc
    hs, ht = ctx.shape.hidden_student, ctx.shape.hidden_teacher
    num_stats, num_partial = kernel_constants()
    bn, bv, bh, split = config["BLOCK_N"], config["BLOCK_V"], config["BLOCK_H"], config["split_size"]
    n_splits, row_blocks = cdiv(v, split), cdiv(n, bn)
    v_tiles = sum(cdiv(min(v, lo + split) - lo, bv) for lo in range(0, v, split))  # tiles over all splits
    hs_p, ht_p = cdiv(hs, bh) * bh, cdiv(ht, bh) * bh
    tile_mm = 2.0 * bn * bv * (hs_p + ht_p)  # both logit tiles of one (row block, vocabulary tile)
    tile_ew = bn * bv * logits_kernel_flops(ctx.divergence, ctx.softcaps, lanes=False)[0]
    partial = n * n_splits * num_partial * acc
    kernels = []
    for p in range(ctx.passes):
        visits = row_blocks * v_tiles
        kernels.append(Kernel(
            f"fwd: fused forward kernel pass {p + 1}", mm_flops=visits * tile_mm, mm_dtype=ctx.dtype,
            ew_flops=visits * tile_ew, programs=row_blocks * n_splits, tiles=visits, block_n=bn, forward=True,
            items=[("W_s, W_t re-read per row block", row_blocks * v_tiles * bv * (hs + ht) * b),
                   ("h_s, h_t re-read per vocabulary tile", visits * bn * (hs + ht) * b),
                   ("partial states written", partial), ("statistics read", n * num_stats * acc * p)],
            bytes_l2=v * (hs + ht) * b + n * (hs + ht) * b + partial + n * num_stats * acc * p))
        kernels.append(Kernel(f"fwd: merge partials pass {p + 1}", programs=cdiv(n, min(128, next_pow2(n))),
                              items=[("partial states read", partial),
                                     ("statistics and loss written", n * (num_stats + 1) * acc)]))
    return kernels, partial


def _backward(ctx: Ctx, block_h: int, config: dict) -> tuple[list[Kernel], int, int]:
    """The backward (`kdops.launchers.linear.fused_backward`): vocabulary slices of G for every row
    (GRADIENT_BYTES), each a launch of the gradient kernel (one program per tile, recomputing both logit tiles of `block_h`-wide
    hidden blocks), then cuBLAS: dW[slice] = Gᵀ·h_s and dH += G·W_s[slice] into float32 sums. Returns
    (kernels, slice width, slices)."""
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    hs, ht = ctx.shape.hidden_student, ctx.shape.hidden_teacher
    gn, gv = config["BLOCK_N"], config["BLOCK_V"]
    width = fused_launchers.slice_columns(n, v, gv, b)
    slices = [(lo, min(v, lo + width)) for lo in range(0, v, width)]
    g_tile_mm = 2.0 * gn * gv * (cdiv(hs, block_h) * block_h + cdiv(ht, block_h) * block_h)
    per_gradient = logits_kernel_flops(ctx.divergence, ctx.softcaps, lanes=False)[1]
    kernels = [zero_grads(ctx, "bwd: zero dH, dW")]
    for lo, hi in slices:
        w = hi - lo
        visits = cdiv(n, gn) * cdiv(w, gv)
        kernels.append(Kernel(
            "bwd: fused gradient kernel (recompute tiles, G written per slice)", mm_flops=visits * g_tile_mm,
            mm_dtype=ctx.dtype, ew_flops=visits * gn * gv * per_gradient, programs=visits, tiles=visits, block_n=gn,
            items=[("h_s, h_t re-read per tile", visits * gn * (hs + ht) * b),
                   ("W_s, W_t re-read per tile", visits * gv * (hs + ht) * b), ("G written", n * w * b)],
            bytes_l2=n * (hs + ht) * b + w * (hs + ht) * b + n * w * b))
        kernels += slice_products(ctx, w, 1)
    return kernels + dh_sums_rounded(ctx), width, len(slices)


def fused_path(ctx: Ctx):
    n, b, acc, hs = ctx.shape.tokens, ctx.b, ctx.acc, ctx.shape.hidden_student
    num_stats, _ = kernel_constants()
    forward_config, backward_config = _configs(ctx)
    forward, partial = _forward(ctx, forward_config)
    backward, width, slices = _backward(ctx, forward_config["BLOCK_H"], backward_config)
    buffers = n * width * b
    hidden_sums = n * hs * acc if b < acc else 0  # dH summed in a float32 buffer, unless it is float32 itself
    extra = n * (num_stats * acc + 2 * acc + 1) + max(partial, buffers + hidden_sums)
    detail = (f"statistics per row + max(the forward's partial states, the backward's G buffer "
              f"({buffers / MiB:.0f} MiB) and float32 dH sums ({hidden_sums / MiB:.0f} MiB))")
    bn, bv, bh, split = (forward_config[key] for key in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "split_size"))
    n_splits = cdiv(ctx.shape.vocab, split)
    notes = (f"fused_config: BLOCK_N={bn}, BLOCK_V={bv}, BLOCK_H={bh}, {n_splits} vocabulary splits of {split} "
             f"({cdiv(n, bn) * n_splits} forward programs); backward: {slices} vocabulary slices of {width} "
             f"columns (GRADIENT_BYTES = {fused_launchers.GRADIENT_BYTES // MiB} MiB), {backward_config['BLOCK_N']} × "
             f"{backward_config['BLOCK_V']} gradient tiles",
             "no L2 reuse: every tile load is an HBM read (total_l2_s: operands once per launch)")
    return forward + backward, extra, detail, notes
