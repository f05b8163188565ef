"""`python -m bench plot`: PNG charts and a markdown summary from the JSON lines of `python -m bench`.

The records are read from every *.jsonl file under bench/results/ (recursively: a run's records live in
bench/results/<device slug>/<kdops version>/), or under the given files and folders. Lines that are not bench
records (a campaign's other measurements, the fused check's) are left out. Only the newest record of each
(device, case, competitor) counts, so partial runs and the records of several versions merge. One chart per
device × function × divergence × dtype × vocabulary/width, three panels against tokens N: total time
(forward + backward), extra memory (peak − gradients), and time / floor time. SUMMARY.md holds, per
device, the table of those records and links to the charts.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import MISSING
from pathlib import Path

from .cases import CASE_FIELDS_BUT_TOKENS, Case
from .report import COLUMNS, MiB, RESULTS_DIR, cells, slug, status_text


CASE_DEFAULTS = {name: f.default for name, f in Case.__dataclass_fields__.items() if f.default is not MISSING}


#: The fields that make a JSON line a bench record (`bench.report.case_records`).
KEY_FIELDS = ("run_id", "device", "label", "competitor", "status")
#: The key `load_latest` adds to each record: the file it was read from.
SOURCE = "_file"


def record_files(inputs=None) -> list[Path]:
    """The JSON-lines files of `inputs` (files, and folders searched recursively; default: bench/results)."""
    files = []
    for path in map(Path, inputs or [RESULTS_DIR]):
        files += sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    return files


def load_latest(paths) -> list[dict]:
    """Bench records from JSON-lines files, the newest (by run_id) of each device × case × competitor; lines
    without a bench record's key fields are skipped."""
    latest: dict[tuple, dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if not all(field in record for field in KEY_FIELDS):
                    continue
                # a record written before a case field existed has that field's default (e.g. k = 0: dense)
                record = {**CASE_DEFAULTS, **record, SOURCE: str(path)}
                key = (record["device"], record["label"], record["competitor"])
                if key not in latest or record["run_id"] >= latest[key]["run_id"]:
                    latest[key] = record
    return list(latest.values())


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records by (device, every case field but tokens): one chart each."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["device"], *(r[f] for f in CASE_FIELDS_BUT_TOKENS))].append(r)
    return groups


def _group_fields(group_key: tuple) -> dict:
    return dict(zip(("device", *CASE_FIELDS_BUT_TOKENS), group_key))


def _width(g: dict, spec: str) -> str:
    return spec.format(**g) if g["hidden_student"] else ""


def _chart_name(group_key: tuple) -> str:
    g = _group_fields(group_key)
    return slug(f"{g['device']} {g['function']} {g['divergence']} v{g['vocab']}"
                f"{_width(g, ' h{hidden_student}-{hidden_teacher}')} {g['dtype']}") + ".png"


def _title(group_key: tuple) -> str:
    g = _group_fields(group_key)
    return (f"{g['function']} · {g['divergence']} · V={g['vocab']}{_width(g, ' Hs={hidden_student} Ht={hidden_teacher}')}"
            f" · {g['dtype']} · {g['device']}")


PANELS = (("total time (ms)", lambda r: r["total_ms"]),
          ("extra memory (MiB)", lambda r: None if r["extra_bytes"] is None else r["extra_bytes"] / MiB),
          ("time / floor", lambda r: r["ratio_floor_total"]))


def draw_chart(key: tuple, records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    competitors = sorted({r["competitor"] for r in records if r["status"] == "ok"})
    for ax, (title, value) in zip(axes, PANELS):
        for i, name in enumerate(competitors):  # one colour per competitor in every panel
            points = sorted((r["tokens"], value(r)) for r in records
                            if r["competitor"] == name and r["status"] == "ok" and value(r) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{i % 10}", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle(_title(key), fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _markdown_table(records: list[dict]) -> list[str]:
    names = ["case", "competitor", *(name for name, _ in COLUMNS[2:])]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    order = sorted(records, key=lambda r: (r["function"], r["divergence"], r["vocab"], r["tokens"]))
    for r in order:
        if r["status"] == "skipped":
            continue
        row = cells(r) if r["status"] == "ok" else [status_text(r)] + [""] * (len(names) - 3)
        lines.append("| " + " | ".join([r["label"], r["competitor"], *row]) + " |")
    return lines


def _source(record: dict) -> str:
    """'; records in <file>' (relative to bench/results where it lies there), or '' for a record without it."""
    if SOURCE not in record:
        return ""
    path = Path(record[SOURCE]).resolve()
    if path.is_relative_to(Path(RESULTS_DIR).resolve()):
        path = path.relative_to(Path(RESULTS_DIR).resolve())
    return f"; records in `{path}`"


def write_summary(records: list[dict], charts: dict[str, list[str]], path: Path) -> None:
    lines = ["# kdops benchmark summary", "",
             "Written by `python -m bench plot` from every record under bench/results/ (newest record of each "
             "device, case and competitor). Times are medians in ms; extra MiB = peak memory − gradients; ×floor "
             "and ×kdops are total-time ratios; Δloss is the relative difference to the reference loss.", ""]
    by_device = defaultdict(list)
    for r in records:
        by_device[r["device"]].append(r)
    for device, device_records in sorted(by_device.items()):
        newest = max(device_records, key=lambda r: r["run_id"])
        lines += [f"## {device}", "",
                  f"Latest run {newest['timestamp']}, kdops {newest.get('kdops') or 'unknown'}, commit "
                  f"`{newest['commit'][:10]}`{' (dirty)' if newest.get('dirty') else ''}, torch {newest['torch']}, "
                  f"triton {newest['triton']}, liger-kernel {newest['liger_kernel'] or 'not installed'}"
                  f"{_source(newest)}.", ""]
        lines += _markdown_table(device_records) + [""]
        lines += [f"![{name}]({name})" for name in charts.get(device, [])] + [""]
    path.write_text("\n".join(lines))


def plot(inputs=None, output: Path | None = None) -> list[Path]:
    """Charts and SUMMARY.md into `output` (bench/results) from `inputs` (files or folders; by default every
    *.jsonl under bench/results, recursively)."""
    output = Path(output or RESULTS_DIR)
    records = load_latest(record_files(inputs))
    output.mkdir(parents=True, exist_ok=True)
    written, charts = [], defaultdict(list)
    for key, group in sorted(_groups(records).items(), key=lambda item: str(item[0])):
        if any(r["status"] == "ok" for r in group):
            name = _chart_name(key)
            draw_chart(key, group, output / name)
            charts[key[0]].append(name)
            written.append(output / name)
    write_summary(records, charts, output / "SUMMARY.md")
    return written + [output / "SUMMARY.md"]
