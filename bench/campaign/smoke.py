"""The smoke step: `python -m pytest -m gpu_smoke`, the kernel tests listed in tests/conftest.py (GPU_SMOKE), on
CUDA; its summary line and counts recorded, its last lines in the report when it fails."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time

from .runner import REPO, Context, Step

SMOKE_COMMAND = ("-m", "pytest", "-m", "gpu_smoke", "-q", "-x", "-p", "no:cacheprovider")
# 52–72 s on an H100 (bench/results/nvidia-h100-80gb-hbm3); 6 more tests since (float64 kernels, near-identical
# JSD): 95 s.
SMOKE_S = 95.0
SHOWN_LINES = 40  # of a failing run's output, in the report


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
    """The smoke run's arguments to `python`."""
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
    """A timed-out run's captured output as text."""
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_smoke(ctx: Context) -> None:
    """The smoke run, stopped at the step's time: its summary (and its output's tail when it fails)."""
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
        for line in output.rstrip().splitlines()[-SHOWN_LINES:]:
            ctx.line(line)
        ctx.line("```")


SMOKE = Step("smoke", "CUDA smoke run of the kernel tests", SMOKE_S,
             (shlex.join(["python", *smoke_command()]),
              "the tests listed in tests/conftest.py GPU_SMOKE; stopped at its time"),
             run_smoke)
