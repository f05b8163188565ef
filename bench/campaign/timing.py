"""Forward + backward timed on CUDA events (`bench.measure.time_steps`), the medians of several repetitions."""

from __future__ import annotations

import statistics


def median_ms(steps, inputs, device, reps: int) -> tuple[float, float, float]:
    """The median forward, backward and total ms of `reps` runs of `steps` ([forward, backward]), the gradients
    cleared before each and after the last."""
    from bench.measure import time_steps

    samples = []
    for _ in range(reps):
        inputs.clear_grads()
        samples.append(time_steps(steps, device))
    inputs.clear_grads()
    return (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples),
            statistics.median(s[0] + s[1] for s in samples))


def time_trial(steps, inputs, device, reps: int) -> tuple[float, float, float, float]:
    """(forward, backward, total) median ms and the loss, after one untimed run (the compile)."""
    inputs.clear_grads()
    value = steps[0]()
    steps[1](value)
    loss = float(value.detach())
    del value
    return (*median_ms(steps, inputs, device, reps), loss)
