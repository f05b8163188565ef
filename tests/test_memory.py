"""Memory bounds of kd_loss, counted allocation by allocation (bench/memory.py) during forward + backward."""

import pytest
import torch

import kdops
import kdops.launchers.linear
import kdops.launchers.matmul
import kdops.paths.chunked
import kdops.paths.sliced
import kdops.paths.torch_engine
from bench.memory import AllocationTracker
from oracle import logit_pair
from conftest import DEVICE


def _measure(student, teacher, **kwargs):
    student = student.detach().requires_grad_(True)
    teacher = teacher.detach().requires_grad_(kwargs.pop("teacher_grad"))
    with AllocationTracker() as tracker:
        kdops.kd_loss(student, teacher, **kwargs).backward()
        grads = [x.grad for x in (student, teacher) if x.grad is not None]
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return tracker, grad_bytes


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
def test_triton_backend_extra_memory_is_o_rows(divergence, teacher_grad):
    """Beyond the gradients themselves, only per-row buffers: nothing near rows × V."""
    rows, vocab = 64, 3001
    student, teacher = logit_pair((rows, vocab), torch.bfloat16, DEVICE)
    tracker, grad_bytes = _measure(student, teacher, divergence=divergence, backend="triton",
                                   teacher_grad=teacher_grad)
    assert grad_bytes == rows * vocab * 2 * (1 + teacher_grad)
    large = [n for n, _ in tracker.allocations if n >= rows * vocab // 4]
    assert sorted(large) == [rows * vocab * 2] * (1 + teacher_grad), "only the gradients may be large"
    assert tracker.peak - grad_bytes <= rows * 128 + 4096


@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
def test_torch_backend_temporaries_within_budget(divergence, monkeypatch):
    """The chunked torch path keeps its temporaries within BUDGET_BYTES, whatever the batch size."""
    budget = 2 * 2**20
    monkeypatch.setattr(kdops.paths.torch_engine, "BUDGET_BYTES", budget)
    rows, vocab = 160, 1000
    assert kdops.paths.torch_engine.chunk_rows(vocab) * 4 < rows  # several chunks
    student, teacher = logit_pair((rows, vocab), torch.float32, DEVICE)
    tracker, grad_bytes = _measure(student, teacher, divergence=divergence, backend="torch", teacher_grad=True)
    assert tracker.peak - grad_bytes <= budget


def _measure_fused(x, **kwargs):
    """Allocations of forward + backward of fused_linear_kd_loss, and the bytes of the gradients."""
    inputs = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in x.items()}
    with AllocationTracker() as tracker:
        kdops.fused_linear_kd_loss(**inputs, **kwargs).backward()
        grad_bytes = sum(v.grad.numel() * v.grad.element_size() for v in inputs.values() if v.grad is not None)
    return tracker, grad_bytes


def _fused_inputs(rows, vocab, hs, ht, dtype):
    g = torch.Generator().manual_seed(0)
    x = dict(student_hidden=torch.randn(rows, hs, generator=g), student_weight=torch.randn(vocab, hs, generator=g),
             teacher_hidden=torch.randn(rows, ht, generator=g), teacher_weight=torch.randn(vocab, ht, generator=g),
             student_bias=torch.randn(vocab, generator=g), labels=torch.randint(0, vocab, (rows,), generator=g))
    return {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for k, v in x.items()}


@pytest.mark.parametrize("divergence", ["generalized_jsd"])  # two passes: every buffer forward KL allocates and more
def test_fused_impl_never_allocates_rows_by_vocab(divergence, monkeypatch):
    """impl="fused": no tensor of N·V/4 elements or more, ever (the weights are smaller than that here): the
    backward's G buffers cover one vocabulary slice of GRADIENT_BYTES."""

    rows, vocab = 256, 2200
    block_v = kdops.launchers.linear.fused_config(rows, vocab, None)["BLOCK_V"]
    monkeypatch.setattr(kdops.launchers.linear, "GRADIENT_BYTES", rows * 2 * block_v)  # one tile per slice
    x = _fused_inputs(rows, vocab, 16, 24, torch.bfloat16)
    tracker, _ = _measure_fused(x, divergence=divergence, impl="fused", backend="triton", hard_weight=0.5)
    element_bytes = 1  # the smallest element: any tensor of N·V/4 elements has at least this many bytes
    assert tracker.allocations, "the tracker saw nothing"
    assert tracker.largest < rows * vocab // 4 * element_bytes
    assert rows * block_v * 2 in [n for n, _ in tracker.allocations], "a G buffer was seen"


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_fused_backward_extra_memory(teacher_grad, monkeypatch):
    """impl="fused" with 16-bit inputs: beyond the gradients, the backward holds the G buffers of one
    vocabulary slice (at most GRADIENT_BYTES, whole tiles), the float32 sums of each hidden gradient over the
    slices, and (off CUDA only) one slice's float32 dW product before its rounding: nothing of V × H or N × V."""

    rows, vocab, hs, ht = 512, 1000, 24, 40
    block_v = kdops.launchers.linear.fused_config(rows, vocab, None)["BLOCK_V"]
    budget = rows * 2 * (1 + teacher_grad) * 2 * block_v  # two tiles per slice: four slices, the last partial
    monkeypatch.setattr(kdops.launchers.linear, "GRADIENT_BYTES", budget)
    x = _fused_inputs(rows, vocab, hs, ht, torch.bfloat16)
    inputs = {k: (v.detach().requires_grad_(k.startswith("student") or teacher_grad) if v.is_floating_point() else v)
              for k, v in x.items()}
    loss = kdops.fused_linear_kd_loss(**inputs, impl="fused", backend="triton", hard_weight=0.5)
    with AllocationTracker() as tracker:
        loss.backward()
        grad_bytes = sum(v.grad.numel() * v.grad.element_size() for v in inputs.values() if v.grad is not None)
    widths = (hs, ht) if teacher_grad else (hs,)
    buffers = [n for n, _ in tracker.allocations if n == rows * 2 * block_v * 2]
    assert len(buffers) == 1 + teacher_grad, "one G buffer per side, allocated once"
    hidden_sums = sum(rows * w * 4 for w in widths)
    # Off CUDA the products' 16-bit operands are upcast to float32 (kdops.launchers.matmul.mm_into): a slice's G and
    # weight rows, the hidden states, and the float32 dW product before its rounding.
    width = 2 * block_v
    upcasts = (rows * width + (rows + width) * max(widths)) * 4 if DEVICE == "cpu" else 0
    assert tracker.peak - grad_bytes <= budget + hidden_sums + upcasts + rows * 16 + 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_chunked_impl_stays_within_its_memory_budget(divergence, backend, dtype):
    """impl="chunked": beyond the inputs' gradients, peak memory ≤ memory_budget plus per-row vectors, with a
    budget that holds neither every row's G nor every row's logits (several groups of several chunks; bf16:
    float32 weight-gradient accumulators inside the budget)."""
    rows, vocab, budget = 300, 1000, 2**20
    x = _fused_inputs(rows, vocab, 24, 40, dtype)
    tracker, grad_bytes = _measure_fused(x, divergence=divergence, impl="chunked", backend=backend,
                                         memory_budget=budget, hard_weight=0.5)
    sides = [kdops.paths.chunked.SideNeeds(dtype, width, True, True) for width in (24, 40)]
    plan = kdops.paths.chunked.plan(rows, vocab, backend, torch.float32, sides, budget)
    assert plan.chunk <= plan.group < rows and plan.accumulate  # several groups (of several chunks but in fp32-triton)
    # Off CUDA, 16-bit matmul operands are upcast to float32 (kdops.launchers.matmul.mm_into): the weights once, a
    # group's G per product; cuBLAS takes them as they are.
    upcasts = vocab * (24 + 40) * 4 + plan.group * vocab * 4 if dtype != torch.float32 and DEVICE == "cpu" else 0
    assert tracker.peak - grad_bytes <= budget + upcasts + rows * 64 + vocab * 16


@pytest.mark.parametrize("divergence, teacher_grad", [("forward_kl", True), ("generalized_jsd", False)])
def test_sliced_impl_stays_within_its_memory_budget(divergence, teacher_grad):
    """impl="sliced" with 16-bit inputs: beyond the gradients, the slice's buffers (float32 logits of both
    models, G of each side asked for) within memory_budget less the float32 dH sums, those sums, and per-row
    vectors; nothing of rows × V (off CUDA, also the float32 upcasts of the matmuls' 16-bit operands)."""

    rows, vocab, hs, ht = 512, 1000, 24, 40
    widths = (hs, ht) if teacher_grad else (hs,)
    hidden_sums = sum(rows * w * 4 for w in widths)
    per_column = kdops.paths.sliced.slice_bytes_per_column(rows, torch.float32, [torch.bfloat16] * len(widths))
    # slices of 256 columns: four, the last partial
    budget = hidden_sums + 2 * kdops.paths.sliced.SLICE_ALIGN * per_column
    x = _fused_inputs(rows, vocab, hs, ht, torch.bfloat16)
    inputs = {k: (v.detach().requires_grad_(k.startswith("student") or teacher_grad) if v.is_floating_point() else v)
              for k, v in x.items()}
    with AllocationTracker() as tracker:
        kdops.fused_linear_kd_loss(**inputs, divergence=divergence, impl="sliced", backend="triton",
                                   memory_budget=budget, hard_weight=0.5).backward()
        grad_bytes = sum(v.grad.numel() * v.grad.element_size() for v in inputs.values() if v.grad is not None)
    width = 2 * kdops.paths.sliced.SLICE_ALIGN
    assert rows * width * 4 in [n for n, _ in tracker.allocations], "a slice's float32 logits buffer was seen"
    assert tracker.largest < rows * vocab * 2  # not even a 16-bit [rows, V] matrix
    # Off CUDA: per pass both weights and both hidden states upcast once, and for the products the hidden
    # states again, a slice's G, its weight rows and the dW product before its rounding.
    upcasts = (vocab * (hs + ht) + rows * (hs + ht) + rows * max(widths) + rows * width
               + 2 * width * max(widths)) * 4 if DEVICE == "cpu" else 0
    assert tracker.peak - grad_bytes <= budget + upcasts + rows * 64 + 4096


def _measure_topk(x, ids, logprobs, fn=None, **kwargs):
    inputs = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in x.items()}
    fn = fn or kdops.fused_linear_topk_kd_loss
    with AllocationTracker() as tracker:
        fn(*inputs.values(), ids, logprobs, **kwargs).backward()
        grad_bytes = sum(v.grad.numel() * v.grad.element_size() for v in inputs.values() if v.grad is not None)
    return tracker, grad_bytes


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_topk_paths_never_hold_rows_by_vocab(tail, backend):
    """Sparse teachers: kdops.topk_kd_loss allocates nothing near rows × V but the gradient it returns, and
    fused_linear_topk_kd_loss nothing near it at all (chunks within memory_budget; tail="renormalize" reads
    only the gathered rows)."""
    rows, vocab, k, budget = 256, 1000, 16, 2**19
    g = torch.Generator().manual_seed(0)
    logprobs, ids = torch.log_softmax(torch.randn(rows, vocab, generator=g) * 3, -1).topk(k, dim=-1)
    ids, logprobs = ids.to(DEVICE), logprobs.to(DEVICE)
    student = torch.randn(rows, vocab, generator=g).to(DEVICE, torch.bfloat16)
    tracker, grad_bytes = _measure_topk({"s": student}, ids, logprobs, kdops.topk_kd_loss, tail=tail, backend=backend)
    assert grad_bytes == rows * vocab * 2
    large = [n for n, _ in tracker.allocations if n >= rows * vocab // 4]
    if backend == "triton":
        assert large == [rows * vocab * 2], "only the gradient may be large"
    bound = rows * 64 * k if backend == "triton" else kdops.paths.torch_engine.BUDGET_BYTES
    assert tracker.peak - grad_bytes <= bound
    x = dict(h=torch.randn(rows, 24, generator=g).to(DEVICE), w=torch.randn(vocab, 24, generator=g).to(DEVICE))
    tracker, grad_bytes = _measure_topk(x, ids, logprobs, tail=tail, backend=backend, memory_budget=budget)
    assert tracker.largest < rows * vocab * 4 // 2
    assert tracker.peak - grad_bytes <= budget + rows * 64 * k + vocab * 24 * 4
