"""The peers' chunked losses, modelled from their sources: Liger's LigerFusedLinearJSDLoss (liger-kernel 0.8.5,
path "liger-chunked") and TRL's ChunkedDivergenceFunction (trl 1.16.0, path "trl-chunked"); both compute the
generalized JSD family only (`jsd_beta`)."""

from __future__ import annotations

from kdops.divergences import Divergence, GeneralizedJSD

from .chunked import logits_matmuls
from .kernels import Ctx, Kernel, cdiv, chunk_counts
from .rates import ELEMENTWISE_FLOPS


def jsd_beta(divergence: Divergence) -> float | None:
    """β of the generalized JSD (mixture β·teacher + (1 − β)·student) equal to `divergence`, or None."""
    if isinstance(divergence, GeneralizedJSD):
        return float(divergence.beta)
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence.name)


# --- Liger ------------------------------------------------------------------------------------------------------------

#: LigerFusedLinearJSDLoss's default chunk_size (liger-kernel 0.8.5, chunked_loss/jsd_loss.py).
LIGER_CHUNK_SIZE = 1024


def liger_chunks(n: int) -> list[tuple[int, int]]:
    """torch.chunk(x, max(1, n // LIGER_CHUNK_SIZE)) sizes (fused_linear_distillation.py)."""
    pieces = max(1, n // LIGER_CHUNK_SIZE)
    size = cdiv(n, pieces)
    return chunk_counts(n, size)


def _liger_chunk(ctx: Ctx, rows: int, count: int, reads_bwd: int) -> list[Kernel]:
    """`count` chunks of `rows` tokens: both logits in the input dtype, the compiled JSD (both logits read
    twice) and its gradient G (read `reads_bwd` times), grad_input = G·W_s, the chunk's dW and its add_."""
    v, b, hs = ctx.shape.vocab, ctx.b, ctx.shape.hidden_student
    return logits_matmuls(ctx, rows, count, "fwd: logits matmuls (input dtype out)", b) + [
        Kernel("fwd: compiled log_softmax + JSD (forward)", ew_flops=rows * v * 2 * ELEMENTWISE_FLOPS,
               launches=count, items=[("both logits read twice", 4 * rows * v * b)]),
        Kernel("fwd: compiled JSD gradient (G)", ew_flops=rows * v * reads_bwd * ELEMENTWISE_FLOPS,
               launches=count, items=[(f"both logits read {reads_bwd}×", 2 * reads_bwd * rows * v * b),
                                      ("G written", rows * v * b)]),
        Kernel("fwd: grad_input = G·W_s", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
               launches=count, items=[("G read", rows * v * b), ("W_s re-read per chunk", v * hs * b),
                                      ("grad_input written", rows * hs * b)]),
        Kernel("fwd: chunk grad_weight = Gᵀ·h_s", mm_flops=2.0 * rows * v * hs, mm_dtype=ctx.dtype,
               launches=count, items=[("G read", rows * v * b), ("h_s read", rows * hs * b),
                                      ("chunk dW written", v * hs * b)]),
        Kernel("fwd: grad_weight.add_(chunk grad)", launches=count,
               items=[("dW and chunk dW read, dW written", 3 * v * hs * b)])]


def liger_chunked(ctx: Ctx):
    """LigerFusedLinearDistillationBase.forward (liger-kernel 0.8.5), read from its source: per chunk of tokens,
    inside one torch.compile'd function, student and teacher logits h·Wᵀ in the input dtype, log_softmax of
    each, the JSD (kl_div for β ∈ {0, 1}), and torch.func.grad_and_value for the chunk's grad_input and
    grad_weight; grad_weight.add_(chunk grad) across chunks, torch.cat of the grad_inputs at the end; the
    backward only scales them (not at all when the upstream gradient is 1).
    Assumed (not read): inductor fuses the elementwise math into row-wise kernels that read both logits twice
    in the forward and twice (JSD: three times) in the backward and write G once, in the input dtype; no
    float32 [chunk, V] intermediates; the chunk's dW product and the add_ stay two kernels."""
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    hs = ctx.shape.hidden_student
    reads_bwd = 2 if jsd_beta(ctx.divergence) in (0.0, 1.0) else 3
    kernels = [Kernel("fwd: zero grad_weight", items=[("dW zeroed", v * hs * b)])]
    for rows, count in liger_chunks(n):
        kernels += _liger_chunk(ctx, rows, count, reads_bwd)
    kernels.append(Kernel("fwd: torch.cat(grad_inputs)", items=[("grad_input read and written", 2 * n * hs * b)]))
    kernels.append(Kernel("bwd: compare the upstream gradient with 1", items=[("scalar", 4)]))
    chunk = liger_chunks(n)[0][0]
    extra = 3 * chunk * v * b + v * hs * b + n * hs * b
    detail = (f"{chunk}-token chunks: both logits and G in the input dtype, a chunk's dW, the grad_input list "
              f"(estimate)")
    notes = (f"{sum(c for _, c in liger_chunks(n))} chunks of {chunk} tokens (chunk_size = {LIGER_CHUNK_SIZE}); "
             "estimate of the compiled elementwise traffic; the gradients are computed in the forward",
             "the chunk-size rule 2^ceil(log2(ceil(N / ceil(V / H)))) is Liger's Triton LigerFusedLinearJSD "
             "(ops/fused_linear_jsd.py), not this chunked loss")
    return kernels, extra, detail, notes


# --- TRL ---------------------------------------------------------------------------------------------------------

#: trl 1.16.0, trl/kernels/chunked_divergence.py: the projections run on tiles of these sizes.
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768


def _trl_projections(ctx: Ctx, phase: str, rows: int, cols: int, count: int) -> list[Kernel]:
    """Both projections of `count` tiles of `rows` tokens × `cols` vocabulary rows by torch.mm into float32
    buffers, the weights' rows re-read per token chunk."""
    b = ctx.b
    return [Kernel(phase, mm_flops=2.0 * rows * cols * h, mm_dtype=ctx.dtype, launches=count,
                   items=[(f"W_{side} re-read per token chunk", cols * h * b), (f"h_{side} read", rows * h * b),
                          ("tile written (float32)", rows * cols * 4)])
            for side, h in (("s", ctx.shape.hidden_student), ("t", ctx.shape.hidden_teacher))]


def _trl_forward(ctx: Ctx, tiles: list, passes: int) -> list[Kernel]:
    """The valid rows gathered, then per pass and tile both projections and a Triton kernel (one program per
    token) folding the tile into online statistics (the second pass: the JSD sums)."""
    n, b, hs, ht = ctx.shape.tokens, ctx.b, ctx.shape.hidden_student, ctx.shape.hidden_teacher
    kernels = [Kernel("fwd: gather the valid rows (h[valid])", launches=2,
                      items=[("h_s, h_t read and written", n * (hs + ht) * b)])]
    for p in range(passes):
        for rows, rc, cols, cc in tiles:
            kernels += _trl_projections(ctx, f"fwd: projections pass {p + 1}", rows, cols, rc * cc)
            kernels.append(Kernel(f"fwd: {'statistics' if p == 0 else 'JSD'} kernel pass {p + 1}",
                                  ew_flops=rows * cols * ELEMENTWISE_FLOPS, programs=rows, launches=rc * cc,
                                  items=[("both tiles read", 2 * rows * cols * 4)]))
    return kernels


def _trl_backward(ctx: Ctx, tiles: list) -> list[Kernel]:
    """float32 grad_hidden and grad_weight zeroed; per tile both projections again, a kernel writing G over the
    student tile (float32), G cast to the input dtype, both gradients accumulated by float32-output addmm; the
    accumulators cast to the input dtype."""
    n, v, b, hs = ctx.shape.tokens, ctx.shape.vocab, ctx.b, ctx.shape.hidden_student
    kernels = [Kernel("bwd: zero float32 grad_hidden, grad_weight",
                      items=[("accumulators zeroed", (n * hs + v * hs) * 4)])]
    for rows, rc, cols, cc in tiles:
        count = rc * cc
        kernels += _trl_projections(ctx, "bwd: projections (recomputed)", rows, cols, count)
        kernels.append(Kernel("bwd: gradient kernel (G over the student tile)",
                              ew_flops=rows * cols * ELEMENTWISE_FLOPS, launches=count,
                              items=[("both tiles read", 2 * rows * cols * 4),
                                     ("G written (float32)", rows * cols * 4)]))
        if b != 4:
            kernels.append(Kernel("bwd: cast G to the input dtype", launches=count,
                                  items=[("G read and written", rows * cols * (4 + b))]))
        kernels.append(Kernel("bwd: grad_hidden addmm (float32 out)", mm_flops=2.0 * rows * cols * hs,
                              mm_dtype=ctx.dtype, launches=count,
                              items=[("G read", rows * cols * b),
                                     ("W_s re-read per token chunk", cols * hs * b),
                                     ("float32 dH read-modify-write per vocabulary chunk", 2 * rows * hs * 4)]))
        kernels.append(Kernel("bwd: grad_weight addmm (float32 out)", mm_flops=2.0 * rows * cols * hs,
                              mm_dtype=ctx.dtype, launches=count,
                              items=[("G read", rows * cols * b), ("h_s read", rows * hs * b),
                                     ("float32 dW read-modify-write per token chunk", 2 * cols * hs * 4)]))
    kernels.append(Kernel("bwd: cast grad_hidden, grad_weight", launches=2,
                          items=[("float32 read, input dtype written", (n * hs + v * hs) * (4 + b) / 2)]))
    return kernels


def trl_chunked(ctx: Ctx):
    """ChunkedDivergenceFunction (trl 1.16.0, kernels/chunked_divergence.py), read from its source. Forward: the
    valid rows gathered (h[valid]); per tile of ≤ 4096 tokens × 32768 vocabulary rows, both projections by
    torch.mm into float32 buffers, then a Triton kernel (one program per token) folding the tile into online
    statistics; β ∉ {0, 1} runs the projections and a second kernel again for the JSD sums. Backward: per
    tile, both projections again, a kernel writing G over the student tile (float32), G cast to the input
    dtype, grad_hidden and grad_weight accumulated by float32-output addmm (read-modify-write of float32
    accumulators), finally cast to the input dtype."""
    n, v, b = ctx.shape.tokens, ctx.shape.vocab, ctx.b
    hs, ht = ctx.shape.hidden_student, ctx.shape.hidden_teacher
    passes = 1 if jsd_beta(ctx.divergence) in (0.0, 1.0) else 2
    tiles = [(rows, rc, cols, cc) for rows, rc in chunk_counts(n, TRL_TOKEN_CHUNK)
             for cols, cc in chunk_counts(v, TRL_VOCAB_CHUNK)]
    kernels = _trl_forward(ctx, tiles, passes) + _trl_backward(ctx, tiles)
    rows = min(n, TRL_TOKEN_CHUNK)
    extra = 2 * rows * TRL_VOCAB_CHUNK * 4 + n * (hs + ht) * b + (n * hs + v * hs) * 4 + rows * TRL_VOCAB_CHUNK * b
    detail = ("two float32 [4096, 32768] tiles, the gathered hidden states (saved for the backward), float32 "
              "grad_hidden and grad_weight, G in the input dtype")
    notes = (f"{cdiv(n, TRL_TOKEN_CHUNK)} token chunk(s) × {cdiv(v, TRL_VOCAB_CHUNK)} vocabulary chunks; "
             f"{passes} projection pass{'es' if passes > 1 else ''} in the forward, one more in the backward",)
    return kernels, extra, detail, notes
