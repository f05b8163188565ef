"""Records and the stdout table: ratios to the floor and to kdops, run metadata, JSON lines, progress.

For each phase (forward, backward, total) of a competitor c on one case:
    ratio_floor_<phase> = median_ms(c) / median_ms(floor)
    ratio_kdops_<phase> = median_ms(c) / median_ms(kdops)
    loss_rel_diff       = |loss(c) − loss(reference)| / |loss(reference)|
None where a side did not run. The floor's own work (bytes or flops, `bench.floor`) is in every record, and
`floor_variant`: which of its matmul variants the floor timed ("full", "chunked", or "<forward>/<backward>"
where they differ: the floor Result's `detail`), None for the floors on logits or where it did not run.
On a GPU, the records of the competitors that `bench.model` models also carry its prediction for the live
GPU (`predicted_*`: forward, backward and total ms, ratio to the floor, extra bytes; None elsewhere), so
every measurement calibrates the cost model; the floor's own record carries the model's floor
(`predicted_path` "floor", ratio 1).
Every record names the code that ran: `commit`, `dirty`, and `source_hash` (a hash of the content of kernels/,
kdops/ and bench/ on disk when the run started, `source_hash`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

import kdops

from .cases import CASE_FIELDS, FUSED, FUSED_TOPK, KD_LOSS, TOPK, Case
from .competitors import FLOOR, KDOPS, REFERENCE
from .floor import floor_work
from .measure import PHASES, Result

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("kernels", "kdops", "bench")
MiB = 2**20

META_FIELDS = ("run_id", "timestamp", "commit", "dirty", "source_hash", "device", "device_type", "torch", "triton",
               "kdops", "liger_kernel", "python", "preset", "reps", "warmup")
FIGURE_FIELDS = (
    tuple(f"{p}_ms" for p in PHASES) + tuple(f"{p}_iqr_ms" for p in PHASES)
    + ("peak_bytes", "input_bytes", "grad_bytes", "extra_bytes", "loss", "loss_rel_diff", "floor_unit")
    + tuple(f"floor_{p}" for p in PHASES) + ("floor_variant",)
    + tuple(f"ratio_{base}_{p}" for base in (FLOOR, KDOPS) for p in PHASES)
)
# `bench.model.RECORD_FIELDS` (kept here as names so that importing the report does not import the model).
PREDICTED_FIELDS = ("predicted_path", "predicted_forward_ms", "predicted_backward_ms", "predicted_total_ms",
                    "predicted_total_l2_ms", "predicted_ratio_floor", "predicted_extra_bytes")
RECORD_FIELDS = (META_FIELDS + CASE_FIELDS + ("label", "competitor", "status", "message") + FIGURE_FIELDS
                 + PREDICTED_FIELDS)


# --- arithmetic ----------------------------------------------------------------------------------------------

def ratio(result: Result, baseline: Result | None, phase: str) -> float | None:
    """median_ms(result) / median_ms(baseline) for `phase`; None unless both ran and the baseline took time."""
    if baseline is None or result.status != "ok" or baseline.status != "ok":
        return None
    denominator = baseline.median_ms.get(phase)
    numerator = result.median_ms.get(phase)
    return None if not denominator or numerator is None else numerator / denominator


def relative_difference(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None:
        return None
    return abs(value - reference) / max(abs(reference), 1e-30)


def case_records(case: Case, results: list[Result], meta: dict) -> list[dict]:
    """One flat record per competitor, with every figure and its ratios to the floor and to kdops."""
    by_name = {r.competitor: r for r in results}
    reference = by_name.get(REFERENCE)
    predicted = _predictions(case, [r.competitor for r in results], meta)
    floor = _floor_fields(case, by_name.get(FLOOR))
    records = []
    for r in results:
        record = {**meta, **case.fields(), "label": case.label, "competitor": r.competitor, "status": r.status,
                  "message": r.message, "peak_bytes": r.peak_bytes, "input_bytes": r.input_bytes,
                  "grad_bytes": r.grad_bytes, "extra_bytes": r.extra_bytes, "loss": r.loss,
                  "loss_rel_diff": relative_difference(r.loss, reference.loss if reference else None), **floor}
        for p in PHASES:
            record[f"{p}_ms"] = r.median_ms.get(p)
            record[f"{p}_iqr_ms"] = r.iqr_ms.get(p)
            for base in (FLOOR, KDOPS):
                record[f"ratio_{base}_{p}"] = ratio(r, by_name.get(base), p)
        record.update(predicted[r.competitor])
        records.append(record)
    return records


def _floor_fields(case: Case, floor: Result | None) -> dict:
    """The floor's work per phase and, where it ran, the variant it timed."""
    work = floor_work(case)
    ran = floor is not None and floor.status == "ok"
    return {"floor_unit": work.unit, "floor_forward": work.forward, "floor_backward": work.backward,
            "floor_total": work.total, "floor_variant": (floor.detail or None) if ran else None}


#: A path of each function, for `bench.model.floor_seconds` (which reads only the function of the path).
_FLOOR_PATHS = {KD_LOSS: "kd_loss-triton", FUSED: "chunked", TOPK: "kd_loss-topk", FUSED_TOPK: "topk-chunked"}


def model_floor(case: Case, gpu) -> dict:
    """The cost model's floor on `gpu` as the floor record's `predicted_*` fields: `bench.model`'s floor time,
    split between the phases as `floor_work` splits the work (one rate for both); ratio 1, no extra bytes."""
    from .model import Shape
    from .model.dispatch import floor_seconds

    shape = Shape(case.tokens, case.hidden_student or 1, case.hidden_teacher or 1, case.vocab)
    total_ms = floor_seconds(_FLOOR_PATHS[case.function], shape, gpu, case.torch_dtype) * 1e3
    work = floor_work(case)
    return {"predicted_path": FLOOR, "predicted_forward_ms": total_ms * work.forward / work.total,
            "predicted_backward_ms": total_ms * work.backward / work.total, "predicted_total_ms": total_ms,
            "predicted_total_l2_ms": total_ms, "predicted_ratio_floor": 1.0, "predicted_extra_bytes": None}


def _predictions(case: Case, competitors: list[str], meta: dict) -> dict[str, dict]:
    """`bench.model.record_fields` of each competitor for the live GPU, `model_floor` for the floor (all None off
    CUDA, or if the model fails: a prediction never costs a measurement)."""
    empty = dict.fromkeys(PREDICTED_FIELDS)
    if meta.get("device_type") != "cuda":
        return {name: dict(empty) for name in competitors}
    from kdops.targets import of_device

    from . import model

    gpu = of_device(torch.device("cuda"))
    out = {}
    for name in competitors:
        try:
            fields = model_floor(case, gpu) if name == FLOOR else model.record_fields(case, name, gpu)
            out[name] = {**empty, **fields}
        except Exception as error:  # noqa: BLE001
            print(f"bench.model: no prediction for {case.label} {name}: {type(error).__name__}: {error}",
                  file=sys.stderr)
            out[name] = dict(empty)
    return out


# --- metadata --------------------------------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def device_name(device) -> str:
    """torch.cuda.get_device_name on CUDA; the CPU model (from /proc/cpuinfo where there is one) otherwise."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine() or 'cpu'} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def source_files(root: Path = REPOSITORY) -> list[Path]:
    """Every file under `root`'s kernels/, kdops/ and bench/ but __pycache__ and bench/results/, sorted by path."""
    skip = {Path(root) / "bench" / "results"}
    files = []
    for top in SOURCE_DIRS:
        for folder, subfolders, names in os.walk(Path(root) / top):
            subfolders[:] = [d for d in subfolders if d != "__pycache__" and Path(folder, d) not in skip]
            files += [Path(folder, name) for name in names]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def source_hash(root: Path = REPOSITORY) -> str:
    """The first 16 hex digits of a sha256 over each of `source_files(root)`: its path relative to `root`, its
    length and its bytes, in path order. It names the code on disk — tracked or not, committed or not — where a
    commit names it only for a clean tree."""
    digest = hashlib.sha256()
    for path in source_files(root):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed between the listing and the read (an editor's temporary file)
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def run_metadata(device, preset: str, reps: int, warmup: int) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%S.%fZ"), "timestamp": now.isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or "unknown", "dirty": bool(_git("status", "--porcelain")),
        "source_hash": source_hash(), "device": device_name(device), "device_type": torch.device(device).type,
        "torch": torch.__version__, "triton": package_version("triton"), "kdops": kdops.__version__,
        "liger_kernel": package_version("liger-kernel"), "python": platform.python_version(),
        "preset": preset, "reps": reps, "warmup": warmup,
    }


def record_dir(device: str, results_dir: Path = RESULTS_DIR) -> Path:
    """The folder of one device's records of this kdops version: <results>/<device slug>/<kdops version>/
    (`python -m bench` writes there; `device` is the device's name, e.g. 'NVIDIA H100 80GB HBM3')."""
    return Path(results_dir) / slug(device) / kdops.__version__


def results_path(results_dir: Path, device: str) -> Path:
    """The JSON-lines file of `device`'s records in the folder `results_dir`: <results_dir>/<device slug>.jsonl."""
    return Path(results_dir) / f"{slug(device)}.jsonl"


def append_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


# --- the table -------------------------------------------------------------------------------------------------

COLUMNS = (("case", 0), ("competitor", 22), ("fwd ms", 9), ("bwd ms", 9), ("total ms", 9), ("±IQR", 7),
           ("extra MiB", 9), ("×floor", 7), ("×kdops", 7), ("Δloss", 7))


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def header(label_width: int) -> str:
    """Column titles; the case column is `label_width` wide (the longest label of the sweep)."""
    left = f"{'case':<{label_width}}  {'competitor':<{COLUMNS[1][1]}}"
    return left + "".join(f"  {name:>{width}}" for name, width in COLUMNS[2:])


def cells(record: dict) -> list[str]:
    """The figures of an "ok" record as table cells, in the order of COLUMNS[2:]."""
    extra = None if record["extra_bytes"] is None else record["extra_bytes"] / MiB
    return [_number(record["forward_ms"], ".2f"), _number(record["backward_ms"], ".2f"),
            _number(record["total_ms"], ".2f"), _number(record["total_iqr_ms"], ".2f"), _number(extra, ".1f"),
            _number(record["ratio_floor_total"], ".2f"), _number(record["ratio_kdops_total"], ".2f"),
            _number(record["loss_rel_diff"], ".0e")]


def status_text(record: dict) -> str:
    return record["status"].upper() + (f": {record['message']}" if record["message"] else "")


def format_row(record: dict, label_width: int) -> str:
    left = f"{record['label']:<{label_width}}  {record['competitor']:<{COLUMNS[1][1]}}"
    if record["status"] != "ok":
        return f"{left}  {status_text(record)}"
    row = left + "".join(f"  {cell:>{width}}" for cell, (_, width) in zip(cells(record), COLUMNS[2:]))
    return row + (f"  ({record['message']})" if record["message"] else "")


def format_case(records: list[dict], label_width: int) -> str:
    """The rows of one case; skipped competitors on one line, grouped by reason."""
    lines = [format_row(r, label_width) for r in records if r["status"] != "skipped"]
    reasons: dict[str, list[str]] = {}
    for r in records:
        if r["status"] == "skipped":
            reasons.setdefault(r["message"], []).append(r["competitor"])
    if reasons:
        lines.append("    skipped: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items()))
    return "\n".join(lines)


def describe_inputs(case: Case, records: list[dict]) -> str:
    ran = next((r for r in records if r["input_bytes"] is not None and r["grad_bytes"] is not None), None)
    if ran is None:
        return ""
    return (f"    inputs {ran['input_bytes'] / MiB:.1f} MiB, student gradients {ran['grad_bytes'] / MiB:.1f} MiB "
            f"(extra = peak − gradients); floor {ran['floor_total']:.3g} {ran['floor_unit']}s")


def describe_trade(records: list[dict]) -> str:
    """A plain line where a kdops competitor takes more time than the reference: what it trades for it (its
    extra memory against the reference's), so that no table row reads as a win or a loss it is not."""
    ok = {r["competitor"]: r for r in records if r["status"] == "ok" and r["total_ms"] is not None}
    reference = ok.get("reference")
    if reference is None:
        return ""
    lines = []
    for name, r in ok.items():
        if not name.startswith("kdops") or r["total_ms"] <= reference["total_ms"]:
            continue
        memory = ""
        if r["extra_bytes"] is not None and reference["extra_bytes"]:
            memory = f" at {r['extra_bytes'] / reference['extra_bytes']:.2f} × its extra memory"
        lines.append(f"    {name} takes {r['total_ms'] / reference['total_ms']:.2f} × the reference's time{memory}: "
                     "it trades time for memory here (row chunks recomputed under autograd, or kernels that "
                     "run interpreted off CUDA), where the reference keeps the whole float32 softmaxes")
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, stream=None):
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, text: str) -> None:
        if self.enabled:
            filled = 20 * self.done // self.total
            self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} {text}")
            self.stream.flush()
        self.done += 1

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
