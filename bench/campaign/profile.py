"""The profile step: torch.profiler, per kernel, over one forward + backward of kdops' fused, chunked and sliced
impls at the headline shape — CUDA-event times, the kernels' share, the GPU's idle gaps and the host's lead —
next to the cost model's per-phase prediction (`bench.model`)."""

from __future__ import annotations

import torch

from .headline import DIVERGENCES, headline_case
from .markdown import error_text, short
from .predictions import model_gpu, predict_headline
from .runner import Context, Step
from .timeline import HOST_MARK, host_lead, idle_gaps, kernel_times
from .timing import median_ms

# impl="epilogue" (experimental) where it runs (`kdops.launchers.epilogue.unavailable`): its one-read kernel's time
# beside the chunked path's two passes is what decides its targets.
PROFILE_IMPLS = ("fused", "chunked", "sliced", "epilogue")
PROFILE_ITEM_S = 8.0
PROFILE_REPS = 3
# 25–32 s on an H100 for the three Triton impls (bench/results/nvidia-h100-80gb-hbm3); the epilogue path's two
# items and its GEMMs' CuTe DSL compiles not measured yet
PROFILE_S = 60.0
SHOWN_KERNELS = 12  # the longest; the others summed in one row
MiB = 2**20


def cost_model_missing() -> str | None:
    """Why bench.model cannot be imported, or None where it can."""
    try:
        import bench.model  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return error_text(error)
    return None


def profiled_events(forward, inputs, cuda: bool):
    """The events of a torch.profiler profile of one `forward()` and its backward, from an idle GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
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
    return profile.events()


def kernel_rows(kernels, total_us: float) -> list[list]:
    """The longest SHOWN_KERNELS kernels (name, calls, ms, share), the others in one row."""
    rows = [[short(n), c, us / 1e3, f"{100 * us / total_us:.1f} %"] for n, c, us in kernels[:SHOWN_KERNELS]]
    rest = kernels[SHOWN_KERNELS:]
    if rest:
        rest_us = sum(us for _, _, us in rest)
        rows.append([f"({len(rest)} others)", sum(c for _, c, _ in rest), rest_us / 1e3,
                     f"{100 * rest_us / total_us:.1f} %"])
    return rows


def report_waits(ctx: Context, idle: dict, lead: dict) -> None:
    """The GPU's longest idle gaps and the host's time before the GPU's first work, where the profile has them."""
    if idle:
        ctx.line(f"GPU idle {idle['idle_us'] / 1e3:.2f} ms of a {idle['span_us'] / 1e3:.2f} ms span "
                 f"({idle['gaps']} gaps); the longest:")
        ctx.line("")
        ctx.table(["gap µs", "after", "before", "host at its middle"],
                  [[g["us"], short(g["after"], 40), short(g["before"], 40), short(g["host"], 40)]
                   for g in idle["longest"]])
        ctx.line("")
    if lead:
        ops = ", ".join(f"{short(o['name'], 40)} ({o['calls']} × {o['us'] / o['calls']:.0f} µs)" for o in lead["ops"])
        ctx.line(f"Host time before the GPU's first work: {lead['lead_us'] / 1e3:.2f} ms; its longest "
                 f"operations: {ops}.")
        ctx.line("")


def profile_impl(ctx: Context, case, inputs, impl: str) -> tuple[float, float]:
    """Time and profile `impl` on `case`'s inputs, record and report it; its median forward and backward ms."""
    import kdops
    from bench.measure import time_steps

    def forward():
        return kdops.fused_linear_kd_loss(*inputs.args, divergence=case.divergence, impl=impl, backend="triton")

    steps = [forward, lambda loss: loss.backward()]
    time_steps(steps, ctx.device)  # compile and warm up
    forward_ms, backward_ms, _ = median_ms(steps, inputs, ctx.device, PROFILE_REPS)
    events = profiled_events(forward, inputs, torch.device(ctx.device).type == "cuda")
    kernels = kernel_times(events)
    total_us = sum(us for _, _, us in kernels) or float("nan")
    idle, lead = idle_gaps(events), host_lead(events)
    ctx.record("profile", impl=impl, divergence=case.divergence, label=case.label, forward_ms=forward_ms,
               backward_ms=backward_ms, gpu_ms=total_us / 1e3, idle=idle, host_lead=lead,
               kernels=[dict(name=n, calls=c, ms=us / 1e3, share=us / total_us) for n, c, us in kernels])
    ctx.line(f"Measured (CUDA events after a head start, median of {PROFILE_REPS}): forward {forward_ms:.2f} "
             f"ms, backward {backward_ms:.2f} ms; GPU time in the profiled forward + backward "
             f"{total_us / 1e3:.2f} ms.")
    ctx.line("")
    ctx.table(["kernel", "calls", "CUDA ms", "share"], kernel_rows(kernels, total_us))
    ctx.line("")
    report_waits(ctx, idle, lead)
    return forward_ms, backward_ms


def report_prediction(ctx: Context, impl, divergence, gpu, model_reason, forward_ms, backward_ms) -> None:
    """The cost model's phases next to the measured times, or why there are none."""
    if model_reason is not None:
        ctx.line(f"cost model unavailable ({model_reason})")
        return
    try:
        prediction_table(ctx, impl, divergence, gpu, forward_ms, backward_ms)
    except Exception as error:  # noqa: BLE001 - the model is another module's: degrade, never fail the step
        ctx.line(f"cost model unavailable ({error_text(error)})")


def prediction_table(ctx: Context, impl, divergence, gpu, forward_ms, backward_ms) -> None:
    """Record the model's prediction of `impl` with the measured times; its totals and phases in the report."""
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


def impl_unavailable(impl: str, device) -> str | None:
    """Why `impl` cannot run on `device` (the epilogue path's GEMMs: a Hopper or Blackwell GPU, quack-kernels), or
    None."""
    if impl != "epilogue":
        return None
    from kdops.launchers.epilogue import unavailable

    return unavailable(torch.device(device))


def run_profile(ctx: Context) -> None:
    """Each impl and divergence that fits the time left: measured, profiled, next to the model's prediction."""
    from bench.measure import free_memory, make_inputs

    gpu = model_gpu(ctx.device)
    model_reason = cost_model_missing()
    for divergence in DIVERGENCES:
        case = headline_case(divergence)
        inputs = make_inputs(case, ctx.device)
        for impl in PROFILE_IMPLS:
            ctx.heading(f"{impl}, {divergence}")
            reason = impl_unavailable(impl, ctx.device)
            if reason is not None:
                ctx.line(f"Skipped: {reason}.")
                continue
            if not ctx.skip_unless_fits(PROFILE_ITEM_S, "profiles", f"Skipped: {ctx.left():.0f} s left."):
                continue
            forward_ms, backward_ms = profile_impl(ctx, case, inputs, impl)
            report_prediction(ctx, impl, divergence, gpu, model_reason, forward_ms, backward_ms)
            ctx.flush()
        del inputs
        free_memory(ctx.device)


PROFILE = Step(
    "profile", "torch.profiler per kernel of kdops' fused, chunked, sliced and epilogue impls, next to the cost model",
    PROFILE_S,
    ("torch.profiler over one forward + backward of kdops.fused_linear_kd_loss(impl='fused' | 'chunked' | 'sliced' | "
     "'epilogue') at the headline shape, per divergence; CUDA time and share per kernel (the epilogue path where "
     "it runs: a Hopper or Blackwell GPU with quack-kernels)",
     "bench.model.predict(impl, Shape(8192, 4096, 4096, 128256), gpu=..., divergence=D, dtype=bf16) per phase"),
    run_profile)
