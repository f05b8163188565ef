"""Timing and peak memory of the competitors on one case.

Per repetition, after `warmup` untimed runs: forward (autograd on), then backward, each timed on its own
(CUDA events on a GPU, `time.perf_counter` on the CPU); total = forward + backward of the same repetition,
unless the competitor times a single fused pass for it (the floor of `kd_loss`). Reported: the median and
the spread IQR = q75 − q25 of each phase. On a GPU each repetition starts from a GPU kept busy for a few
milliseconds (`time_steps`: the host's work before the first kernel overlaps it, as in a training step). A
case's competitors take turns (`measure_in_turn`: each one's first repetition, then each one's second, ...),
so that their ratios do not depend on which of them ran while the GPU was cooler.

Memory, in one more untimed forward + backward: `peak` = the most bytes live at once beyond the inputs
(`torch.cuda.max_memory_allocated` − bytes allocated before the call on CUDA; `bench.memory.AllocationTracker`
on the CPU). The gradients are part of that peak, so `extra = peak − grad_bytes` is what the loss costs
beyond its inputs and the gradients it must return.

Out of memory (torch.OutOfMemoryError, or a RuntimeError saying so) → status "oom"; any other exception →
status "error" with its message; either way the sweep goes on.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .cases import FUSED, FUSED_TOPK, SPARSE, Case
from .memory import AllocationTracker

PHASES = ("forward", "backward", "total")
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)
OOM_MESSAGES = ("out of memory", "can't allocate memory")


@dataclass
class Inputs:
    """Positional arguments of the loss (logits or hidden/weight pairs, then labels) and the student's
    tensors that require grad. The teacher is frozen."""

    args: tuple
    trainable: tuple

    @property
    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args if isinstance(t, torch.Tensor))

    def grad_bytes(self) -> int:
        return sum(t.grad.numel() * t.grad.element_size() for t in self.trainable if t.grad is not None)

    def clear_grads(self) -> None:
        for t in self.trainable:
            t.grad = None


def make_inputs(case: Case, device) -> Inputs:
    """Fresh random inputs: logits randn·4; hidden states randn, weights randn/√H; labels all valid; a sparse
    teacher's (ids, log-probabilities) after the student's tensors."""
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=case.torch_dtype).mul_(scale)

    labels = torch.randint(0, case.vocab, (case.tokens,), device=device)
    if case.function in SPARSE:
        # the teacher's top-k of a randn·4 distribution, as a dataset stores it (float32 log-probabilities)
        teacher = torch.randn(case.tokens, case.vocab, device=device).mul_(4.0)
        logprobs, ids = torch.log_softmax(teacher, -1).topk(case.k, dim=-1)
        del teacher
        if case.function == FUSED_TOPK:
            hs = case.hidden_student
            student = (randn(case.tokens, hs), randn(case.vocab, hs, scale=hs ** -0.5))
        else:
            student = (randn(case.tokens, case.vocab, scale=4.0),)
        args = (*student, ids, logprobs, labels)
    elif case.function == FUSED:
        hs, ht = case.hidden_student, case.hidden_teacher
        student = (randn(case.tokens, hs), randn(case.vocab, hs, scale=hs ** -0.5))
        teacher = (randn(case.tokens, ht), randn(case.vocab, ht, scale=ht ** -0.5))
        args = (*student, *teacher, labels)
    else:
        student = (randn(case.tokens, case.vocab, scale=4.0),)
        args = (student[0], randn(case.tokens, case.vocab, scale=4.0), labels)
    for t in student:
        t.requires_grad_(True)
    return Inputs(args, student)


@dataclass
class Phases:
    """What a competitor runs: forward() → state, backward(state). `total`, when given, is a single pass
    timed as the total instead of forward then backward. `loss` marks a loss whose memory is measured; `detail`
    says how it was built where that varies (the floor's variant), and goes into its Result."""

    forward: Callable[[], Any]
    backward: Callable[[Any], Any]
    total: Callable[[], Any] | None = None
    loss: bool = False
    detail: str = ""

    @classmethod
    def of_loss(cls, loss_fn: Callable[[], torch.Tensor]) -> "Phases":
        return cls(loss_fn, lambda loss: loss.backward(), loss=True)


@dataclass
class Result:
    """Status ("ok", "oom", "error", "skipped"), `message` for the others; figures in ms and bytes."""

    competitor: str
    status: str = "ok"
    message: str = ""
    median_ms: dict = field(default_factory=dict)  # phase → median
    iqr_ms: dict = field(default_factory=dict)  # phase → q75 − q25
    peak_bytes: int | None = None
    grad_bytes: int | None = None
    input_bytes: int | None = None
    loss: float | None = None
    detail: str = ""  # the Phases' detail

    @property
    def extra_bytes(self) -> int | None:
        """Peak memory beyond the inputs and the gradients: peak − grad_bytes."""
        return None if self.peak_bytes is None else self.peak_bytes - self.grad_bytes


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _mark(cuda: bool):
    """A point in time: a recorded CUDA event on the GPU's stream, else perf_counter seconds."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


#: GPU clock cycles of the wait `time_steps` queues before its first mark (`torch.cuda._sleep`): 5 to 6 ms at an
#: H100's clocks, more than any competitor's host work before its first kernel.
HEAD_START_CYCLES = 10_000_000


def time_steps(steps, device) -> list[float]:
    """Milliseconds of each step, run back to back; each step receives the previous step's return value.

    On a GPU the steps start with a head start: the device idle (synchronized), then a wait of
    HEAD_START_CYCLES queued ahead of the first mark, during which the host runs the first step's Python and
    queues its first kernels. So the marks time the device's work as a training step sees it, where the loss's
    host work overlaps the model's forward still running on the GPU, instead of adding the host's lead before the
    first kernel to whoever has the most Python before it; host-bound stretches later in a step still count."""
    cuda = torch.device(device).type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda._sleep(HEAD_START_CYCLES)
    marks, value = [_mark(cuda)], None
    for i, step in enumerate(steps):
        value = step() if i == 0 else step(value)
        marks.append(_mark(cuda))
    _sync(device)
    if cuda:
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def median_iqr(samples) -> tuple[float, float]:
    q25, q50, q75 = np.percentile(np.asarray(samples, dtype=float), [25, 50, 75])
    return float(q50), float(q75 - q25)


def _one_rep(phases: Phases, inputs: Inputs, device) -> tuple[float, float, float]:
    """(forward, backward, total) milliseconds of one repetition, from cleared gradients."""
    inputs.clear_grads()
    forward, backward = time_steps([phases.forward, phases.backward], device)
    total = time_steps([phases.total], device)[0] if phases.total else forward + backward
    return forward, backward, total


def _empty_samples() -> dict[str, list[float]]:
    return {p: [] for p in PHASES}


def _add_sample(samples: dict[str, list[float]], values) -> None:
    for phase, ms in zip(PHASES, values):
        samples[phase].append(ms)


def _peak_memory(phases: Phases, inputs: Inputs, device) -> tuple[int, float]:
    """(peak bytes beyond the inputs, loss value) of one forward + backward."""
    inputs.clear_grads()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = phases.forward()
        phases.backward(loss)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, float(loss.detach())
    with AllocationTracker() as tracker:
        loss = phases.forward()
        phases.backward(loss)
    return tracker.peak, float(loss.detach())


def is_oom(error: BaseException) -> bool:
    return isinstance(error, OOM_ERRORS) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES))


def free_memory(device) -> None:
    """Collect what the last competitor left, so the next one's peak starts from its inputs. On CUDA a full
    collection, then the caching allocator's cache emptied; on the CPU the young generations only: there the peak
    is the AllocationTracker's, which counts what a call allocates whatever garbage is pending, and a full
    collection of a process that has imported transformers and TRL costs a third of a second each time."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    else:
        gc.collect(1)


def failure(name: str, error: BaseException) -> Result:
    """The Result of a run that raised: "oom", or "error" with the exception's first line."""
    if is_oom(error):
        return Result(name, "oom", "out of memory")
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return Result(name, "error", f"{type(error).__name__}: {first_line}")


def _result(name: str, phases: Phases, samples: dict[str, list[float]], inputs: Inputs, device) -> Result:
    """The Result of timed samples: medians and spreads, and for a loss its peak memory and value."""
    result = Result(name, input_bytes=inputs.input_bytes, detail=phases.detail)
    for phase, values in samples.items():
        result.median_ms[phase], result.iqr_ms[phase] = median_iqr(values)
    if phases.loss:
        result.peak_bytes, result.loss = _peak_memory(phases, inputs, device)
        result.grad_bytes = inputs.grad_bytes()
        if not math.isfinite(result.loss):
            result.message, result.loss = f"loss is {result.loss}", None
    return result


def measure_in_turn(builds: list[tuple[str, Callable[[], Phases]]], inputs: Inputs, device, reps: int,
                    warmup: int) -> list[Result]:
    """Time each competitor's phases (`build()`) and, for a loss, its peak memory, the competitors taking turns
    on the same inputs: every one's first repetition, then every one's second, and so on (warm-ups the same
    way, which also lets the caching allocator's pool settle on what all of them allocate), so that a drift of
    the device's speed during the run (a GPU's clocks as it heats) weighs on all of them alike instead of on
    whoever runs last. A competitor that fails (out of memory or any exception) gets an
    "oom" / "error" Result and leaves the turns; the others go on. Results in the order of `builds`."""
    results: dict[str, Result] = {}
    running: dict[str, tuple[Phases, dict]] = {}
    for name, build in builds:
        try:
            running[name] = (build(), _empty_samples())
        except Exception as error:  # noqa: BLE001 - a competitor that cannot be built is a record
            results[name] = failure(name, error)
    for rep in range(warmup + reps):
        for name in list(running):
            phases, samples = running[name]
            try:
                values = _one_rep(phases, inputs, device)
            except Exception as error:  # noqa: BLE001
                results[name], values = failure(name, error), None
                del running[name]
            if values is None:
                inputs.clear_grads()
                free_memory(device)  # after the except block: its traceback no longer holds the tensors
            elif rep >= warmup:
                _add_sample(samples, values)
    for name, (phases, samples) in running.items():
        try:
            results[name] = _result(name, phases, samples, inputs, device)
        except Exception as error:  # noqa: BLE001
            results[name] = failure(name, error)
        inputs.clear_grads()
        free_memory(device)
    return [results[name] for name, _ in builds]
