"""The headline step: `bench.sweep.run_sweep` at Llama-3 8B's lm_head shape, kdops' impls against the floor, the
eager and compiled reference, Liger-Kernel's and TRL's chunked losses; the shape the profile and the tile trials
share (`headline_case`)."""

from __future__ import annotations

from pathlib import Path

from .runner import Context, Step

# The headline: Llama-3 8B's lm_head on both sides, 8192 tokens, bfloat16.
HEADLINE_TOKENS, HEADLINE_VOCAB, HEADLINE_HIDDEN = 8192, 128256, 4096
DIVERGENCES = ("forward_kl", "generalized_jsd")
HEADLINE_COMPETITORS = ("floor", "kdops-fused", "kdops-chunked", "kdops-sliced", "reference", "reference-compiled",
                        "liger-chunked-jsd", "trl-chunked-jsd")
HEADLINE_REPS, HEADLINE_WARMUP = 5, 2
HEADLINE_CASE_S = 60.0  # one divergence, every competitor (two torch.compile's among them): 40–47 s on an H100
HEADLINE_S = 120.0  # the whole step: 79–94 s on an H100 (bench/results/nvidia-h100-80gb-hbm3)
MiB = 2**20

HEADLINE_HEADER = ["competitor", "status", "fwd ms", "bwd ms", "total ms", "× floor", "× kdops-fused", "extra MiB",
                   "Δloss"]


def headline_case(divergence: str):
    """The headline's `bench.cases.Case` for `divergence`."""
    from bench.cases import FUSED, Case

    return Case(FUSED, divergence, HEADLINE_TOKENS, HEADLINE_VOCAB, HEADLINE_HIDDEN, HEADLINE_HIDDEN, "bfloat16")


def competitor_name(record: dict) -> str:
    """The competitor of a row; the floor's with the variant it timed ("floor (full)": `bench.floor`)."""
    variant = record.get("floor_variant") if record["competitor"] == "floor" else None
    return record["competitor"] + (f" ({variant})" if variant else "")


def headline_rows(records: list[dict]) -> list[list]:
    """Table rows: every competitor's times, ratios to the floor and to kdops-fused, extra memory, Δloss."""
    by_name = {r["competitor"]: r for r in records}
    base = by_name.get("kdops-fused")
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["competitor"], f"{r['status']}: {r['message']}"] + [None] * 7)
            continue
        to_fused = (r["total_ms"] / base["total_ms"]) if base and base["status"] == "ok" and base["total_ms"] else None
        extra = None if r["extra_bytes"] is None else r["extra_bytes"] / MiB
        rows.append([competitor_name(r), "ok", r["forward_ms"], r["backward_ms"], r["total_ms"], r["ratio_floor_total"],
                     to_fused, extra, r["loss_rel_diff"]])
    return rows


def run_headline(ctx: Context) -> None:
    """A table per divergence (the cases that no longer fit skipped), the records in both JSON-lines files, the
    charts of the sweep's file."""
    from bench.competitors import COMPETITORS
    from bench.report import results_path
    from bench.sweep import run_sweep

    competitors = tuple(c for c in COMPETITORS if c.name in HEADLINE_COMPETITORS)
    ctx.line(f"{HEADLINE_REPS} repetitions after {HEADLINE_WARMUP} warm-ups (medians), the competitors taking turns "
             "repetition by repetition (`bench.measure.measure_in_turn`); extra = peak memory beyond "
             "the inputs and the student's gradients; Δloss = relative difference to the reference's loss.")
    sweep_file = None
    for divergence in DIVERGENCES:
        case = headline_case(divergence)
        ctx.heading(case.label)
        if not ctx.skip_unless_fits(HEADLINE_CASE_S, "cases",
                                    f"Skipped: estimated {HEADLINE_CASE_S:.0f} s, {ctx.left():.0f} s left."):
            continue
        records = run_sweep([case], device=ctx.device, reps=HEADLINE_REPS, warmup=HEADLINE_WARMUP, preset="campaign",
                            competitors=competitors, results_dir=ctx.output)
        sweep_file = results_path(ctx.output, records[0]["device"]) if records else sweep_file
        for r in records:
            ctx.record("headline", **r)
        ctx.table(HEADLINE_HEADER, headline_rows(records))
        ctx.flush()
    if sweep_file is not None:
        write_charts(ctx, sweep_file)


def write_charts(ctx: Context, sweep_file: Path) -> None:
    """`bench.plot`'s charts of `sweep_file` into charts-<device>/, or why there are none."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        ctx.line("")
        ctx.line("Charts: skipped (matplotlib is not installed).")
        return
    from bench.plot import plot

    folder = ctx.path("charts-{device}")
    written = plot([sweep_file], folder)
    ctx.line("")
    ctx.line(f"Charts (`bench.plot`, every record of `{sweep_file.name}`): "
             + ", ".join(f"`{folder.name}/{p.name}`" for p in written))


HEADLINE = Step(
    "headline", "the headline table: kdops against the floor, the reference, Liger-Kernel and TRL", HEADLINE_S,
    (f"bench.sweep.run_sweep([Case(FUSED, D, {HEADLINE_TOKENS}, {HEADLINE_VOCAB}, {HEADLINE_HIDDEN}, "
     f"{HEADLINE_HIDDEN}, 'bfloat16')]) for D in {', '.join(DIVERGENCES)}; {HEADLINE_REPS} reps after "
     f"{HEADLINE_WARMUP} warm-ups",
     "competitors: " + ", ".join(HEADLINE_COMPETITORS),
     "records also to <output>/<device>.jsonl; charts with bench.plot into charts-<device>/"),
    run_headline)
