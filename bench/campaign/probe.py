"""The probe step, for the tests of the process machinery (`--steps probe`): a record, a line, then a sleep."""

from __future__ import annotations

import os
import time

from .runner import Context, Step


def run_probe(ctx: Context) -> None:
    """Writes a record and a line, then sleeps KDOPS_CAMPAIGN_PROBE_S seconds (tests of the time limits)."""
    ctx.record("probe", value=1)
    ctx.line("probe started")
    ctx.flush()
    time.sleep(float(os.environ.get("KDOPS_CAMPAIGN_PROBE_S", "0")))
    ctx.line("probe finished")


# Estimated at 1 s (it takes milliseconds unless told to sleep): the tests give a campaign seconds, of which a loaded
# machine's interpreter start-up can take five, and the step must still fit what is left.
PROBE = Step("probe", "a probe of the step machinery (tests only)", 1.0, ("sleeps KDOPS_CAMPAIGN_PROBE_S seconds",),
             run_probe)
