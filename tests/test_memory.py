"""Memory bounds of kd_loss, counted allocation by allocation (bench/memory.py) during forward + backward."""

import pytest
import torch

import kdops
import kdops._torch_backend
from bench.memory import AllocationTracker
from oracle import logit_pair
from conftest import DEVICE


def _measure(student, teacher, **kwargs):
    student = student.detach().requires_grad_(True)
    teacher = teacher.detach().requires_grad_(kwargs.pop("teacher_grad"))
    with AllocationTracker() as tracker:
        kdops.kd_loss(student, teacher, **kwargs).backward()
        grads = [x.grad for x in (student, teacher) if x.grad is not None]
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return tracker, grad_bytes


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
def test_triton_backend_extra_memory_is_o_rows(divergence, teacher_grad):
    """Beyond the gradients themselves, only per-row buffers: nothing near rows × V."""
    rows, vocab = 64, 3001
    student, teacher = logit_pair((rows, vocab), torch.bfloat16, DEVICE)
    tracker, grad_bytes = _measure(student, teacher, divergence=divergence, backend="triton",
                                   teacher_grad=teacher_grad)
    assert grad_bytes == rows * vocab * 2 * (1 + teacher_grad)
    large = [n for n, _ in tracker.allocations if n >= rows * vocab // 4]
    assert sorted(large) == [rows * vocab * 2] * (1 + teacher_grad), "only the gradients may be large"
    assert tracker.peak - grad_bytes <= rows * 128 + 4096


@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
def test_torch_backend_temporaries_within_budget(divergence, monkeypatch):
    """The chunked torch path keeps its temporaries within BUDGET_BYTES, whatever the batch size."""
    budget = 2 * 2**20
    monkeypatch.setattr(kdops._torch_backend, "BUDGET_BYTES", budget)
    rows, vocab = 160, 1000
    assert kdops._torch_backend.chunk_rows(vocab) * 4 < rows  # several chunks
    student, teacher = logit_pair((rows, vocab), torch.float32, DEVICE)
    tracker, grad_bytes = _measure(student, teacher, divergence=divergence, backend="torch", teacher_grad=True)
    assert tracker.peak - grad_bytes <= budget
