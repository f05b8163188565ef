"""The trainer_step step: `bench.trainer_step` at its "1b-8b" preset — a 1.24 B student and an 8.03 B teacher (Llama
shapes, random weights), 4096 tokens, bf16 — full optimizer steps in kdops' transformers and TRL trainers, TRL's
own, a Trainer on Liger's fused-linear JSD and one on full logits: tokens/s, step time, peak memory and the first
step's loss of each; the records also in trainer-step-<device>.jsonl. Off CUDA (the tests) it runs the "tiny"
preset."""

from __future__ import annotations

from .runner import EXPANDABLE_SEGMENTS, Context, Step

PRESET, CPU_PRESET = "1b-8b", "tiny"
# No GPU run yet: `bench.trainer_step.run_estimate_s` of the preset (3 warm-up + 5 timed steps per competitor) says
# 129 s — imports and the teacher's build 25 s; per competitor 4 s of setup, 5–40 s of first-step compilation
# (Liger's torch.compile the most) and 8 steps of ~0.35 s (107 TFLOP at a third of an H100's bf16 peak).
TRAINER_STEP_S = 130.0


def run_trainer_step(ctx: Context) -> None:
    """Every competitor of bench.trainer_step in turn (those that no longer fit the step's time skipped): a record
    each, the table in the report; "failed" where one raised an error."""
    from bench import trainer_step

    preset = trainer_step.PRESETS[PRESET if ctx.device == "cuda" else CPU_PRESET]
    for line in trainer_step.describe(preset, preset.warmup, preset.steps):
        ctx.line(line)
    records = trainer_step.run(preset, trainer_step.COMPETITORS, ctx.device, fits=ctx.fits)
    path = trainer_step.write_records(records, ctx.output)
    for record in records:
        ctx.record("trainer_step", **record)
    ctx.line("")
    ctx.table(trainer_step.HEADER, trainer_step.table_rows(records))
    ctx.line("")
    ctx.line(f"Records: `{path.name}`.")
    errors = [r["competitor"] for r in records if r["status"] == "error"]
    if errors:
        ctx.mark("failed", "error in " + ", ".join(errors))
    if any(str(r["message"]).startswith("skipped for time") for r in records):
        ctx.mark("partial", "competitors skipped for time")


def trainer_step_details() -> list[str]:
    """The preset's setting and every competitor with its estimate (`python -m bench.trainer_step --dry-run`)."""
    from bench import trainer_step

    preset = trainer_step.PRESETS[PRESET]
    return trainer_step.dry_run_lines(preset, trainer_step.COMPETITORS, preset.warmup, preset.steps)


TRAINER_STEP = Step(
    "trainer_step", "a whole training step: kdops' trainers against TRL's, Liger's loss and full logits",
    TRAINER_STEP_S,
    (f"bench.trainer_step.run(PRESETS['{PRESET}']): a 1.24 B student and an 8.03 B teacher, 1 × 4096 tokens, bf16, "
     "AdamW, 3 warm-up + 5 timed optimizer steps per competitor",
     "competitors: kdops-transformers, kdops-trl, trl, liger-jsd, torch-logits (generalized JSD, β = 0.5)",
     "records also to <output>/trainer-step-<device>.jsonl"),
    run_trainer_step, EXPANDABLE_SEGMENTS, details=trainer_step_details)
