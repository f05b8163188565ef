"""The fronts step (`--steps fronts`): `bench.fronts` at the headline shape — every competitor's memory knob swept,
all points of a divergence timed in turn, each with its extra memory and its loss error against the float64 oracle;
the records into fronts-<device>.jsonl and the campaign's, a table, a summary and a chart per divergence.

Declared here; the plan (bench/campaign/plan.py) lists the steps it runs."""

from __future__ import annotations

import io

from .headline import DIVERGENCES, headline_case
from .runner import Context, Step

FRONTS_REPS, FRONTS_WARMUP = 5, 2
# Estimates, not yet measured: per divergence about 20 points at 0.05–0.2 s a pass × 8 passes (~15 s), Liger's
# torch.compile per chunk size (4 × ~20 s, the headline's 40–47 s a case with two compiles), orda-kernel's autotuning
# (~10 s a point) and the float64 oracle (~5 s).
FRONTS_CASE_S = 150.0
FRONTS_S = 300.0


def fronts_cases() -> list:
    """The step's cases: the headline's, for each of its divergences."""
    return [headline_case(d) for d in DIVERGENCES]


def run_fronts_step(ctx: Context) -> None:
    """`bench.fronts.run_fronts` for each case that fits the time left: its records also in the campaign's
    JSON lines, its table and summary in the report, its files in the output folder."""
    from bench.fronts import case_lines, run_fronts

    ctx.line(f"{FRONTS_REPS} repetitions after {FRONTS_WARMUP} warm-ups (medians), every point of a case taking its "
             "turn repetition by repetition; extra = peak memory beyond the inputs and the student's gradients; "
             "loss error = relative difference to the float64 oracle.")
    for case in fronts_cases():
        ctx.heading(f"fronts: {case.label}")
        if not ctx.skip_unless_fits(FRONTS_CASE_S, "cases",
                                    f"Skipped: estimated {FRONTS_CASE_S:.0f} s, {ctx.left():.0f} s left."):
            continue
        records = run_fronts([case], device=ctx.device, reps=FRONTS_REPS, warmup=FRONTS_WARMUP, output=ctx.output,
                             out=io.StringIO())
        for record in records:
            ctx.record("fronts", **{k: v for k, v in record.items() if k != "kind"})  # ctx.record sets it
        for line in case_lines(records)[2:]:  # the heading is the step's own
            ctx.line(line)
        ctx.flush()


def fronts_details() -> list[str]:
    """Every point of the step's cases with its estimate, as `python -m bench.fronts --dry-run` gives them for an
    H100 (the cost model where it has the path, a stated rough estimate elsewhere)."""
    from bench.fronts import dry_run_lines
    from kdops import targets

    return dry_run_lines(fronts_cases(), "cuda", targets.H100, FRONTS_REPS, FRONTS_WARMUP)


FRONTS = Step(
    "fronts", "time–memory fronts: every competitor's memory knob at the headline shape", FRONTS_S,
    ("bench.fronts.run_fronts([headline_case(D)]) for D in " + ", ".join(DIVERGENCES)
     + f"; {FRONTS_REPS} reps after {FRONTS_WARMUP} warm-ups, all points in turn",
     "points: kdops chunked at its smallest plan, 2, 4, 8 GiB, epilogue (experimental; Hopper or Blackwell with "
     "quack-kernels) at its smallest plan and 4 GiB, sliced, fused; Liger chunked at chunk_size 512–4096; "
     "Liger fused-linear per inner JSD implementation; TRL at TOKEN_CHUNK_SIZE 1024–8192; orda-kernel at 512–4096 "
     "rows and its dynamic plan",
     "records to <output>/fronts-<device>.jsonl, tables to fronts-<device>.md, charts fronts-<device>-<case>.png"),
    run_fronts_step, details=fronts_details)
