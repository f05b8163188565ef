"""Per-row loss weights (`weights=`): each row's loss, soft and hard terms, times w inside the same pass, the
gradients scaled alike, on every loss, path and backend, against the float64 oracle (the reference on float64
inputs, which multiplies its rows by w before the reduction)."""

from __future__ import annotations

import pytest
import torch

import kdops
from kdops import reference
from oracle import assert_within_reference, logit_pair

N, V, H, K = 11, 101, 12, 5
REDUCTIONS = [("none", None), ("sum", None), ("batchmean", None), ("batchmean", 17.0)]


def row_weights(seed=0, shape=(N,)):
    """Signed weights of a realistic spread (importance ratios, advantages): some negative, one zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 1.5
    w.view(-1)[3] = 0.0
    return w


def labels_of(shape=(N,), seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[1::4] = -100
    return labels


def compare(fn, ref, inputs, grads, **options):
    """fn vs the float64 oracle (ref on float64 copies) within the float32 reference's error + TOLERANCE: the
    loss and the gradient of Σ u·loss (u random upstream weights) for each input named in `grads`."""
    def run(f, dtype):
        xs = {k: (v.detach().to(dtype).requires_grad_(k in grads) if v.is_floating_point() and k != "weights"
                  else v) for k, v in inputs.items()}
        loss = f(**xs, **options)
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        return [loss, *torch.autograd.grad(loss, [xs[k] for k in grads], upstream.to(loss.dtype))]

    oracle, same, ours = run(ref, torch.float64), run(ref, torch.float32), run(fn, torch.float32)
    assert_within_reference(("loss", *grads), oracle, same, ours, torch.float32)
    return ours


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction, num_items", REDUCTIONS)
def test_kd_loss(backend, reduction, num_items):
    s, t = logit_pair((N, V), seed=1)
    inputs = dict(student_logits=s, teacher_logits=t, labels=labels_of(), weights=row_weights())
    loss, *_ = compare(kdops.kd_loss, reference.kd_loss, inputs, ("student_logits", "teacher_logits"),
                       divergence="generalized_jsd", temperature=1.5, reduction=reduction,
                       num_items_in_batch=num_items, backend=backend)
    if reduction == "none":
        assert torch.all(loss[inputs["labels"] == -100] == 0)


def linear_inputs(seed=0, leading=(N,)):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(*leading, H, generator=g), torch.randn(*leading, H + 3, generator=g)
    ws, wt = torch.randn(V, H, generator=g) * 0.8, torch.randn(V, H + 3, generator=g) * 1.2
    return dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt,
                labels=labels_of(leading, seed), student_bias=torch.randn(V, generator=g),
                weights=row_weights(seed, leading))


LINEAR_GRADS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "student_bias")


@pytest.mark.parametrize("impl, backend", [("chunked", "triton"), ("chunked", "torch"), ("sliced", "triton"),
                                           ("fused", "triton")])
@pytest.mark.parametrize("reduction, num_items", [REDUCTIONS[0], REDUCTIONS[3]])
def test_fused_linear(impl, backend, reduction, num_items):
    # a small budget: many chunks, or slices, each with its own rows' weights
    compare(kdops.fused_linear_kd_loss, reference.fused_linear_kd_loss, linear_inputs(leading=(3, 4)),
            LINEAR_GRADS, divergence="reverse_kl", temperature=2.0, hard_weight=0.4, soft_weight=0.8,
            reduction=reduction, num_items_in_batch=num_items, impl=impl, backend=backend,
            memory_budget=None if impl == "fused" else 64 * 1024)


def topk_teacher(seed=0, leading=(N,)):
    g = torch.Generator().manual_seed(seed + 11)
    teacher = torch.randn(*leading, V, generator=g) * 4
    lp, ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    return ids, lp


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction, num_items", [REDUCTIONS[1], REDUCTIONS[2]])
def test_topk(backend, reduction, num_items):
    s, _ = logit_pair((N, V), seed=2)
    ids, lp = topk_teacher()
    inputs = dict(student_logits=s, teacher_ids=ids, teacher_logprobs=lp, labels=labels_of(), weights=row_weights(1))
    compare(kdops.topk_kd_loss, reference.topk_kd_loss, inputs, ("student_logits",), temperature=1.3,
            reduction=reduction, num_items_in_batch=num_items, backend=backend)


@pytest.mark.parametrize("impl, backend, tail, hard, reduction", [("chunked", "triton", "bucket", 0.5, "batchmean"),
                                                                  ("chunked", "torch", "bucket", 0.5, "none"),
                                                                  ("gathered", "triton", "renormalize", 0.0, "none"),
                                                                  ("gathered", "torch", "renormalize", 0.0, "sum")])
def test_fused_linear_topk(impl, backend, tail, hard, reduction):
    x = linear_inputs(seed=3)
    ids, lp = topk_teacher(3)
    inputs = dict(student_hidden=x["student_hidden"], student_weight=x["student_weight"], teacher_ids=ids,
                  teacher_logprobs=lp, labels=x["labels"], student_bias=x["student_bias"], weights=x["weights"])
    compare(kdops.fused_linear_topk_kd_loss, reference.fused_linear_topk_kd_loss, inputs,
            ("student_hidden", "student_weight", "student_bias"), tail=tail, hard_weight=hard, impl=impl,
            backend=backend, reduction=reduction, memory_budget=64 * 1024)


def test_weights_are_constants_and_ones_change_nothing():
    """Weights that require grad get none; all-ones weights give the unweighted loss bit for bit."""
    s, t = logit_pair((N, V), seed=4)
    labels = labels_of()
    w = row_weights().requires_grad_(True)
    loss = kdops.kd_loss(s.requires_grad_(True), t, labels, weights=w, backend="triton")
    loss.backward()
    assert w.grad is None and s.grad is not None
    ones = torch.ones(N)
    for backend in ("triton", "torch"):
        assert torch.equal(kdops.kd_loss(s, t, labels, weights=ones, backend=backend),
                           kdops.kd_loss(s, t, labels, backend=backend))


def test_modules_take_weights():
    s, t = logit_pair((N, V), seed=5)
    labels, w = labels_of(), row_weights(2)
    module = kdops.KDLoss(divergence="tvd", backend="torch", reduction="sum")
    assert torch.equal(module(s, t, labels, weights=w),
                       kdops.kd_loss(s, t, labels, divergence="tvd", backend="torch", reduction="sum", weights=w))
    x = linear_inputs(seed=6)
    linear = kdops.FusedLinearKDLoss(hard_weight=0.5, backend="torch")
    args = [x[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")]
    assert torch.equal(linear(*args, weights=x["weights"]),
                       kdops.fused_linear_kd_loss(*args, hard_weight=0.5, backend="torch", weights=x["weights"]))
    ids, lp = topk_teacher(6)
    topk = kdops.TopKKDLoss(backend="torch")
    assert torch.equal(topk(s, ids, lp, labels, weights=w),
                       kdops.topk_kd_loss(s, ids, lp, labels, backend="torch", weights=w))
    linear_topk = kdops.FusedLinearTopKKDLoss(backend="torch")
    assert torch.equal(linear_topk(x["student_hidden"], x["student_weight"], ids, lp, labels, weights=w),
                       kdops.fused_linear_topk_kd_loss(x["student_hidden"], x["student_weight"], ids, lp, labels,
                                                       backend="torch", weights=w))
