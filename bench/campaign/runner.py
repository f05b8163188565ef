"""What every step shares: its declaration (`Step`), the context its body writes to (`Context`), the budget,
and the plan's execution within it — each step in a process of its own, killed with whatever it started when
its time is up; a failure, a crash or a timeout is recorded and the campaign goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .markdown import error_text, table_lines, traceback_lines

REPO = Path(__file__).resolve().parents[2]

RESERVE_S = 10.0  # kept after the last step for the report (at most a tenth of the budget)
TIMEOUT_FACTOR, TIMEOUT_SLACK_S = 2.0, 20.0  # a step is killed after 2 × its estimate + 20 s (or at the budget)
CHILD_MARGIN_S = 2.0  # a step's process plans its items to end this long before it would be killed
KILL_WAIT_S = 5  # after SIGTERM, then after SIGKILL
# The environment of the steps that allocate close to the GPU's memory (PyTorch's expandable segments: less
# fragmentation between their cases).
EXPANDABLE_SEGMENTS = (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),)


@dataclass
class StepResult:
    """What a step left: status "ok", "partial" (items skipped for time), "failed" (ran, found a problem),
    "error" (raised or crashed), "timeout" (killed at its time) or "skipped" (did not fit); markdown lines."""

    step: str
    status: str = "ok"
    message: str = ""
    lines: list = field(default_factory=list)
    seconds: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "StepResult":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Context:
    """What a step's body works with: the output folder, the campaign's metadata (every record carries it),
    its deadline, and the result it builds (saved to `result_path` at each `flush`, so that a step killed
    at its time still reports what it did)."""

    def __init__(self, step: str, output, meta: dict, seconds: float, result_path=None, device: str = "cuda",
                 clock: Callable[[], float] = time.monotonic):
        self.step, self.output, self.meta, self.device = step, Path(output), meta, device
        self.clock = clock
        self.deadline = clock() + seconds
        self.result = StepResult(step)
        self.result_path = None if result_path is None else Path(result_path)

    def left(self) -> float:
        return self.deadline - self.clock()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def line(self, text: str = "") -> None:
        self.result.lines.append(text)
        print(text, flush=True)

    def heading(self, title: str) -> None:
        """A '### title' section of the step's report."""
        for text in ("", f"### {title}", ""):
            self.line(text)

    def skip_unless_fits(self, estimate_s: float, items: str, note: str) -> bool:
        """Whether an item of `estimate_s` seconds fits the time left; where it does not, `note` in the report
        and the step "partial" ('<items> skipped for time')."""
        if self.fits(estimate_s):
            return True
        self.line(note)
        self.mark("partial", f"{items} skipped for time")
        return False

    def table(self, header: list[str], rows: list[list]) -> None:
        for line in table_lines(header, rows):
            self.line(line)

    def mark(self, status: str, message: str = "") -> None:
        """Lower the step's status (ok < partial < failed < error), never raise it back."""
        order = ("ok", "partial", "failed", "error")
        if order.index(status) >= order.index(self.result.status):
            self.result.status = status
            if message:
                self.result.message = message

    def path(self, pattern: str) -> Path:
        """A file of the output folder, '{device}' replaced by the device's slug."""
        return self.output / pattern.format(device=self.meta["device_slug"])

    def record(self, kind: str, **fields) -> dict:
        """Append one measurement to campaign-<device>.jsonl, with the campaign's metadata."""
        record = {**self.meta, **fields, "step": self.step, "kind": kind}
        path = self.path("campaign-{device}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        return record

    def flush(self) -> None:
        if self.result_path is not None:
            tmp = self.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.result)))
            os.replace(tmp, self.result_path)

    def fail(self, error: BaseException) -> None:
        self.mark("error", error_text(error))
        for line in traceback_lines():
            self.line(line)


class Budget:
    """Seconds of a campaign: what is left, and what is left for steps (less `reserve`, for the report)."""

    def __init__(self, seconds: float, reserve: float | None = None, clock: Callable[[], float] = time.monotonic,
                 start: float | None = None):
        self.seconds = float(seconds)
        self.reserve = min(RESERVE_S, 0.1 * self.seconds) if reserve is None else float(reserve)
        self.clock = clock
        self.start = clock() if start is None else start

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def usable(self) -> float:
        return max(0.0, self.left() - self.reserve)

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.usable()


@dataclass(frozen=True)
class Step:
    """One step: its estimate (seconds, its process's start included: a step runs only where its estimate fits
    what is left, so a stale, high estimate skips it), what it runs (the plan's lines), its body (run in the
    step's own process; the lines it writes are its section of the report) and extra environment variables of
    that process; `details`, where given, lists for the dry run what the step measures, each item with its estimate
    (called on the machine of the dry run, which needs no GPU)."""

    name: str
    title: str
    estimate_s: float
    plan: tuple[str, ...]
    body: Callable[[Context], None]
    env: tuple[tuple[str, str], ...] = ()
    details: Callable[[], list[str]] | None = None


Executor = Callable[[Step, float], StepResult]


def run_steps(steps, budget: Budget, execute: Executor, out=None) -> list[StepResult]:
    """Run each step that fits what is left of `budget` (its estimate against `budget.usable()`), with
    `execute(step, seconds)` given at most TIMEOUT_FACTOR × its estimate + TIMEOUT_SLACK_S; skip, with the
    reason, those that do not fit; record an exception of `execute` as the step's "error" and go on."""
    out = out or sys.stdout
    results = []
    for step in steps:
        usable = budget.usable()
        if not budget.fits(step.estimate_s):
            result = StepResult(step.name, "skipped",
                                f"does not fit: estimated {step.estimate_s:.0f} s, {usable:.0f} s left")
            print(f"## {step.name}: skipped ({result.message})", file=out, flush=True)
            results.append(result)
            continue
        seconds = min(usable, TIMEOUT_FACTOR * step.estimate_s + TIMEOUT_SLACK_S)
        print(f"## {step.name}: {step.title} (estimated {step.estimate_s:.0f} s, at most {seconds:.0f} s)", file=out,
              flush=True)
        start = budget.clock()
        try:
            result = execute(step, seconds)
        except Exception as error:  # noqa: BLE001 - one step's failure is a record, never the campaign's end
            result = StepResult(step.name, "error", error_text(error), traceback_lines())
        result.seconds = budget.clock() - start
        print(f"## {step.name}: {result.status} in {result.seconds:.0f} s"
              + (f" ({result.message})" if result.message else ""), file=out, flush=True)
        results.append(result)
    return results


def run_body(ctx: Context, body: Callable[[Context], None]) -> StepResult:
    """A step's body on `ctx`, its exception recorded as the step's "error"; the result saved before and after."""
    ctx.flush()
    try:
        body(ctx)
    except Exception as error:  # noqa: BLE001
        ctx.fail(error)
    ctx.flush()
    return ctx.result


def execute_inline(output, meta: dict, device: str = "cuda") -> Executor:
    """Run steps in this process (tests; no time limit is enforced, only planned)."""
    def execute(step: Step, seconds: float) -> StepResult:
        return run_body(Context(step.name, output, meta, seconds, device=device), step.body)
    return execute


def kill(process: subprocess.Popen) -> None:
    """End a step's process and whatever it started (its own process group), politely first."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def child_command(step: Step, seconds: float, output, meta_path: Path, result_path: Path) -> list[str]:
    """`python -m bench.campaign --child NAME ...`: the step's process, told to plan its items to end
    CHILD_MARGIN_S before it would be killed."""
    return [sys.executable, "-m", "bench.campaign", "--child", step.name, "--output", str(output),
            "--meta", str(meta_path), "--result", str(result_path),
            "--seconds", f"{max(1.0, seconds - CHILD_MARGIN_S):.1f}"]


def execute_in_child(output, meta_path: Path, workdir: Path) -> Executor:
    """Run each step as `python -m bench.campaign --child NAME` in a process group of its own, killed (with
    whatever it started) when its seconds are up; its result is read from the file it keeps up to date."""
    def execute(step: Step, seconds: float) -> StepResult:
        result_path = Path(workdir) / f"{step.name}.json"
        process = subprocess.Popen(child_command(step, seconds, output, meta_path, result_path), cwd=REPO,
                                   env={**os.environ, **dict(step.env)}, start_new_session=True)
        try:
            code, timed_out = process.wait(timeout=seconds), False
        except subprocess.TimeoutExpired:
            kill(process)
            code, timed_out = process.returncode, True
        except BaseException:
            kill(process)
            raise
        return child_result(step, result_path, code, timed_out, seconds)
    return execute


def child_result(step: Step, result_path: Path, code: int | None, timed_out: bool, seconds: float) -> StepResult:
    """What a step's process left in `result_path`, its status lowered to "timeout" where it was killed and to
    "error" where it exited with a failure it did not report."""
    try:
        result = StepResult.from_dict(json.loads(result_path.read_text()))
    except (OSError, ValueError):
        result = StepResult(step.name, "error", "its process left no result")
    if timed_out:
        result.status = "timeout"
        earlier = f"; {result.message}" if result.message else ""
        result.message = f"killed after {seconds:.0f} s, its time{earlier}"
    elif code != 0 and result.status in ("ok", "partial"):
        result.status, result.message = "error", f"its process exited with code {code}"
    return result
