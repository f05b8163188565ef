"""Bitwise reproducibility (issue 12, part 4): the same inputs give the same loss and the same gradients,
bit for bit, on every call, on every path.

No path uses atomics: the kernels on logits own their rows, the fused forward merges its vocabulary splits
in a fixed order (`partials.py`), and its backward owns row blocks (dH) and vocabulary blocks (dW, db); the
chunked paths add their chunks in order. So two calls must agree exactly, not within a tolerance:
`torch.equal` on the loss and on every gradient (student and teacher logits, hidden states, weights,
biases).

The second call of each pair starts its kernel outputs from a different poison (a large finite value
instead of conftest's NaN): an element that a kernel leaves unwritten, or reads before writing, shows up
as a difference. Under `torch.use_deterministic_algorithms(True)` every path must run (no operation
without a deterministic implementation) and stay reproducible; the flag is restored after the test. On
CUDA that mode needs `CUBLAS_WORKSPACE_CONFIG` for the chunked paths' matmuls (a cuBLAS requirement, set by
the test as a user would set it).

Vocabulary parallelism runs the same kernels on shards plus fixed-order all-reduces; it is checked on a
2-process gloo group (one spawn; kd_loss's Triton path and the fused and chunked impls).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import kdops
import kdops.launchers.common
import kdops.launchers.linear
from conftest import DEVICE
from oracle import logit_pair
from spawn import spawn

N_LOGIT_ROWS, V_LOGITS = (3, 13), 517           # two leading dims; V = 512 + 5: a partly masked block
N, HS, HT, V = 19, 40, 24, 301                  # fused: 3 vocabulary splits on the interpreter
KD_PATHS = ["triton", "torch"]
FUSED_PATHS = {"fused": ("fused", "triton"), "chunked": ("chunked", "triton"), "torch": ("chunked", "torch")}
FUSED_TENSORS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                 "teacher_bias")
# Chunk budgets that make the chunked paths take two chunks of the N rows (the last one partial).
CHUNK_BYTES = {"triton": 10 * V * 12, "torch": 10 * V * 72}
# (path, reduction): the fused path computes its gradients in the backward whatever the reduction; the
# chunked paths in the forward for batchmean, in the backward for none.
FUSED_CASES = [("fused", "batchmean"), ("chunked", "batchmean"), ("chunked", "none"), ("torch", "batchmean"),
               ("torch", "none")]


@contextlib.contextmanager
def poisoned_with(value: float):
    """Kernel outputs start as `value` instead of NaN inside the block."""
    original = kdops.launchers.common.empty

    def empty(shape, dtype, device):
        return torch.full(shape, value, dtype=dtype, device=device)

    kdops.launchers.common.empty = empty
    try:
        yield
    finally:
        kdops.launchers.common.empty = original


def kd_inputs(seed=0):
    """bf16 student and float32 teacher logits [3, 13, 517] (randn·4, peaked rows, shared -inf entries),
    labels with ignored rows; both models trainable."""
    s, t = logit_pair((*N_LOGIT_ROWS, V_LOGITS), torch.float32, DEVICE, seed=seed)
    labels = torch.randint(0, V_LOGITS, N_LOGIT_ROWS, generator=torch.Generator().manual_seed(seed))
    labels.view(-1)[::5] = -100
    return dict(student_logits=s.bfloat16(), teacher_logits=t, labels=labels.to(DEVICE))


def fused_inputs(seed=0):
    """bf16 hidden states [37, H], weights [V, H] (Hs != Ht, the teacher's vocabulary padded by 7 rows) and
    biases; logits of spread ~4 with peaked teacher rows; every fourth label ignored."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, torch.bfloat16)

    x = dict(student_hidden=randn(N, HS), student_weight=randn(V, HS, scale=4 * HS ** -0.5),
             student_bias=randn(V), teacher_hidden=randn(N, HT), teacher_weight=randn(V + 7, HT, scale=4 * HT ** -0.5),
             teacher_bias=randn(V + 7))
    x["teacher_hidden"][::5] = x["teacher_weight"][torch.arange(0, N, 5) * 7 % V] * 3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    x["labels"] = labels.to(DEVICE)
    return x


def run_kd(backend, x, reduction="sum", **options):
    """[loss, grad student, grad teacher] of kd_loss on fresh leaves (upstream randn for reduction none)."""
    s = x["student_logits"].detach().clone().requires_grad_(True)
    t = x["teacher_logits"].detach().clone().requires_grad_(True)
    loss = kdops.kd_loss(s, t, x["labels"], divergence=options.pop("divergence", "generalized_jsd"),
                         temperature=1.7, reduction=reduction, backend=backend, **options)
    upstream = _upstream(loss)
    return [loss.detach(), *torch.autograd.grad(loss, (s, t), upstream)]


def run_fused(path, x, reduction="batchmean", **options):
    """[loss, grads of the six tensors] of fused_linear_kd_loss on fresh leaves."""
    impl, backend = FUSED_PATHS[path]
    inputs = {k: (v.detach().clone().requires_grad_(True) if k in FUSED_TENSORS else v) for k, v in x.items()}
    if impl == "chunked":
        options.setdefault("memory_budget", CHUNK_BYTES[backend])
    loss = kdops.fused_linear_kd_loss(**inputs, divergence=options.pop("divergence", "generalized_jsd"),
                                      temperature=1.7, hard_weight=0.3, soft_weight=0.7, reduction=reduction,
                                      impl=impl, backend=backend, **options)
    grads = torch.autograd.grad(loss, [inputs[k] for k in FUSED_TENSORS], _upstream(loss))
    return [loss.detach(), *grads]


def _upstream(loss):
    if loss.dim() == 0:
        return torch.ones_like(loss)
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(5)).to(loss)


def assert_identical(first, second, what):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.isfinite(a).all(), f"{what}, output {i}: not finite"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}, output {i}"
        assert torch.equal(a, b), f"{what}, output {i}: differs by up to {(a.double() - b.double()).abs().max():.3g}"
    # Not a vacuous comparison: the gradients carry signal.
    assert all(torch.count_nonzero(g) > 0 for g in first[1:]), f"{what}: a zero gradient"


def twice(fn, *args, **kwargs):
    """fn's outputs from two calls, the second with kernel outputs poisoned with a finite value."""
    first = fn(*args, **kwargs)
    with poisoned_with(-3.0e38):
        second = fn(*args, **kwargs)
    return first, second


@pytest.fixture
def small_slices(monkeypatch):
    """The fused backward in several vocabulary slices on the interpreter."""
    monkeypatch.setattr(kdops.launchers.linear, "GRADIENT_BYTES", 1)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("backend", KD_PATHS)
def test_kd_loss_is_bitwise_reproducible(backend, reduction):
    x = kd_inputs()
    assert_identical(*twice(run_kd, backend, x, reduction), f"kd_loss {backend} {reduction}")


@pytest.mark.parametrize("path, reduction", FUSED_CASES)
def test_fused_linear_kd_loss_is_bitwise_reproducible(path, reduction, small_slices):
    x = fused_inputs()
    assert_identical(*twice(run_fused, path, x, reduction), f"fused_linear_kd_loss {path} {reduction}")


def test_deterministic_algorithms_mode(small_slices, monkeypatch):
    """Every path runs under torch.use_deterministic_algorithms(True) (which also fills torch.empty with
    NaN) and is bitwise reproducible there; the Triton paths give the same bits as outside that mode. The
    previous setting is restored after."""
    kd, fused = kd_inputs(seed=1), fused_inputs(seed=1)
    outside = {("kd", "triton"): run_kd("triton", kd), ("fused", "fused"): run_fused("fused", fused)}
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    assert not previous[0]
    if torch.cuda.is_available():
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    results = {}
    torch.use_deterministic_algorithms(True)
    try:
        for backend in KD_PATHS:
            results["kd", backend] = twice(run_kd, backend, kd)
        for path in FUSED_PATHS:
            results["fused", path] = twice(run_fused, path, fused)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    for key, (first, second) in results.items():
        assert_identical(first, second, f"deterministic mode, {key}")
        if key in outside:
            assert_identical(outside[key], first, f"deterministic mode vs default, {key}")


# ------------------------------------------------------------------------------------------------------
# Vocabulary parallelism: 2 ranks, uneven shards.
# ------------------------------------------------------------------------------------------------------

SHARDS = [(0, 130), (130, V)]


def _vocab_parallel_body(rank, world):
    start, stop = SHARDS[rank]
    vp = kdops.VocabParallel(start, stop)
    kd = kd_inputs(seed=2)
    local_kd = dict(kd, student_logits=kd["student_logits"][..., start:stop],
                    teacher_logits=kd["teacher_logits"][..., start:stop])
    assert_identical(*twice(run_kd, "triton", local_kd, vocab_parallel=vp), f"rank {rank}: kd_loss triton")
    x = fused_inputs(seed=2)
    local = dict(x, **{k: x[k][start:stop] for k in ("student_weight", "student_bias", "teacher_weight",
                                                     "teacher_bias")})
    for path, reduction in (("fused", "none"), ("chunked", "batchmean")):
        assert_identical(*twice(run_fused, path, local, reduction, vocab_parallel=vp),
                         f"rank {rank}: fused_linear_kd_loss {path} {reduction}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo workers run the kernels through Triton's "
                    "interpreter on CPU tensors, which is set up only without a GPU")
def test_vocab_parallel_is_bitwise_reproducible():
    """kd_loss and fused_linear_kd_loss (impl fused and chunked) with the Triton kernels on a vocabulary
    split over 2 ranks (uneven shards): the kernels on each shard, the merges of the ranks' partial states
    and the all-reduces (one spawn, a few paths: each spawn costs seconds)."""
    spawn(_vocab_parallel_body, 2)
