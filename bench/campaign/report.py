"""The campaign's markdown: the report (campaign-<device>.md: a table of the steps, then each step's section or
why it was skipped) and the output folder's README.md (a line per campaign: its command, date, commit, source hash,
device)."""

from __future__ import annotations

from pathlib import Path

from .markdown import table_lines
from .runner import Budget, StepResult

VERSIONS = (("torch", "torch"), ("triton", "triton"), ("liger-kernel", "liger_kernel"), ("trl", "trl"))


def versions_text(meta: dict) -> str:
    """'torch 2.11.0, triton 3.6.0, liger-kernel not installed, trl 1.16.0'."""
    return ", ".join(f"{name} {meta.get(key) or 'not installed'}" for name, key in VERSIONS)


def report_name(meta: dict, suffix: str) -> str:
    """campaign-<device>.md or .jsonl."""
    return f"campaign-{meta['device_slug']}{suffix}"


def render_report(meta: dict, steps, results: list[StepResult], budget: Budget) -> str:
    """The report: the campaign's metadata, a row per step, then each step's lines."""
    lines = [f"# kdops GPU campaign: {meta['device']}", "",
             f"`{meta['command']}` · commit `{str(meta['commit'])[:10]}`{' (dirty)' if meta.get('dirty') else ''} · "
             f"source `{meta.get('source_hash')}` · {versions_text(meta)} · started {meta['timestamp']}.", "",
             f"Budget {budget.seconds:.0f} s, used {budget.elapsed():.0f} s. Every measurement is in "
             f"`{report_name(meta, '.jsonl')}`.", ""]
    lines += table_lines(["#", "step", "status", "seconds", "estimate", "note"],
                         [[i, step.name, r.status, "-" if r.seconds is None else f"{r.seconds:.0f}",
                           f"{step.estimate_s:.0f}", r.message or ""]
                          for i, (step, r) in enumerate(zip(steps, results), 1)])
    for i, (step, r) in enumerate(zip(steps, results), 1):
        lines += ["", f"## {i}. {step.name}: {step.title}", ""]
        if r.status == "skipped":
            lines.append(f"Skipped: {r.message}.")
            continue
        if r.status != "ok":
            lines += [f"**{r.status}**" + (f": {r.message}" if r.message else ""), ""]
        lines += list(r.lines)
    return "\n".join(lines) + "\n"


def readme_entry(meta: dict) -> str:
    """A campaign's line of README.md: the exact command line, the date, the commit and the source hash (the code
    that ran, dirty or not: `bench.report.source_hash`), the versions, its files."""
    dirty = " (dirty)" if meta.get("dirty") else ""
    return (f"* `{meta['command']}`, started {meta['timestamp']} on {meta['device']}, kdops {meta.get('kdops')} at "
            f"commit {meta['commit']}{dirty}, source hash {meta.get('source_hash')}; {versions_text(meta)}. "
            f"Report: `{report_name(meta, '.md')}`; every measurement: `{report_name(meta, '.jsonl')}`.\n")


def add_to_readme(output: Path, meta: dict) -> Path:
    """Append the campaign's line to `output`/README.md, started with a title where there is none (a folder
    holds every campaign of one device and kdops version: the lines of earlier ones stay)."""
    path = Path(output) / "README.md"
    head = "" if path.exists() else (f"# {meta['device']} · kdops {meta.get('kdops')}\n\n"
                                     "Written by `python -m bench.campaign`, a line per campaign, first to last:\n\n")
    with open(path, "a") as f:
        f.write(head + readme_entry(meta))
    return path
