"""What every record of a campaign carries: the command line, the commit and the source hash, the device and the
versions."""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys

import torch


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi: the campaign's own process stays off the GPU (no CUDA context)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    names = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return names[0].strip() if names else None


def campaign_metadata(device: str, argv: list[str]) -> dict:
    """What every record carries: the command line, commit, source hash (`bench.report.source_hash`: the code on
    disk as the campaign starts), device, versions."""
    from bench.report import _git, package_version, device_name, slug, source_hash  # imports kdops: only in a campaign

    now = datetime.datetime.now(datetime.timezone.utc)
    name = (gpu_name() if torch.device(device).type == "cuda" else None) or device_name(device)
    return {
        "campaign_id": now.strftime("%Y%m%dT%H%M%SZ"), "timestamp": now.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.campaign", *argv]),
        "commit": _git("rev-parse", "HEAD") or "unknown", "dirty": bool(_git("status", "--porcelain")),
        "source_hash": source_hash(), "device": name, "device_slug": slug(name),
        "device_type": torch.device(device).type,
        "torch": torch.__version__, "triton": package_version("triton"), "kdops": package_version("kdops"),
        "liger_kernel": package_version("liger-kernel"), "trl": package_version("trl"),
        "transformers": package_version("transformers"),
        "python": sys.version.split()[0],
    }
