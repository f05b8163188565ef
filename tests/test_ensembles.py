"""Several teachers (`teacher_mix=`): kdops against a float64 oracle written here — the mixture
Σ w_i softmax(z_i / T) or softmax(Σ w_i z_i / T) as an explicit probability vector per row, and the divergences'
formulas in probability space (`test_topk.divergence_of`) — for 1, 2 and 3 teachers, every gradient."""

from __future__ import annotations

import math

import pytest
import torch

import kdops
import kdops.paths.torch_engine
from bench.memory import AllocationTracker
from kdops import reference
from oracle import TOLERANCE, make_logits, masked_vocab, rel_error
from test_topk import divergence_of

from conftest import DEVICE

V = 389  # several tiles, no block size divides it


def logit_sum(teachers, weights):
    """Σ w_i z_i in float64, −inf wherever a teacher of nonzero weight has −inf."""
    live = [(z.double(), w) for z, w in zip(teachers, weights) if w != 0]
    masked = torch.zeros_like(live[0][0], dtype=torch.bool)
    for z, _ in live:
        masked |= z == -math.inf
    y = sum(w * torch.where(z == -math.inf, 0.0, z) for z, w in live)
    return torch.where(masked, -math.inf, y)


def target_probs(teachers, mix, temperature):
    """The target distribution [rows, V] in float64 from the teachers' logits."""
    if isinstance(mix, kdops.Ensemble):
        return sum(w * torch.softmax(z.double() / temperature, -1) for z, w in zip(teachers, mix.weights))
    return torch.softmax(logit_sum(teachers, mix.weights) / temperature, -1)


def oracle_rows(student, teachers, mix, divergence, temperature):
    q = torch.softmax(student.double() / temperature, -1)
    p = target_probs(teachers, mix, temperature)
    q, p = q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])
    # entries of probability 0 on both sides (the shared masked vocabulary) are no outcome at all
    keep = (p > 0) | (q > 0)
    return torch.stack([divergence_of(divergence, p[r][keep[r]], q[r][keep[r]]) for r in range(q.shape[0])])


def oracle_kd(student, teachers, labels=None, *, teacher_mix, divergence="forward_kl", temperature=1.0, **_):
    rows = oracle_rows(student, teachers, teacher_mix, divergence, temperature).view(student.shape[:-1])
    mask = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != -100
    return torch.where(mask, rows, 0.0).sum() / mask.sum()


def teachers_like(shape, count, dtype, seed):
    """Teachers that share the student's masked vocabulary entries (−inf), peaked rows, randn·4 spread."""
    g = torch.Generator().manual_seed(seed)
    positions = masked_vocab(shape[-1], g)
    student = make_logits(shape, dtype, device=DEVICE, generator=g, mask_positions=positions)
    teachers = [make_logits(shape, dtype, device=DEVICE, generator=g, mask_positions=positions, peaked_every=3 + i)
                for i in range(count)]
    return student, teachers


def run_kd(fn, student, teachers, labels, trainable=(), **kwargs):
    student = student.detach().clone().requires_grad_(True)
    teachers = [t.detach().clone().requires_grad_(i in trainable) for i, t in enumerate(teachers)]
    loss = fn(student, teachers, labels, **kwargs)
    leaves = [student] + [t for t in teachers if t.requires_grad]
    return [loss, *torch.autograd.grad(loss, leaves)]


def assert_close_to(oracle, same, ours, dtype, names=None):
    for i, (o, r, k) in enumerate(zip(oracle, same, ours)):
        name = names[i] if names else str(i)
        assert k.dtype == r.dtype and k.shape == r.shape, name
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"{name}: error {err:.3g} vs reference {ref_err:.3g}"


MIXES = {
    1: [kdops.Ensemble((1.0,)), kdops.LogitSum((0.7,))],
    2: [kdops.Ensemble((0.3, 0.7)), kdops.LogitSum((1.5, -0.5))],
    3: [kdops.Ensemble((0.2, 0.5, 0.3)), kdops.LogitSum((0.6, 0.9, -0.4))],
}
CASES = [(n, mix) for n, mixes in MIXES.items() for mix in mixes]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("count,mix", CASES, ids=[f"{n}-{type(m).__name__}" for n, m in CASES])
def test_kd_loss_mixes_match_oracle(count, mix, backend):
    """Loss, the student's gradient and a trainable teacher's (the first), in several row chunks."""
    student, teachers = teachers_like((3, 7, V), count, torch.float32, seed=count)
    labels = torch.randint(0, V, (3, 7), device=DEVICE)
    labels[0, ::3] = -100
    kwargs = dict(teacher_mix=mix, divergence=kdops.GeneralizedJSD(0.3), temperature=2.0)
    oracle = run_kd(oracle_kd, student.double(), [t.double() for t in teachers], labels, (0,), **kwargs)
    same = run_kd(reference.kd_loss, student, teachers, labels, (0,), **kwargs)
    ours = run_kd(kdops.kd_loss, student, teachers, labels, (0,), backend=backend, **kwargs)
    assert_close_to(oracle, same, ours, torch.float32, ["loss", "student", "teacher 0"])


@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
def test_kd_loss_every_divergence_with_two_teachers(divergence, monkeypatch):
    monkeypatch.setattr(kdops.paths.torch_engine, "BUDGET_BYTES", 8 * V * 4 * 30)  # chunks of a few rows
    student, teachers = teachers_like((20, V), 2, torch.float32, seed=7)
    kwargs = dict(teacher_mix=kdops.Ensemble((0.6, 0.4)), divergence=divergence, temperature=1.5)
    oracle = run_kd(oracle_kd, student.double(), [t.double() for t in teachers], None, (1,), **kwargs)
    same = run_kd(reference.kd_loss, student, teachers, None, (1,), **kwargs)
    ours = run_kd(kdops.kd_loss, student, teachers, None, (1,), backend="triton", **kwargs)
    assert_close_to(oracle, same, ours, torch.float32, ["loss", "student", "teacher 1"])


def test_single_teacher_mixes_and_zero_weights_are_the_plain_loss():
    """Ensemble((1,)) and LogitSum((1,)) of one teacher are the plain loss; a zero weight drops its teacher
    (and gives it a zero gradient)."""
    student, (t1, t2) = teachers_like((4, 9, V), 2, torch.float32, seed=3)
    for backend in ("triton", "torch"):
        plain = run_kd(lambda s, ts, y, **k: kdops.kd_loss(s, ts[0], y, **k), student, [t1], None, (0,),
                       backend=backend)
        for mix, teachers in ((kdops.Ensemble((1.0,)), [t1]), (kdops.LogitSum((1.0,)), [t1]),
                              (kdops.Ensemble((1.0, 0.0)), [t1, t2]), (kdops.LogitSum((1.0, 0.0)), [t1, t2])):
            mixed = run_kd(kdops.kd_loss, student, teachers, None, tuple(range(len(teachers))), backend=backend,
                           teacher_mix=mix)
            for a, b in zip(plain, mixed):
                assert rel_error(b, a) < 2e-6, (backend, mix)
            if len(teachers) == 2:
                assert torch.count_nonzero(mixed[3]) == 0, "a teacher of weight 0 has a zero gradient"


def test_taid_toward_a_logit_sum():
    """TAID interpolates toward the mixed target: KL(softmax(((1 − t)·sg(s) + t·Σ w_i z_i) / T) ‖ q)."""
    student, teachers = teachers_like((5, V), 2, torch.float32, seed=11)
    mix, t = kdops.LogitSum((1.4, -0.4)), 0.6

    def oracle(s, ts, labels, **_):
        s64 = s.double()
        target = torch.log_softmax((1 - t) * s64.detach() + t * logit_sum(ts, mix.weights), -1)
        log_q = torch.log_softmax(s64, -1)
        p = target.exp()
        return (p * torch.where(p > 0, target - log_q, 0.0)).sum(-1).mean()

    expected = run_kd(oracle, student.double(), [x.double() for x in teachers], None, (0,))
    for backend in ("triton", "torch"):
        ours = run_kd(kdops.kd_loss, student, teachers, None, (0,), teacher_mix=mix, divergence=kdops.TAID(t),
                      backend=backend)
        for o, k in zip(expected, ours):
            assert rel_error(k, o) < 1e-5


# --- from hidden states ----------------------------------------------------------------------------------------


def linear_teachers(count, dtype=torch.float32, seed=0, rows=(3, 7), hs_width=24, widths=(40, 16, 32)):
    """The student's hidden states, weight and bias; per teacher its own width and weight (one vocabulary) and a
    bias for every other teacher; labels."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*rows, hs_width, generator=g)
    ws = torch.randn(V, hs_width, generator=g) * (4.0 / hs_width ** 0.5)
    bs = torch.randn(V, generator=g)
    hts = [torch.randn(*rows, w, generator=g) for w in widths[:count]]
    wts = [torch.randn(V, w, generator=g) * (5.0 / w ** 0.5) for w in widths[:count]]
    bts = [torch.randn(V, generator=g) if i % 2 == 0 else None for i in range(count)]
    labels = torch.randint(0, V, rows, generator=g)
    labels.view(-1)[::5] = -100
    move = lambda x: None if x is None else x.to(DEVICE, dtype)  # noqa: E731
    return move(hs), move(ws), move(bs), [move(x) for x in hts], [move(x) for x in wts], [move(x) for x in bts], \
        labels.to(DEVICE)


def oracle_linear(hs, ws, hts, wts, labels, *, teacher_mix, student_bias, teacher_bias, divergence="forward_kl",
                  temperature=1.0, hard_weight=0.0, soft_weight=1.0, **_):
    s = hs.double() @ ws.double().T + student_bias.double()
    zs = [h.double() @ w.double().T + (0 if b is None else b.double()) for h, w, b in zip(hts, wts, teacher_bias)]
    rows = soft_weight * oracle_rows(s, zs, teacher_mix, divergence, temperature).view(s.shape[:-1])
    mask = labels != -100
    if hard_weight:
        safe = torch.where(mask, labels, 0)
        rows = rows + hard_weight * (torch.logsumexp(s, -1) - s.gather(-1, safe[..., None])[..., 0])
    return torch.where(mask, rows, 0.0).sum() / mask.sum()


def run_linear(fn, case, trainable, dtype=None, **kwargs):
    hs, ws, bs, hts, wts, bts, labels = case
    cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.to(dtype))  # noqa: E731
    hs, ws, bs = (cast(x).detach().clone().requires_grad_(True) for x in (hs, ws, bs))
    hts = [cast(h).detach().clone().requires_grad_(i in trainable) for i, h in enumerate(hts)]
    wts = [cast(w).detach().clone().requires_grad_(i in trainable) for i, w in enumerate(wts)]
    bts = [None if b is None else cast(b).detach().clone() for b in bts]
    loss = fn(hs, ws, hts, wts, labels, student_bias=bs, teacher_bias=bts, **kwargs)
    leaves = [hs, ws, bs] + [x for pair in zip(hts, wts) for x in pair if x.requires_grad]
    return [loss, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("impl,backend", [("chunked", "triton"), ("chunked", "torch"), ("auto", "triton")])
@pytest.mark.parametrize("count,mix", [c for c in CASES if c[0] > 1], ids=[f"{n}-{type(m).__name__}" for n, m in
                                                                           CASES if n > 1])
def test_fused_linear_mixes_match_oracle(count, mix, impl, backend):
    """Teachers of different widths, biases on some, the first trainable; the hard-label term; many chunks in
    several groups."""
    case = linear_teachers(count, seed=count)
    kwargs = dict(teacher_mix=mix, divergence="reverse_kl", temperature=1.5, hard_weight=0.3, soft_weight=0.8)
    oracle = run_linear(oracle_linear, case, (0,), torch.float64, **kwargs)
    same = run_linear(reference.fused_linear_kd_loss, case, (0,), **kwargs)
    ours = run_linear(kdops.fused_linear_kd_loss, case, (0,), impl=impl, backend=backend,
                      memory_budget=3 * V * 4 * 40, **kwargs)
    assert_close_to(oracle, same, ours, torch.float32)


def test_fused_linear_bf16_softcapped_teachers():
    """bf16 inputs, each teacher's logits softcapped before the mix, within the bf16 reference's own error."""
    case = linear_teachers(2, seed=5)
    kwargs = dict(teacher_mix=kdops.Ensemble((0.5, 0.5)), divergence="forward_kl", teacher_softcap=4.0,
                  student_softcap=6.0)

    def oracle(hs, ws, hts, wts, labels, **kw):
        capped = [lambda z, c=c: c * torch.tanh(z / c) for c in (6.0, 4.0)]
        s = capped[0](hs.double() @ ws.double().T + kw["student_bias"].double())
        zs = [capped[1](h.double() @ w.double().T + (0 if b is None else b.double()))
              for h, w, b in zip(hts, wts, kw["teacher_bias"])]
        rows = oracle_rows(s, zs, kw["teacher_mix"], "forward_kl", 1.0).view(s.shape[:-1])
        mask = labels != -100
        return torch.where(mask, rows, 0.0).sum() / mask.sum()

    expected = run_linear(oracle, case, (), torch.float64, **kwargs)
    same = run_linear(reference.fused_linear_kd_loss, case, (), torch.bfloat16, **kwargs)
    ours = run_linear(kdops.fused_linear_kd_loss, case, (), torch.bfloat16, **kwargs)
    assert_close_to(expected, same, ours, torch.bfloat16)


def test_modules_take_teacher_mix():
    student, teachers = teachers_like((2, 5, V), 2, torch.float32, seed=13)
    mix = kdops.LogitSum((1.2, -0.2))
    assert torch.equal(kdops.KDLoss(teacher_mix=mix)(student, teachers),
                       kdops.kd_loss(student, teachers, teacher_mix=mix))
    hs, ws, bs, hts, wts, bts, labels = linear_teachers(2, seed=2)
    module = kdops.FusedLinearKDLoss(teacher_mix=kdops.Ensemble((0.5, 0.5)), hard_weight=0.2)
    assert torch.equal(module(hs, ws, hts, wts, labels, student_bias=bs, teacher_bias=bts),
                       kdops.fused_linear_kd_loss(hs, ws, hts, wts, labels, student_bias=bs, teacher_bias=bts,
                                                  teacher_mix=kdops.Ensemble((0.5, 0.5)), hard_weight=0.2))


def test_kd_loss_with_teachers_holds_one_chunk_at_a_time(monkeypatch):
    """Three teachers on logits: beyond the gradients, the mix and the loss hold one row chunk's temporaries
    (the chunk budget), recomputed in the backward; no [rows, V] tensor."""
    budget = 2**20
    monkeypatch.setattr(kdops.paths.torch_engine, "BUDGET_BYTES", budget)
    rows = 200
    student, teachers = teachers_like((rows, V), 3, torch.float32, seed=17)
    for backend in ("triton", "torch"):
        s = student.detach().clone().requires_grad_(True)
        with AllocationTracker() as tracker:
            kdops.kd_loss(s, teachers, teacher_mix=kdops.Ensemble((0.2, 0.3, 0.5)), backend=backend).backward()
            grad_bytes = s.grad.numel() * s.grad.element_size()
        assert tracker.peak - grad_bytes <= budget + rows * 64, backend


def test_fused_linear_with_teachers_stays_within_its_budget():
    """Two teachers from hidden states: beyond the gradients, peak memory within memory_budget plus per-row
    vectors (every model's chunk logits, the target, the mix's temporaries and the group's G are the plan's)."""
    hs, ws, bs, hts, wts, bts, labels = linear_teachers(2, rows=(6, 50), seed=23)
    budget = 2**20
    inputs = [x.detach().requires_grad_(True) for x in (hs, ws, bs)]
    with AllocationTracker() as tracker:
        kdops.fused_linear_kd_loss(inputs[0], inputs[1], hts, wts, labels, student_bias=inputs[2], teacher_bias=bts,
                                   teacher_mix=kdops.Ensemble((0.4, 0.6)), impl="chunked", backend="triton",
                                   memory_budget=budget, hard_weight=0.5).backward()
        grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in inputs)
    rows = hs.shape[0] * hs.shape[1]
    assert tracker.peak - grad_bytes <= budget + rows * 64 + V * 16


# --- errors ------------------------------------------------------------------------------------------------------


def test_mix_errors():
    student, (t1, t2) = teachers_like((4, V), 2, torch.float32, seed=19)
    for bad, match in (((0.5, 0.6), "sum to 1"), ((1.2, -0.2), "≥ 0"), ((math.nan, 1.0), "finite")):
        with pytest.raises(ValueError, match=match):
            kdops.Ensemble(bad)
    with pytest.raises(ValueError, match="finite"):
        kdops.LogitSum((1.0, math.inf))
    with pytest.raises(TypeError, match="sequence of numbers"):
        kdops.LogitSum(1.0)
    with pytest.raises(ValueError, match="at least one teacher"):
        kdops.Ensemble(())
    with pytest.raises(ValueError, match="2 teachers need teacher_mix"):
        kdops.kd_loss(student, [t1, t2])
    with pytest.raises(ValueError, match="3 weights for 2 teachers"):
        kdops.kd_loss(student, [t1, t2], teacher_mix=kdops.LogitSum((1.0, 1.0, 1.0)))
    with pytest.raises(TypeError, match="teacher_mix: expected kdops.Ensemble or kdops.LogitSum"):
        kdops.kd_loss(student, [t1, t2], teacher_mix=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"teacher_logits\[1\].*shape"):
        kdops.kd_loss(student, [t1, t2[:, :-1]], teacher_mix=kdops.Ensemble((0.5, 0.5)))
    with pytest.raises(ValueError, match="empty sequence"):
        kdops.kd_loss(student, [], teacher_mix=kdops.Ensemble((1.0,)))
    hs, ws, bs, hts, wts, bts, labels = linear_teachers(2)
    mix = kdops.Ensemble((0.5, 0.5))
    with pytest.raises(ValueError, match="teacher_hidden has 2 tensors and teacher_weight 1"):
        kdops.fused_linear_kd_loss(hs, ws, hts, wts[:1], labels, teacher_mix=mix)
    with pytest.raises(ValueError, match="teacher_bias has 1"):
        kdops.fused_linear_kd_loss(hs, ws, hts, wts, labels, teacher_bias=bts[:1], teacher_mix=mix)
    with pytest.raises(ValueError, match=r"teacher_weight\[1\].*vocabulary"):
        kdops.fused_linear_kd_loss(hs, ws, hts, [wts[0], wts[1][:-2]], labels, teacher_mix=mix)
    for impl in ("fused", "sliced"):
        with pytest.raises(ValueError, match=f"impl='{impl}'.*teacher_mix"):
            kdops.fused_linear_kd_loss(hs, ws, hts, wts, labels, teacher_mix=mix, impl=impl, backend="triton")
    with pytest.raises(ValueError, match="vocab_parallel.*teacher_mix"):
        kdops.kd_loss(student, [t1, t2], teacher_mix=mix, vocab_parallel=kdops.VocabParallel(0, V))
    with pytest.raises(ValueError, match=r"teacher_hidden\[1\]"):
        kdops.fused_linear_kd_loss(hs, ws, [hts[0], hts[1][:2]], wts, labels, teacher_mix=mix)
