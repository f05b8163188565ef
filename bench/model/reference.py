"""kdops' references, counted op by op (`probes`): `kdops.reference.kd_loss` on [N, V] logits (path
"kd_loss-reference") and `kdops.reference.fused_linear_kd_loss` (path "reference": float32 casts of the
operands, float32 [N, V] logits, autograd). Estimates."""

from __future__ import annotations

from .kernels import Ctx
from .probes import PROBE_HS, PROBE_HT, PROBE_ROWS, PROBE_VOCAB, torch_kernels


def kd_loss_reference(ctx: Ctx):
    n, v = ctx.shape.tokens, ctx.shape.vocab
    dims = {PROBE_ROWS: n, PROBE_VOCAB: v}
    names = {("fwd", "ew"): "fwd: reference math on [N, V] (float32 softmaxes)",
             ("bwd", "ew"): "bwd: autograd of the reference math", ("fwd", "mm"): "fwd: matmuls",
             ("bwd", "mm"): "bwd: matmuls"}
    kernels, peak, count = torch_kernels(ctx, "kd_loss-reference", dims, names)
    extra = peak - n * v * ctx.b
    return kernels, extra, f"{extra / (n * v * 4):.2f} float32 [N, V] matrices", (
        f"estimate: {count} aten operators, each reading its inputs and writing its outputs once",)


def reference_path(ctx: Ctx):
    n, v, hs, ht = ctx.shape.tokens, ctx.shape.vocab, ctx.shape.hidden_student, ctx.shape.hidden_teacher
    dims = {PROBE_ROWS: n, PROBE_VOCAB: v, PROBE_HS: hs, PROBE_HT: ht}
    names = {("fwd", "ew"): "fwd: casts to float32 and the reference math",
             ("fwd", "mm"): "fwd: logits matmuls (float32 operands)",
             ("bwd", "ew"): "bwd: autograd of the math and of the casts",
             ("bwd", "mm"): "bwd: dH, dW matmuls (float32 operands)"}
    kernels, peak, count = torch_kernels(ctx, "reference", dims, names)
    extra = peak - (n * hs + v * hs) * ctx.b
    detail = f"float32 logits, weights and temporaries: {extra / (n * v * 4):.2f} float32 [N, V] matrices"
    notes = (f"estimate: {count} aten operators; the matmuls take float32 operands (CUDA cores unless TF32 is "
             f"allowed: torch's default is not)",)
    return kernels, extra, detail, notes
