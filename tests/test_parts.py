"""`return_parts=True`: the loss's parts per row (`kdops.LossParts`: the divergence, the hard-label cross-entropy,
the student's and the target's entropies at T) from the loss's own pass, against a float64 oracle written here on
whole logits; the loss itself unchanged; the calls that report no parts raise."""

from __future__ import annotations

import pytest
import torch

import kdops
import kdops.launchers.logits
import kdops.launchers.topk
from kdops import reference
from kdops.torch_math import loss_logits
from oracle import logit_pair

N, V, H = 13, 101, 12
TOL = {torch.float32: 5e-5, torch.float64: 1e-10}


def oracle_parts(student_logits, teacher_logits, labels, divergence, temperature, softcaps=(None, None)):
    """(soft, hard, H_student, H_target) in float64 from whole logits: the reference's per-row divergence, the
    cross-entropy of the (softcapped) student at T = 1, and −Σ p log p of both softmaxes at T."""
    s, t = student_logits.double(), teacher_logits.double()
    c = kdops.as_divergence(divergence).canonical().with_softcaps(*softcaps)
    student, target = loss_logits(c, s, t)
    soft = reference.kd_loss(s if not any(softcaps) else student, t if not any(softcaps) else target,
                             divergence=divergence if not any(softcaps) else divergence, temperature=temperature,
                             reduction="none")

    def entropy(z):
        log_p = torch.log_softmax(z / temperature, -1)
        return -torch.where(log_p.exp() > 0, log_p.exp() * log_p, 0.0).sum(-1)

    valid = labels != -100
    hard = torch.where(valid, torch.nn.functional.cross_entropy(
        student.reshape(-1, student.shape[-1]), torch.where(valid, labels, 0).reshape(-1),
        reduction="none").view(labels.shape), 0.0)
    return [torch.where(valid, x, 0.0) for x in (soft, hard, entropy(student), entropy(target))]


def assert_parts(parts, expected, dtype, names=kdops.LossParts._fields):
    for name, got, want in zip(names, parts, expected):
        assert got.shape == want.shape and not got.requires_grad, name
        scale = want.abs().max().clamp_min(1.0)
        assert float((got.double() - want).abs().max() / scale) <= TOL[dtype], name


def labels_of(shape):
    labels = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(5))
    labels.view(-1)[2::5] = -100
    return labels


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("divergence, dtype", [("forward_kl", torch.float32), ("forward_kl", torch.float64),
                                               ("generalized_jsd", torch.float32), (kdops.TAID(0.4), torch.float32)],
                         ids=str)
def test_kd_loss_parts(backend, divergence, dtype):
    s, t = logit_pair((3, 5, V), dtype, seed=1)  # peaked rows and −inf entries
    labels = labels_of((3, 5))
    loss, parts = kdops.kd_loss(s, t, labels, divergence=divergence, temperature=1.7, backend=backend,
                                reduction="none", return_parts=True)
    assert isinstance(parts, kdops.LossParts)
    assert torch.equal(loss, kdops.kd_loss(s, t, labels, divergence=divergence, temperature=1.7, backend=backend,
                                           reduction="none"))
    expected = oracle_parts(s, t, labels, divergence, 1.7)
    finite = torch.isfinite(expected[1])  # a label at a −inf logit: CE = ∞ (the kernels agree)
    assert torch.equal(torch.isfinite(parts.hard), finite)
    expected[1] = torch.where(finite, expected[1], 0.0)
    parts = parts._replace(hard=torch.where(finite, parts.hard, 0.0))
    assert_parts(parts, expected, dtype)


@pytest.mark.parametrize("impl, backend, reduction, vocab", [
    ("chunked", "triton", "batchmean", V), ("chunked", "torch", "none", V), ("chunked", "triton", "none", V),
    ("sliced", "triton", "none", 301), ("fused", "triton", "batchmean", V)])
def test_fused_linear_parts(impl, backend, reduction, vocab):
    """Every path: chunks (a small budget: several), vocabulary slices (V = 301 in slices of 128: their entropy
    states merged), the fused kernels (the interpreter's several vocabulary splits, merged)."""
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(3, 5, H, generator=g), torch.randn(3, 5, H + 4, generator=g) * 2
    ws, wt = torch.randn(vocab, H, generator=g), torch.randn(vocab + 3, H + 4, generator=g)
    labels = labels_of((3, 5))
    options = dict(divergence="reverse_kl", temperature=2.0, hard_weight=0.3, student_softcap=5.0,
                   reduction=reduction, backend=backend, impl=impl,
                   memory_budget=20_000 if impl == "chunked" else 4096 if impl == "sliced" else None)
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws)]
    loss, parts = kdops.fused_linear_kd_loss(*leaves, ht, wt, labels, return_parts=True, **options)
    plain = kdops.fused_linear_kd_loss(hs, ws, ht, wt, labels, **options)
    torch.testing.assert_close(loss, plain)  # (the torch engine's CPU sums may round another way, an ulp)
    grads = torch.autograd.grad(loss.sum(), leaves)  # the parts leave the gradients as they were
    plain_grads = torch.autograd.grad(kdops.fused_linear_kd_loss(*leaves, ht, wt, labels, **options).sum(), leaves)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b)
    expected = oracle_parts(hs.double() @ ws.double().T, ht.double() @ wt[:vocab].double().T, labels, "reverse_kl",
                            2.0, (5.0, None))
    assert_parts(parts, expected, torch.float32)


def sparse_oracle(student_logits, teacher_logprobs, tail, temperature, labels):
    """(soft, hard, H_student, H_teacher) of a sparse teacher in float64: the reference's pair divergence, CE at
    T = 1, the student's entropy over the whole vocabulary, and the teacher's over its k (+1) outcomes."""
    s = student_logits.double()
    ids_lp = teacher_logprobs.double()
    p = ids_lp.exp()
    q = torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0)], -1) if tail == "bucket" else p / p.sum(-1, True)
    teacher_entropy = -torch.where(q > 0, q * q.log(), 0.0).sum(-1)
    _, hard, student_entropy, _ = oracle_parts(s, s, labels, "forward_kl", temperature)
    return hard, student_entropy, torch.where(labels != -100, teacher_entropy, 0.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "zero"])
def test_topk_parts(backend, tail):
    s, t = logit_pair((N, V), seed=7)
    labels = labels_of((N,))
    lp, ids = torch.log_softmax(t / 1.5, -1).topk(6, -1)
    options = dict(tail=tail, temperature=1.5, backend=backend, reduction="none")
    loss, parts = kdops.topk_kd_loss(s, ids, lp, labels, return_parts=True, **options)
    torch.testing.assert_close(loss, kdops.topk_kd_loss(s, ids, lp, labels, **options))
    soft = reference.topk_kd_loss(s.double(), ids, lp.double(), labels, **dict(options, backend="auto"))
    assert_parts(parts, [soft, *sparse_oracle(s, lp, tail, 1.5, labels)], torch.float32)


@pytest.mark.parametrize("backend, impl, reduction", [("triton", "chunked", "sum"), ("torch", "auto", "none")])
def test_fused_linear_topk_parts(backend, impl, reduction):
    """From hidden states: the chunked path in chunks (tail="renormalize" would take the gathered path, which never
    reads the whole vocabulary: with parts asked for, "auto" runs the chunks)."""
    g = torch.Generator().manual_seed(8)
    hs, ws = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    labels = labels_of((N,))
    lp, ids = torch.log_softmax(torch.randn(N, V, generator=g) * 4, -1).topk(4, -1)
    options = dict(tail="renormalize", temperature=1.5, backend=backend, reduction=reduction, impl=impl,
                   student_softcap=6.0, memory_budget=20_000)
    loss, parts = kdops.fused_linear_topk_kd_loss(hs, ws, ids, lp, labels, return_parts=True, **options)
    torch.testing.assert_close(loss, kdops.fused_linear_topk_kd_loss(hs, ws, ids, lp, labels, **options))
    z = 6.0 * torch.tanh((hs.double() @ ws.double().T) / 6.0)
    soft = reference.topk_kd_loss(z, ids, lp.double(), labels, tail="renormalize", temperature=1.5, reduction="none")
    assert_parts(parts, [soft, *sparse_oracle(z, lp, "renormalize", 1.5, labels)], torch.float32)


def test_parts_across_tiles(monkeypatch):
    """Tiny vocabulary blocks (the interpreter's blocks otherwise hold a whole small row): the entropy sums re-expressed
    whenever a row's max grows from one tile to the next, in the kernels on logits (their lanes), the top-k student's
    pass, and the fused kernels (two tiles per vocabulary split at V = 701)."""
    def small(*args, **kwargs):
        return dict(BLOCK_R=4, BLOCK_V=16)

    monkeypatch.setattr(kdops.launchers.logits, "logits_config", small)
    monkeypatch.setattr(kdops.launchers.topk, "logits_config", small)
    s, t = logit_pair((N, V), seed=12)
    labels = labels_of((N,))
    _, parts = kdops.kd_loss(s, t, labels, divergence="generalized_jsd", temperature=0.7, backend="triton",
                             return_parts=True)
    assert_parts(parts, oracle_parts(s, t, labels, "generalized_jsd", 0.7), torch.float32)
    lp, ids = torch.log_softmax(t / 0.7, -1).topk(5, -1)
    _, parts = kdops.topk_kd_loss(s, ids, lp, labels, temperature=0.7, backend="triton", return_parts=True)
    assert_parts(parts[1:3], sparse_oracle(s, lp, "bucket", 0.7, labels)[:2], torch.float32, ("hard", "entropy"))
    g = torch.Generator().manual_seed(13)
    hs, ws = torch.randn(N, H, generator=g), torch.randn(701, H, generator=g) * 1.5
    ht, wt = torch.randn(N, H, generator=g), torch.randn(701, H, generator=g) * 2
    _, parts = kdops.fused_linear_kd_loss(hs, ws, ht, wt, labels, impl="fused", backend="triton", return_parts=True)
    assert_parts(parts, oracle_parts(hs.double() @ ws.double().T, ht.double() @ wt.double().T, labels, "forward_kl",
                                     1.0), torch.float32)


def test_modules_return_parts():
    s, t = logit_pair((N, V), seed=14)
    labels = labels_of((N,))
    loss, parts = kdops.KDLoss(divergence="tvd", backend="torch")(s, t, labels, return_parts=True)
    expected = kdops.kd_loss(s, t, labels, divergence="tvd", backend="torch", return_parts=True)
    assert torch.equal(loss, expected[0]) and all(torch.equal(a, b) for a, b in zip(parts, expected[1]))


def test_without_labels_hard_is_none():
    s, t = logit_pair((N, V), seed=3)
    _, parts = kdops.kd_loss(s, t, return_parts=True, backend="triton")
    assert parts.hard is None and parts.soft.shape == (N,)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mix", [kdops.Ensemble([0.3, 0.7]), kdops.LogitSum([0.6, 0.4])], ids=str)
def test_several_teachers_parts(backend, mix):
    """The target's entropy is the mix's (an Ensemble's mixture of softmaxes, a LogitSum's softmax of the sum)."""
    s, t = logit_pair((N, V), seed=9)
    other = torch.randn(N, V, generator=torch.Generator().manual_seed(10)) * 3
    labels = labels_of((N,))
    options = dict(teacher_mix=mix, divergence="reverse_kl", temperature=1.5, backend=backend, reduction="none")
    loss, parts = kdops.kd_loss(s, [t, other], labels, return_parts=True, **options)
    torch.testing.assert_close(loss, kdops.kd_loss(s, [t, other], labels, **options))
    target = mix.target_logits([t.double(), other.double()], 1.5)  # logits whose softmax at T is the target
    assert_parts(parts, oracle_parts(s, target, labels, "reverse_kl", 1.5), torch.float32)
    g = torch.Generator().manual_seed(11)
    hs, ws = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    heads = [(torch.randn(N, 9, generator=g) * 2, torch.randn(V, 9, generator=g)),
             (torch.randn(N, 7, generator=g), torch.randn(V, 7, generator=g))]
    _, parts = kdops.fused_linear_kd_loss(hs, ws, [h for h, _ in heads], [w for _, w in heads], labels,
                                          memory_budget=20_000, return_parts=True, **options)
    target = mix.target_logits([h.double() @ w.double().T for h, w in heads], 1.5)
    assert_parts(parts, oracle_parts(hs.double() @ ws.double().T, target, labels, "reverse_kl", 1.5), torch.float32)


def test_gathered_path_raises():
    """The gathered top-k path never reads the whole vocabulary: no student entropy to report."""
    s, t = logit_pair((N, V), seed=4)
    lp, ids = torch.log_softmax(t, -1).topk(3, -1)
    with pytest.raises(ValueError, match="return_parts with impl='gathered'"):
        kdops.fused_linear_topk_kd_loss(torch.randn(N, H), torch.randn(V, H), ids, lp, tail="renormalize",
                                        impl="gathered", return_parts=True)
    with pytest.raises(TypeError, match="return_parts: expected a bool"):
        kdops.kd_loss(s, t, return_parts=1)
    with pytest.raises(TypeError, match="return_parts"):
        kdops.kd_loss(s, t, return_parts=1)


def test_inside_torch_compile_runs_eagerly():
    s, t = logit_pair((N, V), seed=6)
    labels = labels_of((N,))

    def step(s, t, labels):
        loss, parts = kdops.kd_loss(s, t, labels, backend="triton", return_parts=True)
        return loss, parts.student_entropy.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")(s, t, labels)
    eager = step(s, t, labels)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
