"""kdops.fused_linear_kd_loss: both impls (Triton through the interpreter on CPU) and the torch backend,
against the float64 oracle `reference.fused_linear_kd_loss`, for the loss and every gradient."""

import pytest
import torch
import triton
import triton.language as tl

import kdops
import kdops.launchers.linear
import kdops.paths.sliced
import kdops._autograd
from kdops import reference
from kdops.kernels import linear as linear_kernels
from conftest import DEVICE
from oracle import TOLERANCE, rel_error

N, HS, HT, V = 37, 67, 96, 1000
DIVERGENCES = list(kdops.DIVERGENCES)
IMPLS = [("fused", "triton"), ("chunked", "triton"), ("chunked", "torch"), ("sliced", "triton")]
IMPL_IDS = ["fused", "chunked", "torch", "sliced"]
TENSORS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def make_inputs(dtype=torch.float32, leading=(N,), hs=HS, ht=HT, vs=V, vt=V + 64, seed=0, bias=True):
    """Hidden states and weights whose logits have a realistic spread (std ≈ 4) and some peaked rows;
    every fourth label ignored."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)

    x = dict(student_hidden=randn(*leading, hs), student_weight=randn(vs, hs, scale=4 * hs ** -0.5),
             teacher_hidden=randn(*leading, ht), teacher_weight=randn(vt, ht, scale=4 * ht ** -0.5),
             student_bias=randn(vs) if bias else None, teacher_bias=randn(vt) if bias else None)
    # Peaked rows: the teacher's hidden state aligned with one vocabulary row.
    flat = x["teacher_hidden"].view(-1, ht)
    for r in range(0, flat.shape[0], 5):
        flat[r] = x["teacher_weight"][(r * 7) % min(vs, vt)] * 3
    labels = torch.randint(0, min(vs, vt), leading, generator=g)
    labels.view(-1)[::4] = -100
    x["labels"] = labels.to(DEVICE)
    return x


def run(fn, x, teacher_grad=True, dtype=None, **options):
    """Loss and the gradients of every tensor input that is given (teacher ones if teacher_grad)."""
    inputs = {}
    for name, value in x.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            # a copy with the same strides (clone would make a view with gaps between its rows contiguous)
            value = torch.empty_strided(value.shape, value.stride(), dtype=dtype or value.dtype,
                                        device=value.device).copy_(value.detach())
            value.requires_grad_(name.startswith("student") or teacher_grad)
        inputs[name] = value
    loss = fn(**inputs, **options)
    wrt = [inputs[name] for name in TENSORS if inputs.get(name) is not None and inputs[name].requires_grad]
    grads = torch.autograd.grad(loss, wrt, torch.ones_like(loss))
    return [loss, *grads]


def assert_matches_oracle(x, teacher_grad=True, **options):
    dtype = x["student_hidden"].dtype
    oracle = run(reference.fused_linear_kd_loss, x, teacher_grad, torch.float64, **options)
    same_dtype = run(reference.fused_linear_kd_loss, x, teacher_grad, **options)
    ours = run(kdops.fused_linear_kd_loss, x, teacher_grad, **options)
    assert len(ours) == len(oracle)
    for i, (o, r, k) in enumerate(zip(oracle, same_dtype, ours)):
        assert k.dtype == r.dtype and k.shape == r.shape
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"output {i}: error {err:.3g} vs reference {ref_err:.3g}"
    return ours


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_oracle(divergence, dtype, impl, backend):
    """Every divergence, T = 2, hard_weight > 0, ignored rows, biases, Hs != Ht, Vt = V + 64, all grads."""
    assert_matches_oracle(make_inputs(dtype), divergence=divergence, temperature=2.0, hard_weight=0.3,
                          soft_weight=0.7, impl=impl, backend=backend)


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("reduction, num_items", [("sum", None), ("none", None), ("batchmean", 50),
                                                  ("batchmean", "tensor")])
def test_reductions(reduction, num_items, impl, backend):
    if num_items == "tensor":
        num_items = torch.tensor(50.0, device=DEVICE)
    x = make_inputs(vt=V, seed=1)
    assert_matches_oracle(x, divergence="reverse_kl", reduction=reduction, num_items_in_batch=num_items,
                          impl=impl, backend=backend)


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_leading_dims_and_strided_hidden(divergence, impl, backend, monkeypatch):
    """[B, L, H] hidden states that are views (hidden[:, :-1]), student vocabulary larger than the
    teacher's, no biases, fp16; the fused impl takes the view as it is."""
    x = make_inputs(torch.float16, leading=(3, 14), vs=V + 5, vt=V, seed=2, bias=False)
    for name in ("student_hidden", "teacher_hidden"):
        x[name] = x[name][:, :-1]
    x["labels"] = x["labels"][:, :-1]
    assert not x["student_hidden"].is_contiguous()
    seen = []
    spy = kdops.launchers.linear.FusedProblem.__init__

    def record(self, hs, *args, **kwargs):
        seen.append(hs.is_contiguous())
        return spy(self, hs, *args, **kwargs)

    monkeypatch.setattr(kdops.launchers.linear.FusedProblem, "__init__", record)
    assert_matches_oracle(x, teacher_grad=False, divergence=divergence, hard_weight=0.5, impl=impl,
                          backend=backend)
    assert seen == ([False] if impl == "fused" else [])


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
def test_mixed_dtypes(impl, backend):
    """bf16 hidden states against float32 weights (e.g. an fp32 master lm_head): math in float32."""
    x = make_inputs(seed=3)
    x["student_hidden"] = x["student_hidden"].bfloat16()
    x["teacher_hidden"] = x["teacher_hidden"].bfloat16()
    got = run(kdops.fused_linear_kd_loss, x, impl=impl, backend=backend, hard_weight=0.2)
    want = run(reference.fused_linear_kd_loss, x, hard_weight=0.2)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert rel_error(g, w) < 2e-2 if g.dtype == torch.bfloat16 else rel_error(g, w) < 1e-5


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
def test_frozen_teacher_gets_nothing(impl, backend):
    x = make_inputs(seed=4)
    inputs = {k: v.requires_grad_(k.startswith("student")) if k != "labels" else v for k, v in x.items()}
    kdops.fused_linear_kd_loss(**inputs, impl=impl, backend=backend).backward()
    assert all(inputs[k].grad is None for k in TENSORS if k.startswith("teacher"))
    assert all(inputs[k].grad is not None for k in TENSORS if k.startswith("student"))
    # Weight rows past the shared vocabulary are padding: zero gradient.
    assert torch.count_nonzero(inputs["student_weight"].grad[V:]) == 0


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_ignored_batch_is_zero(impl, backend, reduction):
    x = make_inputs(seed=5)
    x["labels"] = torch.full_like(x["labels"], -100)
    loss, *grads = run(kdops.fused_linear_kd_loss, x, impl=impl, backend=backend, reduction=reduction,
                       hard_weight=1.0)
    assert torch.count_nonzero(loss) == 0 and not loss.isnan().any()
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
def test_hard_loss_alone_is_cross_entropy(impl, backend):
    """soft_weight = 0, hard_weight = 1: exactly torch's cross-entropy of the student's logits."""
    x = make_inputs(seed=6)
    loss = kdops.fused_linear_kd_loss(**x, soft_weight=0.0, hard_weight=1.0, impl=impl, backend=backend)
    logits = x["student_hidden"] @ x["student_weight"].T + x["student_bias"]
    expected = torch.nn.functional.cross_entropy(logits.double(), x["labels"])
    assert rel_error(loss, expected) < 1e-5


def test_several_chunks_splits_and_slices(monkeypatch):
    """Small budgets: the chunked path takes many chunks, the fused backward many vocabulary slices, the
    fused forward many vocabulary splits, the sliced path many vocabulary slices (of 128 columns here), each
    with a partial last one."""
    monkeypatch.setattr(kdops.launchers.linear, "GRADIENT_BYTES", 1)  # one vocabulary tile per backward slice
    monkeypatch.setattr(kdops.launchers.linear, "GROUP_ROWS",
                        3)  # row groups of the backward's ordering, the last partial
    monkeypatch.setattr(kdops.paths.sliced, "FORWARD_ROWS", 16)  # the sliced forward in chunks of 16, 16 and 5 rows
    original = kdops.launchers.linear.fused_config

    def small(n_rows, vocab, gpu, dtype, **kwargs):
        return dict(original(n_rows, vocab, gpu, dtype, **kwargs), BLOCK_N=16, BLOCK_V=64, BLOCK_H=32,
                    split_size=192)

    monkeypatch.setattr(kdops.launchers.linear, "fused_config", small)
    x = make_inputs(torch.bfloat16, seed=7)
    for impl in ("fused", "chunked", "sliced"):
        assert_matches_oracle(x, divergence="skew_reverse_kl", hard_weight=0.4, impl=impl, backend="triton",
                              memory_budget=7 * V * 10, temperature=0.7)
    for reduction in ("sum", "none"):
        assert_matches_oracle(x, divergence="tvd", impl="chunked", backend="torch", reduction=reduction,
                              memory_budget=5 * V * 4 * 18)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_k_loop_loads(divergence, tma, monkeypatch):
    """The K loops' three ways of loading (LOADS): hidden sizes that BLOCK_H divides load without masks (EVEN_K)
    or by tensor descriptors (TMA, as on Hopper), with a partial last row block and vocabulary tile (clamped or
    zero-filled, and still exact): every fused launch takes that way, and the loss and every gradient match
    the oracle. A hidden size that BLOCK_H does not divide takes the masked loop (or TMA, which fills zeros);
    operands TMA cannot take (a strided [B, L, H] view, float32 weights) fall back to pointers."""
    seen = []

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel.__name__, kwargs["LOADS"]))
        return launch(kernel, grid, *args, **kwargs)

    launch = kdops.launchers.linear.launch
    monkeypatch.setattr(kdops.launchers.linear, "launch", spy)
    original = kdops.launchers.linear.fused_config
    monkeypatch.setattr(kdops.launchers.linear, "fused_config", lambda *a, **k: dict(original(*a, **k), tma=tma))
    block_h = original(N, V, None)["BLOCK_H"]
    names = {"fused_forward_kernel", "fused_gradient_kernel"}

    def ways(x, strided=False):
        """The ways of loading of a forward and backward on x's tensors as they are (views stay views)."""
        seen.clear()
        leaves = {k: v.detach().requires_grad_() if k != "labels" and v is not None else v for k, v in x.items()}
        inputs = dict(leaves)
        if strided:  # the student's hidden states: a [B, L - 1, H] view with a gap between its rows
            inputs["student_hidden"] = leaves["student_hidden"][:, :-1]
            inputs["teacher_hidden"] = leaves["teacher_hidden"][:, :-1]
            inputs["labels"] = x["labels"][:, :-1]
        kdops.fused_linear_kd_loss(**inputs, divergence=divergence, impl="fused", backend="triton").backward()
        assert {name for name, _ in seen} == names
        return {loads for _, loads in seen}

    x = make_inputs(torch.bfloat16, hs=block_h, ht=2 * block_h, seed=11)
    seen.clear()
    assert_matches_oracle(x, divergence=divergence, temperature=1.5, hard_weight=0.2, impl="fused", backend="triton")
    even = linear_kernels.TMA if tma else linear_kernels.EVEN_K
    assert {name for name, _ in seen} == names and {loads for _, loads in seen} == {even.value}
    odd = make_inputs(torch.bfloat16, hs=block_h, ht=block_h + 24, seed=12)
    assert ways(odd) == {(linear_kernels.TMA if tma else linear_kernels.MASKED_K).value}
    if tma:
        assert_matches_oracle(odd, divergence=divergence, impl="fused", backend="triton")
        strided = make_inputs(torch.bfloat16, leading=(3, 14), hs=block_h, ht=block_h, seed=13, bias=False)
        assert ways(strided) == {linear_kernels.TMA.value}
        assert ways(strided, strided=True) == {linear_kernels.EVEN_K.value}
        mixed = dict(x, student_weight=x["student_weight"].float())
        assert ways(mixed) == {linear_kernels.EVEN_K.value}


@pytest.mark.parametrize("impl, backend", IMPLS, ids=IMPL_IDS)
def test_gradcheck(impl, backend):
    g = torch.Generator().manual_seed(8)
    args = [(torch.randn(*shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
            for shape in ((5, 6), (9, 6), (9,), (5, 4), (11, 4), (11,))]
    labels = torch.tensor([1, -100, 8, 0, 3])

    def loss(hs, ws, bs, ht, wt, bt):
        return kdops.fused_linear_kd_loss(hs, ws, ht, wt, labels, divergence="generalized_jsd", student_bias=bs,
                                          teacher_bias=bt, hard_weight=0.5, temperature=1.3, impl=impl,
                                          backend=backend, reduction="none")

    # fast_mode: finite differences along random directions of every input and output (a full Jacobian
    # takes 2 × 168 interpreted forwards; the logits kernels' full Jacobians are test_gradcheck.py's)
    assert torch.autograd.gradcheck(loss, args, fast_mode=True)


def test_eager_gradients_allow_one_backward():
    """The chunked paths compute gradients in the forward for scalar reductions; a second backward
    through the same graph would reuse scaled gradients, so it raises."""
    x = make_inputs(seed=9)
    inputs = {k: v.requires_grad_() if k != "labels" else v for k, v in x.items()}
    loss = kdops.fused_linear_kd_loss(**inputs, impl="chunked", backend="torch")
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_upstream_gradient_scales_eager_gradients():
    x = make_inputs(seed=10)
    a = run(lambda **k: 3.0 * kdops.fused_linear_kd_loss(**k, impl="chunked", backend="triton"), x)
    b = run(lambda **k: 3.0 * kdops.fused_linear_kd_loss(**k, impl="fused", backend="triton"), x)
    for u, w in zip(a, b):
        assert rel_error(u, w) < 1e-5
    # an upstream 1 (loss.backward()) leaves the forward's gradients as they are: the same, a third as large
    one = run(lambda **k: kdops.fused_linear_kd_loss(**k, impl="chunked", backend="triton"), x)
    for u, w in zip(a, one):
        assert rel_error(u, 3.0 * w) < 1e-6


def test_upstream_gradient_is_read_on_the_device(monkeypatch):
    """The Triton engine applies the upstream gradient to the forward's gradients without the host reading it
    (`_launch.scale_unless_one`: no synchronization in the backward of a training step): no Tensor.item in
    the backward, for upstream 1 and for others, and the gradients those of the torch engine (which reads it)."""
    x = make_inputs(seed=13)
    torch_engine = [run(lambda **k: u * kdops.fused_linear_kd_loss(**k, impl="chunked", backend="torch"), x)
                    for u in (1.0, 0.3)]

    def no_item(self):
        raise AssertionError("the host read a tensor")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    for u, expected in zip((1.0, 0.3), torch_engine):
        ours = run(lambda **k: u * kdops.fused_linear_kd_loss(**k, impl="chunked", backend="triton"), x)
        for a, b in zip(ours, expected):
            assert rel_error(a, b) < 1e-5


def test_auto_impl_rule(monkeypatch):
    """auto: chunked under the default budget, and under a given memory_budget that its plan fits; sliced
    under a given budget below the smallest plan (here, with no gradient asked for: one logits row)."""
    chosen = []
    monkeypatch.setattr(kdops._autograd.FusedLinearKDFunction, "apply",
                        staticmethod(lambda problem, *a: chosen.append(type(problem).__name__) or
                                     torch.zeros(N)))
    x = make_inputs(seed=11)
    per_row = V * 8  # two float32 logits rows; no gradient asked for, so no G kept
    for memory_budget, expected in ((None, "ChunkedProblem"), (per_row, "ChunkedProblem"),
                                    (per_row - 1, "SlicedProblem")):
        kdops.fused_linear_kd_loss(**x, backend="triton", memory_budget=memory_budget, reduction="none")
        assert chosen.pop() == expected


@pytest.mark.parametrize("overrides, error, match", [
    (dict(impl="fused", backend="torch"), ValueError, r"impl='fused'.*backend='triton'"),
    (dict(impl="sliced", backend="torch"), ValueError, r"impl='sliced'.*backend='triton'"),
    (dict(memory_budget=0), ValueError, r"memory_budget"),
    (dict(memory_budget=1.5), TypeError, r"memory_budget"),
    (dict(hard_weight=1.0, labels=torch.full((N,), V)), ValueError, r"labels.*\[0, 1000\)"),
])
def test_errors(overrides, error, match):
    x = make_inputs(seed=12)
    x.update(overrides)
    with pytest.raises(error, match=match):
        kdops.fused_linear_kd_loss(**x)


def test_module_matches_function():
    x = make_inputs(seed=13)
    labels = x.pop("labels")
    module = kdops.FusedLinearKDLoss(divergence="tvd", hard_weight=0.5, backend="torch")
    got = module(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], labels,
                 x["student_bias"], x["teacher_bias"])
    want = reference.fused_linear_kd_loss(**x, labels=labels, divergence="tvd", hard_weight=0.5)
    assert rel_error(got, want) < 1e-6
    assert "hard_weight=0.5" in repr(module)
    with pytest.raises(ValueError, match="impl"):
        kdops.FusedLinearKDLoss(impl="cce")


@triton.jit
def _visit_kernel(order_ptr, n_row_blocks, n_col_tiles, GROUP: tl.constexpr):
    """order[row block, column tile] += pid + 1 for the tile that `grouped_tile` gives program pid."""
    pid = tl.program_id(0)
    row, col = linear_kernels.grouped_tile(pid, n_row_blocks, n_col_tiles, GROUP)
    tl.atomic_add(order_ptr + row * n_col_tiles + col, pid + 1)


def _grouped_order(n_row_blocks: int, n_col_tiles: int, group: int) -> torch.Tensor:
    """order[r, c] = the program id that `kernels.linear.grouped_tile` gives tile (r, c), -1 where none does."""
    order = torch.zeros(n_row_blocks * n_col_tiles, dtype=torch.int32, device=DEVICE)
    _visit_kernel[(n_row_blocks * n_col_tiles,)](order, n_row_blocks, n_col_tiles, GROUP=group)
    return order.view(n_row_blocks, n_col_tiles).cpu() - 1


@pytest.mark.parametrize("rows, cols, group", [(7, 5, 3), (8, 3, 8), (2, 9, 8), (5, 1, 2)])
def test_backward_ordering_visits_every_tile_once(rows, cols, group):
    """The gradient kernel's grouped ordering: each (row block, vocabulary tile) exactly once; `group` row blocks
    (fewer in the last group) walked down each column before the next column."""
    order = _grouped_order(rows, cols, group)
    assert sorted(order.flatten().tolist()) == list(range(rows * cols)), order
    for first in range(0, rows, group):
        block = order[first:first + group]
        assert (block.t().flatten() == torch.arange(block.numel()) + first * cols).all(), order
