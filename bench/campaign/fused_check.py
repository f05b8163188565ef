"""The fused_check step: `bench.fused_check` — fused_linear_kd_loss at a real size against the float32 reference,
per divergence, again at half the tokens where the reference runs out of memory; each error judged."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from .headline import DIVERGENCES
from .runner import EXPANDABLE_SEGMENTS, Context, Step

FUSED_CHECK_TOKENS = (8192, 4096)  # the second only if the reference runs out of memory at the first
FUSED_CHECK_DIVERGENCE_S = 25.0
FUSED_CHECK_S = 40.0  # 18–22 s on an H100 (bench/results/nvidia-h100-80gb-hbm3)
# Relative error (max |Δ| / max |reference|) above which the check fails: bfloat16 gradients round at
# 2^-8 ≈ 4e-3, and the accuracy bound (docs/math.md) allows 1e-2 beyond the same-dtype reference's own error.
FUSED_CHECK_TOLERANCE = 2e-2
ERRORS = ("err_loss", "err_grad_hidden", "err_grad_weight")


def check_divergence(ctx: Context, divergence: str) -> list[dict]:
    """`bench.fused_check`'s records for `divergence` at the first of FUSED_CHECK_TOKENS at which the reference
    fits in memory, appended to fused-check-<device>.jsonl and recorded."""
    from bench import fused_check
    from bench.measure import free_memory, is_oom

    for tokens in FUSED_CHECK_TOKENS:
        records = None
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "check.jsonl"
            try:
                fused_check.main(["--tokens", str(tokens), "--divergence", divergence, "--output", str(out)])
                records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
            except Exception as error:  # noqa: BLE001
                if not is_oom(error) or tokens == FUSED_CHECK_TOKENS[-1]:
                    raise
        if records is None:  # out of memory: the failed run's tensors are free once its traceback is gone
            free_memory(ctx.device)
            ctx.line(f"{divergence}: out of memory at {tokens} tokens; again with fewer")
            continue
        with open(ctx.path("fused-check-{device}.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        for r in records:
            ctx.record("fused_check", **r)
        return records
    return []


def run_fused_check(ctx: Context) -> None:
    """Each divergence that fits the time left, its errors and costs in a table; "failed" beyond the tolerance."""
    rows = []
    for divergence in DIVERGENCES:
        if not ctx.skip_unless_fits(FUSED_CHECK_DIVERGENCE_S, "divergences",
                                    f"{divergence}: skipped, {ctx.left():.0f} s left"):
            continue
        rows += check_divergence(ctx, divergence)
        ctx.flush()
    bad = [r for r in rows if not all(math.isfinite(r[e]) and r[e] <= FUSED_CHECK_TOLERANCE for e in ERRORS)]
    if rows:
        r0 = rows[0]
        ctx.line(f"bf16, Hs {r0['hs']}, Ht {r0['ht']}, V {r0['vocab']}, hard_weight 0.5, T = 2; error = max |Δ| / "
                 f"max |reference| (fails above {FUSED_CHECK_TOLERANCE:g}); seconds and extra memory of one "
                 "forward + backward:")
        ctx.line("")
        ctx.table(["divergence", "impl", "tokens", "err loss", "err dH", "err dW", "seconds", "extra MiB",
                   "reference s", "reference extra MiB"],
                  [[r["divergence"], r["impl"], r["tokens"], r["err_loss"], r["err_grad_hidden"], r["err_grad_weight"],
                    r["seconds"], r["extra_mib"], r["reference_seconds"], r["reference_extra_mib"]] for r in rows])
    if bad:
        ctx.mark("failed", f"{len(bad)} result(s) beyond {FUSED_CHECK_TOLERANCE:g}")


FUSED_CHECK = Step(
    "fused_check", "fused_linear_kd_loss at a real size against the float32 reference", FUSED_CHECK_S,
    ("bench.fused_check.main(['--tokens', N, '--divergence', D, '--output', ...]) for D in "
     + ", ".join(DIVERGENCES) + f"; N = {FUSED_CHECK_TOKENS[0]} (again at {FUSED_CHECK_TOKENS[1]} on out of "
     "memory); Hs 2048, Ht 4096, V 151936, bf16",
     "records to <output>/fused-check-<device>.jsonl"),
    run_fused_check, EXPANDABLE_SEGMENTS)
