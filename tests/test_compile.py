"""torch.compile(fullgraph=True) of a step that calls each loss: no graph break, same loss and gradients
as eager (the Triton paths are custom ops: kdops.paths.logits, kdops.paths.linear)."""

import pytest
import torch

import kdops
from kdops.problem import divergence_from_repr
from conftest import DEVICE

BACKENDS = ["torch", "triton"]


def _step_results(step, params, *args):
    for p in params:
        p.grad = None
    loss = step(*args)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in params]


def _compare_compiled(step, params, *args):
    torch._dynamo.reset()
    eager = _step_results(step, params, *args)
    compiled = _step_results(torch.compile(step, fullgraph=True, backend="aot_eager"), params, *args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kd_loss_compiles_fullgraph(backend, reduction):
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 301).to(DEVICE)
    x, teacher = torch.randn(2, 9, 24, device=DEVICE), torch.randn(2, 9, 301, device=DEVICE) * 3
    labels = torch.randint(0, 301, (2, 9), device=DEVICE)
    labels[0, :3] = -100
    # per-row weights (signed) in one of the two cases: a graph input multiplying the rows
    weights = torch.randn(2, 9, device=DEVICE) if reduction == "none" else None

    def step(x, teacher, labels, weights):
        loss = kdops.kd_loss(head(x), teacher, labels, divergence=kdops.GeneralizedJSD(beta=0.3), temperature=2.0,
                             reduction=reduction, backend=backend, weights=weights)
        return loss.sum()

    _compare_compiled(step, list(head.parameters()), x, teacher, labels, weights)


@pytest.mark.parametrize("impl, backend, transforms", [
    ("fused", "triton", False), ("chunked", "triton", False), ("chunked", "torch", False),
    ("fused", "triton", True), ("chunked", "torch", True), ("sliced", "triton", True)])
def test_fused_linear_kd_loss_compiles_fullgraph(impl, backend, transforms):
    torch.manual_seed(1)
    body = torch.nn.Linear(16, 20).to(DEVICE)
    weight = torch.nn.Parameter(torch.randn(300, 20, device=DEVICE) * 0.5)
    bias = torch.nn.Parameter(torch.randn(300, device=DEVICE))
    x = torch.randn(3, 7, 16, device=DEVICE)
    teacher_hidden, teacher_weight = torch.randn(3, 7, 28, device=DEVICE), torch.randn(310, 28, device=DEVICE) * 0.5
    labels = torch.randint(0, 300, (3, 7), device=DEVICE)
    labels[1, :2] = -100
    weights = torch.randn(3, 7, device=DEVICE) if transforms else None  # per-row weights, a graph input

    # the tile transforms travel through the custom op's options: softcaps, and TAID as a divergence
    options = dict(divergence=kdops.TAID(0.4), student_softcap=2.0, teacher_softcap=3.0) if transforms else dict(
        divergence="reverse_kl")

    def step(x, teacher_hidden, teacher_weight, labels, weights):
        return kdops.fused_linear_kd_loss(torch.tanh(body(x)), weight, teacher_hidden, teacher_weight, labels,
                                          student_bias=bias, hard_weight=0.5, temperature=1.5, impl=impl,
                                          backend=backend, weights=weights, **options)

    _compare_compiled(step, [*body.parameters(), weight, bias], x, teacher_hidden, teacher_weight, labels, weights)


@pytest.mark.parametrize("name", list(kdops.DIVERGENCES))
def test_divergence_repr_round_trips(name):
    divergence = kdops.as_divergence(name)
    assert divergence_from_repr(repr(divergence)) == divergence
    assert divergence_from_repr("GeneralizedJSD(beta=0.25)") == kdops.GeneralizedJSD(beta=0.25)
    assert divergence_from_repr(repr(kdops.TAID(0.3))) == kdops.TAID(0.3)
