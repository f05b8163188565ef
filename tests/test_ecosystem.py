"""Bugs that other distillation libraries shipped, one test per class (issue 12, part 5): each test's
docstring names the report it guards against. Every test runs kd_loss on both backends and
fused_linear_kd_loss on its three paths (impl fused and chunked with the Triton kernels, and the torch
backend), unless it says otherwise.

Expected values come from formulas written out here in float64 (softmax, KL, mixtures by hand), not from
`kdops.reference`, wherever a convention is what is tested (temperature, JSD's β); elsewhere from the
float64 oracle under SPEC "Accuracy" (`oracle.py`).
"""

from __future__ import annotations

import pytest
import torch

import kdops
from kdops import reference
from conftest import DEVICE
from oracle import TOLERANCE, assert_matches_oracle, make_logits, rel_error

F64 = torch.float64
KD_BACKENDS = ["triton", "torch"]
FUSED_PATHS = {"fused": ("fused", "triton"), "chunked": ("chunked", "triton"), "torch": ("chunked", "torch")}
FUSED_TENSORS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                 "teacher_bias")


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------


def fused_fn(path):
    """fused_linear_kd_loss on `path` (impl, backend), taking the tensors and options as keywords."""
    impl, backend = FUSED_PATHS[path]

    def fn(**kwargs):
        return kdops.fused_linear_kd_loss(**kwargs, impl=impl, backend=backend)

    return fn


def fused(path, x, **options):
    return fused_fn(path)(**x, **options)


def fused_run(fn, x, dtype=None, **options):
    """[loss, gradients of the tensors of x] of fn(**x) on fresh leaves (cast to `dtype` if given)."""
    inputs = {k: (v.detach().clone().to(dtype or v.dtype).requires_grad_(True) if k in FUSED_TENSORS and
                  v is not None else v) for k, v in x.items()}
    loss = fn(**inputs, **options)
    wrt = [inputs[k] for k in FUSED_TENSORS if inputs.get(k) is not None]
    return [loss.detach(), *torch.autograd.grad(loss, wrt, torch.ones_like(loss))]


def assert_fused_matches_oracle(path, x, **options):
    """SPEC "Accuracy" for fused_linear_kd_loss on `path`: loss and every gradient. Returns kdops' outputs."""
    dtype = x["student_hidden"].dtype
    oracle = fused_run(reference.fused_linear_kd_loss, x, F64, **options)
    same = fused_run(reference.fused_linear_kd_loss, x, **options)
    ours = fused_run(fused_fn(path), x, **options)
    for i, (o, r, k) in enumerate(zip(oracle, same, ours)):
        assert torch.isfinite(k).all(), f"output {i}: not finite"
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"output {i}: error {err:.3g} vs reference {ref_err:.3g}"
    return ours


def logits_of(x, dtype=F64):
    """(student, teacher) logits of fused inputs over the shared vocabulary, in `dtype`."""
    vocab = min(x["student_weight"].shape[0], x["teacher_weight"].shape[0])

    def side(h, w, b):
        out = h.to(dtype) @ w[:vocab].to(dtype).T
        return out if b is None else out + b[:vocab].to(dtype)

    return (side(x["student_hidden"], x["student_weight"], x.get("student_bias")),
            side(x["teacher_hidden"], x["teacher_weight"], x.get("teacher_bias")))


def hand_kl(lp, lq):
    """KL(P ‖ Q) per row from float64 log-probabilities: Σ p (log p − log q), 0 where p = 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)


def hand_jsd(lp, lq, beta):
    """β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = βp + (1 − β)q, computed from the probabilities themselves
    (float64, logits of moderate spread: nothing underflows)."""
    m = beta * lp.exp() + (1 - beta) * lq.exp()
    return beta * hand_kl(lp, m.log()) + (1 - beta) * hand_kl(lq, m.log())


H_GRID, W_GRID = 2.0 ** -7, 2.0 ** -10


def fused_inputs(seed, n=11, hs=24, ht=16, vocab=131, dtype=torch.float32, bias=True):
    """Hidden states, weights [V, H] and biases whose logits have std ≈ 4, teacher rows peaked at ≈ 48.
    Hidden states lie on a 2^-7 grid and weights and biases on a 2^-10 grid, coarse enough that every
    float32 matmul of them is exact in any summation order (partial sums below 2^7 on a 2^-17 grid): the
    float32 logits of every path equal the float64 ones, and only the loss's own math is compared (with
    `dtype` float32; bf16 rounds the hidden states once more)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grid=W_GRID):
        return torch.round(torch.randn(*shape, generator=g, dtype=F64) * scale / grid) * grid

    x = dict(student_hidden=randn(n, hs, grid=H_GRID), student_weight=randn(vocab, hs, scale=4 * hs ** -0.5),
             teacher_hidden=randn(n, ht, grid=H_GRID), teacher_weight=randn(vocab, ht, scale=4 * ht ** -0.5),
             student_bias=randn(vocab) if bias else None, teacher_bias=randn(vocab) if bias else None)
    peaked = x["teacher_weight"][torch.arange(0, n, 3) * 5 % vocab] * 3
    x["teacher_hidden"][::3] = torch.round(peaked / H_GRID) * H_GRID
    for side in ("student", "teacher"):
        bound = (x[f"{side}_hidden"].abs() @ x[f"{side}_weight"].abs().T).max()
        assert bound < 2 ** 7, f"{side}: partial sums up to {bound:.3g}"
    return {k: None if v is None else v.to(DEVICE, dtype) for k, v in x.items()}


# ------------------------------------------------------------------------------------------------------
# Liger-Kernel #769, #1453: NaN when a mixture's log underflows
# ------------------------------------------------------------------------------------------------------

MIXTURE_DIVERGENCES = [kdops.GeneralizedJSD(beta=0.5), kdops.GeneralizedJSD(beta=0.1), kdops.GeneralizedJSD(beta=0.9),
                       kdops.SkewForwardKL(alpha=0.1), kdops.SkewReverseKL(alpha=0.3)]


def underflowing_logits(seed=0, rows=13, vocab=211):
    """float32 student and teacher logits whose log-probabilities at T = 0.5 go far below −104 (where
    float32's exp is 0) on both sides at the same entries: rows peaked at +60 over randn·4, and rows of
    spread 30."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * 4
    t = s + torch.randn(rows, vocab, generator=g)
    peaks = torch.randint(0, vocab, (rows,), generator=g)
    for r in range(0, rows, 2):
        s[r, peaks[r]] = t[r, peaks[r]] = 60.0
        t[r, (peaks[r] + 1) % vocab] = 58.0
    s[1::2] *= 7.5
    t[1::2] *= 7.5
    return s.to(DEVICE), t.to(DEVICE)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", MIXTURE_DIVERGENCES, ids=repr)
def test_mixture_log_underflow_is_not_nan_kd_loss(divergence, backend):
    """Liger-Kernel #769 (LigerFusedLinearJSDLoss) and #1453 (its JSD kernel): the mixture was formed in
    probability space, βp + (1−β)q, and its log taken; where both probabilities underflow float32
    (log-probabilities below about −104, closer at T < 1) that is log 0, and 0·(−inf) made the loss NaN.
    Here a quarter or more of the entries underflow on both sides at T = 0.5: loss and gradients finite
    and exact (SPEC "Accuracy" against the float64 oracle), for JSD at three β and both skew KLs."""
    s, t = underflowing_logits()
    lq, lp = torch.log_softmax(s / 0.5, -1), torch.log_softmax(t / 0.5, -1)
    both = (lq < -104) & (lp < -104)
    assert both.sum() > s.numel() // 4 and (lq.exp()[both] == 0).all() and (lp.exp()[both] == 0).all()
    ours = assert_matches_oracle(kdops.kd_loss, reference.kd_loss, s, t, divergence=divergence, temperature=0.5,
                                 backend=backend, reduction="sum")
    assert all(torch.isfinite(x).all() for x in ours)


def near_student(x, seed):
    """x with a student that is the teacher (same width) plus noise: hidden states ±0.1, weights ±0.1,
    biases ±0.3, on the grids (the two models agree on their top entries, as after some training)."""
    g = torch.Generator().manual_seed(seed)

    def jitter(v, scale, grid):
        v = v.double().cpu() + scale * torch.randn(v.shape, generator=g, dtype=F64)
        return (torch.round(v / grid) * grid).to(DEVICE, x["student_hidden"].dtype)

    return dict(x, student_hidden=jitter(x["teacher_hidden"], 0.1, H_GRID),
                student_weight=jitter(x["teacher_weight"], 0.1, W_GRID),
                student_bias=jitter(x["teacher_bias"], 0.3, W_GRID))


@pytest.mark.parametrize("path", list(FUSED_PATHS))
@pytest.mark.parametrize("divergence", [kdops.GeneralizedJSD(beta=0.5), kdops.SkewReverseKL(alpha=0.3)], ids=repr)
def test_mixture_log_underflow_is_not_nan_fused(divergence, path):
    """Liger-Kernel #769 and #1453 (their fused linear JSD): logits from hidden states and weights of a
    student close to its teacher, at T = 0.2: a third of the log-probabilities lie below −104 on both
    sides (the tails), the heads overlap. Finite, exact loss and gradients (SPEC "Accuracy")."""
    x = near_student(fused_inputs(seed=2, hs=16, ht=16), seed=3)
    s, t = logits_of(x, torch.float32)
    both = (torch.log_softmax(s / 0.2, -1) < -104) & (torch.log_softmax(t / 0.2, -1) < -104)
    assert both.sum() > s.numel() // 4
    assert_fused_matches_oracle(path, x, divergence=divergence, temperature=0.2, reduction="sum")


# ------------------------------------------------------------------------------------------------------
# Liger-Kernel #974: ignore_index silently not applied
# ------------------------------------------------------------------------------------------------------

IGNORE = 3  # a real token id: labels equal to it are ignored, -100 is then an ordinary (unused) label


def ignored_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, generator=g) > 0.35
    keep[0] = keep[-1] = True
    keep[1] = False
    return keep.to(DEVICE)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_ignore_index_is_applied_kd_loss(reduction, backend):
    """Liger-Kernel #974: LigerFusedLinearJSDLoss accepted `ignore_index` and never used it (padding and
    prompt tokens counted, and the mean divided by all tokens). Rows whose label is ignore_index (here 3,
    a real token id; -100 is then an ordinary label) must count for nothing: the loss is that of the other
    rows alone (computed on them alone, no labels), their mean for batchmean; ignored rows get exactly
    zero gradient whatever their logits (here garbage of spread 80), the kept rows the gradients they get
    alone."""
    n, vocab = 17, 157
    s, t = make_logits((n, vocab), generator=torch.Generator().manual_seed(0)), make_logits((n, vocab))
    s, t = s.to(DEVICE), t.to(DEVICE)
    keep = ignored_rows(n, seed=1)
    s[~keep] = torch.randn(int((~keep).sum()), vocab, device=DEVICE) * 80
    labels = torch.full((n,), -100, device=DEVICE)
    labels[~keep] = IGNORE
    options = dict(divergence="generalized_jsd", temperature=1.5, backend=backend)

    s_all, t_all = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = kdops.kd_loss(s_all, t_all, labels, ignore_index=IGNORE, reduction=reduction, **options)
    s_kept, t_kept = s[keep].clone().requires_grad_(True), t[keep].clone().requires_grad_(True)
    rows = kdops.kd_loss(s_kept, t_kept, reduction="none", **options)
    expected = {"none": None, "sum": rows.sum(), "batchmean": rows.mean()}[reduction]
    if reduction == "none":
        expected = torch.zeros(n, device=DEVICE).masked_scatter(keep, rows)
    assert rel_error(loss, expected) < 1e-6
    upstream = torch.randn(loss.shape, device=DEVICE) if reduction == "none" else torch.ones_like(loss)
    g_s, g_t = torch.autograd.grad(loss, (s_all, t_all), upstream)
    if reduction == "none":
        kept_upstream = upstream[keep]
    else:
        kept_upstream = upstream / (keep.sum() if reduction == "batchmean" else 1)
    e_s, e_t = torch.autograd.grad(rows, (s_kept, t_kept), kept_upstream.expand(rows.shape))
    for got, want in ((g_s, e_s), (g_t, e_t)):
        assert torch.count_nonzero(got[~keep]) == 0
        assert rel_error(got[keep], want) < 1e-6


@pytest.mark.parametrize("path", list(FUSED_PATHS))
def test_ignore_index_is_applied_fused(path):
    """Liger-Kernel #974 for the fused API, with a hard-label term: with ignore_index = 3, rows
    labelled 3 count for nothing in the soft or the hard term: the loss (batchmean) and every gradient
    equal those of the kept rows alone; the ignored rows' hidden states (garbage of norm ~100 here) get
    exactly zero gradient."""
    x = fused_inputs(seed=2)
    n, vocab = x["student_hidden"].shape[0], x["student_weight"].shape[0]
    keep = ignored_rows(n, seed=3)
    x["student_hidden"][~keep] *= 25
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    labels[labels == IGNORE] = IGNORE + 1
    labels[~keep] = IGNORE
    options = dict(divergence="generalized_jsd", temperature=2.0, hard_weight=0.5, soft_weight=0.5)
    got = fused_run(fused_fn(path), dict(x, labels=labels), ignore_index=IGNORE, **options)
    kept = {k: (v[keep] if k in ("student_hidden", "teacher_hidden") else v) for k, v in x.items()}
    want = fused_run(fused_fn(path), dict(kept, labels=labels[keep]), ignore_index=-100,
                     **options)
    for i, name in enumerate(("loss",) + FUSED_TENSORS):
        g, w = got[i], want[i]
        if name.endswith("hidden"):
            assert torch.count_nonzero(g[~keep]) == 0, f"{name}: ignored rows got a gradient"
            g = g[keep]
        assert rel_error(g, w) < 1e-5, f"{name}: {rel_error(g, w):.3g}"


# ------------------------------------------------------------------------------------------------------
# TRL #5731: temperature silently different from the one asked
# ------------------------------------------------------------------------------------------------------

TEMPERATURES = [0.5, 2.0, 3.7]


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_temperature_divides_both_logits_kd_loss(backend):
    """TRL #5731: GKD's Liger path ran at the generation temperature (0.9) where the default path used
    1.0, so the loss silently had another temperature than intended. SPEC: the T passed divides both the
    student's and the teacher's logits, and the loss is not multiplied by T². Checked against KL(p‖q)
    and JSD(β = 0.5) written out by hand in float64 at each T, and the student gradient against its
    closed form (q − p) / T / rows for forward KL (the backward must use the same T)."""
    n, vocab = 9, 97
    s, t = (make_logits((n, vocab), generator=torch.Generator().manual_seed(i), masked_every=0).to(DEVICE)
            for i in (5, 6))
    values = []
    for temperature in TEMPERATURES:
        lq = torch.log_softmax(s.double() / temperature, -1)
        lp = torch.log_softmax(t.double() / temperature, -1)
        student = s.clone().requires_grad_(True)
        kl = kdops.kd_loss(student, t, temperature=temperature, backend=backend)
        assert rel_error(kl, hand_kl(lp, lq).mean()) < 1e-5, temperature
        (grad,) = torch.autograd.grad(kl, student)
        assert rel_error(grad, (lq.exp() - lp.exp()) / temperature / n) < 1e-5, temperature
        jsd = kdops.kd_loss(s, t, divergence="generalized_jsd", temperature=temperature, backend=backend)
        assert rel_error(jsd, hand_jsd(lp, lq, 0.5).mean()) < 1e-5, temperature
        values.append(kl.item())
    assert len(set(values)) == len(values)  # the temperatures give different losses: T reached the loss


@pytest.mark.parametrize("path", list(FUSED_PATHS))
def test_temperature_divides_both_logits_fused(path):
    """TRL #5731 for the fused API (there, Liger's fused JSD loss): soft_weight · KL(softmax(t/T) ‖
    softmax(s/T)) + hard_weight · CE(s at T = 1), by hand in float64 from the logits h·Wᵀ + b, at two
    temperatures; the student's hidden-state gradient G·W with the closed-form logit gradient
    G = (soft · (q_T − p_T) / T + hard · (softmax(s) − onehot(label))) / rows. The same fix also removed
    Liger's default 0.5 · CE term: kdops' defaults (hard_weight 0, soft_weight 1) are the divergence alone."""
    x = fused_inputs(seed=7)
    n = x["student_hidden"].shape[0]
    labels = torch.randint(0, x["student_weight"].shape[0], (n,), generator=torch.Generator().manual_seed(8))
    labels = labels.to(DEVICE)
    s, t = logits_of(x)
    for temperature in (0.5, 3.7):
        lq = torch.log_softmax(s / temperature, -1)
        lp = torch.log_softmax(t / temperature, -1)
        ce = -torch.log_softmax(s, -1).gather(1, labels[:, None])[:, 0]
        expected = (0.6 * hand_kl(lp, lq) + 0.4 * ce).mean()
        grad_logits = (0.6 * (lq.exp() - lp.exp()) / temperature
                       + 0.4 * (torch.softmax(s, -1) - torch.nn.functional.one_hot(labels, s.shape[1]))) / n
        hidden = x["student_hidden"].clone().requires_grad_(True)
        loss = fused(path, dict(x, student_hidden=hidden, labels=labels), temperature=temperature, soft_weight=0.6,
                     hard_weight=0.4)
        assert rel_error(loss, expected) < 1e-5, temperature
        (grad,) = torch.autograd.grad(loss, hidden)
        assert rel_error(grad, grad_logits @ x["student_weight"].double()) < 1e-5, temperature
    defaults = fused(path, dict(x, labels=labels))  # T = 1, no hard-label term
    kl = hand_kl(torch.log_softmax(t, -1), torch.log_softmax(s, -1)).mean()
    assert rel_error(defaults, kl) < 1e-5


# ------------------------------------------------------------------------------------------------------
# TRL #3043: JSD's β convention and its endpoints
# ------------------------------------------------------------------------------------------------------


def expected_jsd(lp, lq, beta):
    """SPEC's generalized_jsd: β = 0 forward KL(p‖q), β = 1 reverse KL(q‖p), else the β-mixture JSD."""
    if beta == 0:
        return hand_kl(lp, lq)
    if beta == 1:
        return hand_kl(lq, lp)
    return hand_jsd(lp, lq, beta)


BETAS = [0.0, 1.0, 0.2, 0.8]


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_jsd_beta_convention_kd_loss(backend):
    """TRL #3043: GKDTrainer mixed β·student + (1 − β)·teacher where the definition is β·teacher +
    (1 − β)·student; with that fixed the formula is 0 at β = 0 and 1, which are therefore special cases.
    SPEC: β = 0 is forward KL(p‖q), β = 1 reverse KL(q‖p), and in between m = βp + (1 − β)q weighs the
    teacher by β: ℓ = β·KL(p‖m) + (1 − β)·KL(q‖m). Per row, by hand in float64; the endpoints also equal
    kdops' own forward_kl / reverse_kl, and β = 0.2 differs from β = 0.8 (a swap would be seen)."""
    s, t = (make_logits((7, 3, 89), generator=torch.Generator().manual_seed(i), masked_every=0).to(DEVICE)
            for i in (9, 10))
    lq, lp = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    rows = {}
    for beta in BETAS:
        rows[beta] = kdops.kd_loss(s, t, divergence=kdops.GeneralizedJSD(beta=beta), reduction="none", backend=backend)
        assert rel_error(rows[beta], expected_jsd(lp, lq, beta)) < 1e-5, beta
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        assert rel_error(rows[beta], kdops.kd_loss(s, t, divergence=name, reduction="none", backend=backend)) < 1e-6
    assert rel_error(rows[0.2], rows[0.8]) > 1e-2


@pytest.mark.parametrize("path", list(FUSED_PATHS))
def test_jsd_beta_convention_fused(path):
    """TRL #3043 for the fused API: β = 0, 1 and 0.2 per row against the hand formulas of the logits."""
    x = fused_inputs(seed=11, bias=False)
    s, t = logits_of(x)
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    for beta in (0.0, 1.0, 0.2):
        got = fused(path, x, divergence=kdops.GeneralizedJSD(beta=beta), reduction="none")
        assert rel_error(got, expected_jsd(lp, lq, beta)) < 1e-5, beta


# ------------------------------------------------------------------------------------------------------
# ms-swift #10156: negative JSD with a bf16 teacher and an fp32 student
# ------------------------------------------------------------------------------------------------------

ALL_DIVERGENCES = [*kdops.DIVERGENCES, kdops.GeneralizedJSD(beta=0.1), kdops.AlphaBeta(alpha=0.5, beta=0.5),
                   kdops.AlphaBeta(alpha=1.5, beta=0.3)]
# Every divergence is ≥ 0 exactly; computed, a row may fall below 0 by rounding only. The divergences
# between near-identical distributions are differences of sums of order 1 (KL, JSD, skews, TVD: Σ p = 1;
# α-β: sums of order 1/(αβ) ≈ 7 for its defaults, α = 0.2, β = 0.7): a few float32 ulps of those sums.
NEGATIVE_TOLERANCE = 2e-6


def near_identical_rows(seed=12, rows=18, vocab=173):
    """A bf16 teacher (randn·4, even rows peaked at +30) and an fp32 student: the teacher's own values
    (rows 0, 3, ...: the same distribution), and the teacher plus noise of 1e-3 (rows 1, 4, ...) and 5e-2."""
    g = torch.Generator().manual_seed(seed)
    t = make_logits((rows, vocab), torch.bfloat16, generator=g, masked_every=0, peaked_every=2)
    noise = torch.tensor([0.0, 1e-3, 5e-2]).repeat(rows // 3)[:, None]
    s = t.float() + noise * torch.randn(rows, vocab, generator=g)
    return s.to(DEVICE), t.to(DEVICE)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_loss_is_not_negative_kd_loss(temperature, backend):
    """ms-swift #10156: Megatron GKD's JSD (β = 0.5) came out negative (−1.7e-4, where float64 gives
    +5e-4) with fp32 student and bf16 teacher logits, the teacher rounded through the temperature scaling
    and probabilities before meeting the student. Every divergence, per row (reduction "none"), on a
    student equal to its teacher or within 1e-3 or 5e-2 of it: ℓ ≥ −NEGATIVE_TOLERANCE (2e-6: rounding of
    sums of order 1 to 7), and the identical rows' ℓ within that of 0."""
    s, t = near_identical_rows()
    for divergence in ALL_DIVERGENCES:
        rows = kdops.kd_loss(s, t, divergence=divergence, temperature=temperature, reduction="none", backend=backend)
        assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
        assert rows.min() >= -NEGATIVE_TOLERANCE, (divergence, rows.min().item())
        assert rows[::3].abs().max() <= NEGATIVE_TOLERANCE, (divergence, rows[::3])
        assert rows[2::3].max() > 10 * NEGATIVE_TOLERANCE  # the noisiest rows are not ~0: a real test


@pytest.mark.parametrize("path", list(FUSED_PATHS))
def test_loss_is_not_negative_fused(path):
    """ms-swift #10156 for the fused API: a bf16 teacher (hidden states, weights) and an fp32 student
    equal to it or within 1e-3 or 3e-3 of it, row by row: ℓ ≥ −NEGATIVE_TOLERANCE for every divergence
    (default parameters)."""
    x = fused_inputs(seed=13, n=12, hs=16, ht=16, bias=False, dtype=torch.bfloat16)
    noise = torch.tensor([0.0, 1e-3, 3e-3]).repeat(4)[:, None].to(DEVICE)
    x["student_hidden"] = x["teacher_hidden"].float() + noise * torch.randn(12, 16, device=DEVICE)
    x["student_weight"] = x["teacher_weight"].float()
    for divergence in kdops.DIVERGENCES:  # default parameters (the others: the kd_loss test)
        rows = fused(path, x, divergence=divergence, reduction="none")
        assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
        assert rows.min() >= -NEGATIVE_TOLERANCE, (divergence, rows.min().item())
        assert rows[::3].abs().max() <= NEGATIVE_TOLERANCE, (divergence, rows[::3])


# ------------------------------------------------------------------------------------------------------
# verl #7806: a clamp that kills gradients
# ------------------------------------------------------------------------------------------------------

STARVED, SHUNNED = 17, 40  # entries that the student, resp. the teacher, all but rules out


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "skew_reverse_kl"])
def test_near_zero_rows_keep_their_gradient(divergence, backend):
    """verl #7806 (review): the distillation loss wrapper's `clamp_min(0)` returned zero loss and zero
    gradient wherever the computed per-token value was negative. kdops clamps nothing: rows of a student
    within 1e-3 of its teacher have losses of 1e-7..1e-6, and each such row keeps its own gradient,
    within 1e-2 of the float64 oracle's, row by row (a zeroed row is off by 1). (Rows peaked at +30 are
    left out: their gradients, ~1e-14, are below float32's resolution of q − p ≈ 1 − 1.)"""
    s, t = near_identical_rows()
    rows = [r for r in range(s.shape[0]) if r % 3 == 1 and r % 2 == 1]  # noise 1e-3, not peaked
    student = s.clone().requires_grad_(True)
    loss = kdops.kd_loss(student, t, divergence=divergence, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, student, torch.ones_like(loss))
    s64 = s.double().requires_grad_(True)
    oracle_rows = reference.kd_loss(s64, t.double(), divergence=divergence, reduction="none")
    (oracle,) = torch.autograd.grad(oracle_rows, s64, torch.ones_like(oracle_rows))
    assert oracle_rows[rows].max() < 1e-5
    assert (loss[rows] - oracle_rows[rows]).abs().max() <= NEGATIVE_TOLERANCE
    for r in rows:
        assert oracle[r].abs().max() > 0
        assert rel_error(grad[r], oracle[r]) < 1e-2, (r, loss[r].item(), rel_error(grad[r], oracle[r]))


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl"])
def test_extreme_logits_keep_their_gradient_kd_loss(divergence, backend):
    """verl #7806, the other clamps of its class (log-probability floors, loss clamps): the student's
    log-probability of an entry the teacher favours is −150 (its probability underflows float32), the
    teacher's of an entry the student favours too, and some rows are one-hot in float32 (gaps of 200
    logits) on different entries for teacher and student, so some row losses are ~150. Loss and
    gradients are finite and exact: SPEC "Accuracy", and element by element (rtol 1e-3) wherever the
    float64 oracle's gradient is above 1e-3 of its largest; for forward KL the starved entry's gradient is
    (q − p) ≈ −p, far from 0, and for reverse KL the shunned entry's is large and positive."""
    n, vocab = 9, 131
    g = torch.Generator().manual_seed(14)
    s = torch.randn(n, vocab, generator=g) * 4
    t = torch.randn(n, vocab, generator=g) * 4
    s[:, STARVED] = s.max(1).values - 150
    t[:, STARVED] = t.max(1).values + 1.0   # the teacher's favourite, p ≈ 0.4..0.7
    t[:, SHUNNED] = t.max(1).values - 150
    s[:, SHUNNED] = s.max(1).values + 0.5   # the student's favourite
    s[1::3, 60] = 250.0                     # one-hot student rows, on another entry
    t[2::3, STARVED] = 250.0                # one-hot teacher rows
    s, t = s.to(DEVICE), t.to(DEVICE)
    assert (torch.log_softmax(s, -1)[:, STARVED] < -140).all() and (torch.log_softmax(t, -1)[:, SHUNNED] < -140).all()
    loss, g_s, g_t = assert_matches_oracle(kdops.kd_loss, reference.kd_loss, s, t, divergence=divergence,
                                           backend=backend, reduction="sum")
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    o_s, o_t = torch.autograd.grad(reference.kd_loss(s64, t64, divergence=divergence, reduction="sum"), (s64, t64))
    for got, oracle in ((g_s, o_s), (g_t, o_t)):
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), oracle, rtol=1e-3, atol=1e-3 * float(oracle.abs().max()))
    if divergence == "forward_kl":
        assert (g_s[:, STARVED] < -0.3).all(), g_s[:, STARVED]
    if divergence == "reverse_kl":
        assert (g_s[::3, SHUNNED] > 1.0).all(), g_s[:, SHUNNED]


@pytest.mark.parametrize("path", list(FUSED_PATHS))
def test_extreme_logits_keep_their_gradient_fused(path):
    """verl #7806 for the fused API: the student's bias rules out an entry (−150) that the teacher favours
    and that is the label of every other row (hard-label term, forward KL): the student's bias and weight
    gradients at that entry are finite, exact (SPEC "Accuracy") and far from 0 (≈ −p − hard · labelled
    share)."""
    x = fused_inputs(seed=15)
    n = x["student_hidden"].shape[0]
    x["student_bias"][STARVED] = -150.0
    x["teacher_bias"][STARVED] = 12.0
    labels = torch.randint(0, x["student_weight"].shape[0], (n,), generator=torch.Generator().manual_seed(16))
    labels[::2] = STARVED
    x["labels"] = labels.to(DEVICE)
    s, _ = logits_of(x)
    assert (torch.log_softmax(s, -1)[:, STARVED] < -130).all()
    loss, g_hs, g_ws, g_bs, *_ = assert_fused_matches_oracle(path, x, divergence="forward_kl", hard_weight=0.5)
    assert g_bs[STARVED] < -0.5, g_bs[STARVED]
    assert g_ws[STARVED].abs().max() > 0.1
