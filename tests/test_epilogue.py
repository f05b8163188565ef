"""impl="epilogue": the chunked path whose logits GEMMs keep row statistics (`kdops.paths.epilogue`).

Off the GPU the GEMM is its PyTorch definition (`ReferenceGEMM`, KDOPS_EPILOGUE_REFERENCE=<tile width>) and the
kernels on logits run in Triton's interpreter: the statistics' merge, the one-read kernel (`logits_backward` with
`loss=`), the second pass from given statistics (`logits_forward` with `stats=`) and the path are checked against
the float64 oracle here; the CuTe DSL GEMM itself is compiled for sm_90a
and sm_100a without a launch (`bench.epilogue`, below) and checked against the oracle on a GPU (`gpu_smoke`).
"""

import importlib.util
import json

import pytest
import torch

import kdops
import kdops.launchers.logits
import kdops.paths.chunked
from kdops.launchers import epilogue
from kdops.launchers.logits import logits_backward, logits_forward, one_read, second_pass_only
from kdops import reference
from oracle import TOLERANCE, logit_pair, rel_error
from test_fused_linear import assert_matches_oracle, make_inputs

V = 1000
TILE = 64  # the reference GEMM's tile width: 16 tiles of V = 1000, the last one ragged (40 columns)


@pytest.fixture
def reference_gemm(monkeypatch):
    monkeypatch.setenv("KDOPS_EPILOGUE_REFERENCE", str(TILE))


def count_launches(monkeypatch):
    """The kernels on logits launched, in order: (name, LOSS (the backward's), STAGE (the forward's))."""
    seen = []
    original = kdops.launchers.logits.launch

    def record(kernel, *args, **kwargs):
        stage = kwargs.get("STAGE")
        seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, kwargs.get("LOSS"),
                     getattr(stage, "value", stage)))
        return original(kernel, *args, **kwargs)

    monkeypatch.setattr(kdops.launchers.logits, "launch", record)
    return seen


@pytest.mark.parametrize("temperature, hard", [(1.0, 0.0), (2.0, 0.4), (1.0, 0.4)], ids=["T1", "T2-hard", "T1-hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_kl_reads_each_logit_once(dtype, temperature, hard, reference_gemm, monkeypatch):
    """Forward KL through the epilogue's statistics: the loss and every student gradient match the float64 oracle,
    in many chunks (each its own statistics) with ignored rows and peaked teacher rows, and the kernels on logits
    run one pass per chunk: the one-read gradient, never the statistics pass."""
    monkeypatch.setattr(kdops.paths.chunked, "MIN_CHUNK_ROWS", 8)
    x = make_inputs(dtype, vt=V, seed=3, bias=False)
    launches = count_launches(monkeypatch)
    assert_matches_oracle(x, teacher_grad=False, divergence="forward_kl", temperature=temperature, hard_weight=hard,
                          impl="epilogue", backend="triton", memory_budget=16 * V * 4 * 3)
    chunks = len(launches)
    assert chunks >= 3 and launches == [("kd_logits_backward_kernel", True, None)] * chunks


GIVEN = kdops.launchers.logits.kernel_modules().logits.GIVEN.value


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "both"])
@pytest.mark.parametrize("dtype, temperature, hard, beta", [(torch.float32, 1.0, 0.0, 0.5),
                                                            (torch.bfloat16, 2.0, 0.4, 0.1)],
                         ids=["fp32-T1", "bf16-T2-hard"])
def test_jsd_skips_the_statistics_pass(dtype, temperature, hard, beta, teacher_grad, reference_gemm, monkeypatch):
    """The generalized JSD through the epilogue's statistics: the loss and every gradient, the teacher's too, match
    the float64 oracle in many chunks with ignored rows and peaked teacher rows, and each chunk runs two passes over
    its logits, the forward's second pass from the given statistics and the gradient, never the first pass."""
    monkeypatch.setattr(kdops.paths.chunked, "MIN_CHUNK_ROWS", 8)
    x = make_inputs(dtype, vt=V, seed=6, bias=False)
    launches = count_launches(monkeypatch)
    assert_matches_oracle(x, teacher_grad=teacher_grad, divergence=kdops.GeneralizedJSD(beta=beta),
                          temperature=temperature, hard_weight=hard, impl="epilogue", backend="triton",
                          memory_budget=16 * V * 4 * 3)
    chunks = len(launches) // 2
    assert chunks >= 3 and launches == [("kd_logits_forward_kernel", None, GIVEN),
                                        ("kd_logits_backward_kernel", False, None)] * chunks


@pytest.mark.parametrize("divergence", ["reverse_kl", "skew_forward_kl", "tvd"])
def test_other_losses_take_the_chunked_passes(divergence, reference_gemm, monkeypatch):
    """Losses that need more than the log-normalizers (a first pass over both models), forward KL's teacher gradient
    and biases: the chunked path as it is, still exact."""
    launches = count_launches(monkeypatch)
    assert_matches_oracle(make_inputs(torch.bfloat16, vt=V, seed=4, bias=False), teacher_grad=True,
                          divergence=divergence, temperature=2.0, hard_weight=0.3, impl="epilogue", backend="triton")
    assert {(name, stage) for name, _, stage in launches} <= {("kd_logits_forward_kernel", 0),
                                                              ("kd_logits_backward_kernel", None)}
    assert all(loss is not True for _, loss, _ in launches)
    for bias, teacher_grad in ((True, False), (False, True)):  # forward KL: biases; the teacher's gradient
        launches.clear()
        assert_matches_oracle(make_inputs(torch.bfloat16, vt=V, seed=5, bias=bias), teacher_grad=teacher_grad,
                              divergence="forward_kl", impl="epilogue", backend="triton")
        assert ("kd_logits_forward_kernel", None, 0) in launches


@pytest.mark.parametrize("source", ["epilogue", "forward"])
@pytest.mark.parametrize("hard", [0.0, 0.5])
def test_one_read_kernel(source, hard):
    """`logits_backward(..., loss=...)` on [..., V] logits with −inf entries and peaked rows: its losses are the
    forward's (to a float32 rounding) and its gradient the two-pass gradient's, with the statistics from the
    reference epilogue's tiles or from the forward itself. Outputs are poisoned first."""
    torch.manual_seed(0)
    s, t = logit_pair((13, 1003), torch.float32, seed=11)
    labels = torch.randint(0, 1003, (13,))
    canon = kdops.divergences.ForwardKL().canonical()
    inv_temp = 1 / 1.5
    loss_ref, stats = logits_forward(s, t, labels, canon, inv_temp, 1.0, hard)
    scale = torch.rand(13) + 0.5
    scale[5] = 0.0
    g_ref, _ = logits_backward(s, t, labels, stats, scale, canon, inv_temp, True, False, 1.0, hard)
    if source == "epilogue":
        gemm = epilogue.ReferenceGEMM(TILE)
        parts = [dict(zip(("top", "sums"), gemm._tiles(z * torch.tensor(inv_temp))))
                 | dict(zip(("top_ce", "sums_ce"), gemm._tiles(z))) for z in (s, t)]
        stats = epilogue.statistics(parts[0], parts[1], False, hard > 0)
    loss = torch.full((13,), float("nan"))
    g = torch.full_like(s, float("nan"))
    logits_backward(s, t, labels, stats, scale, canon, inv_temp, True, False, 1.0, hard, out_s=g, loss=loss)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-8)
    assert torch.all(g[5] == 0)


@pytest.mark.parametrize("hard", [0.0, 0.5])
def test_second_pass_from_given_statistics(hard):
    """`logits_forward(..., stats=...)` with the reference epilogue's statistics, on [..., V] logits with −inf entries
    and peaked rows: the JSD's completed statistics are the two-pass forward's (to float32 roundings of the
    log-normalizers' size), and its losses and the gradients from them (both models') are as close to the float64
    oracle as the float32 reference's, within the contract. What the pass writes is poisoned first."""
    s, t = logit_pair((13, 1003), torch.float32, seed=12)
    labels = torch.randint(0, 1003, (13,), generator=torch.Generator().manual_seed(2))
    divergence, temperature = kdops.GeneralizedJSD(beta=0.3), 1.5
    canon, inv_temp = divergence.canonical(), 1 / temperature
    _, stats_ref = logits_forward(s, t, labels, canon, inv_temp, 1.0, hard)
    gemm = epilogue.ReferenceGEMM(TILE)
    parts = [dict(zip(("top", "sums"), gemm._tiles(z * torch.tensor(inv_temp))))
             | dict(zip(("top_ce", "sums_ce"), gemm._tiles(z))) for z in (s, t)]
    stats = epilogue.statistics(parts[0], parts[1], canon.student_is_p, hard > 0)
    stats[:, 5:9] = float("nan")  # what the second pass writes: aux1..3, L
    loss, out = logits_forward(s, t, labels, canon, inv_temp, 1.0, hard, stats=stats)
    assert out is stats
    read = 11 if hard else 9  # (m_c, ls_c): the hard-label term's, unwritten without it
    torch.testing.assert_close(stats[:, :read], stats_ref[:, :read], rtol=1e-5, atol=1e-6)
    scale = torch.rand(13, generator=torch.Generator().manual_seed(3)) + 0.5
    scale[4] = 0.0
    grads = logits_backward(s, t, labels, stats, scale, canon, inv_temp, True, True, 1.0, hard)

    def reference_of(dtype):
        z = [s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()]
        rows = reference.kd_loss(*z, divergence=divergence, temperature=temperature, reduction="none")
        if hard:
            rows = rows + hard * torch.nn.functional.cross_entropy(z[0], labels, reduction="none")
        rows.backward(scale.to(dtype))
        return [rows.detach(), z[0].grad, z[1].grad]

    oracle, float32 = reference_of(torch.float64), reference_of(torch.float32)
    for i, (ours, o, r) in enumerate(zip([loss, *grads], oracle, float32)):
        assert rel_error(ours, o) <= rel_error(r, o) + TOLERANCE[torch.float32], i


def test_given_statistics_only_where_they_suffice():
    """The kinds whose second pass needs r to the precision of its own size (skew KL, TVD), the one-pass kinds and
    transformed tiles refuse given statistics."""
    s, t = logit_pair((3, 100))
    assert second_pass_only(kdops.GeneralizedJSD(beta=0.2).canonical())
    for divergence in (kdops.divergences.ForwardKL(), kdops.divergences.ReverseKL(),
                       kdops.divergences.SkewForwardKL(), kdops.divergences.TVD()):
        canon = divergence.canonical()
        assert not second_pass_only(canon)
        with pytest.raises(AssertionError, match="given statistics"):
            logits_forward(s, t, None, canon, 1.0, stats=torch.zeros(3, 11))
    assert not second_pass_only(kdops.GeneralizedJSD().canonical().with_softcaps(30.0, None))


def test_one_read_refuses_what_needs_the_forward():
    s, t = logit_pair((3, 100))
    for canon, grad_t in ((kdops.divergences.ForwardKL().canonical(), True),
                          (kdops.divergences.ReverseKL().canonical(), False),
                          (kdops.divergences.GeneralizedJSD().canonical(), False)):
        assert not one_read(canon, grad_t)
        with pytest.raises(AssertionError, match="needs the forward's statistics"):
            logits_backward(s, t, None, torch.zeros(3, 11), torch.ones(3), canon, 1.0, True, grad_t,
                            loss=torch.empty(3))


def test_merged_statistics_of_peaked_rows():
    """The tiles' merge (`merged`, and the kernel of `statistics`) keeps the log-sum to a few float32 ulps of its own
    size on rows whose logits are of order 60 (a log-sum-exp of the logits' size would lose 4e-6), with a tile
    holding only −inf (it adds nothing) and a ragged last tile; the statistics put P's and Q's where the kernels
    read them, with r = ls_y − ls_x to its own precision and the student's T = 1 pair."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 5, 1000, generator=g, dtype=torch.float64) * 4 + 60
    v[0, 1, :100] = float("-inf")
    v = v.float()
    exact = torch.logsumexp(v.double(), -1) - v.double().amax(-1)
    gemm = epilogue.ReferenceGEMM(96)
    sinks = [dict(zip(("top", "sums"), gemm._tiles(v[i]))) for i in range(3)]
    for i in range(3):
        m, ls = epilogue.merged(sinks[i]["top"], sinks[i]["sums"])
        assert torch.equal(m, v[i].amax(-1))
        assert (ls.double() - exact[i]).abs().max() < 4 * torch.finfo(torch.float32).eps * exact[i].abs().max()
    student = dict(sinks[0], top_ce=sinks[2]["top"], sums_ce=sinks[2]["sums"])
    stats = torch.full((5, 11), float("nan"))
    stats.copy_(epilogue.statistics(student, sinks[1], False, True))
    eps = 4 * torch.finfo(torch.float32).eps * exact.abs().max()
    for (m_col, ls_col), side in (((0, 1), 1), ((2, 3), 0), ((9, 10), 2)):  # x = P = teacher, y = Q = student
        assert torch.equal(stats[:, m_col], v[side].amax(-1))
        assert (stats[:, ls_col].double() - exact[side]).abs().max() < eps
    # r = ls_y − ls_x to the merged sums' precision (~1.5e-7 here), from log(S_y / S_x): no log-sum rounded first
    exact_r = exact[0] - exact[1]
    assert (stats[:, 4].double() - exact_r).abs().max() < 2e-7 and torch.all(stats[:, 5:9] == 0)


def test_errors(monkeypatch):
    monkeypatch.delenv("KDOPS_EPILOGUE_REFERENCE", raising=False)
    x = make_inputs(torch.bfloat16, bias=False)
    args = [x[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="impl='epilogue': the epilogue path runs on CUDA GPUs"):
            kdops.fused_linear_kd_loss(*args, impl="epilogue", backend="triton")
    with pytest.raises(ValueError, match="needs backend='triton'"):
        kdops.fused_linear_kd_loss(*args, impl="epilogue", backend="torch")
    with pytest.raises(ValueError, match="takes one teacher"):
        kdops.fused_linear_kd_loss(args[0], args[1], [args[2], args[2]], [args[3], args[3]],
                                   teacher_mix=kdops.Ensemble([0.5, 0.5]), impl="epilogue", backend="triton")


# --- the CuTe DSL GEMM on a GPU (tests/conftest.py's GPU_SMOKE) --------------------------------------------------------

ON_GPU = torch.cuda.is_available() and epilogue.unavailable(torch.device("cuda")) is None
NEEDS_GPU = pytest.mark.skipif(not ON_GPU, reason="the epilogue GEMM runs on a Hopper or Blackwell GPU with "
                                                  "quack-kernels")


@NEEDS_GPU
@pytest.mark.parametrize("ce", [False, True], ids=["T", "T-and-CE"])
def test_quack_gemm_keeps_its_definition(ce):
    """`QuackGEMM` against `ReferenceGEMM` at the plan's tile width: the float32 logits (the same bf16 products,
    summed in another order), each tile's max and sum of exponentials, on a ragged vocabulary, poisoned outputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(300, 96, device="cuda", generator=g) * 2).bfloat16()
    w = (torch.randn(V, 96, device="cuda", generator=g) * 0.4).bfloat16()
    out = torch.full((300, V), float("nan"), device="cuda")
    sinks = epilogue.QuackGEMM()(h, w, out, 1 / 1.5, ce)
    tile_n = -(-V // sinks["top"].shape[1])
    ref_out = torch.empty_like(out)
    ref = epilogue.ReferenceGEMM(tile_n)(h, w, ref_out, 1 / 1.5, ce)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert sinks.keys() == ref.keys()
    for name in sinks:
        torch.testing.assert_close(sinks[name], ref[name], rtol=2e-5, atol=1e-5)


@NEEDS_GPU
@pytest.mark.parametrize("divergence", list(kdops.DIVERGENCES))
def test_path_on_the_gpu(divergence):
    """impl="epilogue" with its CuTe DSL GEMM against the float64 oracle: every divergence, T = 2, the hard-label
    term, bf16, the student's gradients; then forward KL with softcaps (the chunked path)."""
    x = make_inputs(torch.bfloat16, vt=V, seed=6, bias=False)
    assert_matches_oracle(x, teacher_grad=False, divergence=divergence, temperature=2.0, hard_weight=0.3,
                          impl="epilogue", backend="triton")
    if divergence == "forward_kl":
        assert_matches_oracle(x, teacher_grad=False, divergence=divergence, impl="epilogue", backend="triton",
                              student_softcap=20.0, teacher_softcap=30.0)


# --- the CuTe DSL GEMM, compiled without a GPU ---------------------------------------------------------------------

HAS_QUACK = importlib.util.find_spec("quack") is not None


def gemm_plan(arch: str):
    """A background process (tests/conftest.py) that plans both epilogues for `arch` (`python -m bench.epilogue`)."""
    return pytest.mark.background(f"epilogue_{arch}", ["{python}", "-m", "bench.epilogue", "--arch", arch, "--rows",
                                                       "200", "--vocab", "1000", "--hidden", "96", "--json"])


@pytest.mark.skipif(not HAS_QUACK, reason='quack-kernels is not installed (pip install "kdops[quack]")')
@gemm_plan("sm_90")
@gemm_plan("sm_100")
def test_gemm_compiles(background):
    """Both epilogues compile for sm_90a and sm_100a (a fresh process per architecture: the DSL's target is fixed at
    import): the plan's GEMM tile, its sinks' buffers [rows, ⌈V / tile_n⌉] of float32, a cubin for that
    architecture with tensor-core instructions, and no more local memory than `bench.epilogue.SPILL_LIMITS`."""
    from bench.epilogue import SPILL_LIMITS

    for arch in ("sm_90", "sm_100"):
        run = background[f"epilogue_{arch}"]
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout.strip().splitlines()[-1])
        assert {r["epilogue"] for r in report} == {"logits_statistics", "logits_statistics_ce"}
        for r in report:
            tiles = -(-1000 // r["tile_n"])
            names = ["top", "sums"] + (["top_ce", "sums_ce"] if r["epilogue"].endswith("_ce") else [])
            assert r["sinks"] == {name: [[200, tiles], "torch.float32"] for name in names}
            assert r["arch"] == arch + "a" and 0 < r["registers"] <= 255 and r["tensor_core_instructions"] > 0
            assert r["spill_bytes"] <= SPILL_LIMITS[arch][r["epilogue"]], (arch, r)
