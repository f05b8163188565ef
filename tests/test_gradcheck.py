"""torch.autograd.gradcheck in float64 on tiny shapes: both backends (the interpreter runs float64)."""

import pytest
import torch

import kdops
from conftest import DEVICE

DIVERGENCES = [
    "forward_kl", "reverse_kl", "generalized_jsd", kdops.GeneralizedJSD(beta=0.2), "skew_forward_kl",
    kdops.SkewReverseKL(alpha=0.4), "tvd", "alpha_beta", kdops.AlphaBeta(alpha=1.3, beta=0.6),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=str)
def test_gradcheck(divergence, backend):
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 2).to(DEVICE).requires_grad_()
    teacher = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 2).to(DEVICE).requires_grad_()
    labels = torch.tensor([1, -100, 2], device=DEVICE)

    def loss(s, t):
        return kdops.kd_loss(s, t, labels, divergence=divergence, temperature=1.7, backend=backend,
                             reduction="sum")

    assert torch.autograd.gradcheck(loss, (student, teacher), eps=1e-6, atol=1e-7, rtol=1e-5)
