"""kdops.kd_loss against the float64 oracle (SPEC "Accuracy"): every divergence, both backends."""

import zlib

import pytest
import torch

import kdops
import kdops._autograd
import kdops.launchers.logits
from kdops import reference
from oracle import assert_matches_oracle, logit_pair, run_loss, rel_error
from conftest import DEVICE

DIVERGENCES = [
    "forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "alpha_beta",
    kdops.GeneralizedJSD(beta=0.0), kdops.GeneralizedJSD(beta=1.0), kdops.GeneralizedJSD(beta=0.9),
    kdops.SkewForwardKL(alpha=0.0), kdops.SkewReverseKL(alpha=0.5), kdops.AlphaBeta(alpha=0.5, beta=0.5),
    kdops.AlphaBeta(alpha=1.5, beta=0.3),
]
BACKENDS = ["triton", "torch"]
REDUCTIONS = ["batchmean", "sum", "none", "num_items"]
# (leading shape, V, ignore some rows): a 2-D batch with ignored rows and V below one block, and a 3-D
# batch with V = 4 blocks + 3 columns.
LAYOUTS = [((37,), 1000, True), ((3, 13), 4099, False)]


def _labels(leading, ignore, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 100, leading, generator=g)
    if ignore:
        labels[torch.rand(leading, generator=g) < 0.3] = -100
    return labels.to(DEVICE)


def _options(reduction, leading, labels):
    """kd_loss keyword arguments for a reduction name ("num_items" = batchmean with num_items_in_batch)."""
    if reduction == "num_items":
        return dict(reduction="batchmean", num_items_in_batch=int((labels != -100).sum()) + 3)
    kwargs = dict(reduction=reduction)
    if reduction == "none":
        kwargs["upstream"] = torch.randn(leading)  # per-row upstream gradients
    return kwargs


CASES = [
    (div, dtype, temperature, layout, BACKENDS[b], REDUCTIONS[(i + j + b) % 4])
    for i, div in enumerate(DIVERGENCES)
    for dtype in (torch.float32, torch.bfloat16)
    for temperature in (1.0, 2.5)
    for j, layout in enumerate(LAYOUTS)
    for b in range(2)
]


@pytest.mark.parametrize("divergence,dtype,temperature,layout,backend,reduction", CASES,
                         ids=lambda v: str(v) if not isinstance(v, tuple) else f"{len(v[0])}d-V{v[1]}")
def test_matches_float64_oracle(divergence, dtype, temperature, layout, backend, reduction):
    leading, vocab, ignore = layout
    seed = zlib.crc32(f"{vocab}{divergence}".encode()) % 1000  # the same inputs in every run (hash() is salted)
    student, teacher = logit_pair((*leading, vocab), dtype, DEVICE, seed=seed)
    labels = _labels(leading, ignore, seed=vocab)
    assert_matches_oracle(kdops.kd_loss, reference.kd_loss, student, teacher, labels=labels,
                          divergence=divergence, temperature=temperature, backend=backend,
                          **_options(reduction, leading, labels))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_reductions(divergence, ignore, reduction, backend):
    student, teacher = logit_pair((5, 8, 301), torch.float32, DEVICE, seed=3)
    labels = _labels((5, 8), ignore, seed=4)
    options = _options(reduction, (5, 8), labels)
    options.pop("upstream", None)
    ours = kdops.kd_loss(student, teacher, labels, divergence=divergence, backend=backend, **options)
    rows = reference.kd_loss(student.double(), teacher.double(), labels, divergence=divergence, reduction="none")
    mask = labels != -100
    assert torch.all(rows[~mask] == 0)
    expected = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / mask.sum(),
                "num_items": rows.sum() / options.get("num_items_in_batch", 1)}[reduction]
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert rel_error(ours, expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES[:7])
def test_all_ignored_batch_is_zero(divergence, backend):
    student, teacher = logit_pair((2, 5, 130), torch.bfloat16, DEVICE)
    student[0, 0] = float("-inf")  # even a degenerate ignored row must not leak NaN
    labels = torch.full((2, 5), -100, device=DEVICE)
    loss, g_s, g_t = run_loss(kdops.kd_loss, student, teacher, labels=labels, divergence=divergence,
                              backend=backend)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g_s) == 0 and torch.count_nonzero(g_t) == 0


FINITE_WITH_TEACHER_ZEROS = ["forward_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
                             "alpha_beta"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", FINITE_WITH_TEACHER_ZEROS)
def test_teacher_only_masked_entries(divergence, backend):
    """-inf in the teacher only (p = 0 where q > 0): every divergence that stays finite there is finite,
    NaN-free and exact, loss and gradients."""
    student, teacher = logit_pair((19, 333), torch.float32, DEVICE, seed=5)
    student = torch.randn(19, 333, device=DEVICE) * 4
    teacher[:, :50] = float("-inf")
    ours = assert_matches_oracle(kdops.kd_loss, reference.kd_loss, student, teacher, divergence=divergence,
                                 temperature=2.0, backend=backend)
    assert all(torch.isfinite(x).all() for x in ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_divergence_is_inf_not_nan(backend):
    """q = 0 where p > 0 makes KL(p ‖ q) infinite: the loss says so, and no gradient is NaN."""
    student = torch.randn(4, 50, device=DEVICE)
    student[1, 3] = float("-inf")
    teacher = torch.randn(4, 50, device=DEVICE)
    loss, g_s, _ = run_loss(kdops.kd_loss, student, teacher, backend=backend, reduction="none")
    assert torch.isinf(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert not torch.isnan(g_s).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    student, teacher = logit_pair((3, 40), torch.float32, DEVICE)
    teacher[1, 7] = float("nan")
    loss = kdops.kd_loss(student, teacher, backend=backend, reduction="none")
    assert torch.isnan(loss[1]) and not torch.isnan(loss[[0, 2]]).any()


@pytest.mark.parametrize("divergence", DIVERGENCES[:7])
def test_frozen_teacher_pays_nothing(divergence, monkeypatch):
    """A teacher without requires_grad gets no gradient, and the kernel is not asked to write one."""
    calls = []
    original = kdops._autograd.logits_backward

    def spy(*args, **kwargs):
        calls.append(args[7:9])
        return original(*args, **kwargs)

    monkeypatch.setattr(kdops._autograd, "logits_backward", spy)
    student, teacher = logit_pair((6, 77), torch.float32, DEVICE)
    student.requires_grad_(True)
    kdops.kd_loss(student, teacher, divergence=divergence, backend="triton").backward()
    assert teacher.grad is None and student.grad is not None
    assert calls == [(True, False)]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "alpha_beta"])
def test_block_boundaries(divergence, monkeypatch):
    """Tiny blocks: many row blocks and vocabulary blocks, with a partial last one of each."""
    monkeypatch.setattr(kdops.launchers.logits, "logits_config", lambda *args, **kwargs: dict(BLOCK_R=4, BLOCK_V=64))
    student, teacher = logit_pair((37, 1000), torch.float32, DEVICE, seed=7)
    assert_matches_oracle(kdops.kd_loss, reference.kd_loss, student, teacher, divergence=divergence,
                          temperature=2.5, backend="triton", reduction="sum")


VIEWS = {
    "shifted": lambda x: x[:, :-1],                       # logits[:, :-1] of [B, L, V]
    "transposed": lambda x: x.transpose(0, 1),            # [L, B, V]
    "strided_vocab": lambda x: x[..., ::2],               # non-unit vocabulary stride: copied
    "four_d": lambda x: x.unflatten(1, (3, 3))[:, :, 1:],  # three leading dims that do not merge: copied
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_non_contiguous_inputs(view):
    """Views of [B, L, V] logits give the same numbers as their contiguous copies."""
    base_s, base_t = logit_pair((4, 9, 257), torch.float32, DEVICE)
    student, teacher = VIEWS[view](base_s), VIEWS[view](base_t)
    assert not student.is_contiguous()
    ours = run_loss(kdops.kd_loss, student, teacher, backend="triton", divergence="generalized_jsd")
    expected = run_loss(kdops.kd_loss, student.contiguous(), teacher.contiguous(), backend="triton",
                        divergence="generalized_jsd")
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and torch.equal(a, b)


def test_mixed_input_dtypes():
    """A bfloat16 student against a float32 teacher: each gradient in its input's dtype."""
    student, teacher = logit_pair((11, 300), torch.float32, DEVICE)
    student = student.bfloat16()
    loss, g_s, g_t = run_loss(kdops.kd_loss, student, teacher, backend="triton")
    ref = run_loss(reference.kd_loss, student.double(), teacher.double())
    assert g_s.dtype == torch.bfloat16 and g_t.dtype == torch.float32
    assert rel_error(loss, ref[0]) < 1e-5 and rel_error(g_s, ref[1]) < 1e-2 and rel_error(g_t, ref[2]) < 1e-5


def test_module_matches_function():
    student, teacher = logit_pair((2, 6, 100), torch.float32, DEVICE)
    labels = _labels((2, 6), True, seed=1)
    module = kdops.KDLoss(divergence=kdops.SkewReverseKL(alpha=0.3), temperature=1.5, backend="triton")
    got = module(student, teacher, labels)
    ref = reference.kd_loss(student, teacher, labels, divergence=kdops.SkewReverseKL(alpha=0.3), temperature=1.5)
    assert rel_error(got, ref) < 1e-5
    assert "SkewReverseKL(alpha=0.3)" in repr(module)
