"""Targets beyond one plain teacher, as tile transforms: final-logit softcaps and TAID's interpolated target,
against float64 oracles of their formulas written here (softcap c·tanh(z / c); TAID's
KL(softmax(((1 − t)·sg(s) + t·z) / T) ‖ softmax(s / T))); and TAID's schedule against a transcription of the
paper's update rule."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import kdops
import kdops.torch_math
from kdops import reference
from kdops.kernels import transforms
from oracle import TOLERANCE, logit_pair, rel_error
from test_topk import linear_inputs, oracle_rows, run_linear

from conftest import DEVICE

# --- oracles ---------------------------------------------------------------------------------------------------


def capped(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


def taid_rows(student, teacher, t, temperature):
    """KL(p_t ‖ q) per row in float64, p_t from (1 − t)·sg(s) + t·z (a side whose weight is 0 left out)."""
    s, z = student.double(), teacher.double()
    if t == 0:
        target = s.detach()
    elif t == 1:
        target = z
    else:
        target = (1 - t) * s.detach() + t * z
    log_p = torch.log_softmax(target / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    p = log_p.exp()
    live = p > 0
    return torch.where(live, p * (torch.where(live, log_p, 0.0) - torch.where(live, log_q, 0.0)), 0.0).sum(-1)


def taid_oracle(student, teacher, labels=None, *, divergence, temperature=1.0, **_):
    rows = taid_rows(student, teacher, divergence.t, temperature)
    mask = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != -100
    return torch.where(mask, rows, 0.0).sum() / mask.sum()


def run(fn, student, teacher, labels, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, labels, **kwargs)
    return [loss, *torch.autograd.grad(loss, (student, teacher), allow_unused=True, materialize_grads=True)]


def assert_close_to(oracle, same, ours, dtype):
    for name, o, r, k in zip(("loss", "student", "teacher"), oracle, same, ours):
        assert k.dtype == r.dtype, name
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"{name}: error {err:.3g} vs reference {ref_err:.3g}"


# --- TAID on logits --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("t", [0.3, 0.85])
def test_taid_kd_loss_matches_oracle(t, dtype, backend):
    """Loss, the student's gradient (through q only) and the teacher's (t times the target's) against the
    oracle; peaked rows, shared −inf entries, a vocabulary of several tiles that no block size divides."""
    s, z = logit_pair((3, 5, 1031), dtype, DEVICE, seed=4)
    labels = torch.randint(0, 1031, (3, 5), device=DEVICE)
    labels[1, ::2] = -100
    kwargs = dict(divergence=kdops.TAID(t), temperature=2.0)
    oracle = run(taid_oracle, s.double(), z.double(), labels, **kwargs)
    same = run(reference.kd_loss, s, z, labels, **kwargs)
    ours = run(kdops.kd_loss, s, z, labels, backend=backend, **kwargs)
    assert_close_to(oracle, same, ours, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_taid_endpoints(backend):
    """t = 0: the target is the student itself, zero loss and zero gradients, exactly (the kernels drop the
    teacher's side, −inf entries included); t = 1: forward KL, bit for bit."""
    s, z = logit_pair((4, 7, 389), torch.float32, DEVICE, seed=5)
    zero = run(kdops.kd_loss, s, z, None, divergence=kdops.TAID(0.0), backend=backend)
    assert all(torch.count_nonzero(x) == 0 for x in zero)
    one = run(kdops.kd_loss, s, z, None, divergence=kdops.TAID(1.0), backend=backend)
    kl = run(kdops.kd_loss, s, z, None, divergence="forward_kl", backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(one, kl))


def test_taid_modules_and_validation():
    s, z = logit_pair((2, 3, 97), torch.float32, DEVICE, seed=6)
    module = kdops.KDLoss(divergence=kdops.TAID(0.5), temperature=1.5)
    assert torch.equal(module(s, z), kdops.kd_loss(s, z, divergence=kdops.TAID(0.5), temperature=1.5))
    for bad in (-0.1, 1.5, math.nan, "0.5", True):
        with pytest.raises(ValueError, match="TAID: t must be"):
            kdops.TAID(bad)
    with pytest.raises(ValueError, match="unknown divergence 'taid'"):
        kdops.kd_loss(s, z, divergence="taid")
    ids, logprobs = torch.topk(torch.log_softmax(z, -1), 4)
    with pytest.raises(ValueError, match="TAID.*sparse teacher"):
        kdops.topk_kd_loss(s, ids, logprobs, divergence=kdops.TAID(0.5))
    with pytest.raises(ValueError, match="TAID.*sparse teacher"):
        kdops.TopKKDLoss(divergence=kdops.TAID(0.5))


# --- from hidden states: softcaps and TAID ----------------------------------------------------------------------


def linear_oracle(hs, ws, ht, wt, labels, *, divergence, temperature=1.0, hard_weight=0.0, soft_weight=1.0,
                  student_softcap=None, teacher_softcap=None, student_bias=None, **_):
    """The logits of both models in float64, capped, then the loss by formula (TAID) or by the reference's
    float64 math on the capped logits (every other divergence)."""
    vocab = min(ws.shape[0], wt.shape[0])
    s = capped(hs.double() @ ws[:vocab].double().T + student_bias[:vocab].double(), student_softcap)
    z = capped(ht.double() @ wt[:vocab].double().T, teacher_softcap)
    if isinstance(divergence, kdops.TAID):
        rows = taid_rows(s, z, divergence.t, temperature)
    else:
        rows = kdops.torch_math.divergence_rows(kdops.as_divergence(divergence), s, z, temperature)
    rows = soft_weight * rows
    mask = labels != -100
    if hard_weight:
        safe = torch.where(mask, labels, 0)
        rows = rows + hard_weight * (torch.logsumexp(s, -1) - s.gather(-1, safe[..., None])[..., 0])
    return torch.where(mask, rows, 0.0).sum() / mask.sum()


def linear_case(dtype, seed=0, rows=(3, 7), vocab=263, hs_width=24, ht_width=40):
    """Hidden states and weights whose logits spread like randn·4 (far past caps of 3 and 5: the tanh bites,
    and saturates in places), a teacher wider than the student with extra padding rows, labels."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*rows, hs_width, generator=g)
    ws = torch.randn(vocab, hs_width, generator=g) * (4.0 / hs_width ** 0.5)
    bs = torch.randn(vocab, generator=g)
    ht = torch.randn(*rows, ht_width, generator=g)
    wt = torch.randn(vocab + 5, ht_width, generator=g) * (6.0 / ht_width ** 0.5)
    labels = torch.randint(0, vocab, rows, generator=g)
    labels.view(-1)[::5] = -100
    return [x.to(DEVICE, dtype) for x in (hs, ws, bs, ht, wt)], labels.to(DEVICE)


def run_fused(fn, tensors, labels, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    hs, ws, bs, ht, wt = leaves
    loss = fn(hs, ws, ht, wt, labels, student_bias=bs, **kwargs)
    return [loss, *torch.autograd.grad(loss, leaves)]


PATHS = [("fused", "triton"), ("chunked", "triton"), ("chunked", "torch")]


@pytest.mark.parametrize("impl,backend", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,caps", [
    ("generalized_jsd", (3.0, 5.0)), ("reverse_kl", (None, 5.0)), (kdops.TAID(0.6), (3.0, None)),
    (kdops.TAID(0.25), (3.0, 5.0))])
def test_fused_linear_transforms_match_oracle(divergence, caps, dtype, impl, backend):
    """Every input's gradient (the teacher's too: a trainable teacher) against the float64 oracle, within
    the same-dtype reference's error + TOLERANCE; the chunked paths in many chunks and several groups."""
    tensors, labels = linear_case(dtype)
    kwargs = dict(divergence=divergence, temperature=1.5, hard_weight=0.4, soft_weight=0.8,
                  student_softcap=caps[0], teacher_softcap=caps[1])
    oracle = run_fused(linear_oracle, [x.double() for x in tensors], labels, **kwargs)
    same = run_fused(reference.fused_linear_kd_loss, tensors, labels, **kwargs)
    ours = run_fused(kdops.fused_linear_kd_loss, tensors, labels, impl=impl, backend=backend,
                     memory_budget=3 * 263 * 4 * 8 if impl == "chunked" else None, **kwargs)
    for name, o, r, k in zip(("loss", "hs", "ws", "bs", "ht", "wt"), oracle, same, ours):
        assert k.dtype == r.dtype, name
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"{name}: error {err:.3g} vs reference {ref_err:.3g}"


def test_softcaps_change_the_loss_and_the_modules_take_them():
    """A cap that bites changes the loss (the test above could not pass by ignoring caps); the module takes
    the caps as options."""
    tensors, labels = linear_case(torch.float32, seed=1)
    hs, ws, bs, ht, wt = tensors
    plain = kdops.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs)
    capped_loss = kdops.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, student_softcap=3.0,
                                             teacher_softcap=5.0)
    assert abs(float(capped_loss - plain)) > 1e-2 * float(plain)
    module = kdops.FusedLinearKDLoss(student_softcap=3.0, teacher_softcap=5.0)
    assert torch.equal(module(hs, ws, ht, wt, labels, student_bias=bs), capped_loss)


@pytest.mark.parametrize("bad,error", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                       (math.nan, ValueError), (True, TypeError), ("30", TypeError)])
def test_softcap_errors(bad, error):
    tensors, labels = linear_case(torch.float32)
    hs, ws, bs, ht, wt = tensors
    for name in ("student_softcap", "teacher_softcap"):
        with pytest.raises(error, match=f"{name}: expected None or a positive finite number"):
            kdops.fused_linear_kd_loss(hs, ws, ht, wt, labels, **{name: bad})
        with pytest.raises(error, match=f"{name}: expected None or a positive finite number"):
            kdops.FusedLinearKDLoss(**{name: bad})
        with pytest.raises(error, match=f"{name}: expected None or a positive finite number"):
            reference.fused_linear_kd_loss(hs, ws, ht, wt, labels, **{name: bad})
    with pytest.raises(error, match="student_softcap: expected None or a positive finite number"):
        kdops.fused_linear_topk_kd_loss(hs, ws, *torch.topk(torch.randn(3, 7, 263).log_softmax(-1), 4),
                                        student_softcap=bad)


# --- the tile functions' precision -----------------------------------------------------------------------------


@triton.jit
def softcap_kernel(z_ptr, value_ptr, slope_ptr, cap, N: tl.constexpr):
    i = tl.arange(0, N)
    z = tl.load(z_ptr + i)
    value = transforms.softcap(z, cap)
    tl.store(value_ptr + i, value)
    tl.store(slope_ptr + i, transforms.softcap_slope(value, cap))


@pytest.mark.parametrize("dtype,ulp", [(torch.float32, 2.0 ** -23), (torch.float64, 2.0 ** -52)])
def test_softcap_tile_functions_are_precise_everywhere(dtype, ulp):
    """cap·tanh(z / cap) from the kernels' formulas, in float32 and float64: within a few of the dtype's ulps
    of torch's float64 tanh (itself within about one) over 34 orders of magnitude of z — tiny, at the
    series' edge |z / cap| = ¼, where tanh saturates, huge — and −inf kept absent. The slope, from the capped
    value u as PyTorch's tanh backward takes it, (1 − u)(1 + u): within a few ulps of u's own rounding
    carried through 1 − u (relative 1 / (1 − |u|) of an ulp)."""
    magnitudes = torch.logspace(-30, 4, 400, dtype=torch.float64)
    edges = torch.tensor([0.25, 0.2499999, 0.2500001], dtype=torch.float64)
    z = torch.cat([magnitudes, -magnitudes, edges * 30.0, edges * 0.7, torch.tensor([0.0, float("-inf")],
                                                                                    dtype=torch.float64)])
    z = torch.cat([z, torch.zeros(1024 - z.numel(), dtype=torch.float64)]).to(dtype)
    for cap in (30.0, 0.7):
        value = torch.full_like(z, math.nan, device=DEVICE)
        slope = torch.full_like(z, math.nan, device=DEVICE)
        softcap_kernel[(1,)](z.to(DEVICE), value, slope, cap, N=1024)
        value, slope = value.cpu(), slope.cpu()
        exact = cap * torch.tanh(z.double() / cap)
        exact_slope = torch.cosh(z.double() / cap).pow(-2)
        finite = torch.isfinite(z)
        assert value[~finite].item() == float("-inf") and slope[~finite].item() == 0.0
        rel = ((value.double() - exact).abs() / exact.abs().clamp_min(1e-300))[finite & (z != 0)]
        assert float(rel.max()) < 4 * ulp
        live = finite & (exact_slope > 1e-30)
        rel = ((slope.double() - exact_slope).abs() / exact_slope)[live]
        u = torch.tanh(z.double() / cap).abs()[live]
        assert bool((rel <= 4 * (1 + 1 / (1 - u)) * ulp).all())


# --- sparse teachers: the student's softcap ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("tail,hard,impl", [("bucket", 0.5, "chunked"), ("renormalize", 0.0, "gathered"),
                                            ("zero", 0.3, "chunked")])
def test_topk_student_softcap_matches_oracle(tail, hard, impl, backend):
    tensors, ids, logprobs, labels = linear_inputs(torch.float32)

    def oracle(hs, ws, ids, logprobs, labels, *, student_bias, divergence, temperature=1.0, tail="bucket",
               hard_weight=0.0, soft_weight=1.0, student_softcap=None):
        logits = capped(hs.double() @ ws.double().T + student_bias.double(), student_softcap)
        rows = soft_weight * oracle_rows(logits, ids, logprobs, divergence, temperature, tail)
        mask = labels != -100
        if hard_weight > 0:
            safe = torch.where(mask, labels, 0)
            rows = rows + hard_weight * (torch.logsumexp(logits, -1) - logits.gather(-1, safe[..., None])[..., 0])
        return torch.where(mask, rows, 0.0).sum() / mask.sum()

    kwargs = dict(divergence=kdops.GeneralizedJSD(0.3), temperature=2.0, tail=tail, hard_weight=hard,
                  soft_weight=0.7, student_softcap=2.5)
    expected = run_linear(oracle, [x.double() for x in tensors], ids, logprobs, labels, **kwargs)
    same = run_linear(reference.fused_linear_topk_kd_loss, tensors, ids, logprobs, labels, **kwargs)
    ours = run_linear(kdops.fused_linear_topk_kd_loss, tensors, ids, logprobs, labels, impl=impl, backend=backend,
                      memory_budget=3 * 263 * 4 * 8, **kwargs)
    for what, o, r, k in zip(("loss", "hidden", "weight", "bias"), expected, same, ours):
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[torch.float32], f"{what}: error {err:.3g} vs reference {ref_err:.3g}"
    module = kdops.FusedLinearTopKKDLoss(tail=tail, student_softcap=2.5, backend=backend)
    hs, ws, bs = tensors
    assert torch.equal(module(hs, ws, ids, logprobs, labels, student_bias=bs),
                       kdops.fused_linear_topk_kd_loss(hs, ws, ids, logprobs, labels, student_bias=bs, tail=tail,
                                                       student_softcap=2.5, backend=backend))


# --- TAID's schedule ---------------------------------------------------------------------------------------------


def transcribed_schedule(losses, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, num_steps=100):
    """The paper's update rule, transcribed: t after each loss of the sequence."""
    t, momentum, previous, out = t_start, 0.0, None, []
    for step, loss in enumerate(losses, start=1):
        if previous is not None:
            relative = (previous - loss) / previous
            momentum = beta * momentum + (1 - beta) * relative
            linear = t_start + (t_end - t_start) * min(1.0, step / num_steps)
            t = min(t_end, max(linear, t + alpha * (1 / (1 + math.exp(-momentum))) * (1 - t)))
        previous = loss
        out.append(t)
    return out


@pytest.mark.parametrize("options", [dict(), dict(alpha=0.05, num_steps=400), dict(t_start=0.1, t_end=0.9,
                                                                                   alpha=0.3, beta=0.5,
                                                                                   num_steps=20)])
def test_taid_schedule_follows_the_update_rule(options):
    g = torch.Generator().manual_seed(0)
    # A falling loss with noise and a bump: momentum of both signs; long enough for t to reach t_end.
    losses = [float(3.0 * math.exp(-i / 40) + 0.3 + 0.05 * torch.rand((), generator=g)) for i in range(300)]
    losses[100:110] = [x * 1.5 for x in losses[100:110]]
    expected = transcribed_schedule(losses, **options)
    schedule = kdops.TAIDSchedule(**{"num_steps": 100, **options})
    assert schedule.t == schedule.state_dict()["t_start"] and schedule.divergence == kdops.TAID(schedule.t)
    got = []
    for i, loss in enumerate(losses):
        got.append(schedule.update(torch.tensor(loss) if i % 2 else loss))
        if i == 150:  # a checkpoint: a fresh schedule resumes from its state
            restored = kdops.TAIDSchedule(num_steps=1)
            restored.load_state_dict(schedule.state_dict())
            schedule = restored
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert all(a <= b for a, b in zip(got, got[1:])) and schedule.divergence == kdops.TAID(schedule.t)
    if schedule.num_steps <= len(losses):  # the linear floor has reached t_end
        assert schedule.t == schedule.t_end


def test_taid_schedule_adapts_above_the_linear_floor():
    """A steadily falling loss and a large alpha move t faster than the linear schedule; a flat loss follows
    the linear schedule exactly."""
    fast = kdops.TAIDSchedule(alpha=0.5, num_steps=1000)
    flat = kdops.TAIDSchedule(alpha=0.0, num_steps=1000)
    for step in range(1, 11):
        fast.update(10.0 / step)
        flat.update(1.0)
    assert fast.t > fast.linear_t(10) + 0.1
    assert flat.t == pytest.approx(flat.linear_t(10))


@pytest.mark.parametrize("kwargs,match", [
    (dict(t_start=-0.1), "t_start must be in"), (dict(t_start=0.5, t_end=0.4), "t_end must be in"),
    (dict(alpha=2.0), "alpha must be in"), (dict(beta=math.nan), "beta must be a finite number"),
    (dict(num_steps=0), "num_steps must be a positive int"), (dict(num_steps=2.5), "num_steps must be a positive"),
])
def test_taid_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kdops.TAIDSchedule(**{"num_steps": 10, **kwargs})
    with pytest.raises(ValueError, match="the loss must be finite"):
        kdops.TAIDSchedule(num_steps=10).update(math.inf)
