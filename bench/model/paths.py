"""The paths the model predicts (names, descriptions, which of them take what) and the cases it tabulates by
default."""

from __future__ import annotations

PATHS = ("kd_loss-triton", "kd_loss-torch", "kd_loss-reference", "fused", "chunked", "epilogue", "sliced",
         "fused-torch", "reference", "liger-chunked", "trl-chunked")
KD_PATHS = PATHS[:3]
DESCRIPTIONS = {
    "kd_loss-triton": "kd_loss, Triton kernels on existing [N, V] logits",
    "kd_loss-torch": "kd_loss, backend=\"torch\" (reference math over row chunks; estimate)",
    "kd_loss-reference": "kdops.reference.kd_loss on [N, V] logits (estimate)",
    "fused": "fused_linear_kd_loss impl=\"fused\" (logit tiles recomputed in Triton kernels)",
    "chunked": "fused_linear_kd_loss impl=\"chunked\" (token chunks, float32 logits, kernels on logits)",
    "epilogue": "fused_linear_kd_loss impl=\"epilogue\" (experimental: chunked, the row statistics in the logits "
                "GEMMs' epilogue; forward KL reads each float32 logit once)",
    "sliced": "fused_linear_kd_loss impl=\"sliced\" (vocabulary slices of every row, float32 logits, kernels on "
              "logits, the logits again in the backward)",
    "fused-torch": "fused_linear_kd_loss backend=\"torch\" (chunks, reference math under autograd; estimate)",
    "reference": "kdops.reference.fused_linear_kd_loss (float32 [N, V] logits; estimate)",
    "liger-chunked": "Liger LigerFusedLinearJSDLoss (1024-token chunks, torch.compile; estimate)",
    "trl-chunked": "TRL 1.16 _chunked_divergence_loss (4096 × 32768 float32 tiles)",
}

#: The paths that take several teachers (`teacher_mix`) in the model.
MIX_PATHS = ("kd_loss-triton", "chunked")
#: The paths whose return_parts the model counts: those of the kernels on logits (the fused kernels' PARTS
#: specialization, with its spills on sm_90, is not modelled).
PARTS_PATHS = ("kd_loss-triton", "chunked", "sliced")

#: The sparse-teacher paths (`kdops.topk`); predicted with `k` (the teacher's top-k), not in PATHS' tables.
TOPK_PATHS = ("kd_loss-topk", "topk-chunked", "topk-gathered")
DESCRIPTIONS.update({
    "kd_loss-topk": "topk_kd_loss, Triton kernels on existing [N, V] student logits (tail bucket)",
    "topk-chunked": "fused_linear_topk_kd_loss impl=\"chunked\" (token chunks, float32 student logits, top-k "
                    "kernels)",
    "topk-gathered": "fused_linear_topk_kd_loss impl=\"gathered\" (tail renormalize: the k gathered weight rows "
                     "only)",
})

#: kdops.token_logprobs (the student's side of on-policy estimators); predicted alone, not in PATHS' tables.
LOGPROBS_PATHS = ("token-logprobs",)
DESCRIPTIONS["token-logprobs"] = ("token_logprobs backend=\"triton\" (log p(token) and entropy with their gradients; "
                                  "row chunks of float32 logits, recomputed in the backward)")

#: The sparse teacher's k in the model's top-k paths unless `predict(..., k=)` says otherwise.
DEFAULT_K = 32

#: The paths that cast their operands under torch.autocast (kdops' fused API).
AUTOCAST_PATHS = ("fused", "chunked", "epilogue", "sliced", "fused-torch")

HEADLINE = "8192x4096x4096x128256"
STANDARD_SHAPES = (("Llama-3 8B widths", HEADLINE), ("Qwen2.5 1.5B → 7B", "8192x1536x3584x151936"),
                   ("Gemma-2 2B → 9B", "8192x2304x3584x256000"))
DEFAULT_DIVERGENCES = ("forward_kl", "generalized_jsd")
