"""Element offsets beyond 2^31: the kernels address rows with 64-bit arithmetic (issue 12, part 4).

A [tokens, V] logits tensor of a real batch passes 2^31 elements (8192 × 262144), and so does an lm_head
weight [V, H] (262144 × 8192) or a view whose row stride is that of a larger tensor (`logits[:, :-1]` of a
[B, L, V] batch). A kernel that computes `row · stride` in 32 bits wraps around and reads (or writes)
another row, or outside the tensor. Triton's interpreter keeps the kernels' integer types (numpy int32
wraps like the GPU's), so such a bug shows here too: as a wrong row (dropping the int64 cast of the fused
kernels' weight rows fails `test_weight_and_hidden_rows_past_2_31[fused]`), or as a negative offset that
crashes the process (dropping the one in `kernels/logits.py: row_offsets` segfaults the logits tests).

The inputs here are views, made with `torch.as_strided`, of a lazily allocated storage: `torch.empty` of a
few billion elements reserves address space only, and the pages the tests never touch cost no memory. Only
the few rows in use are written; the views place them past 2^31 elements from their storage's start. Row
strides are chosen in each of Triton's integer specializations: one that fits int32 (the product overflows,
not the stride) and one in [2^31, 2^32) (passed as uint32).

Each path must give, bit for bit, what it gives on a dense copy of the same rows (the arithmetic is the
same, only the addresses differ), and agree with the float64 reference within SPEC "Accuracy". The memory
the process holds must not grow by more than the small inputs and outputs: the gradients of the views are
allocated dense ([rows, V], [V, H]), never with the views' strides (which would mean the size of the whole
storage), and the launchers are asked for no large buffer.

No test here may touch the huge storages beyond the rows in use: `torch.use_deterministic_algorithms`
(which fills `torch.empty` with NaN) must stay off while they are allocated. CPU only (Triton's
interpreter): CUDA allocations are not lazy. A machine that does not overcommit memory refuses the
storages: the tests are skipped there.

What no lazy storage can reach is a write past 2^31 elements: the gradient of [rows, V] logits, and the
fused kernels' float32 scratch, are dense buffers the kernels fill, so their offsets (row · V, row · H)
pass 2^31 only in buffers of that size. `test_compiled_kernels_multiply_offsets_in_64_bits` checks those
in the kernels as compiled for sm_90 (`bench.compile` records every launch the launchers make, without a
GPU): every integer product in their Triton IR is 64-bit, except a program id times a block or split
size (at most the grid's extent) and a loop index times a constant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdops
import kdops.launchers.common
import kdops.launchers.logits
import kdops.launchers.topk
import kdops.paths.chunked
from kdops import reference
from oracle import TOLERANCE, make_logits, rel_error

interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="lazily allocated storages are CPU-only: the "
                                 "kernels run through Triton's interpreter here only without a GPU")

BIG = 2 ** 31
# Memory the process may gain during one test: inputs and outputs are a few MiB; 256 MiB leaves room for
# allocator noise and Triton's interpreter, and is far below the 4 GiB+ a dense copy of a storage would take.
RSS_GROWTH_LIMIT = 256 * 2 ** 20
# The most elements any launcher buffer may have here (the largest legitimate one is a [rows, V] gradient).
LAUNCH_NUMEL_LIMIT = 2 ** 20


def _rss() -> int:
    """Resident memory of this process in bytes (the pages actually touched)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(autouse=True)
def bounded_memory(monkeypatch):
    """Fails the test if a launcher asks for a buffer the size of the storages, or if the process's resident
    memory grows by more than RSS_GROWTH_LIMIT; deterministic mode (which would fill the storages) is off."""
    assert not torch.are_deterministic_algorithms_enabled()
    original = kdops.launchers.common.empty

    def checked_empty(shape, dtype, device):
        numel = 1
        for n in shape:
            numel *= n
        assert numel <= LAUNCH_NUMEL_LIMIT, f"launcher buffer of {tuple(shape)} elements"
        return original(shape, dtype, device)

    for launchers in (kdops.launchers.logits, kdops.launchers.topk, kdops.paths.chunked):  # every caller of empty
        monkeypatch.setattr(launchers, "empty", checked_empty)
    before = _rss()
    yield
    grown = _rss() - before
    assert grown < RSS_GROWTH_LIMIT, f"resident memory grew by {grown / 2 ** 20:.0f} MiB"


def sparse_view(dense: torch.Tensor, strides, storage_numel: int, offset: int = 0, storage=None):
    """A view with `dense`'s shape and values and the given strides into a lazily allocated storage of
    `storage_numel` elements (or into `storage`): only the view's elements are written."""
    if storage is None:
        try:
            storage = torch.empty(storage_numel, dtype=dense.dtype)
        except RuntimeError as error:  # e.g. vm.overcommit_memory = 2
            pytest.skip(f"a lazily allocated storage of {storage_numel} elements was refused: {error}")
    view = torch.as_strided(storage, dense.shape, strides, offset)
    view.copy_(dense)
    return view, storage


def last_offset(view: torch.Tensor) -> int:
    """The largest element offset of `view` in its storage."""
    return view.storage_offset() + sum((n - 1) * s for n, s in zip(view.shape, view.stride()))


def loss_and_grads(fn, inputs, grads_of, **options):
    """fn(*inputs)'s per-row losses and the .grad of the inputs at `grads_of` after a backward with upstream
    randn (through AccumulateGrad, whose layout rules decide the strides of a leaf's gradient)."""
    inputs = [x.detach().requires_grad_(i in grads_of) if x.is_floating_point() else x for i, x in enumerate(inputs)]
    rows = fn(*inputs, reduction="none", **options)
    rows.backward(torch.randn(rows.shape, generator=torch.Generator().manual_seed(1)))
    return [rows.detach(), *(inputs[i].grad for i in grads_of)]


def assert_same_as_dense(fn, ref_fn, sparse, grads_of, dtype, **options):
    """fn on the sparse views = fn on their dense copies, bit for bit; both within SPEC "Accuracy" of the
    float64 reference. Gradients come back dense."""
    dense = [x.detach().clone() for x in sparse]
    ours = loss_and_grads(fn, sparse, grads_of, **options)
    same = loss_and_grads(fn, dense, grads_of, **options)
    oracle = loss_and_grads(ref_fn, [x.double() if x.is_floating_point() else x for x in dense], grads_of, **options)
    ref = loss_and_grads(ref_fn, dense, grads_of, **options)
    for i, (a, b, o, r) in enumerate(zip(ours, same, oracle, ref)):
        assert torch.isfinite(a).all(), f"output {i}: not finite"
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), f"output {i}: differs from the dense copy's by {(a - b).abs().max():.3g}"
        if i:
            assert a.is_contiguous(), f"gradient {i}: strides {a.stride()}"
            assert a.untyped_storage().nbytes() == a.numel() * a.element_size(), f"gradient {i}: a large storage"
        err, ref_err = rel_error(a, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"output {i}: error {err:.3g} vs reference {ref_err:.3g}"
    return ours


def kd_triton(s, t, **options):
    return kdops.kd_loss(s, t, backend="triton", **options)


def kd_torch(s, t, **options):
    return kdops.kd_loss(s, t, backend="torch", **options)


V = 203  # one vocabulary block of the interpreter's kernels on logits, partly masked

# (leading shape, row strides): rows of [R, V] past 2^31 elements with an int32 stride (the product
# overflows 32 bits) or a uint32 one; a [2, 3, V] batch whose two leading dimensions do not merge.
LOGIT_LAYOUTS = {
    "stride_i32": ((4,), (2 ** 30 + 3,)),
    "stride_u32": ((3,), (BIG + 5,)),
    "two_dims": ((2, 3), (3 * 2 ** 30 + 7, 2 ** 29 + 1)),
}


@interpreted
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", list(LOGIT_LAYOUTS))
def test_logits_rows_past_2_31(layout, backend):
    """kd_loss forward and backward (student and teacher gradients) on logits whose later rows lie past
    2^31 elements: each row's loss and gradient at the place of that row."""
    leading, strides = LOGIT_LAYOUTS[layout]
    s_dense, t_dense = make_logits((*leading, V), torch.bfloat16), make_logits((*leading, V), torch.bfloat16,
                                                                               peaked_every=2)
    strides = (*strides, 1)
    numel = sum((n - 1) * st for n, st in zip(s_dense.shape, strides)) + 2 * V
    # Student and teacher in one storage: the teacher's row r right after the student's.
    student, storage = sparse_view(s_dense, strides, numel)
    teacher, _ = sparse_view(t_dense, strides, numel, offset=V, storage=storage)
    assert last_offset(teacher) >= last_offset(student) > BIG
    assert student.untyped_storage().nbytes() >= 2 * BIG  # really a huge storage (not resident)
    fn = kd_triton if backend == "triton" else kd_torch
    rows, g_s, g_t = assert_same_as_dense(fn, reference.kd_loss, [student, teacher], (0, 1), torch.bfloat16,
                                          divergence="generalized_jsd", temperature=1.5)
    assert (rows > 0).all() and g_s.shape == student.shape and g_t.shape == teacher.shape


@interpreted
@pytest.mark.parametrize("impl, backend", [("fused", "triton"), ("chunked", "triton"), ("chunked", "torch")],
                         ids=["fused", "chunked", "torch"])
def test_weight_and_hidden_rows_past_2_31(impl, backend):
    """fused_linear_kd_loss with lm_head weights [V, H] whose rows past V/2 lie beyond 2^31 elements (the
    row stride of a far larger weight, V · stride > 2^31) and hidden states whose later rows do too:
    forward, and the gradients of hidden states, weights and biases of both models."""
    n, hs, ht, vocab = 11, 40, 24, 301  # three vocabulary splits of the interpreter's fused forward
    g = torch.Generator().manual_seed(3)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    w_s, w_t = randn(vocab, hs, scale=4 * hs ** -0.5), randn(vocab, ht, scale=4 * ht ** -0.5)
    h_s, h_t = randn(n, hs), randn(n, ht)
    h_t[::3] = w_t[torch.arange(0, n, 3) * 7] * 3  # peaked teacher rows
    b_s, b_t = randn(vocab), randn(vocab)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100

    w_stride = BIG // (vocab // 2) + 3  # in int32; row vocab // 2 onwards lies past 2^31
    weight_s, storage = sparse_view(w_s, (w_stride, 1), (vocab - 1) * w_stride + hs + ht)
    weight_t, _ = sparse_view(w_t, (w_stride, 1), 0, offset=hs, storage=storage)
    h_stride = BIG // (n // 2) + 1
    hidden_s, storage = sparse_view(h_s, (h_stride, 1), (n - 1) * h_stride + hs + ht)
    hidden_t, _ = sparse_view(h_t, (h_stride, 1), 0, offset=hs, storage=storage)
    assert last_offset(weight_s) > BIG and last_offset(hidden_t) > BIG

    def fn(hs_, ws_, bs_, ht_, wt_, bt_, y, **options):
        return kdops.fused_linear_kd_loss(hs_, ws_, ht_, wt_, y, student_bias=bs_, teacher_bias=bt_, impl=impl,
                                          backend=backend, **options)

    def ref_fn(hs_, ws_, bs_, ht_, wt_, bt_, y, **options):
        return reference.fused_linear_kd_loss(hs_, ws_, ht_, wt_, y, student_bias=bs_, teacher_bias=bt_, **options)

    outputs = assert_same_as_dense(fn, ref_fn, [hidden_s, weight_s, b_s, hidden_t, weight_t, b_t, labels],
                                   (0, 1, 2, 3, 4, 5), torch.bfloat16, divergence="generalized_jsd",
                                   temperature=2.0, hard_weight=0.4)
    # The far rows of the weights got their own gradient (rows of the vocabulary past 2^31 elements).
    for grad in (outputs[2], outputs[5]):
        assert grad.shape == (vocab, grad.shape[1]) and grad[vocab // 2:].abs().amax(1).min() > 0


# Compiles the first launch of each kernel that `python -m bench.compile --quick` records (bf16, sm_90) and
# prints, per kernel, the 32-bit integer multiplies of its Triton IR other than a program id times anything
# (a block's or a split's start: at most the extent the grid covers) or a loop index times a constant (a
# split's slot in a partial state).
_NARROW_PRODUCTS = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from bench import compile as gate

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
report = {}
for spec in gate.record("sm_90", quick=True, dtypes=["bf16"]):
    if spec.name in report:
        continue
    kernel = spec.kernel
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = bind(*spec.args, **spec.kwargs)
    options, signature, constants, attrs = kernel._pack_args(backend, spec.kwargs, bound, specialization, options)
    ttir = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target,
                          options=options.__dict__).asm["ttir"]
    program_ids = set(re.findall(r"(%[\w.]+) = tt.get_program_id", ttir))
    loop_indices = set(re.findall(r"scf.for (%[\w.]+) =", ttir))
    constants = set(re.findall(r"(%[\w.]+) = arith.constant", ttir))
    narrow, products = [], 0
    for line in ttir.splitlines():
        m = re.match(r"\s*%[\w.]+ = arith.muli (%[\w.]+), (%[\w.]+) : (\S+)", line)
        if not m:
            continue
        products += 1
        operands = {m.group(1), m.group(2)}
        bounded = operands & program_ids or (operands & loop_indices and operands & constants)
        if m.group(3).endswith(("i32", "xi32>")) and not bounded:
            narrow.append(line.strip())
    report[spec.name] = dict(products=products, narrow=narrow)
print("REPORT" + json.dumps(report))
"""


def test_compiled_kernels_multiply_offsets_in_64_bits():
    """Every kernel (on logits, fused forward and fused gradient kernels, the merge of partial
    states) as compiled for sm_90: its integer products are 64-bit, or a program id times a block or split
    size, or a loop index times a constant. Row offsets (row · stride, row · V of the gradients, vocabulary
    entry · weight stride, row · H of the scratch, row · NUM_STATS) then never wrap, whatever the sizes."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _NARROW_PRODUCTS], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    expected = {"kd_logits_forward_kernel", "kd_logits_backward_kernel", "fused_forward_kernel",
                "fused_gradient_kernel", "merge_partials_kernel"}
    assert expected <= set(report), sorted(report)
    for name, found in report.items():
        assert found["products"] > 0, name
        assert not found["narrow"], f"{name}: 32-bit products {found['narrow']}"
