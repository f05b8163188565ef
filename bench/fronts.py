"""Time–memory fronts of `fused_linear_kd_loss`: every competitor swept over its memory knob, all the points of a
case timed in turn in one run, each with its extra memory and its loss error against a float64 oracle.

    python -m bench.fronts [--divergence D ...] [--shape TOKENSxHSxHTxVOCAB] [--dtype bf16|fp16|fp32]
                           [--reps N] [--warmup N] [--tolerance T] [--only PATTERN ...] [--output DIR] [--no-save]
                           [--dry-run [--gpu h100|h200|a100]]

The points (`points`), each competitor's in knob order (bench/competitors.py says how each knob is set, and why
none of them leaks into another point's calls):
* kdops-chunked at memory_budget = its smallest plan (`smallest_plan_bytes`), 2, 4 (the default) and 8 GiB,
  sorted: a budget below the smallest plan is exceeded by it, and its record says by how much (the extra memory
  measured); kdops-epilogue (impl="epilogue", experimental: a Hopper or Blackwell GPU, quack-kernels, 16-bit
  inputs) at the smallest plan and the default budget; kdops-sliced and kdops-fused, a point each (Triton kernels:
  CUDA only).
* liger-chunked-jsd: LigerFusedLinearJSDLoss(chunk_size = 512, 1024 (its default), 2048, 4096).
* liger-fused-linear-jsd: LigerFusedLinearJSD with each implementation of its inner JSD kernel (jsd_impl), CUDA
  only; an implementation that cannot run there is a skipped point that says why.
* trl-chunked-jsd: TRL's chunked divergence loss at TOKEN_CHUNK_SIZE = 1024, 2048, 4096 (its default), 8192.
* orda-kd: orda-kernel's chunked Triton loss at chunks of 512, 1024, 2048, 4096 rows and its dynamic plan, CUDA
  only (its CPU path materializes the [N, V] logits whatever the chunk size).

Per case (by default the headline on CUDA, 8192 tokens × Hs 4096 × Ht 4096 × V 128256 in bf16, and CPU_SHAPE in
float32 elsewhere) every point that applies is timed in turn with the others (`bench.measure.measure_in_turn`:
each one's first repetition, then each one's second, ...). Extra memory = peak − gradients (bench/measure.py).
Loss error = |loss − oracle| / |oracle|, the oracle being `float64_oracle`: kdops.reference on float64 copies of
the same inputs, every row, in chunks of ORACLE_ROWS rows — exact, and within an H100's memory at the headline
(the float64 weights, 8.4 GB, and one chunk's float64 [256, V] buffers).

Output, into --output (default `bench.report.record_dir(<device>)`): fronts-<device>.jsonl (a record per point,
`FRONT_FIELDS` and the run's metadata), fronts-<device>.md (a table per case and its summary, appended case by
case) and fronts-<device>-<case>.png (total time against extra memory on a log scale, each competitor's points
joined in knob order, kdops' drawn bold). The summary (`compare`, `summary_lines`): for each kdops point, the
fastest peer point at equal or lower extra memory and equal accuracy (a loss error at most max(tolerance, kdops'
own)), and kdops' speed against it — or, plainly, that the peer wins. `--dry-run` lists every point with an
estimate of its time (`estimate`) instead of running them.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

import kdops
import kdops.reference
from kdops.paths import chunked

from .campaign.markdown import table_lines
from .cases import FUSED, Case
from .competitors import (COMPETITORS, FLOOR, Competitor, kdops_check, kdops_epilogue_check, kdops_loss,
                          liger_check, liger_chunked_jsd, liger_fused_linear_jsd, liger_jsd_impl_check, liger_jsd_impls,
                          module_constant, orda_check, orda_kd, trl_check, trl_chunked_jsd)
from .floor import floor_work
from .measure import PHASES, Inputs, Result, free_memory, make_inputs, measure_in_turn
from .report import (MiB, append_jsonl, device_name, package_version, record_dir, relative_difference, run_metadata,
                     slug)

GiB = 2**30
HEADLINE_SHAPE = "8192x4096x4096x128256"  # bench.model.paths.HEADLINE: Llama-3 8B's lm_head on both sides
CPU_SHAPE = "128x128x192x8000"  # both divergences on a CPU in well under a minute (2 idle cores)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DIVERGENCES = ("forward_kl", "generalized_jsd")
REPS = {"cuda": (5, 2), "cpu": (2, 1)}  # (timed repetitions, warm-ups)

BUDGETS = (2 * GiB, 4 * GiB, 8 * GiB)
LIGER_CHUNK_SIZES, LIGER_DEFAULT_CHUNK = (512, 1024, 2048, 4096), 1024  # liger-kernel 0.8.5's default
TRL_TOKEN_CHUNKS, TRL_DEFAULT_CHUNK = (1024, 2048, 4096, 8192), 4096  # trl 1.16.0's TOKEN_CHUNK_SIZE
TRL_VOCAB_CHUNK = 32768  # trl 1.16.0's VOCAB_CHUNK_SIZE, not swept
ORDA_CHUNK_ROWS = (512, 1024, 2048, 4096, None)  # None: its ChunkSize.dynamic(), the default

#: Rows per chunk of the float64 oracle.
ORACLE_ROWS = 256
#: Relative loss error up to which two points count as equally accurate (`compare`): far above float32
#: arithmetic (~1e-6), below what a wrong formula gives (the old Liger mixture: percents).
LOSS_TOLERANCE = 1e-3
SUMMARY_TITLE = "kdops' speed against the best peer at equal or lower memory and equal accuracy"

#: Rough estimates (`estimate`) where the cost model has no path: this many times the floor's time per forward +
#: backward; the floor's flops at CPU_FLOPS on a CPU (about what an idle 2-core CPU reached per pass on CPU_SHAPE,
#: the elementwise work included; a loaded one is several times slower); once per point, compiling or autotuning
#: (guesses).
ROUGH_FLOOR_FACTOR = 2.5
CPU_FLOPS = 5e10
SETUP_S = {"liger-chunked-jsd": 20.0, "orda-kd": 10.0, "kdops-epilogue": 30.0}

FRONT_FIELDS = (("kind", "case", "competitor", "point", "knob", "value", "value_text", "knob_order", "detail",
                 "status", "message") + tuple(f"{p}_ms" for p in PHASES) + tuple(f"{p}_iqr_ms" for p in PHASES)
                + ("peak_bytes", "grad_bytes", "input_bytes", "extra_bytes", "loss", "oracle_loss", "loss_error",
                   "oracle", "predicted_total_ms", "predicted_extra_bytes", "trl", "orda_kernel"))
BY_NAME = {c.name: c for c in COMPETITORS}


# --- the points ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One value of one competitor's memory knob (knob None: its only point). `text` shows the value; `model`:
    (bench.model path, memory_budget, (module, attribute, value) set around the prediction) where the cost model
    predicts the point."""

    competitor: Competitor
    knob: str | None = None
    value: object = None
    text: str = ""
    detail: str = ""
    model: tuple | None = None

    @property
    def name(self) -> str:
        return self.competitor.name if self.knob is None else f"{self.competitor.name} {self.knob}={self.text}"


def _default(value, default) -> str:
    return " (default)" if value == default else ""


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:,.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:,.1f} MiB"


def _chunked_plan(case: Case, engine: str, budget: int) -> tuple:
    """`kdops.paths.chunked.plan` of `case` under `budget` (the student's dH and dW, a frozen teacher) and its
    extra bytes."""
    dtype = case.torch_dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sides = (chunked.SideNeeds(dtype, case.hidden_student, True, True),
             chunked.SideNeeds(dtype, case.hidden_teacher, False, False))
    plan = chunked.plan(case.tokens, case.vocab, engine, acc, sides, budget)
    return plan, plan.extra_bytes(case.vocab, engine, acc, sides)


def smallest_plan_bytes(case: Case, engine: str) -> int:
    """The extra bytes of kdops' smallest chunked plan for `case` (the plan of a one-byte budget: chunks of
    MIN_CHUNK_ROWS rows) with `engine` ("triton" on CUDA, "torch" elsewhere: what backend="auto" takes)."""
    return _chunked_plan(case, engine, 1)[1]


def _budget_point(case: Case, engine: str, impl: str, budget: int, smallest: int, competitor: Competitor,
                  how: str) -> Point:
    """The point of `competitor` (kdops' `impl`) at memory_budget = `budget`, with its chunked plan."""
    plan, extra = _chunked_plan(case, engine, budget)
    text = _size(budget) + (" (smallest plan)" if budget == smallest else "") + _default(budget, chunked.MEMORY_BUDGET)
    detail = f"{how}: chunks of {plan.chunk} rows, groups of {plan.group}; plan {_size(extra)}"
    return Point(competitor, "memory_budget", budget, text, detail, (impl, budget, None))


def kdops_points(case: Case, cuda: bool) -> list[Point]:
    """kdops-chunked at the smallest plan and BUDGETS (sorted, distinct); kdops-epilogue (experimental) at the
    smallest plan and the default budget, the two budgets of its targets; then kdops-sliced and kdops-fused."""
    engine = "triton" if cuda else "torch"
    smallest = smallest_plan_bytes(case, engine)
    found = [_budget_point(case, engine, "chunked", budget, smallest,
                           Competitor("kdops-chunked", (FUSED,), kdops_loss(impl="chunked", memory_budget=budget),
                                      check=kdops_check), engine)
             for budget in sorted({smallest, *BUDGETS})]
    found += [_budget_point(case, engine, "epilogue", budget, smallest,
                            Competitor("kdops-epilogue", (FUSED,), kdops_loss(impl="epilogue", memory_budget=budget),
                                       True, kdops_epilogue_check), "CuTe DSL GEMMs (quack-kernels)")
              for budget in sorted({smallest, chunked.MEMORY_BUDGET})]
    return found + [Point(BY_NAME[name], detail="Triton kernels", model=(path, None, None))
                    for name, path in (("kdops-sliced", "sliced"), ("kdops-fused", "fused"))]


def _liger_fused_chunk(case: Case) -> int:
    """LigerFusedLinearJSD's rows per chunk before Blackwell: 2^ceil(log2(ceil(N / ceil(V / H))))), at most N."""
    inc = -(-case.vocab // case.hidden_student)
    rows = -(-case.tokens // inc)
    return min(1 << (rows - 1).bit_length(), case.tokens)


def liger_points(case: Case) -> list[Point]:
    """liger-chunked-jsd at LIGER_CHUNK_SIZES; liger-fused-linear-jsd with each inner JSD implementation."""
    found = [Point(Competitor("liger-chunked-jsd", (FUSED,), liger_chunked_jsd(size), check=liger_check),
                   "chunk_size", size, f"{size}{_default(size, LIGER_DEFAULT_CHUNK)}",
                   f"{max(1, case.tokens // size)} chunk(s), logits in the input dtype",
                   ("liger-chunked", None, ("bench.model.peers", "LIGER_CHUNK_SIZE", size)))
             for size in LIGER_CHUNK_SIZES]
    chunk = _liger_fused_chunk(case)
    return found + [Point(Competitor("liger-fused-linear-jsd", (FUSED,), liger_fused_linear_jsd(impl), True,
                                     liger_jsd_impl_check(impl)),
                          "jsd_impl", impl, impl, f"chunks of {chunk} rows before Blackwell, float32 logits")
                    for impl in liger_jsd_impls()]


def trl_points(case: Case) -> list[Point]:
    """trl-chunked-jsd at TRL_TOKEN_CHUNKS."""
    return [Point(Competitor("trl-chunked-jsd", (FUSED,), trl_chunked_jsd(rows), check=trl_check),
                  "TOKEN_CHUNK_SIZE", rows, f"{rows}{_default(rows, TRL_DEFAULT_CHUNK)}",
                  f"float32 tiles of {min(case.tokens, rows)} × {TRL_VOCAB_CHUNK}",
                  ("trl-chunked", None, ("bench.model.peers", "TRL_TOKEN_CHUNK", rows)))
            for rows in TRL_TOKEN_CHUNKS]


def orda_points(case: Case) -> list[Point]:
    """orda-kd at ORDA_CHUNK_ROWS (None: its dynamic plan, the default)."""
    return [Point(Competitor("orda-kd", (FUSED,), orda_kd(rows), True, orda_check), "chunk_size", rows,
                  "dynamic (default)" if rows is None else str(rows), "profile 'balanced' (autotuned)")
            for rows in ORDA_CHUNK_ROWS]


def floor_points(case: Case) -> list[Point]:
    """The floor: the problem's four matmuls at their fastest (`bench.floor`), timed in turn with the points; the
    ratios to it, not a point of any front."""
    return [Point(BY_NAME[FLOOR], detail="the four matmuls, the faster of full-N and chunked per phase")]


def points(case: Case, cuda: bool, only=None) -> list[Point]:
    """The floor, then every point of `case` (kdops' plans for the engine of CUDA or of a CPU), those of
    competitors matching a pattern of `only` (None: all; the floor always)."""
    found = kdops_points(case, cuda) + liger_points(case) + trl_points(case) + orda_points(case)
    chosen = [p for p in found if only is None or any(fnmatch.fnmatch(p.competitor.name, o) for o in only)]
    return floor_points(case) + chosen


# --- measuring -----------------------------------------------------------------------------------------------

def float64_oracle(case: Case, inputs: Inputs, rows: int = ORACLE_ROWS) -> float:
    """The loss in float64: kdops.reference.fused_linear_kd_loss on float64 copies of the inputs, summed over
    chunks of `rows` rows (only one chunk's float64 [rows, V] buffers at a time), over the counted rows."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs.args
    with torch.no_grad():
        weights = student_weight.detach().double(), teacher_weight.detach().double()
        total = 0.0
        for start in range(0, labels.shape[0], rows):
            part = slice(start, start + rows)
            total += float(kdops.reference.fused_linear_kd_loss(
                student_hidden[part].detach().double(), weights[0], teacher_hidden[part].double(), weights[1],
                labels[part], divergence=case.divergence, reduction="sum"))
    return total / max(int((labels != -100).sum()), 1)


def oracle_of(case: Case, inputs: Inputs, device) -> tuple[float | None, str]:
    """(float64_oracle, what it is), or (None, why not) where it fails (e.g. out of memory)."""
    try:
        value = float64_oracle(case, inputs)
        text = f"float64 kdops.reference on float64 copies of the inputs, every row, {ORACLE_ROWS} rows at a time"
    except Exception as error:  # noqa: BLE001 - no oracle costs the errors, not the measurements
        value, text = None, f"no oracle: {type(error).__name__}: {str(error)[:200]}"
    free_memory(device)
    return value, text


def measure_points(case: Case, found: list[Point], device, reps: int, warmup: int):
    """Each point's Result (skipped ones with their reason; the others timed in turn on the same fresh inputs)
    and the oracle's (value, text)."""
    inputs = make_inputs(case, device)
    results, builds = {}, []
    for point in found:
        applies, reason = point.competitor.applies(case, device)
        if applies:
            builds.append((point.name, functools.partial(point.competitor.build, case, inputs)))
        else:
            results[point.name] = Result(point.name, "skipped", reason)
    results.update((r.competitor, r) for r in measure_in_turn(builds, inputs, device, reps, warmup))
    oracle = oracle_of(case, inputs, device)
    del inputs
    free_memory(device)
    return [results[p.name] for p in found], oracle


def predicted(case: Case, point: Point, gpu) -> dict:
    """bench.model's predicted total ms and extra bytes of `point` on `gpu` (None where it has no path for it,
    there is no GPU, or the model fails: a prediction never costs a measurement)."""
    empty = {"predicted_total_ms": None, "predicted_extra_bytes": None}
    if gpu is None or point.model is None:
        return empty
    from .model import Shape, predict

    path, budget, constant = point.model
    shape = Shape(case.tokens, case.hidden_student, case.hidden_teacher, case.vocab)
    try:
        with module_constant(*constant) if constant else contextlib.nullcontext():
            p = predict(path, shape, gpu, case.divergence, case.torch_dtype, budget=budget)
    except Exception:  # noqa: BLE001
        return empty
    return {"predicted_total_ms": p.total_s * 1e3, "predicted_extra_bytes": int(p.extra_bytes)}


def point_record(case: Case, order: int, point: Point, result: Result, oracle: tuple, meta: dict, gpu) -> dict:
    """The flat record of one point (FRONT_FIELDS, after the run's metadata and the case's fields)."""
    value, text = oracle
    record = {**meta, **case.fields(), "kind": "fronts", "case": case.label, "competitor": point.competitor.name,
              "point": point.name, "knob": point.knob, "value": point.value, "value_text": point.text,
              "knob_order": order, "detail": point.detail, "status": result.status, "message": result.message,
              "peak_bytes": result.peak_bytes, "grad_bytes": result.grad_bytes, "input_bytes": result.input_bytes,
              "extra_bytes": result.extra_bytes, "loss": result.loss, "oracle_loss": value,
              "loss_error": relative_difference(result.loss, value), "oracle": text}
    for phase in PHASES:
        record[f"{phase}_ms"], record[f"{phase}_iqr_ms"] = result.median_ms.get(phase), result.iqr_ms.get(phase)
    return {**record, **predicted(case, point, gpu)}


def fronts_metadata(device, reps: int, warmup: int) -> dict:
    """`bench.report.run_metadata` with the other peers' versions (None where not installed)."""
    return {**run_metadata(device, "fronts", reps, warmup), "trl": package_version("trl"),
            "orda_kernel": package_version("orda-kernel")}


def live_gpu(device):
    """kdops.targets' description of the live GPU, or None (a CPU, or a GPU it does not describe)."""
    if torch.device(device).type != "cuda":
        return None
    from kdops.targets import of_device

    return of_device(torch.device(device))


def measure_case(case: Case, device, reps: int, warmup: int, meta: dict, only=None) -> list[dict]:
    """The records of every point of `case`, in knob order per competitor."""
    found = points(case, torch.device(device).type == "cuda", only)
    results, oracle = measure_points(case, found, device, reps, warmup)
    gpu = live_gpu(device)
    return [point_record(case, i, p, r, oracle, meta, gpu) for i, (p, r) in enumerate(zip(found, results))]


# --- the summary ---------------------------------------------------------------------------------------------

def is_kdops(record: dict) -> bool:
    return record["competitor"].startswith("kdops")


def is_peer(record: dict) -> bool:
    return not is_kdops(record) and record["competitor"] != FLOOR


def floor_ms(records: list[dict]) -> dict:
    """(device, case) → the floor's total ms, where it ran."""
    return {(r["device"], r["case"]): r["total_ms"] for r in records
            if r["competitor"] == FLOOR and r["status"] == "ok" and r["total_ms"]}


def _ran(record: dict) -> bool:
    return record["status"] == "ok" and record["total_ms"] is not None and record["extra_bytes"] is not None


def compare(records: list[dict], tolerance: float = LOSS_TOLERANCE) -> list[dict]:
    """For each kdops point that ran, per (device, case): the fastest peer point that ran at an extra memory ≤
    kdops' with a loss error ≤ max(`tolerance`, kdops' own) ("peer"; a point without a loss error is left out,
    None where none is left), `speedup` = peer time / kdops' time (> 1: kdops is faster; None without a peer),
    `left_out`: how many peer points within that memory the loss error left out, and `floor_ms`: the case's floor
    (None where it did not run). Pure: records in, dicts out."""
    groups, floors = defaultdict(list), floor_ms(records)
    for r in records:
        if _ran(r):
            groups[(r["device"], r["case"])].append(r)
    found = []
    for (device, case), ran in groups.items():
        for mine in filter(is_kdops, ran):
            bound = max(tolerance, mine["loss_error"] or 0.0)
            within = [r for r in ran if is_peer(r) and r["extra_bytes"] <= mine["extra_bytes"]]
            accurate = [r for r in within if r["loss_error"] is not None and r["loss_error"] <= bound]
            peer = min(accurate, key=lambda r: r["total_ms"], default=None)
            found.append({"device": device, "case": case, "kdops": mine, "peer": peer,
                          "speedup": None if peer is None else peer["total_ms"] / mine["total_ms"],
                          "left_out": len(within) - len(accurate), "floor_ms": floors.get((device, case))})
    return found


def _where(record: dict) -> str:
    return f"{record['total_ms']:,.2f} ms at {_size(record['extra_bytes'])}"


def summary_line(comparison: dict) -> str:
    """One kdops point against its best peer, in words."""
    mine, peer, speedup = comparison["kdops"], comparison["peer"], comparison["speedup"]
    floor = comparison.get("floor_ms")
    head = f"- {mine['point']} ({_where(mine)}" + (f", {mine['total_ms'] / floor:.2f} × the floor)" if floor else ")")
    left_out = comparison["left_out"]
    note = f" ({left_out} peer point(s) within its memory left out for their loss error)" if left_out else ""
    if peer is None:
        return f"{head}: no peer point runs within its memory at equal accuracy{note}"
    if speedup >= 1:
        return f"{head}: kdops {speedup:.2f} × as fast as {peer['point']} ({_where(peer)}){note}"
    return f"{head}: a peer wins: {peer['point']} ({_where(peer)}) is {1 / speedup:.2f} × as fast{note}"


def summary_lines(records: list[dict], tolerance: float = LOSS_TOLERANCE) -> list[str]:
    """SUMMARY_TITLE and a `summary_line` per kdops point that ran."""
    comparisons = compare(records, tolerance)
    title = f"{SUMMARY_TITLE} (loss error at most max({tolerance:g}, kdops' own)):"
    return [title] + ([summary_line(c) for c in comparisons] or ["- no kdops point ran"])


# --- tables, charts, files -------------------------------------------------------------------------------------

TABLE_HEADER = ["point", "status", "fwd ms", "bwd ms", "total ms", "±IQR", "× floor", "extra MiB", "loss error",
                "detail"]


def table_row(r: dict, floor: float | None = None) -> list:
    """A record's row of TABLE_HEADER (`floor`: the case's floor total ms, for the ratio)."""
    if r["status"] != "ok":
        return [r["point"], f"{r['status']}: {r['message']}"] + [None] * 7 + [r["detail"]]
    extra = None if r["extra_bytes"] is None else r["extra_bytes"] / MiB
    ratio = r["total_ms"] / floor if floor and r["total_ms"] is not None else None
    return [r["point"], "ok", r["forward_ms"], r["backward_ms"], r["total_ms"], r["total_iqr_ms"], ratio, extra,
            r["loss_error"], r["detail"]]


def case_lines(records: list[dict], tolerance: float = LOSS_TOLERANCE) -> list[str]:
    """One case's section: its title, the oracle, the table of its points, the summary."""
    first = records[0]
    return ([f"### {first['case']} · {first['device']}", "", f"Oracle: {first['oracle']} "
             f"({'-' if first['oracle_loss'] is None else format(first['oracle_loss'], '.6g')}).", ""]
            + table_lines(TABLE_HEADER, [table_row(r, floor_ms(records).get((first["device"], first["case"])))
                                         for r in records]) + [""]
            + summary_lines(records, tolerance) + [""])


def draw_front(records: list[dict], path: Path) -> None:
    """Total time against extra memory (log scale) of one case's points that ran, each competitor's joined in knob
    order and labelled with its knob's value, kdops' drawn bold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
    ran = [r for r in records if _ran(r)]
    for i, name in enumerate(dict.fromkeys(r["competitor"] for r in ran)):
        line = sorted((r for r in ran if r["competitor"] == name), key=lambda r: r["knob_order"])
        xs, ys = [max(r["extra_bytes"], 1) / MiB for r in line], [r["total_ms"] for r in line]
        bold = name.startswith("kdops")
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name, linewidth=2.5 if bold else 1.0,
                markersize=7 if bold else 4, alpha=1.0 if bold else 0.7, zorder=3 if bold else 2)
        for r, x, y in zip(line, xs, ys):
            if r["knob"]:
                ax.annotate(r["value_text"], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    floor = floor_ms(records).get((records[0]["device"], records[0]["case"]))
    if floor:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="floor (the four matmuls)")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("extra memory (MiB: peak − gradients)")
    ax.set_ylabel("total time (ms: forward + backward)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{records[0]['case']} · {records[0]['device']}", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_case(records: list[dict], output: Path, tolerance: float = LOSS_TOLERANCE) -> list[Path]:
    """Append the records to fronts-<device>.jsonl and the case's section to fronts-<device>.md; draw
    fronts-<device>-<case>.png (unless matplotlib is missing). Returns the files written."""
    device = slug(records[0]["device"])
    output.mkdir(parents=True, exist_ok=True)
    jsonl, markdown = output / f"fronts-{device}.jsonl", output / f"fronts-{device}.md"
    append_jsonl(records, jsonl)
    chart = output / f"fronts-{device}-{slug(records[0]['case'])}.png"
    lines = case_lines(records, tolerance)
    try:
        draw_front(records, chart)
        lines.append(f"![{chart.name}]({chart.name})")
    except ImportError:
        chart = None
        lines.append("(no chart: matplotlib is not installed)")
    new = not markdown.exists()
    with open(markdown, "a") as f:
        f.write("\n".join((["# Time–memory fronts (python -m bench.fronts)", ""] if new else []) + lines + [""]))
    return [p for p in (jsonl, markdown, chart) if p is not None]


def run_fronts(cases: list[Case], *, device, reps: int, warmup: int, output: Path | None = None,
               tolerance: float = LOSS_TOLERANCE, only=None, out=None) -> list[dict]:
    """Measure every case's points, print each case's section to `out` (stdout), save it into `output` unless
    None (`save_case`), and return the records."""
    out = out or sys.stdout
    meta = fronts_metadata(device, reps, warmup)
    records = []
    for case in cases:
        found = measure_case(case, device, reps, warmup, meta, only)
        print("\n".join(case_lines(found, tolerance)), file=out, flush=True)
        if output is not None:
            print("# wrote " + ", ".join(map(str, save_case(found, Path(output), tolerance))), file=out)
        records += found
    return records


# --- the dry run -----------------------------------------------------------------------------------------------

def estimate(case: Case, point: Point, gpu, runs: int) -> tuple[float, str]:
    """Seconds of a point's `runs` forward + backward passes (warm-ups, repetitions, the memory pass) and how they
    were estimated: bench.model's prediction on `gpu` where it models the point, else ROUGH_FLOOR_FACTOR × the
    floor (at `gpu`'s matmul rate, or CPU_FLOPS where `gpu` is None); plus SETUP_S where it applies."""
    setup = SETUP_S.get(point.competitor.name, 0.0) if gpu is not None else 0.0
    ms = predicted(case, point, gpu)["predicted_total_ms"]
    if ms is not None:
        how = f"bench.model: {ms:,.1f} ms a pass on {gpu.name}"
    else:
        floor_s = floor_work(case).total / (CPU_FLOPS if gpu is None else gpu.matmul_flops(case.torch_dtype))
        factor = 1.0 if point.competitor.name == FLOOR else ROUGH_FLOOR_FACTOR
        ms = factor * floor_s * 1e3
        how = "the floor's flops at the matmul rate" if factor == 1.0 else f"rough: {factor:g} × the floor"
        how += f", {ms:,.1f} ms a pass"
    return runs * ms / 1e3 + setup, how + (f", + {setup:.0f} s to compile or autotune" if setup else "")


def dry_run_lines(cases: list[Case], device, gpu, reps: int, warmup: int, only=None) -> list[str]:
    """Every case's points with their estimated seconds, and why a point would be skipped on `device` here; the
    total of those that would run, and of every point (where every peer is installed)."""
    lines, total, every = [], 0.0, 0.0
    for case in cases:
        lines.append(f"{case.label} ({reps} repetitions after {warmup} warm-ups, one memory pass):")
        for point in points(case, torch.device(device).type == "cuda", only):
            applies, reason = point.competitor.applies(case, device)
            seconds, how = estimate(case, point, gpu, reps + warmup + 1)
            every += seconds
            total += seconds if applies else 0.0
            skip = "" if applies else f"; skipped here: {reason}"
            lines.append(f"  {point.name}: ~{seconds:,.1f} s ({how}){skip}")
    return lines + [f"estimated total: ~{total:,.0f} s for the points that would run here, ~{every:,.0f} s for every "
                    "point; the float64 oracle and the inputs aside"]


# --- the command line ------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fronts", description="Time against extra memory of "
                                     "every competitor's memory knob, all points timed in turn.")
    parser.add_argument("--divergence", nargs="+", default=list(DIVERGENCES))
    parser.add_argument("--shape", metavar="TOKENSxHSxHTxVOCAB",
                        help=f"default {HEADLINE_SHAPE} (bf16) with CUDA, {CPU_SHAPE} (fp32) without")
    parser.add_argument("--dtype", choices=DTYPES, help="default bf16 with CUDA, fp32 without")
    parser.add_argument("--reps", type=int, help="timed repetitions (default 5 with CUDA, 2 without)")
    parser.add_argument("--warmup", type=int, help="untimed warm-ups (default 2 with CUDA, 1 without)")
    parser.add_argument("--tolerance", type=float, default=LOSS_TOLERANCE,
                        help="relative loss error counted as equal accuracy in the summary")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="competitors (names or shell patterns)")
    parser.add_argument("--output", help="folder of the records and charts (default bench.report.record_dir)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their estimated times")
    parser.add_argument("--gpu", choices=("h100", "h200", "a100"),
                        help="with --dry-run: plan the run of this GPU (CUDA's points, bench.model's rates)")
    return parser


def cases_of(divergences, shape: str | None, dtype: str | None, cuda: bool) -> list[Case]:
    """The fused cases of `divergences` at `shape` (the headline with CUDA, CPU_SHAPE without) in `dtype`."""
    from .model import Shape

    s = Shape.parse(shape or (HEADLINE_SHAPE if cuda else CPU_SHAPE))
    dtype_name = DTYPES[dtype] if dtype else ("bfloat16" if cuda else "float32")
    for name in divergences:
        kdops.as_divergence(name)
    return [Case(FUSED, d, s.tokens, s.vocab, s.hidden_student, s.hidden_teacher, dtype_name) for d in divergences]


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.gpu and not args.dry_run:
        parser.error("--gpu plans a run on that GPU: it goes with --dry-run")
    planned = args.gpu is not None
    device = "cuda" if torch.cuda.is_available() or planned else "cpu"
    try:
        cases = cases_of(args.divergence, args.shape, args.dtype, device == "cuda")
    except ValueError as error:
        parser.error(str(error))
    reps, warmup = (d if v is None else v for v, d in zip((args.reps, args.warmup), REPS[device]))
    if args.dry_run:
        from kdops.targets import by_name

        gpu = by_name(args.gpu) if planned else live_gpu(device)
        print("\n".join(dry_run_lines(cases, device, gpu, reps, warmup, args.only)))
        return 0
    output = None if args.no_save else Path(args.output or record_dir(device_name(device)))
    run_fronts(cases, device=device, reps=reps, warmup=warmup, output=output, tolerance=args.tolerance,
               only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
