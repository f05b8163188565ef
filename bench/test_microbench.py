"""pytest-benchmark microbenchmarks of the losses on logits: `pytest bench --benchmark-only`.

One forward + backward of `kdops.kd_loss` (backend auto: Triton on CUDA, torch elsewhere) and of
`kdops.reference.kd_loss` per divergence, at a small shape, so that regressions show in the usual tool
(`--benchmark-compare`, `--benchmark-autosave`). Not collected by the normal test run (testpaths = tests);
without --benchmark-only they still run, once per benchmark round.
"""

import pytest
import torch

import kdops
import kdops.reference

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS, VOCAB = (4096, 32000) if DEVICE == "cuda" else (128, 8000)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(scope="module")
def logits():
    student = (torch.randn(TOKENS, VOCAB, device=DEVICE) * 4).to(DTYPE).requires_grad_(True)
    teacher = (torch.randn(TOKENS, VOCAB, device=DEVICE) * 4).to(DTYPE)
    return student, teacher


def _forward_backward(loss_fn, student, teacher, divergence):
    student.grad = None
    loss_fn(student, teacher, divergence=divergence).backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
@pytest.mark.parametrize("implementation", ["kdops", "reference"])
def test_kd_loss_forward_backward(benchmark, logits, implementation, divergence):
    loss_fn = kdops.kd_loss if implementation == "kdops" else kdops.reference.kd_loss
    benchmark.group = f"kd_loss {divergence} {TOKENS}x{VOCAB}"
    benchmark(_forward_backward, loss_fn, *logits, divergence)
    assert logits[0].grad is not None and torch.isfinite(logits[0].grad).all()
