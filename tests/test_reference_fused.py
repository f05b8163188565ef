"""reference.fused_linear_kd_loss: the oracle of the fused API (issue 3 builds the kernels on it)."""

import pytest
import torch

import kdops
import kdops.torch_math
from kdops import reference

N, HS, HT, V = 37, 67, 96, 1000


def _inputs(dtype=torch.float64, leading=(N,), vt=V + 64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    labels = torch.randint(0, V, leading, generator=g)
    labels[torch.rand(leading, generator=g) < 0.3] = -100
    return dict(student_hidden=randn(*leading, HS), student_weight=randn(V, HS, scale=HS ** -0.5 * 4),
                teacher_hidden=randn(*leading, HT), teacher_weight=randn(vt, HT, scale=HT ** -0.5 * 4),
                student_bias=randn(V), teacher_bias=randn(vt), labels=labels)


def test_forward_kl_with_hard_loss_matches_the_formula():
    """Σ_valid [soft · Σ p (log p − log q) + hard · (lse(s) − s_y)] / #valid, written out by hand."""
    x = _inputs()
    T, hard, soft = 2.0, 0.3, 0.7
    got = reference.fused_linear_kd_loss(**x, temperature=T, hard_weight=hard, soft_weight=soft)
    s = x["student_hidden"] @ x["student_weight"].T + x["student_bias"]
    t = (x["teacher_hidden"] @ x["teacher_weight"].T + x["teacher_bias"])[:, :V]  # padding rows dropped
    p, log_p, log_q = (t / T).softmax(-1), (t / T).log_softmax(-1), (s / T).log_softmax(-1)
    valid = x["labels"] != -100
    kl = (p * (log_p - log_q)).sum(-1)
    ce = s.logsumexp(-1) - s.gather(1, x["labels"].clamp_min(0)[:, None])[:, 0]
    expected = ((soft * kl + hard * ce) * valid).sum() / valid.sum()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
def test_padding_rows_of_the_larger_weight_are_ignored(divergence):
    x = _inputs()
    loss = reference.fused_linear_kd_loss(**x, divergence=divergence, hard_weight=0.5)
    loss.backward()
    assert torch.count_nonzero(x["teacher_weight"].grad[V:]) == 0
    assert torch.count_nonzero(x["teacher_bias"].grad[V:]) == 0
    with torch.no_grad():
        x["teacher_weight"][V:] += 100.0
    again = reference.fused_linear_kd_loss(**x, divergence=divergence, hard_weight=0.5)
    assert torch.equal(loss.detach(), again.detach())


def test_matches_kd_loss_on_materialized_logits():
    """Without the hard term, the fused reference is kd_loss of the logits, for 3-D inputs and bf16."""
    x = _inputs(torch.bfloat16, leading=(3, 13), vt=V)
    labels = x.pop("labels")
    got = reference.fused_linear_kd_loss(**x, labels=labels, divergence="generalized_jsd", temperature=1.5,
                                         reduction="none")
    s = kdops.torch_math.linear_logits(x["student_hidden"], x["student_weight"], x["student_bias"], V, torch.float32)
    t = kdops.torch_math.linear_logits(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"], V, torch.float32)
    expected = reference.kd_loss(s, t, labels, divergence="generalized_jsd", temperature=1.5, reduction="none")
    assert got.shape == (3, 13) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "tvd", "alpha_beta"])
def test_gradcheck(divergence):
    g = torch.Generator().manual_seed(2)
    args = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
            for shape in ((4, 5), (7, 5), (4, 3), (6, 3), (7,), (6,))]
    labels = torch.tensor([1, -100, 4, 0])

    def loss(hs, ws, ht, wt, bs, bt):
        return reference.fused_linear_kd_loss(hs, ws, ht, wt, labels, divergence=divergence, student_bias=bs,
                                              teacher_bias=bt, hard_weight=0.5, temperature=1.3)

    assert torch.autograd.gradcheck(loss, args)


def _call(fn=reference.fused_linear_kd_loss, **overrides):
    x = _inputs(torch.float32)
    x.update(overrides)
    return fn(**x)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(student_hidden=torch.randn(N, HS + 1)), ValueError, r"student_hidden.*student_weight.*width"),
    (dict(teacher_weight=torch.randn(V, HT - 1)), ValueError, r"teacher_hidden.*teacher_weight"),
    (dict(teacher_hidden=torch.randn(N + 1, HT)), ValueError, r"leading shape"),
    (dict(student_weight=torch.randn(0, HS), student_bias=None), ValueError, r"shared vocabulary is empty"),
    (dict(student_weight=torch.randn(V, HS, 1)), ValueError, r"student_weight.*2-D"),
    (dict(student_bias=torch.randn(V + 1)), ValueError, r"student_bias.*shape"),
    (dict(labels=None, hard_weight=0.5), ValueError, r"hard_weight.*labels"),
    (dict(hard_weight=-1.0), ValueError, r"hard_weight"),
    (dict(soft_weight=float("nan")), ValueError, r"soft_weight"),
    (dict(impl="cublas"), ValueError, r"impl.*'cublas'"),
    (dict(teacher_weight=torch.randn(V, HT, device="meta"), teacher_bias=None), ValueError, r"one device"),
    (dict(student_hidden=torch.randint(0, 3, (N, HS))), TypeError, r"student_hidden.*floating"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, r"labels.*shape"),
    (dict(temperature=0.0), ValueError, r"temperature"),
    (dict(reduction="mean"), ValueError, r"reduction.*'mean'"),
    (dict(backend="cuda"), ValueError, r"backend.*'cuda'"),
])
@pytest.mark.parametrize("fn", [reference.fused_linear_kd_loss, kdops.fused_linear_kd_loss],
                         ids=["reference", "kdops"])
def test_errors(fn, overrides, error, match):
    with pytest.raises(error, match=match):
        _call(fn, **overrides)
