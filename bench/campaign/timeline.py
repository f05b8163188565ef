"""What a torch.profiler timeline says: time per device kernel, where the GPU waits, and what the host does before
the GPU's first work. Pure functions of the profile's events (anything with name, device_type and time_range)."""

from __future__ import annotations

from torch.autograd import DeviceType

HOST_MARK = "kdops forward"  # the profiled call's own range (torch.profiler.record_function): where host time starts


def kernel_times(events) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) of the device-side events (kernels, copies, fills) of a profile, longest first."""
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


def host_lead(events, mark: str = HOST_MARK, top: int = 5) -> dict:
    """What the host does before the GPU's first work in a profile: the time from the start of the `mark` range
    (the profiled call) to the first device event, and the outermost host operations in that window, summed by
    name, longest first (an event timing from an idle GPU counts this lead; a training step, whose GPU is
    still busy with earlier work, hides it)."""
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
