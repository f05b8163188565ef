"""The sweep: every case × every competitor that implements its function, on fresh inputs per case, the
competitors of a case timed in turn, repetition by repetition (`bench.measure.measure_in_turn`).

A competitor that does not apply (no CUDA, not installed, not implemented yet) is recorded as "skipped"
with the reason; one that runs out of memory or raises is recorded as "oom" / "error"; the sweep goes on.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from .cases import Case
from .competitors import COMPETITORS, Competitor
from .measure import Result, failure, free_memory, make_inputs, measure_in_turn
from .report import (Progress, append_jsonl, case_records, describe_inputs, describe_trade, format_case, header,
                     results_path, run_metadata)


def _run_case(case: Case, competitors, device, reps: int, warmup: int, progress: Progress) -> list[Result]:
    try:
        inputs, input_error = make_inputs(case, device), None
    except Exception as error:  # noqa: BLE001 - e.g. the inputs alone do not fit: every competitor fails alike
        inputs, input_error = None, error
    results, measured = {}, []
    for competitor in competitors:
        applies, reason = competitor.applies(case, device)
        progress.step(f"{case.label} · {competitor.name}")
        if not applies:
            results[competitor.name] = Result(competitor.name, "skipped", reason)
        elif input_error is not None:
            results[competitor.name] = failure(competitor.name, input_error)
        else:
            measured.append((competitor.name, functools.partial(competitor.build, case, inputs)))
    if measured:
        for result in measure_in_turn(measured, inputs, device, reps, warmup):
            results[result.competitor] = result
    results = [results[competitor.name] for competitor in competitors]
    del inputs
    free_memory(device)
    return results


def run_sweep(cases: list[Case], *, device, reps: int, warmup: int, preset: str = "custom",
              competitors: tuple[Competitor, ...] = COMPETITORS, results_dir: Path | None = None,
              out=None) -> list[dict]:
    """Measure, print the table to `out` (stdout) case by case, append the records to
    `results_dir`/<device>.jsonl unless `results_dir` is None, and return the records."""
    out = out or sys.stdout
    meta = run_metadata(device, preset, reps, warmup)
    plan = [(case, [c for c in competitors if case.function in c.functions]) for case in cases]
    progress = Progress(sum(len(cs) for _, cs in plan))
    print(f"# {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · kdops {meta['kdops']} · "
          f"commit {meta['commit'][:10]}{' (dirty)' if meta['dirty'] else ''} · {reps} reps after {warmup} warm-up",
          file=out)
    label_width = max((len(case.label) for case in cases), default=4)
    print(header(label_width), file=out)
    records = []
    for case, case_competitors in plan:
        case_result = case_records(case, _run_case(case, case_competitors, device, reps, warmup, progress), meta)
        progress.clear()
        print(format_case(case_result, label_width), file=out)
        for summary in (describe_inputs(case, case_result), describe_trade(case_result)):
            if summary:
                print(summary, file=out)
        out.flush()
        if results_dir is not None:
            append_jsonl(case_result, results_path(results_dir, meta["device"]))
        records.extend(case_result)
    if results_dir is not None:
        print(f"# appended {len(records)} records to {results_path(results_dir, meta['device'])}", file=out)
    return records
