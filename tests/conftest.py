"""Test configuration: Triton runs through its interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before triton is imported (triton.jit decides at decoration time), so it is
set here, before any test module imports kdops' kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kdops._launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(kdops._launch, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
