"""The launcher of `kernels/scale.py`: the chunked paths' gradients scaled by the upstream gradient on the device."""

from __future__ import annotations

import torch

from .. import targets
from .common import cdiv, kernel_modules, launch

#: scale_unless_one's programs: elements a program's block takes per step, and programs per SM on a GPU.
SCALE_BLOCK, SCALE_PROGRAMS_PER_SM = 2048, 4


def scale_unless_one(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ·= scale in place, for a contiguous x and a one-element `scale` on x's device, unless scale is exactly
    1 (`kernels/scale.py`: the kernel reads it, the host does not; the product in float32, float64 for float64
    x). Returns x."""
    # an invariant of the callers (the chunked paths' own gradient buffers), not a user error: the kernel walks
    # the elements in memory order
    assert x.is_contiguous(), f"scale_unless_one takes a contiguous tensor, got strides {x.stride()}"
    modules = kernel_modules()
    kernel, tl = modules.scale.scale_unless_one_kernel, modules.tl
    gpu = targets.of_device(x.device)
    blocks = cdiv(x.numel(), SCALE_BLOCK)
    programs = max(1, min(blocks, SCALE_PROGRAMS_PER_SM * gpu.sm_count if gpu is not None else 4))
    launch(kernel, (programs,), x, scale.reshape(1), x.numel(), BLOCK=SCALE_BLOCK,
           ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=4)
    return x
