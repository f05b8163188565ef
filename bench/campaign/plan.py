"""The plan: every step in the campaign's order, the default ones, the default budget, and the plan of a budget
(`simulate`: the runner on a clock that advances by each step's estimate) as the dry run prints it."""

from __future__ import annotations

import io

from .fronts import FRONTS
from .fused_check import FUSED_CHECK
from .headline import HEADLINE
from .memory import MEMORY
from .probe import PROBE
from .profile import PROFILE
from .runner import Budget, Step, StepResult, run_steps
from .smoke import SMOKE
from .trainer_step import TRAINER_STEP
from .tune import TUNE
from .tune_headline import TUNE_HEADLINE, TUNE_KINDS

#: Nine minutes of steps: with a GPU machine's start-up, the whole campaign fits 15 minutes.
DEFAULT_MINUTES = 9.0
# The estimates follow the H100 runs (bench/results/nvidia-h100-80gb-hbm3; each step's module says what they
# measured, and which are not measured yet): a step runs only where its estimate fits what is left, so a stale,
# high estimate skips it (the headline of the 0.3.3 run was skipped so).
STEPS = {step.name: step for step in (SMOKE, FUSED_CHECK, MEMORY, HEADLINE, FRONTS, TRAINER_STEP, PROFILE, TUNE,
                                      TUNE_HEADLINE, TUNE_KINDS, PROBE)}
# The headline measured as a user compares: the kernels' numerics on the GPU first, then every competitor at every
# memory point beside the true floor (`fronts`), then a whole training step. The others (the headline table with
# the PyTorch reference, memory, profile, tuning) run when named with --steps.
DEFAULT_STEPS = ("smoke", "fronts", "trainer_step")


def steps_in_order(names) -> list[Step]:
    """The steps of `names` (known ones) in the campaign's order."""
    return [STEPS[n] for n in sorted(names, key=lambda n: list(STEPS).index(n))]


def simulate(steps, seconds: float, reserve: float | None = None) -> tuple[list[StepResult], Budget]:
    """The plan: `run_steps` on a clock that advances by each step's estimate."""
    now = [0.0]
    budget = Budget(seconds, reserve, clock=lambda: now[0], start=0.0)

    def execute(step: Step, limit: float) -> StepResult:
        now[0] += step.estimate_s
        return StepResult(step.name, "planned", f"at most {limit:.0f} s")

    return run_steps(steps, budget, execute, out=io.StringIO()), budget


def plan_lines(steps, results: list[StepResult], budget: Budget) -> list[str]:
    """The plan in markdown: each step, what it runs, its estimate and whether it fits; the total."""
    lines = [f"Plan for {budget.seconds:.0f} s ({budget.seconds / 60:g} min; {budget.reserve:.0f} s kept for the "
             "report), each step in its own process:", ""]
    for i, (step, result) in enumerate(zip(steps, results), 1):
        fits = "would be skipped: " + result.message if result.status == "skipped" else result.message
        lines.append(f"{i}. **{step.name}** — {step.title}: ~{step.estimate_s:.0f} s ({fits})")
        lines += [f"   - {text}" for text in step.plan]
        if step.details is not None:
            lines += ["", "   ```", *(f"   {text}" for text in step.details()), "   ```", ""]
    total = sum(s.estimate_s for s in steps)
    lines += ["", f"Estimated total {total:.0f} s of {budget.seconds - budget.reserve:.0f} s."]
    return lines
