"""The memory step: `bench.memory_target`, the peak-memory table of kd_loss at 8192 × 128256, bfloat16, written to
MEMORY-<device>.md; each of its rows recorded, its table in the report."""

from __future__ import annotations

from .runner import EXPANDABLE_SEGMENTS, Context, Step

MEMORY_S = 35.0


def table_cells(line: str) -> list[str]:
    """The cells of a markdown table's line."""
    return [c.strip() for c in line.strip("|").split("|")]


def run_memory(ctx: Context) -> None:
    """bench.memory_target's table: a record per row, the table in the report."""
    from bench import memory_target

    target = ctx.path("MEMORY-{device}.md")
    memory_target.main(["--output", str(target)])
    text = target.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = table_cells(table[0]) if table else []
    for line in table[2:]:
        ctx.record("memory", **dict(zip(header, table_cells(line))))
    ctx.line(f"From `{target.name}`:")
    ctx.line("")
    for line in table:
        ctx.line(line)


MEMORY = Step("memory", "kd_loss peak memory at 8192 × 128256, bf16", MEMORY_S,
              ("bench.memory_target.main(['--output', '<output>/MEMORY-<device>.md'])",),
              run_memory, EXPANDABLE_SEGMENTS)
