"""The tune step: a handful of block-size choices of `kdops.launchers.logits.logits_config` and
`kdops.launchers.linear.fused_config`,
timed forward + backward at medium shapes against kdops' own choice ({}); the fastest recorded."""

from __future__ import annotations

from .runner import Context, Step
from .tuning import TUNE_REPS, patched_fused_config, patched_logits_config, tune

# Block-size trials: a handful of alternatives to kdops' own choice ({}), not the full product.
TUNE_FUSED_SHAPE = (4096, 32000, 4096, 4096)  # tokens, vocab, Hs, Ht
TUNE_LOGITS_SHAPE = (4096, 128256)  # tokens, vocab
TUNE_FUSED_TRIAL_S, TUNE_LOGITS_TRIAL_S = 12.0, 5.0
TUNE_S = 100.0  # 51 s on an H100 (bench/results/nvidia-h100-80gb-hbm3)
FUSED_TRIALS = (
    {},
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=2),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2),
)
LOGITS_TRIALS = (
    {},
    dict(BLOCK_R=1, BLOCK_V=2048, num_warps=8),  # both kernels' configuration until the H100 campaign
    dict(BLOCK_R=1, BLOCK_V=1024, num_warps=4),
    dict(BLOCK_R=1, BLOCK_V=4096, num_warps=8),
    dict(BLOCK_R=1, BLOCK_V=4096, num_warps=16),
    dict(BLOCK_R=2, BLOCK_V=2048, num_warps=8),
    dict(BLOCK_R=4, BLOCK_V=1024, num_warps=8),
    # A row per warp: Triton's default layout gives each lane one 16-byte vector of a 32-lane row segment
    # (256 bf16 or 128 float32 columns), so BLOCK_V of that width with BLOCK_R = num_warps keeps every row's
    # per-tile reductions inside a warp (shuffles, no barriers). The sm_90 SASS of the default's forward
    # kernels holds 14-18 barriers per tile; these hold none, at 10 % more instructions per element
    # (fewer elements per lane to amortize each reduction): which wins is the GPU's to say.
    dict(BLOCK_R=8, BLOCK_V=256, num_warps=8),
    dict(BLOCK_R=8, BLOCK_V=128, num_warps=8),
    dict(BLOCK_R=4, BLOCK_V=128, num_warps=4),
)
# The kernels on logits are tuned on bf16 logits (kd_loss) and on the float32 logit chunks of the chunked
# impl, with generalized JSD there (its three passes are the chunked path's largest non-matmul cost).
TUNE_LOGITS_CASES = (("forward_kl", "bfloat16"), ("generalized_jsd", "float32"))


def run_tune(ctx: Context) -> None:
    """The logits kernels' trials per case of TUNE_LOGITS_CASES, then the fused kernels' at TUNE_FUSED_SHAPE."""
    import kdops
    import kdops.launchers.linear
    import kdops.launchers.logits
    from bench.cases import FUSED, KD_LOSS, Case

    # The kernels on logits first: they are what stands between the chunked impl and the matmul floor.
    tokens, vocab = TUNE_LOGITS_SHAPE
    for divergence, dtype in TUNE_LOGITS_CASES:
        logits_case = Case(KD_LOSS, divergence, tokens, vocab, dtype=dtype)
        tune(ctx, "logits", kdops.launchers.logits, "logits_config", patched_logits_config, LOGITS_TRIALS, logits_case,
             lambda *a, divergence=divergence: kdops.kd_loss(*a, divergence=divergence, backend="triton"),
             TUNE_LOGITS_TRIAL_S)
        ctx.flush()
    tokens, vocab, hs, ht = TUNE_FUSED_SHAPE
    fused_case = Case(FUSED, "forward_kl", tokens, vocab, hs, ht, "bfloat16")
    tune(ctx, "fused", kdops.launchers.linear, "fused_config", patched_fused_config, FUSED_TRIALS, fused_case,
         lambda *a: kdops.fused_linear_kd_loss(*a, divergence="forward_kl", impl="fused", backend="triton"),
         TUNE_FUSED_TRIAL_S)
    ctx.flush()
    ctx.line("")
    ctx.line("`logits_config` also serves the chunked impl of fused_linear_kd_loss (its kernels run on float32 "
             "logit chunks).")


TUNE = Step(
    "tune", "block sizes: a handful of alternatives to kdops' own choice", TUNE_S,
    (f"kdops.launchers.linear.fused_config: {len(FUSED_TRIALS)} configurations (the default first) at fused "
     "{} × V {} × Hs {} × Ht {}, bf16".format(*TUNE_FUSED_SHAPE),
     f"kdops.launchers.logits.logits_config: {len(LOGITS_TRIALS)} configurations at kd_loss {TUNE_LOGITS_SHAPE[0]} × "
     f"{TUNE_LOGITS_SHAPE[1]}, " + ", ".join(f"{d} {t}" for d, t in TUNE_LOGITS_CASES)
     + f"; forward + backward, {TUNE_REPS} reps; the fastest recorded"),
    run_tune)
