"""The one-call GPU campaign: what a lent GPU should measure, in one command, within a time budget.

    python -m bench.campaign [--minutes 9] [--output DIR] [--steps NAME ...] [--dry-run]

Steps, in this order, each in a process of its own (an exception, a crash or a timeout in one is recorded
in the report and the campaign goes on):

1. smoke        `python -m pytest -m gpu_smoke -q -x`: the kernel tests listed in tests/conftest.py
                (GPU_SMOKE), on CUDA.
2. fused_check  `bench.fused_check`: fused_linear_kd_loss at a real size against the float32 reference,
                per divergence (again at half the tokens if the reference runs out of memory).
3. memory       `bench.memory_target`: the peak-memory table of kd_loss at 8192 × 128256, bfloat16.
4. headline     `bench.sweep.run_sweep` at 8192 tokens × Hs 4096 × Ht 4096 × V 128256, bfloat16, for
                forward_kl and generalized_jsd: kdops fused and chunked against the floor, the eager and the
                compiled reference, Liger-Kernel's chunked JSD and TRL's chunked loss (forward, backward,
                total, extra memory).
5. profile      `torch.profiler`, per kernel, over one forward + backward of kdops' fused and chunked impls
                at the headline shape, next to the cost model's per-phase prediction (`bench.model`).
6. tune         a handful of block-size choices of `kdops._fused.fused_config` and
                `kdops._launch.logits_config`, timed forward + backward at a medium shape; the fastest is
                recorded.

Opt-in (`--steps tune_headline`): the fused tiles of `kdops._fused.fused_config` at the headline shape itself,
for both divergences, kdops' choice against its neighbours.

Time: the budget (--minutes) counts from the start of the command. Before each step, its estimate is
compared with the time left less RESERVE_S (kept for the report): a step that does not fit is skipped, and
the report says so. A step that runs is killed at the earlier of the budget's end and TIMEOUT_FACTOR × its
estimate + TIMEOUT_SLACK_S (so that one slow step leaves time to the next). Steps made of several items
(cases, configurations) skip the items that no longer fit.

Output, in --output (default bench/results/; <device> is the GPU's name as a slug):
* campaign-<device>.jsonl: every measurement, each with the command line, the git commit, the device and
  the torch / triton / liger-kernel / trl versions;
* campaign-<device>.md: the report, each step's results or why it was skipped;
* <device>.jsonl: the headline's records as `python -m bench` writes them; charts-<device>/: their charts
  (`bench.plot`, when matplotlib is installed); fused-check-<device>.jsonl; MEMORY-<device>.md.

--dry-run works on any machine: it prints the plan (each step, what it runs, its estimate, whether it fits)
and the cost model's predicted times for the headline cases, writes nothing unless --output is given (then
campaign-plan.md), and exits 0.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # the budget counts from here, before the heavy imports

import argparse  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

DEFAULT_MINUTES = 9.0
RESERVE_S = 10.0  # kept after the last step for the report (at most a tenth of the budget)
TIMEOUT_FACTOR, TIMEOUT_SLACK_S = 2.0, 20.0  # a step is killed after 2 × its estimate + 20 s (or at the budget)
CHILD_MARGIN_S = 2.0  # a step's process plans its items to end this long before it would be killed

# The headline: Llama-3 8B's lm_head on both sides, 8192 tokens, bfloat16.
HEADLINE_TOKENS, HEADLINE_VOCAB, HEADLINE_HIDDEN = 8192, 128256, 4096
DIVERGENCES = ("forward_kl", "generalized_jsd")
HEADLINE_COMPETITORS = ("floor", "kdops-fused", "kdops-chunked", "kdops-sliced", "reference", "reference-compiled",
                        "liger-chunked-jsd", "trl-chunked-jsd")
HEADLINE_REPS, HEADLINE_WARMUP = 5, 2
HEADLINE_CASE_S = 60.0  # one divergence, every competitor (two torch.compile's among them): 40–47 s on an H100

FUSED_CHECK_TOKENS = (8192, 4096)  # the second only if the reference runs out of memory at the first
FUSED_CHECK_DIVERGENCE_S = 25.0
# Relative error (max |Δ| / max |reference|) above which the check fails: bfloat16 gradients round at
# 2^-8 ≈ 4e-3, and the accuracy bound (docs/math.md) allows 1e-2 beyond the same-dtype reference's own error.
FUSED_CHECK_TOLERANCE = 2e-2

PROFILE_ITEM_S = 8.0
PROFILE_REPS = 3

# Block-size trials: a handful of alternatives to kdops' own choice ({}), not the full product.
TUNE_FUSED_SHAPE = (4096, 32000, 4096, 4096)  # tokens, vocab, Hs, Ht
TUNE_LOGITS_SHAPE = (4096, 128256)  # tokens, vocab
TUNE_REPS = 5
TUNE_FUSED_TRIAL_S, TUNE_LOGITS_TRIAL_S = 12.0, 5.0
FUSED_TRIALS = (
    {},
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=2),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2),
)
# The fused tiles again at the headline shape (`--steps tune_headline`, not a default step): both divergences,
# kdops' own choice (0.3.5: 128 × 128 in both kernels on Hopper, bench/results/nvidia-h100-campaign/0.3.5-wide-tiles)
# against its neighbours: a fourth stage (the first H100 session measured 49.3 → 44.6 ms for the forward at
# 128 × 128, before TMA), 16 warps (four warpgroups: half the accumulator registers a thread, fewer spills),
# pointer loads, and the 0.3.4 tiles.
TUNE_HEADLINE_TRIAL_S = 10.0  # what a trial must find left to start
HEADLINE_TRIAL_ESTIMATE_S = 4.0  # what one takes: the H100 ran 12 in 31 s (0.3.4/) and 22 in 71 s (0.3.5-wide-tiles/)
_WIDEST_16_BIT = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
HEADLINE_FUSED_TRIALS = (
    {},
    dict(tma=False),
    dict(forward=dict(_WIDEST_16_BIT, num_stages=4)),
    dict(backward=dict(_WIDEST_16_BIT, num_stages=4)),
    dict(forward=dict(_WIDEST_16_BIT, num_warps=16)),
    dict(backward=dict(_WIDEST_16_BIT, num_warps=16)),
    dict(forward=dict(_WIDEST_16_BIT, BLOCK_V=64)),
)
# The fused tiles of the other specializations at the headline shape (`--steps tune_kinds`, not a default step):
# the kinds and terms the headline does not run, each against the widths `tile_width` does not give it (what
# decided 0.3.5's tiles: bench/results/nvidia-h100-campaign/0.3.5-wide-tiles).
_WIDEST_TILES = _WIDEST_16_BIT
_WIDE_TILES = dict(_WIDEST_TILES, BLOCK_V=64)
_NARROW_TILES = dict(_WIDE_TILES, BLOCK_N=64)
_EVERY_WIDTH = ({}, dict(forward=_NARROW_TILES), dict(forward=_WIDE_TILES), dict(forward=_WIDEST_TILES),
                dict(backward=_NARROW_TILES), dict(backward=_WIDE_TILES), dict(backward=_WIDEST_TILES))
KINDS_FUSED_TRIALS = (
    ("skew_reverse_kl", {}, ({}, dict(forward=_WIDE_TILES), dict(backward=_WIDE_TILES))),
    ("tvd", {}, ({}, dict(forward=_WIDE_TILES))),
    ("alpha_beta", {}, ({}, dict(forward=_WIDE_TILES), dict(backward=_WIDE_TILES))),
    ("forward_kl", dict(hard_weight=0.5), _EVERY_WIDTH),
    ("generalized_jsd", dict(hard_weight=0.5), _EVERY_WIDTH),
)
LOGITS_TRIALS = (
    {},
    dict(BLOCK_R=1, BLOCK_V=2048, num_warps=8),  # both kernels' configuration until the H100 campaign
    dict(BLOCK_R=1, BLOCK_V=1024, num_warps=4),
    dict(BLOCK_R=1, BLOCK_V=4096, num_warps=8),
    dict(BLOCK_R=1, BLOCK_V=4096, num_warps=16),
    dict(BLOCK_R=2, BLOCK_V=2048, num_warps=8),
    dict(BLOCK_R=4, BLOCK_V=1024, num_warps=8),
    # A row per warp: Triton's default layout gives each lane one 16-byte vector of a 32-lane row segment
    # (256 bf16 or 128 float32 columns), so BLOCK_V of that width with BLOCK_R = num_warps keeps every row's
    # per-tile reductions inside a warp (shuffles, no barriers). The sm_90 SASS of the default's forward
    # kernels holds 14-18 barriers per tile; these hold none, at 10 % more instructions per element
    # (fewer elements per lane to amortize each reduction): which wins is the GPU's to say.
    dict(BLOCK_R=8, BLOCK_V=256, num_warps=8),
    dict(BLOCK_R=8, BLOCK_V=128, num_warps=8),
    dict(BLOCK_R=4, BLOCK_V=128, num_warps=4),
)
# The kernels on logits are tuned on bf16 logits (kd_loss) and on the float32 logit chunks of the chunked
# impl, with generalized JSD there (its three passes are the chunked path's largest non-matmul cost).
TUNE_LOGITS_CASES = (("forward_kl", "bfloat16"), ("generalized_jsd", "float32"))
MiB = 2**20


# --- results, context, budget ------------------------------------------------------------------------------

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

    def table(self, header: list[str], rows: list[list]) -> None:
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "---|" * len(header))
        for row in rows:
            self.line("| " + " | ".join(_cell(v) for v in row) + " |")

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
        self.mark("error", f"{type(error).__name__}: {_first_line(error)}")
        self.line("```text")
        self.line(traceback.format_exc().rstrip())
        self.line("```")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:,.2f}"
    return str(value).replace("|", "\\|")


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
    """One step: its estimate (seconds, its process's start included), what it runs (for the plan), its body
    (run in the step's own process) and extra environment variables of that process."""

    name: str
    title: str
    estimate_s: float
    plan: tuple[str, ...]
    body: Callable[[Context], None]
    env: tuple[tuple[str, str], ...] = ()


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
            result = StepResult(step.name, "error", f"{type(error).__name__}: {_first_line(error)}",
                                ["```text", traceback.format_exc().rstrip(), "```"])
        result.seconds = budget.clock() - start
        print(f"## {step.name}: {result.status} in {result.seconds:.0f} s"
              + (f" ({result.message})" if result.message else ""), file=out, flush=True)
        results.append(result)
    return results


def execute_inline(output, meta: dict, device: str = "cuda") -> Executor:
    """Run steps in this process (tests; no time limit is enforced, only planned)."""
    def execute(step: Step, seconds: float) -> StepResult:
        ctx = Context(step.name, output, meta, seconds, device=device)
        try:
            step.body(ctx)
        except Exception as error:  # noqa: BLE001
            ctx.fail(error)
        return ctx.result
    return execute


def _kill(process: subprocess.Popen) -> None:
    """End a step's process and whatever it started (its own process group), politely first."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def execute_in_child(output, meta_path: Path, workdir: Path) -> Executor:
    """Run each step as `python -m bench.campaign --child NAME` in a process group of its own, killed (with
    whatever it started) when its seconds are up; its result is read from the file it keeps up to date."""
    def execute(step: Step, seconds: float) -> StepResult:
        result_path = Path(workdir) / f"{step.name}.json"
        command = [sys.executable, "-m", "bench.campaign", "--child", step.name, "--output", str(output),
                   "--meta", str(meta_path), "--result", str(result_path),
                   "--seconds", f"{max(1.0, seconds - CHILD_MARGIN_S):.1f}"]
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **dict(step.env)}, start_new_session=True)
        try:
            code, timed_out = process.wait(timeout=seconds), False
        except subprocess.TimeoutExpired:
            _kill(process)
            code, timed_out = process.returncode, True
        except BaseException:
            _kill(process)
            raise
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
    return execute


# --- metadata and the cost model ---------------------------------------------------------------------------

def _gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi: the campaign's own process stays off the GPU (no CUDA context)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    names = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return names[0].strip() if names else None


def campaign_metadata(device: str, argv: list[str]) -> dict:
    """What every record carries: the command line, commit, device, versions."""
    from .report import _git, _version, device_name, slug

    now = datetime.datetime.now(datetime.timezone.utc)
    name = (_gpu_name() if torch.device(device).type == "cuda" else None) or device_name(device)
    return {
        "campaign_id": now.strftime("%Y%m%dT%H%M%SZ"), "timestamp": now.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.campaign", *argv]),
        "commit": _git("rev-parse", "HEAD") or "unknown", "dirty": bool(_git("status", "--porcelain")),
        "device": name, "device_slug": slug(name), "device_type": torch.device(device).type,
        "torch": torch.__version__, "triton": _version("triton"), "kdops": _version("kdops"),
        "liger_kernel": _version("liger-kernel"), "trl": _version("trl"), "transformers": _version("transformers"),
        "python": sys.version.split()[0],
    }


def model_gpu(device: str = "cuda"):
    """The GPU the cost model predicts for: this one, or an H100 where there is none."""
    from kdops import targets

    live = targets.of_device(torch.device(device)) if torch.cuda.is_available() else None
    return live or targets.H100


def predict_headline(impl: str, divergence: str, gpu):
    """bench.model's prediction of a path ("fused", "chunked", ...) at the headline shape; ImportError where
    bench.model is unavailable."""
    from bench.model import Shape, predict

    return predict(impl, Shape(HEADLINE_TOKENS, HEADLINE_HIDDEN, HEADLINE_HIDDEN, HEADLINE_VOCAB), gpu=gpu,
                   divergence=divergence, dtype=torch.bfloat16)


def modelled_competitors() -> list[tuple[str, str]]:
    """(competitor, the cost model's path) of the headline competitors the model knows: kdops' impls, then
    the others the model has a path for (`bench.model.COMPETITOR_PATHS`)."""
    import bench.model as model
    from bench.cases import FUSED

    paths = dict(getattr(model, "COMPETITOR_PATHS", {}))
    known = [(name, paths[(FUSED, name)]) for name in HEADLINE_COMPETITORS if (FUSED, name) in paths]
    kdops = [(name, path) for name, path in (("kdops-fused", "fused"), ("kdops-chunked", "chunked"),
                                             ("kdops-sliced", "sliced"))]
    return kdops + [(name, path) for name, path in known if name not in dict(kdops)]


def prediction_lines(gpu) -> list[str]:
    """A markdown table of the predicted headline times, or why there is none."""
    try:
        competitors = modelled_competitors()
    except Exception as error:  # noqa: BLE001 - written concurrently; degrade, never fail
        return [f"cost model unavailable ({type(error).__name__}: {_first_line(error)})"]
    lines = [f"Cost model (`bench.model`) for {getattr(gpu, 'name', gpu)}, {HEADLINE_TOKENS} tokens × Hs "
             f"{HEADLINE_HIDDEN} × Ht {HEADLINE_HIDDEN} × V {HEADLINE_VOCAB}, bf16 (the headline cases):", "",
             "| competitor | divergence | forward ms | backward ms | total ms | floor ms | × floor | extra MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for divergence in DIVERGENCES:
        for name, path in competitors:
            try:
                p = predict_headline(path, divergence, gpu)
                cells = [p.forward_s * 1e3, p.backward_s * 1e3, p.total_s * 1e3, p.floor_s * 1e3, p.ratio_to_floor,
                         p.extra_bytes / MiB]
            except Exception as error:  # noqa: BLE001
                cells = [f"unavailable: {type(error).__name__}: {_first_line(error)}"] + [None] * 5
            lines.append("| " + " | ".join([name, divergence, *(_cell(c) for c in cells)]) + " |")
    return lines


# --- 1. smoke ------------------------------------------------------------------------------------------------

SMOKE_COMMAND = ("-m", "pytest", "-m", "gpu_smoke", "-q", "-x", "-p", "no:cacheprovider")


def smoke_modules() -> tuple[str, ...]:
    """The test modules that hold the GPU_SMOKE tests (read from tests/conftest.py, not imported: it sets up
    the interpreter), so that the smoke run collects only them: a test module of an optional package that
    fails to import on the GPU machine cannot stop it. Empty (the whole suite) if none is found."""
    try:
        text = (REPO / "tests" / "conftest.py").read_text()
    except OSError:
        return ()
    block = text.split("GPU_SMOKE = (", 1)[-1].split("\n)", 1)[0]
    return tuple(sorted(set(re.findall(r'"(tests/test_\w+\.py)::', block))))


def smoke_command() -> tuple[str, ...]:
    return (*SMOKE_COMMAND, *smoke_modules())


def pytest_summary(output: str) -> tuple[str, dict]:
    """pytest's closing line ('3 passed, 1 failed in 2.0s') and its counts."""
    lines = [line.strip("= ").strip() for line in output.splitlines()
             if re.search(r"\b(passed|failed|errors?|no tests ran|deselected)\b", line)]
    summary = lines[-1] if lines else ""
    counts = {word if word != "error" else "errors": int(n)
              for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary)}
    return summary, counts


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _smoke(ctx: Context) -> None:
    command = [sys.executable, *smoke_command()]
    shown = shlex.join(["python", *smoke_command()])
    ctx.line(f"`{shown}` (the tests of tests/conftest.py GPU_SMOKE)")
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, ctx.left()))
        code, output, timed_out = done.returncode, done.stdout + done.stderr, False
    except subprocess.TimeoutExpired as error:
        code, output, timed_out = None, _text(error.stdout) + _text(error.stderr), True
    seconds = time.monotonic() - start
    summary, counts = pytest_summary(output)
    ctx.record("smoke", command=shown, returncode=code, timed_out=timed_out,
               summary=summary, counts=counts, seconds=seconds)
    ctx.line("")
    ctx.line(f"**{summary or 'no summary line'}** ({seconds:.0f} s{', stopped at its time' if timed_out else ''})")
    if code != 0:
        ctx.mark("failed", summary or ("timed out" if timed_out else f"exit code {code}"))
        ctx.line("")
        ctx.line("```text")
        for line in output.rstrip().splitlines()[-40:]:
            ctx.line(line)
        ctx.line("```")


# --- 2. fused_check and 3. memory ----------------------------------------------------------------------------

def _fused_check(ctx: Context) -> None:
    from bench import fused_check
    from bench.measure import free_memory, is_oom

    target = ctx.path("fused-check-{device}.jsonl")
    rows = []
    for divergence in DIVERGENCES:
        if not ctx.fits(FUSED_CHECK_DIVERGENCE_S):
            ctx.line(f"{divergence}: skipped, {ctx.left():.0f} s left")
            ctx.mark("partial", "divergences skipped for time")
            continue
        for tokens in FUSED_CHECK_TOKENS:
            records = None
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "check.jsonl"
                try:
                    fused_check.main(["--tokens", str(tokens), "--divergence", divergence, "--output", str(out)])
                    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
                except Exception as error:  # noqa: BLE001
                    if not is_oom(error) or tokens == FUSED_CHECK_TOKENS[-1]:
                        raise
            if records is None:  # out of memory: the failed run's tensors are free once its traceback is gone
                free_memory(ctx.device)
                ctx.line(f"{divergence}: out of memory at {tokens} tokens; again with fewer")
                continue
            with open(target, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            for r in records:
                ctx.record("fused_check", **r)
                rows.append(r)
            break
        ctx.flush()
    errors = ("err_loss", "err_grad_hidden", "err_grad_weight")
    bad = [r for r in rows if not all(math.isfinite(r[e]) and r[e] <= FUSED_CHECK_TOLERANCE for e in errors)]
    if rows:
        r0 = rows[0]
        ctx.line(f"bf16, Hs {r0['hs']}, Ht {r0['ht']}, V {r0['vocab']}, hard_weight 0.5, T = 2; error = max |Δ| / "
                 f"max |reference| (fails above {FUSED_CHECK_TOLERANCE:g}); seconds and extra memory of one "
                 "forward + backward:")
        ctx.line("")
        ctx.table(["divergence", "impl", "tokens", "err loss", "err dH", "err dW", "seconds", "extra MiB",
                   "reference s", "reference extra MiB"],
                  [[r["divergence"], r["impl"], r["tokens"], r["err_loss"], r["err_grad_hidden"], r["err_grad_weight"],
                    r["seconds"], r["extra_mib"], r["reference_seconds"], r["reference_extra_mib"]] for r in rows])
    if bad:
        ctx.mark("failed", f"{len(bad)} result(s) beyond {FUSED_CHECK_TOLERANCE:g}")


def _memory(ctx: Context) -> None:
    from bench import memory_target

    target = ctx.path("MEMORY-{device}.md")
    memory_target.main(["--output", str(target)])
    text = target.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")] if table else []
    for line in table[2:]:
        ctx.record("memory", **dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    ctx.line(f"From `{target.name}`:")
    ctx.line("")
    for line in table:
        ctx.line(line)


# --- 4. headline ---------------------------------------------------------------------------------------------

def headline_case(divergence: str):
    from bench.cases import FUSED, Case

    return Case(FUSED, divergence, HEADLINE_TOKENS, HEADLINE_VOCAB, HEADLINE_HIDDEN, HEADLINE_HIDDEN, "bfloat16")


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
        rows.append([r["competitor"], "ok", r["forward_ms"], r["backward_ms"], r["total_ms"], r["ratio_floor_total"],
                     to_fused, extra, r["loss_rel_diff"]])
    return rows


HEADLINE_HEADER = ["competitor", "status", "fwd ms", "bwd ms", "total ms", "× floor", "× kdops-fused", "extra MiB",
                   "Δloss"]


def _headline(ctx: Context) -> None:
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
        ctx.line("")
        ctx.line(f"### {case.label}")
        ctx.line("")
        if not ctx.fits(HEADLINE_CASE_S):
            ctx.line(f"Skipped: estimated {HEADLINE_CASE_S:.0f} s, {ctx.left():.0f} s left.")
            ctx.mark("partial", "cases skipped for time")
            continue
        records = run_sweep([case], device=ctx.device, reps=HEADLINE_REPS, warmup=HEADLINE_WARMUP, preset="campaign",
                            competitors=competitors, results_dir=ctx.output)
        sweep_file = results_path(ctx.output, records[0]["device"]) if records else sweep_file
        for r in records:
            ctx.record("headline", **r)
        ctx.table(HEADLINE_HEADER, headline_rows(records))
        ctx.flush()
    if sweep_file is not None:
        _charts(ctx, sweep_file)


def _charts(ctx: Context, sweep_file: Path) -> None:
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


# --- 5. profile ----------------------------------------------------------------------------------------------

def kernel_times(events) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) of the device-side events (kernels, copies, fills) of a profile, longest first."""
    from torch.autograd import DeviceType

    totals: dict[str, list] = {}
    for e in events:
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)
        entry = totals.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    return sorted(((name, n, us) for name, (n, us) in totals.items()), key=lambda t: -t[2])


def idle_gaps(events, top: int = 5) -> dict:
    """Where the GPU waits in a profile: its busy span, the time no device event runs, and the longest gaps.

    Each gap names the device events either side and the innermost host-side operation running at its midpoint
    (what the host was doing while the GPU had nothing queued: a sync, an allocation, Python between launches).
    """
    from torch.autograd import DeviceType

    device, host = [], []
    for e in events:
        span = getattr(e, "time_range", None)
        if span is None:
            continue
        (device if getattr(e, "device_type", None) == DeviceType.CUDA else host).append((span.start, span.end, e.name))
    if not device:
        return {}
    device.sort()
    gaps, end, previous = [], device[0][1], device[0][2]
    for start, stop, name in device[1:]:
        if start > end:
            gaps.append((start - end, end, previous, name))
        if stop >= end:
            end, previous = stop, name
    gaps.sort(key=lambda g: -g[0])

    def host_at(t):
        around = [(stop - start, name) for start, stop, name in host if start <= t <= stop]
        return min(around)[1] if around else "-"

    return dict(span_us=end - device[0][0], idle_us=sum(g[0] for g in gaps), gaps=len(gaps),
                longest=[dict(us=us, after=a, before=b, host=host_at(t + us / 2)) for us, t, a, b in gaps[:top]])


HOST_MARK = "kdops forward"  # the profiled call's own range (torch.profiler.record_function): where host time starts


def host_lead(events, mark: str = HOST_MARK, top: int = 5) -> dict:
    """What the host does before the GPU's first work in a profile: the time from the start of the `mark` range
    (the profiled call) to the first device event, and the outermost host operations in that window, summed by
    name, longest first (an event timing from an idle GPU counts this lead; a training step, whose GPU is
    still busy with earlier work, hides it)."""
    from torch.autograd import DeviceType

    host, first_device = [], None
    for e in events:
        span = getattr(e, "time_range", None)
        if span is None:
            continue
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            first_device = span.start if first_device is None else min(first_device, span.start)
        else:
            host.append((span.start, -span.end, e.name))
    starts = [start for start, _, name in host if name == mark]
    if first_device is None or not starts or first_device <= min(starts):
        return {}
    t0 = min(starts)
    totals: dict[str, list] = {}
    reach = t0
    for start, neg_end, name in sorted(host):  # outermost first: by start, the longer of equal starts first
        end = -neg_end
        if name == mark or start < t0 or end > first_device or end <= reach:
            continue
        reach = end
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += end - start
    ops = sorted(((name, n, us) for name, (n, us) in totals.items()), key=lambda t: -t[2])[:top]
    return dict(lead_us=first_device - t0, ops=[dict(name=n, calls=c, us=us) for n, c, us in ops])


def _profile(ctx: Context) -> None:
    import statistics

    import kdops
    from bench.measure import free_memory, make_inputs, time_steps

    gpu = model_gpu(ctx.device)
    try:
        import bench.model  # noqa: F401
        model_reason = None
    except Exception as error:  # noqa: BLE001
        model_reason = f"{type(error).__name__}: {_first_line(error)}"
    cuda = torch.device(ctx.device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for divergence in DIVERGENCES:
        case = headline_case(divergence)
        inputs = make_inputs(case, ctx.device)
        for impl in ("fused", "chunked", "sliced"):
            ctx.line("")
            ctx.line(f"### {impl}, {divergence}")
            ctx.line("")
            if not ctx.fits(PROFILE_ITEM_S):
                ctx.line(f"Skipped: {ctx.left():.0f} s left.")
                ctx.mark("partial", "profiles skipped for time")
                continue

            def forward(impl=impl, divergence=divergence):
                return kdops.fused_linear_kd_loss(*inputs.args, divergence=divergence, impl=impl, backend="triton")

            steps = [forward, lambda loss: loss.backward()]
            time_steps(steps, ctx.device)  # compile and warm up
            samples = []
            for _ in range(PROFILE_REPS):
                inputs.clear_grads()
                samples.append(time_steps(steps, ctx.device))
            inputs.clear_grads()
            forward_ms = statistics.median(s[0] for s in samples)
            backward_ms = statistics.median(s[1] for s in samples)
            if cuda:
                # the GPU idle at the call (time_steps' head start left out): the host's lead before the first
                # kernel shows in the profile
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as profile:
                with torch.profiler.record_function(HOST_MARK):
                    loss = forward()
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
            del loss
            inputs.clear_grads()
            kernels = kernel_times(profile.events())
            total_us = sum(us for _, _, us in kernels) or float("nan")
            idle, lead = idle_gaps(profile.events()), host_lead(profile.events())
            ctx.record("profile", impl=impl, divergence=divergence, label=case.label, forward_ms=forward_ms,
                       backward_ms=backward_ms, gpu_ms=total_us / 1e3, idle=idle, host_lead=lead,
                       kernels=[dict(name=n, calls=c, ms=us / 1e3, share=us / total_us) for n, c, us in kernels])
            ctx.line(f"Measured (CUDA events after a head start, median of {PROFILE_REPS}): forward {forward_ms:.2f} "
                     f"ms, backward {backward_ms:.2f} ms; GPU time in the profiled forward + backward "
                     f"{total_us / 1e3:.2f} ms.")
            ctx.line("")
            shown = kernels[:12]
            rest = kernels[12:]
            rows = [[_short(n), c, us / 1e3, f"{100 * us / total_us:.1f} %"] for n, c, us in shown]
            if rest:
                rest_us = sum(us for _, _, us in rest)
                rows.append([f"({len(rest)} others)", sum(c for _, c, _ in rest), rest_us / 1e3,
                             f"{100 * rest_us / total_us:.1f} %"])
            ctx.table(["kernel", "calls", "CUDA ms", "share"], rows)
            ctx.line("")
            if idle:
                ctx.line(f"GPU idle {idle['idle_us'] / 1e3:.2f} ms of a {idle['span_us'] / 1e3:.2f} ms span "
                         f"({idle['gaps']} gaps); the longest:")
                ctx.line("")
                ctx.table(["gap µs", "after", "before", "host at its middle"],
                          [[g["us"], _short(g["after"], 40), _short(g["before"], 40), _short(g["host"], 40)]
                           for g in idle["longest"]])
                ctx.line("")
            if lead:
                ops = ", ".join(f"{_short(o['name'], 40)} ({o['calls']} × {o['us'] / o['calls']:.0f} µs)"
                                for o in lead["ops"])
                ctx.line(f"Host time before the GPU's first work: {lead['lead_us'] / 1e3:.2f} ms; its longest "
                         f"operations: {ops}.")
                ctx.line("")
            _prediction(ctx, impl, divergence, gpu, model_reason, forward_ms, backward_ms)
            ctx.flush()
        del inputs
        free_memory(ctx.device)


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _prediction(ctx: Context, impl, divergence, gpu, model_reason, forward_ms, backward_ms) -> None:
    if model_reason is not None:
        ctx.line(f"cost model unavailable ({model_reason})")
        return
    try:
        _model_table(ctx, impl, divergence, gpu, forward_ms, backward_ms)
    except Exception as error:  # noqa: BLE001 - the model is another module's: degrade, never fail the step
        ctx.line(f"cost model unavailable ({type(error).__name__}: {_first_line(error)})")


def _model_table(ctx: Context, impl, divergence, gpu, forward_ms, backward_ms) -> None:
    p = predict_headline(impl, divergence, gpu)
    ctx.record("prediction", impl=impl, divergence=divergence, gpu=getattr(gpu, "name", str(gpu)),
               forward_s=p.forward_s, backward_s=p.backward_s, total_s=p.total_s, floor_s=p.floor_s,
               ratio_to_floor=p.ratio_to_floor, extra_bytes=p.extra_bytes,
               phases=[dict(name=ph.name, flops=ph.flops, bytes=ph.bytes, seconds=ph.seconds, detail=ph.detail)
                       for ph in p.phases],
               measured_forward_s=forward_ms / 1e3, measured_backward_s=backward_ms / 1e3)
    measured = (forward_ms + backward_ms) / 1e3
    ctx.line(f"Cost model ({getattr(gpu, 'name', gpu)}): forward {p.forward_s * 1e3:.2f} ms, backward "
             f"{p.backward_s * 1e3:.2f} ms, total {p.total_s * 1e3:.2f} ms (floor {p.floor_s * 1e3:.2f} ms); "
             f"measured / predicted = {measured / p.total_s:.2f}.")
    ctx.line("")
    ctx.table(["phase", "GFLOP", "MiB moved", "predicted ms", "share", "detail"],
              [[ph.name, ph.flops / 1e9, ph.bytes / MiB, ph.seconds * 1e3, f"{100 * ph.seconds / p.total_s:.1f} %",
                ph.detail] for ph in p.phases])


# --- 6. tune -------------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def patched_fused_config(original, override: dict):
    """`original` (kdops._fused.fused_config(n_rows, vocab, gpu, ...)) with `override`'s entries, and the
    vocabulary split re-derived so that the forward launches as many programs as with kdops' own tiles.
    `override` may instead hold a "forward" and / or a "backward" dict: entries for that kernel alone."""
    def config(n_rows, vocab, gpu, *args, **kwargs):
        base = original(n_rows, vocab, gpu, *args, **kwargs)
        entries = override
        if "forward" in override or "backward" in override:
            entries = override.get("forward" if kwargs.get("forward") else "backward", {})
        if not entries:
            return base
        cfg = {**base, **entries}
        programs = _cdiv(vocab, base["split_size"]) * _cdiv(n_rows, base["BLOCK_N"])
        splits = max(1, programs // _cdiv(n_rows, cfg["BLOCK_N"]))
        cfg["split_size"] = _cdiv(_cdiv(vocab, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
        return cfg
    return config


def patched_logits_config(original, override: dict):
    """`original` (kdops._launch.logits_config(n_rows, vocab, gpu, ...)) with `override`'s entries."""
    def config(n_rows, vocab, gpu, *args, **kwargs):
        return {**original(n_rows, vocab, gpu, *args, **kwargs), **override}
    return config


def time_trial(steps, inputs, device, reps: int) -> tuple[float, float, float, float]:
    """(forward, backward, total) median ms and the loss, after one untimed run (the compile)."""
    import statistics

    from bench.measure import time_steps

    inputs.clear_grads()
    value = steps[0]()
    steps[1](value)
    loss = float(value.detach())
    del value
    samples = []
    for _ in range(reps):
        inputs.clear_grads()
        samples.append(time_steps(steps, device))
    inputs.clear_grads()
    return (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples),
            statistics.median(s[0] + s[1] for s in samples), loss)


def tune(ctx: Context, target: str, module, attribute: str, patch, trials, case, loss_fn, trial_s: float,
         reps: int = TUNE_REPS) -> list[dict]:
    """Time `loss_fn` forward + backward on `case` with `module.attribute` patched by each of `trials`;
    record every trial (a failure to compile or run is a "failed" trial; a loss that differs from the first
    trial's by more than 1e-3 is "wrong") and return the records."""
    from bench.measure import free_memory, make_inputs

    original = getattr(module, attribute)
    inputs = make_inputs(case, ctx.device)
    steps = [lambda: loss_fn(*inputs.args), lambda loss: loss.backward()]
    rows, reference_loss = [], None
    try:
        for i, override in enumerate(trials):
            if not ctx.fits(trial_s):
                ctx.line(f"{target}: {len(trials) - i} configuration(s) skipped, {ctx.left():.0f} s left")
                ctx.mark("partial", "configurations skipped for time")
                break
            chosen, used = patch(original, override), []

            def spy(*args, chosen=chosen, used=used, **kwargs):  # what the launchers are given
                config = chosen(*args, **kwargs)
                used.append(dict(config))
                return config

            row = dict(target=target, label=case.label, trial=i, default=not override, config=dict(override),
                       status="ok", message="", forward_ms=None, backward_ms=None, total_ms=None, loss=None)
            setattr(module, attribute, spy)
            try:
                row["forward_ms"], row["backward_ms"], row["total_ms"], row["loss"] = time_trial(
                    steps, inputs, ctx.device, reps)
            except Exception as error:  # noqa: BLE001 - compile errors, shared memory or registers exhausted
                row["status"], row["message"] = "failed", f"{type(error).__name__}: {_first_line(error)}"
            finally:
                setattr(module, attribute, original)
                inputs.clear_grads()
            row["config"] = used[0] if used else row["config"]
            if row["status"] == "ok":
                if reference_loss is None:
                    reference_loss = row["loss"]
                elif not (math.isfinite(row["loss"])
                          and abs(row["loss"] - reference_loss) <= 1e-3 * max(abs(reference_loss), 1e-12)):
                    row["status"], row["message"] = "wrong", f"loss {row['loss']:.6g} vs {reference_loss:.6g}"
            if row["status"] == "failed":
                free_memory(ctx.device)
            ctx.record("tune", **row)
            rows.append(row)
    finally:
        setattr(module, attribute, original)
        del inputs
        free_memory(ctx.device)
    ok = [r for r in rows if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["total_ms"]) if ok else None
    default = next((r for r in ok if r["default"]), None)
    if best is not None:
        ctx.record("tune_best", target=target, label=case.label, config=best["config"], total_ms=best["total_ms"],
                   default_total_ms=default["total_ms"] if default else None, trial=best["trial"])
    ctx.line("")
    ctx.line(f"**{target}** (`{module.__name__}.{attribute}`) at {case.label}, forward + backward, median of {reps}:")
    ctx.line("")
    ctx.table(["trial", "config", "status", "fwd ms", "bwd ms", "total ms", "× default"],
              [[("default" if r["default"] else str(r["trial"])) + (" **fastest**" if r is best else ""),
                _config_text(r["config"]), r["status"] + (f": {r['message']}" if r["message"] else ""),
                r["forward_ms"], r["backward_ms"], r["total_ms"],
                (r["total_ms"] / default["total_ms"]) if default and r["total_ms"] else None] for r in rows])
    if rows and not ok:
        ctx.mark("failed", f"no {target} configuration ran")
    return rows


def _config_text(config: dict) -> str:
    short = {"BLOCK_N": "N", "BLOCK_V": "V", "BLOCK_H": "H", "BLOCK_R": "R", "num_warps": "w", "num_stages": "s",
             "split_size": "split"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in config.items())


def _tune(ctx: Context) -> None:
    import kdops
    import kdops._fused
    import kdops._launch
    from bench.cases import FUSED, KD_LOSS, Case

    # The kernels on logits first: they are what stands between the chunked impl and the matmul floor.
    tokens, vocab = TUNE_LOGITS_SHAPE
    for divergence, dtype in TUNE_LOGITS_CASES:
        logits_case = Case(KD_LOSS, divergence, tokens, vocab, dtype=dtype)
        tune(ctx, "logits", kdops._launch, "logits_config", patched_logits_config, LOGITS_TRIALS, logits_case,
             lambda *a, divergence=divergence: kdops.kd_loss(*a, divergence=divergence, backend="triton"),
             TUNE_LOGITS_TRIAL_S)
        ctx.flush()
    tokens, vocab, hs, ht = TUNE_FUSED_SHAPE
    fused_case = Case(FUSED, "forward_kl", tokens, vocab, hs, ht, "bfloat16")
    tune(ctx, "fused", kdops._fused, "fused_config", patched_fused_config, FUSED_TRIALS, fused_case,
         lambda *a: kdops.fused_linear_kd_loss(*a, divergence="forward_kl", impl="fused", backend="triton"),
         TUNE_FUSED_TRIAL_S)
    ctx.flush()
    ctx.line("")
    ctx.line("`logits_config` also serves the chunked impl of fused_linear_kd_loss (its kernels run on float32 "
             "logit chunks).")


def _tune_fused_at_headline(ctx: Context, cases) -> None:
    """`tune` of kdops._fused.fused_config at the headline shape, bf16, for each (divergence, loss options,
    trials) of `cases`."""
    import kdops
    import kdops._fused
    from bench.cases import FUSED, Case

    for divergence, options, trials in cases:
        case = Case(FUSED, divergence, HEADLINE_TOKENS, HEADLINE_VOCAB, HEADLINE_HIDDEN, HEADLINE_HIDDEN, "bfloat16")
        target = " ".join(["fused", *(f"{k}={v}" for k, v in options.items())])
        tune(ctx, target, kdops._fused, "fused_config", patched_fused_config, trials, case,
             lambda *a, divergence=divergence, options=options: kdops.fused_linear_kd_loss(
                 *a, divergence=divergence, impl="fused", backend="triton", **options),
             TUNE_HEADLINE_TRIAL_S, reps=3)
        ctx.flush()


def _tune_headline(ctx: Context) -> None:
    _tune_fused_at_headline(ctx, [(divergence, {}, HEADLINE_FUSED_TRIALS) for divergence in DIVERGENCES])


def _tune_kinds(ctx: Context) -> None:
    _tune_fused_at_headline(ctx, KINDS_FUSED_TRIALS)


# --- a probe, for the tests of the process machinery ---------------------------------------------------------

def _probe(ctx: Context) -> None:
    """Writes a record and a line, then sleeps KDOPS_CAMPAIGN_PROBE_S seconds (tests of the time limits)."""
    ctx.record("probe", value=1)
    ctx.line("probe started")
    ctx.flush()
    time.sleep(float(os.environ.get("KDOPS_CAMPAIGN_PROBE_S", "0")))
    ctx.line("probe finished")


# --- the steps -----------------------------------------------------------------------------------------------

def _headline_plan() -> tuple[str, ...]:
    return (f"bench.sweep.run_sweep([Case(FUSED, D, {HEADLINE_TOKENS}, {HEADLINE_VOCAB}, {HEADLINE_HIDDEN}, "
            f"{HEADLINE_HIDDEN}, 'bfloat16')]) for D in {', '.join(DIVERGENCES)}; {HEADLINE_REPS} reps after "
            f"{HEADLINE_WARMUP} warm-ups",
            "competitors: " + ", ".join(HEADLINE_COMPETITORS),
            "records also to <output>/<device>.jsonl; charts with bench.plot into charts-<device>/")


# The estimates follow the H100 runs (bench/results/nvidia-h100-campaign: smoke 52–72 s, fused_check 18–22 s,
# headline 79–94 s, profile 25–32 s, tune 51 s): a step is run only where its estimate fits what is left, so a
# stale, high estimate skips it (the headline of the 0.3.3 run was skipped so). The smoke run holds 6 more tests
# since (float64 kernels, near-identical JSD): 95 s.
STEPS = {step.name: step for step in (
    Step("smoke", "CUDA smoke run of the kernel tests", 95.0,
         (shlex.join(["python", *smoke_command()]),
          "the tests listed in tests/conftest.py GPU_SMOKE; stopped at its time"),
         _smoke),
    Step("fused_check", "fused_linear_kd_loss at a real size against the float32 reference", 40.0,
         ("bench.fused_check.main(['--tokens', N, '--divergence', D, '--output', ...]) for D in "
          + ", ".join(DIVERGENCES) + f"; N = {FUSED_CHECK_TOKENS[0]} (again at {FUSED_CHECK_TOKENS[1]} on out of "
          "memory); Hs 2048, Ht 4096, V 151936, bf16",
          "records to <output>/fused-check-<device>.jsonl"),
         _fused_check, (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),)),
    Step("memory", "kd_loss peak memory at 8192 × 128256, bf16", 35.0,
         ("bench.memory_target.main(['--output', '<output>/MEMORY-<device>.md'])",),
         _memory, (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),)),
    Step("headline", "the headline table: kdops against the floor, the reference, Liger-Kernel and TRL", 120.0,
         _headline_plan(), _headline),
    Step("profile", "torch.profiler per kernel of kdops' fused and chunked impls, next to the cost model", 35.0,
         ("torch.profiler over one forward + backward of kdops.fused_linear_kd_loss(impl='fused' | 'chunked') at "
          "the headline shape, per divergence; CUDA time and share per kernel",
          "bench.model.predict(impl, Shape(8192, 4096, 4096, 128256), gpu=..., divergence=D, dtype=bf16) per phase"),
         _profile),
    Step("tune", "block sizes: a handful of alternatives to kdops' own choice", 100.0,
         (f"kdops._fused.fused_config: {len(FUSED_TRIALS)} configurations (the default first) at fused "
          "{} × V {} × Hs {} × Ht {}, bf16".format(*TUNE_FUSED_SHAPE),
          f"kdops._launch.logits_config: {len(LOGITS_TRIALS)} configurations at kd_loss {TUNE_LOGITS_SHAPE[0]} × "
          f"{TUNE_LOGITS_SHAPE[1]}, " + ", ".join(f"{d} {t}" for d, t in TUNE_LOGITS_CASES)
          + f"; forward + backward, {TUNE_REPS} reps; the fastest recorded"),
         _tune),
    Step("tune_headline", "the fused tiles at the headline shape, both divergences (not a default step)",
         2 * len(HEADLINE_FUSED_TRIALS) * HEADLINE_TRIAL_ESTIMATE_S,
         (f"kdops._fused.fused_config: {len(HEADLINE_FUSED_TRIALS)} configurations (the default first) at fused "
          f"{HEADLINE_TOKENS} × V {HEADLINE_VOCAB} × Hs {HEADLINE_HIDDEN} × Ht {HEADLINE_HIDDEN}, bf16, "
          f"{' and '.join(DIVERGENCES)}; forward + backward, 3 reps",),
         _tune_headline),
    Step("tune_kinds", "the fused tiles of the other kinds and the hard-label term at the headline shape "
         "(not a default step)", sum(len(trials) for _, _, trials in KINDS_FUSED_TRIALS) * HEADLINE_TRIAL_ESTIMATE_S,
         (f"kdops._fused.fused_config at fused {HEADLINE_TOKENS} × V {HEADLINE_VOCAB} × Hs {HEADLINE_HIDDEN} × Ht "
          f"{HEADLINE_HIDDEN}, bf16: " + "; ".join(f"{d} {o or ''} {len(t)} configurations" for d, o, t in
                                                   KINDS_FUSED_TRIALS) + "; forward + backward, 3 reps",),
         _tune_kinds),
    Step("probe", "a probe of the step machinery (tests only)", 3.0, ("sleeps KDOPS_CAMPAIGN_PROBE_S seconds",),
         _probe),
)}
DEFAULT_STEPS = ("smoke", "fused_check", "memory", "headline", "profile", "tune")


# --- plan, report, command line ------------------------------------------------------------------------------

def simulate(steps, seconds: float, reserve: float | None = None) -> tuple[list[StepResult], Budget]:
    """The plan: `run_steps` on a clock that advances by each step's estimate."""
    now = [0.0]
    budget = Budget(seconds, reserve, clock=lambda: now[0], start=0.0)

    def execute(step: Step, limit: float) -> StepResult:
        now[0] += step.estimate_s
        return StepResult(step.name, "planned", f"at most {limit:.0f} s")

    return run_steps(steps, budget, execute, out=io.StringIO()), budget


def plan_lines(steps, results: list[StepResult], budget: Budget) -> list[str]:
    lines = [f"Plan for {budget.seconds:.0f} s ({budget.seconds / 60:g} min; {budget.reserve:.0f} s kept for the "
             "report), each step in its own process:", ""]
    for i, (step, result) in enumerate(zip(steps, results), 1):
        fits = "would be skipped: " + result.message if result.status == "skipped" else result.message
        lines.append(f"{i}. **{step.name}** — {step.title}: ~{step.estimate_s:.0f} s ({fits})")
        lines += [f"   - {text}" for text in step.plan]
    total = sum(s.estimate_s for s in steps)
    lines += ["", f"Estimated total {total:.0f} s of {budget.seconds - budget.reserve:.0f} s."]
    return lines


def render_report(meta: dict, steps, results: list[StepResult], budget: Budget) -> str:
    versions = ", ".join(f"{name} {meta.get(key) or 'not installed'}" for name, key in
                         (("torch", "torch"), ("triton", "triton"), ("liger-kernel", "liger_kernel"), ("trl", "trl")))
    lines = [f"# kdops GPU campaign: {meta['device']}", "",
             f"`{meta['command']}` · commit `{str(meta['commit'])[:10]}`{' (dirty)' if meta.get('dirty') else ''} · "
             f"{versions} · started {meta['timestamp']}.", "",
             f"Budget {budget.seconds:.0f} s, used {budget.elapsed():.0f} s. Every measurement is in "
             f"`campaign-{meta['device_slug']}.jsonl`.", "",
             "| # | step | status | seconds | estimate | note |", "|---|---|---|---|---|---|"]
    for i, (step, r) in enumerate(zip(steps, results), 1):
        seconds = "-" if r.seconds is None else f"{r.seconds:.0f}"
        lines.append(f"| {i} | {step.name} | {r.status} | {seconds} | {step.estimate_s:.0f} | "
                     f"{_cell(r.message or '')} |")
    for i, (step, r) in enumerate(zip(steps, results), 1):
        lines += ["", f"## {i}. {step.name}: {step.title}", ""]
        if r.status == "skipped":
            lines.append(f"Skipped: {r.message}.")
            continue
        if r.status != "ok":
            lines += [f"**{r.status}**" + (f": {r.message}" if r.message else ""), ""]
        lines += list(r.lines)
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"the whole campaign's time budget (default {DEFAULT_MINUTES:g})")
    parser.add_argument("--output", help="results folder (default: bench/results)")
    parser.add_argument("--steps", nargs="+", metavar="NAME",
                        help="only these steps, in the campaign's order: " + ", ".join(DEFAULT_STEPS))
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the cost model's predictions; write nothing unless --output")
    for hidden in ("--child", "--meta", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    return parser


def child_main(args) -> int:
    meta = json.loads(Path(args.meta).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = Context(args.child, args.output, meta, args.seconds or 600.0, result_path=args.result, device=device)
    ctx.flush()
    try:
        STEPS[args.child].body(ctx)
    except Exception as error:  # noqa: BLE001
        ctx.fail(error)
    ctx.flush()
    return 1 if ctx.result.status == "error" else 0


def main(argv=None) -> int:
    from_command = argv is None  # then the budget counts from this process's start
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    names = args.steps or DEFAULT_STEPS
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(DEFAULT_STEPS)}")
    steps = [STEPS[n] for n in sorted(names, key=lambda n: list(STEPS).index(n))]
    seconds = 60.0 * args.minutes
    if args.dry_run:
        results, budget = simulate(steps, seconds)
        lines = ["# kdops GPU campaign: dry run", "", *plan_lines(steps, results, budget), "",
                 *prediction_lines(model_gpu())]
        print("\n".join(lines))
        if args.output:
            path = Path(args.output) / "campaign-plan.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
            print(f"wrote {path}")
        return 0
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("python -m bench.campaign needs a CUDA device; `--dry-run` prints its plan anywhere", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = Budget(seconds, start=_STARTED if from_command else None)
    output = Path(args.output).resolve() if args.output else RESULTS_DIR
    output.mkdir(parents=True, exist_ok=True)
    meta = campaign_metadata(device, argv)
    print(f"# kdops GPU campaign on {meta['device']}: {', '.join(s.name for s in steps)} in {seconds:.0f} s; "
          f"commit {str(meta['commit'])[:10]}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdops-campaign-") as tmp:
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta))
        results = run_steps(steps, budget, execute_in_child(output, meta_path, Path(tmp)))
    report = output / f"campaign-{meta['device_slug']}.md"
    report.write_text(render_report(meta, steps, results, budget))
    print(f"# wrote {report} and {output / ('campaign-' + meta['device_slug'] + '.jsonl')} "
          f"({budget.elapsed():.0f} s of {seconds:.0f} s)")
    return 1 if any(r.status in ("failed", "error", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
