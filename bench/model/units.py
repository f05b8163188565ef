"""Units of the model's tables and how they print: decimal gigabytes of traffic, binary sizes of memory,
milliseconds."""

from __future__ import annotations

GB = 1e9
MiB = 2**20


def traffic_text(nbytes: float) -> str:
    """HBM traffic in GB, or in MB below 0.01 GB."""
    return f"{nbytes / GB:,.2f} GB" if nbytes >= 0.01 * GB else f"{nbytes / 1e6:,.2f} MB"


def size_text(nbytes: float) -> str:
    """Memory in GiB, MiB or KiB, whichever is at least 1."""
    if abs(nbytes) >= 2**30:
        return f"{nbytes / 2**30:,.2f} GiB"
    if abs(nbytes) >= MiB:
        return f"{nbytes / MiB:,.0f} MiB"
    return f"{nbytes / 1024:,.0f} KiB"


def ms_text(seconds: float) -> str:
    """Milliseconds: one decimal from 10 ms up, two below."""
    return f"{seconds * 1e3:,.1f}" if seconds >= 0.01 else f"{seconds * 1e3:,.2f}"
