"""The CUDA compile gate (`python -m bench.compile`): every kernel compiles for sm_90 and sm_80 without
spills, and 16-bit fused matmuls use the tensor cores — checked ahead of time, on this GPU-less machine; for
sm_100 (Blackwell), a part of the grid with the arch's own tensor-core rule (tcgen05: UTCHMMA).

The gate itself runs in a subprocess: the test process has TRITON_INTERPRET set, and interpreted kernels
cannot be compiled."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl

import kdops
import kdops.launchers.common
import kdops.launchers.linear
import kdops.launchers.logits
from bench import compile as gate
from kdops import targets
from kdops.kernels import linear

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"kd_logits_forward_kernel", "kd_logits_backward_kernel", "merge_partials_kernel", *gate.FUSED_KERNELS}
TOPK_KERNELS = {"complement_lse_kernel", "topk_student_backward_kernel"}  # the quick gate's sparse-teacher call
SCALE_KERNELS = {"scale_unless_one_kernel"}  # the chunked paths' upstream gradient (no float argument)
TOKEN_LOGPROBS_KERNELS = {"token_logprobs_forward_kernel", "token_logprobs_backward_kernel"}
EPILOGUE_KERNELS = {"merge_tile_statistics_kernel"}  # impl="epilogue": its GEMMs' tile statistics merged


@pytest.mark.background("quick_gate", ["{python}", "-m", "bench.compile", "--quick", "--arch", "sm_90", "sm_80",
                                       "--jobs", "1", "--output", "{out}/KERNELS.md"])
def test_quick_gate_compiles_every_kernel_within_its_spill_limit(background):
    """The CI gate: the quick subset (every kernel, bf16 and some fp32, both archs) compiles, none spills but the
    fused kernels' 128 × 128 Hopper tiles (within WIDEST_SPILL_LIMIT), and the 16-bit fused kernels issue
    tensor-core instructions. (A background process from the test run's start: tests/conftest.py.)"""
    result = background["quick_gate"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = (result.folder / "KERNELS.md").read_text()
    assert " 0 failures.**" in text
    for arch in ("sm_90", "sm_80"):
        for kernel in KERNELS | TOPK_KERNELS | SCALE_KERNELS | TOKEN_LOGPROBS_KERNELS | EPILOGUE_KERNELS:
            assert f"| {arch} | {kernel} |" in text, (arch, kernel)
    for kernel in ("kd_logits_forward_kernel", "fused_forward_kernel", "complement_lse_kernel"):  # return_parts'
        assert any(f"| {kernel} |" in line and "PARTS=1" in line for line in text.splitlines()), kernel
    # the one-read gradient of impl="epilogue", with and without the hard-label term
    for hard in (0, 1):
        assert any("| kd_logits_backward_kernel |" in line and f"HARD={hard}" in line and "LOSS=1" in line
                   for line in text.splitlines()), hard


def test_the_sass_is_read_only_where_it_can_count(tmp_path):
    """A kernel without a dot and without local memory: `-res-usage` alone gives what `-sass` would add (no
    STL/LDL, no tensor-core instruction), so the gate skips the SASS there."""
    script = ("from bench import compile as gate\n"
              "spec = next(s for s in gate.record('sm_90', True) if s.name == 'merge_partials_kernel')\n"
              "cubin = gate.compile_spec(spec).asm['cubin']\n"
              "lean, full = (gate.analyse_cubin(cubin, 'sm_90', has_dot=d) for d in (False, True))\n"
              "assert lean == full and lean['registers'] > 0, (lean, full)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# Records the quick grid's bf16 calls for reverse KL on sm_100 and compiles, through the gate's own job, one 16-bit
# fused gradient kernel at 64 × 64 tiles (no spill); prints what the assertions read of it, its report and its SASS.
_BLACKWELL = r"""
import json, re
from bench import compile as gate

specs = [s for s in gate.record("sm_100", True, ["bf16"], ["reverse_kl"])
         if s.name == "fused_gradient_kernel" and gate._describe(s)[2]]
spec = next(s for s in specs if s.arguments["BLOCK_N"] == 64)
result, = gate.compile_all([spec], jobs=1)
compiled = gate.compile_spec(spec)  # Triton's cache: the cubin just analysed
sass = gate.sass(compiled.asm["cubin"])
without = "\n".join(line for line in sass.splitlines() if "UTCHMMA" not in line)
print(json.dumps(dict(
    tiles=sorted({(s.arguments["BLOCK_N"], s.arguments["BLOCK_V"], s.arguments["LOADS"]) for s in specs}),
    failures=result.failures, tensor_core_instructions=result.tensor_core_instructions,
    local_bytes=result.local_bytes, report=gate.report([result], ["sm_100"], True, 0.0),
    ptx_target=re.findall(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M), sass_arch="code for sm_100a" in sass,
    counts={arch: gate.tensor_core_instructions(sass, arch) for arch in gate.ARCHS},
    without=gate.tensor_core_instructions(without, "sm_100"))))
"""


def test_blackwell_gate_demands_tcgen05():
    """The sm_100 gate records the configurations the launchers pick on a B200 (the Hopper ones: 128 × 128 tiles
    where they are widest, TMA loads), compiles them for sm_100a, and passes a 16-bit fused kernel for its tcgen05
    instructions (UTCHMMA), which the sm_90 and sm_80 opcodes do not name: the same SASS without them fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _BLACKWELL], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    tma = linear.TMA.value
    assert [128, 128, tma] in seen["tiles"] and all(loads == tma for _, _, loads in seen["tiles"])
    assert seen["ptx_target"] == ["sm_100a"] and seen["sass_arch"]
    assert seen["failures"] == [] and seen["local_bytes"] == 0
    assert seen["tensor_core_instructions"] == seen["counts"]["sm_100"] > 0
    assert seen["counts"]["sm_90"] == seen["counts"]["sm_80"] == 0  # no HGMMA, no HMMA: tcgen05 alone
    assert "(UTCHMMA on sm_100)" in seen["report"] and "tiles on sm_90 and sm_100 up to" in seen["report"]
    assert seen["without"] == 0
    missing = gate.Compiled("fused_gradient_kernel", "sm_100", "c", "", "", registers=200, sixteen_bit_dot=True,
                            tensor_core_instructions=seen["without"])
    assert missing.failures == ["16-bit dot without tensor-core instructions"]


def test_tensor_core_opcodes_follow_the_arch():
    """Each arch counts its own tensor-core instructions in the SASS, predicated or not, at any offset: UTCHMMA
    (tcgen05.mma) on sm_100 only; HGMMA on sm_90; HMMA on sm_80 and sm_90, not on sm_100 (mma.sync, which
    leaves tcgen05 unused there)."""
    def line(offset, instruction):
        return f"        /*{offset}*/                   {instruction} ;   /* 0x00ff1c0e040075ea */"

    utc = line("1710", "UTCHMMA gdesc[UR4], gdesc[UR14], tmem[UR9], tmem[UR28], idesc[UR29], UPT")
    utc_far = line("10a40", "@UP0 UTCHMMA gdesc[UR16], gdesc[UR18], tmem[UR9], tmem[UR28], idesc[UR29], UPT")
    hgmma = line("0f20", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT")
    hmma = line("0f30", "HMMA.16816.F32.BF16 R4, R8, R12, R4")
    count = gate.tensor_core_instructions
    assert [count(f"{utc}\n{utc_far}", arch) for arch in ("sm_100", "sm_90", "sm_80")] == [2, 0, 0]
    assert [count(hgmma, arch) for arch in ("sm_100", "sm_90", "sm_80")] == [0, 1, 0]
    assert [count(hmma, arch) for arch in ("sm_100", "sm_90", "sm_80")] == [0, 1, 1]
    assert set(gate.TENSOR_CORE_OPCODES) == set(gate.ARCHS)


def test_blackwell_runs_keep_their_own_report():
    """Without --arch the gate covers sm_90 and sm_80 and writes KERNELS.md (their record); a run that includes
    sm_100 writes KERNELS_SM100.md. The B200 it assumes: capability (10, 0), 148 SMs."""
    assert gate.DEFAULT_ARCHS == ("sm_90", "sm_80")
    assert gate.default_output(gate.DEFAULT_ARCHS) == gate.default_output(["sm_80"]) == gate.RESULTS
    assert gate.default_output(["sm_100"]) == gate.default_output(["sm_90", "sm_100"]) == gate.BLACKWELL_RESULTS
    assert gate.BLACKWELL_RESULTS != gate.RESULTS and gate.BLACKWELL_RESULTS.parent == gate.RESULTS.parent
    b200 = gate.gpu_of_arch("sm_100")
    assert (b200.capability, b200.sm_count, b200.arch) == ((10, 0), 148, "sm_100")
    assert gate.gpu_of_arch("sm_90") is targets.H100 and gate.gpu_of_arch("sm_80") is targets.A100


def test_failures_are_named():
    """What fails the gate: a compile error, any local memory (spills), a 16-bit fused dot without
    tensor-core instructions; float32 fused kernels (exact FMA products) pass without them."""
    ok = gate.Compiled("fused_forward_kernel", "sm_90", "call", "", "", registers=200, sixteen_bit_dot=True,
                       tensor_core_instructions=8)
    assert ok.failures == []
    assert gate.Compiled("fused_forward_kernel", "sm_90", "c", "", "", sixteen_bit_dot=False).failures == []
    no_tc = gate.Compiled("fused_gradient_kernel", "sm_80", "c", "", "", sixteen_bit_dot=True)
    assert no_tc.failures == ["16-bit dot without tensor-core instructions"]
    spill = gate.Compiled("kd_logits_forward_kernel", "sm_90", "c", "", "", local_bytes=16, spill_instructions=4)
    assert spill.failures == ["spills (16 B local, 4 STL/LDL)"]
    # the fused 128 × 128 Hopper tiles: spills up to their limit pass, beyond it fail
    limit = gate.WIDEST_SPILL_LIMIT
    widest = dict(sixteen_bit_dot=True, tensor_core_instructions=8, spill_limit=limit)
    assert gate.Compiled("fused_forward_kernel", "sm_90", "c", "", "", local_bytes=limit, spill_instructions=400,
                         **widest).failures == []
    over = gate.Compiled("fused_forward_kernel", "sm_90", "c", "", "", local_bytes=limit + 8, spill_instructions=400,
                         **widest)
    assert over.failures == [f"spills ({limit + 8} B local, 400 STL/LDL, over the {limit} B allowed)"]
    assert gate.Compiled("merge_partials_kernel", "sm_90", "c", "", "", error="CompilationError: x").failures
    leak = gate.Compiled("kd_logits_backward_kernel", "sm_90", "c", "", "", float64_instructions=3)
    assert leak.failures == ["3 float64 arithmetic instructions in a float32 kernel"]


def test_spill_limit_covers_the_widest_fused_tiles_alone():
    """Only the fused kernels' 16-bit 128 × 128 tiles on sm_90 and sm_100 may spill (up to WIDEST_SPILL_LIMIT): not
    the same tiles before Hopper or with float32 operands, not narrower fused tiles, not the kernels on logits."""
    def spec(name="fused_forward_kernel", arch="sm_90", **config):
        kernel = SimpleNamespace(__name__=name, arg_names=["BLOCK_N"])  # BLOCK_N positional, the rest keywords
        return gate.Spec(kernel, (config.pop("BLOCK_N", 64),), config, call=None, arch=arch)

    widest, limit = dict(BLOCK_N=128, BLOCK_V=128), gate.WIDEST_SPILL_LIMIT
    assert gate.spill_limit(spec(**widest), True) == gate.spill_limit(spec("fused_gradient_kernel", **widest), True) \
        == limit > 0
    assert gate.spill_limit(spec(arch="sm_100", **widest), True) == limit  # the same tiles from Hopper on
    assert gate.spill_limit(spec(**widest), False) == gate.spill_limit(spec(arch="sm_80", **widest), True) == 0
    assert gate.spill_limit(spec(BLOCK_N=128, BLOCK_V=64), True) == 0
    assert gate.spill_limit(spec("kd_logits_forward_kernel", **widest), True) == 0


def test_float64_math_counts_arithmetic_only():
    """`float64_math` counts float64 arithmetic in PTX, predicated or not; loading a float64 parameter, moving
    it and converting it to float32 are what every kernel does with its FLOAT arguments, and LLVM may compare
    the float64 value where the source compares its conversion."""
    ptx = ("\tld.param.f64 \t%fd1, [k_param_14];\n\tcvt.rn.f32.f64 \t%r1, %fd1;\n\tmov.f64 \t%fd2, %fd1;\n"
           "\tmul.f32 \t%r2, %r1, %r1;\n\tadd.f64 \t%fd3, %fd1, %fd2;\n\t@%p1 fma.rn.f64 \t%fd4, %fd1, %fd2, %fd3;\n"
           "\tsetp.lt.f64 \t%p2, %fd1, %fd2;\n\tsub.f64 \t%fd5, %fd1, %fd2;\n")
    assert gate.float64_math(ptx) == 3


def test_float_arguments_reach_the_kernels_unrounded():
    """Every float argument a launcher passes (a temperature's inverse, β or α, the loss weights, softcaps) is a
    float64 parameter of its kernel (FLOAT): Triton would otherwise pass a Python float as float32 and round it
    before a float64 kernel sees it. Recorded for an H100: kd_loss, the fused and chunked paths with the hard-label
    term and a softcap, and a sparse teacher's kernels."""
    from kdops.kernels.divergences import FLOAT

    assert FLOAT is tl.float64
    floats = {}

    def recorder(kernel, grid, args, kwargs):
        params = inspect.signature(kernel.fn).parameters  # (interpreted here: the annotations are the source's)
        for name, value in dict(zip(params, args), **kwargs).items():
            if isinstance(value, float):
                floats.setdefault(kernel.fn.__name__, {})[name] = params[name].annotation

    s, t = torch.randn(5, 1000, requires_grad=True), torch.randn(5, 1000)
    labels = torch.randint(0, 1000, (5,))
    hs = torch.randn(37, 64, dtype=torch.bfloat16, requires_grad=True)
    ws = torch.randn(1000, 64, dtype=torch.bfloat16, requires_grad=True)
    with targets.assume("h100"), kdops.launchers.common.recording(recorder):
        kdops.kd_loss(s, t, labels, divergence="generalized_jsd", temperature=1.5, backend="triton").backward()
        for impl in ("fused", "chunked"):
            kdops.fused_linear_kd_loss(hs, ws, hs.detach(), ws.detach(), torch.randint(0, 1000, (37,)),
                                       divergence="skew_reverse_kl", impl=impl, backend="triton", hard_weight=0.5,
                                       student_softcap=30.0).backward()
        ids = torch.topk(t, 8).indices
        kdops.topk_kd_loss(s, ids, torch.log_softmax(t, -1).gather(1, ids), backend="triton").backward()
    assert set(floats) >= KERNELS | TOPK_KERNELS
    assert all(kind is tl.float64 for params in floats.values() for kind in params.values()), floats


def test_recording_finds_every_kernel_with_the_gpu_configs():
    """Recorded launches (nothing runs) carry the configurations the launchers pick for the assumed GPU."""
    seen = {}

    def recorder(kernel, grid, args, kwargs):
        seen.setdefault(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, kwargs)

    hs = torch.randn(37, 64, dtype=torch.bfloat16, requires_grad=True)
    ws = torch.randn(1000, 64, dtype=torch.bfloat16, requires_grad=True)
    ht, wt = torch.randn(37, 96, dtype=torch.bfloat16), torch.randn(1000, 96, dtype=torch.bfloat16)
    with targets.assume("h100"), kdops.launchers.common.recording(recorder):
        kdops.fused_linear_kd_loss(hs, ws, ht, wt, impl="fused", backend="triton").backward()
        s = torch.randn(5, 1000, requires_grad=True)
        kdops.kd_loss(s, torch.randn(5, 1000), backend="triton").backward()
    assert KERNELS <= set(seen)
    # Forward KL without a hard label, biases or softcaps, a frozen teacher, TMA: the widest Hopper tiles in both.
    for name in ("fused_forward_kernel", "fused_gradient_kernel"):
        expected = kdops.launchers.linear.fused_config(37, 1000, targets.H100, torch.bfloat16,
                                                       forward=name == "fused_forward_kernel",
                                                       width=kdops.launchers.linear.WIDEST)
        assert (expected["BLOCK_N"], expected["BLOCK_V"]) == (128, 128) and seen[name]["LOADS"] == linear.TMA.value
        for key in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages"):
            assert seen[name][key] == expected[key]
    for name, forward in (("kd_logits_forward_kernel", True), ("kd_logits_backward_kernel", False)):
        config = kdops.launchers.logits.logits_config(5, 1000, targets.H100, forward=forward)
        assert {key: seen[name][key] for key in config} == config
    # At a real vocabulary the forward takes 1024 columns and 4 warps, the gradient 2048 and 8 (measured).
    forward, gradient = (kdops.launchers.logits.logits_config(8192, 128256, targets.H100, forward=f) for f in (True,
                                                                                                               False))
    assert (forward["BLOCK_V"], forward["num_warps"], gradient["BLOCK_V"], gradient["num_warps"]) == (1024, 4, 2048, 8)
    # The hard-label term and the other kinds: the widest tiles too; a softcap (a tile transform): the common
    # tiles; the teacher's gradients too: the widest forward, the wide gradient kernel (forward KL's least state).
    labels = torch.randint(0, 1000, (37,))
    wt_grad = wt.clone().requires_grad_(True)
    for teacher_weight, options, forward_tiles, gradient_tiles in (
            (wt, dict(hard_weight=0.5), (128, 128), (128, 128)),
            (wt, dict(divergence="generalized_jsd"), (128, 128), (128, 128)),
            (wt, dict(divergence="skew_forward_kl"), (128, 128), (128, 128)),
            (wt, dict(student_softcap=30.0), (64, 64), (64, 64)),
            (wt_grad, {}, (128, 128), (128, 64))):
        seen.clear()
        with targets.assume("h100"), kdops.launchers.common.recording(recorder):
            kdops.fused_linear_kd_loss(hs, ws, ht, teacher_weight, labels, impl="fused", backend="triton",
                                       **options).backward()
        for name, tiles in (("fused_forward_kernel", forward_tiles), ("fused_gradient_kernel", gradient_tiles)):
            assert (seen[name]["BLOCK_N"], seen[name]["BLOCK_V"]) == tiles, (options, name)
    # Before Hopper the same call loads by pointers (masked along H: BLOCK_H does not divide Ht = 96).
    seen.clear()
    with targets.assume("a100"), kdops.launchers.common.recording(recorder):
        kdops.fused_linear_kd_loss(hs, ws, ht, wt, impl="fused", backend="triton").backward()
    assert seen["fused_forward_kernel"]["LOADS"] == seen["fused_gradient_kernel"]["LOADS"] == linear.MASKED_K.value


def test_configs_follow_the_named_gpu():
    """One code path decides the configs: the split count follows the GPU's SM count; the interpreter's
    configuration is the one without a GPU."""
    h100 = kdops.launchers.linear.fused_config(512, 128256, targets.H100)
    a100 = kdops.launchers.linear.fused_config(512, 128256, targets.A100)
    rows = 512 // h100["BLOCK_N"]
    assert -(-128256 // h100["split_size"]) == pytest.approx(2 * 132 // rows, abs=1)
    assert -(-128256 // a100["split_size"]) == pytest.approx(2 * 108 // rows, abs=1)
    # Many rows: splits enough that the programs in flight cover FORWARD_ROW_BLOCKS_IN_FLIGHT row blocks.
    many = kdops.launchers.linear.fused_config(8192, 128256, targets.H100)
    in_flight = kdops.launchers.linear.FORWARD_ROW_BLOCKS_IN_FLIGHT
    assert -(-128256 // many["split_size"]) == pytest.approx(132 // in_flight, abs=1)
    assert kdops.launchers.linear.fused_config(512, 128256, targets.H100, torch.float32)["BLOCK_H"] < h100["BLOCK_H"]
    # The 16-bit forward before Hopper: narrower tiles (its KL first pass spilled on sm_80); the backward's own.
    assert kdops.launchers.linear.fused_config(512, 128256, targets.A100,
                                               forward=True)["BLOCK_V"] == a100["BLOCK_V"] // 2
    assert kdops.launchers.linear.fused_config(512, 128256, targets.H100, forward=True) == h100
    assert "num_warps" not in kdops.launchers.linear.fused_config(512, 128256, None)
    # The least live state (one pass, no hard label, teacher bias or transform): 128-row 16-bit tiles on Hopper
    # only; the other specializations, float32 operands and the A100 keep theirs.
    wide = kdops.launchers.linear.fused_config(512, 128256, targets.H100, width=kdops.launchers.linear.WIDE)
    assert (wide["BLOCK_N"], wide["BLOCK_V"]) == (128, 64) and wide["split_size"] % 64 == 0
    widest = kdops.launchers.linear.fused_config(512, 128256, targets.H100, width=kdops.launchers.linear.WIDEST)
    assert (widest["BLOCK_N"], widest["BLOCK_V"]) == (128, 128)
    assert kdops.launchers.linear.fused_config(512, 128256, targets.H100, forward=True,
                                               width=kdops.launchers.linear.WIDE) == wide
    assert kdops.launchers.linear.fused_config(512, 128256, targets.A100, width=kdops.launchers.linear.WIDE) == a100
    assert kdops.launchers.linear.fused_config(512, 128256, targets.H100, torch.float32,
                                               width=kdops.launchers.linear.WIDE) == \
        kdops.launchers.linear.fused_config(512, 128256, targets.H100, torch.float32)

    def width(forward=True, two_pass=False, hard=0.0, bias=False, transform=0, tma=True, grads=False):
        return kdops.launchers.linear.tile_width(forward, two_pass, hard, bias, transform, tma, grads)

    # With TMA and no tile transform, the widest tiles (measured faster on an H100 despite their spills): in the
    # forward of every specialization, and in the gradient kernel where it stores the student's gradient alone.
    for options in ({}, dict(two_pass=True), dict(hard=0.5), dict(bias=True), dict(grads=True)):
        assert width(**options) == kdops.launchers.linear.WIDEST
        if "grads" not in options:
            assert width(forward=False, **options) == kdops.launchers.linear.WIDEST
    # Elsewhere (pointer loads, a tile transform, the teacher's gradients too) the tiles that do not spill: wide
    # for the least live state (one pass, no hard label, teacher bias or transform), narrow otherwise.
    assert width(tma=False) == width(forward=False, tma=False) == width(forward=False,
                                                                        grads=True) == kdops.launchers.linear.WIDE
    assert width(transform=1) == width(forward=False, transform=1) == kdops.launchers.linear.NARROW
    for options in (dict(two_pass=True), dict(hard=0.5), dict(bias=True)):
        assert width(tma=False, **options) == width(forward=False, grads=True,
                                                    **options) == kdops.launchers.linear.NARROW
    # Generalized JSD (the most live state): half the columns in its float64 forward; every other kernel of
    # it keeps the common tiles.
    jsd = dict(jsd=True)
    assert kdops.launchers.linear.fused_config(512, 128256, targets.H100, **jsd) == h100
    assert kdops.launchers.linear.fused_config(512, 128256, targets.H100, forward=True, **jsd) == h100
    assert kdops.launchers.linear.fused_config(512, 128256, targets.A100, **jsd) == a100
    fp64 = kdops.launchers.linear.fused_config(512, 128256, targets.H100, torch.float64)
    for gpu in (targets.H100, targets.A100):
        assert kdops.launchers.linear.fused_config(512, 128256, gpu, torch.float64, forward=True, **jsd)["BLOCK_V"] == \
            fp64["BLOCK_V"] // 2
        assert kdops.launchers.linear.fused_config(512, 128256, gpu, torch.float64, **jsd)["BLOCK_V"] == fp64["BLOCK_V"]
    seen = {}
    hs, ws = torch.randn(37, 64, dtype=torch.bfloat16, requires_grad=True), torch.randn(1000, 64, dtype=torch.bfloat16)
    with targets.assume("a100"), kdops.launchers.common.recording(lambda kernel, grid, args, kwargs: seen.setdefault(
            kernel.__name__, kwargs)):
        kdops.fused_linear_kd_loss(hs, ws, hs.detach(), ws, divergence="generalized_jsd", impl="fused",
                                   backend="triton", student_softcap=30.0).backward()
    # Before Hopper: the 16-bit forward half as wide, a transformed backward half as tall.
    assert seen["fused_gradient_kernel"]["BLOCK_N"] == a100["BLOCK_N"] // 2
    assert seen["fused_forward_kernel"]["BLOCK_V"] == a100["BLOCK_V"] // 2
    assert targets.of_device(torch.device("cpu")) is None
    with targets.assume("a100"):
        assert targets.of_device(torch.device("cpu")) is targets.A100
    with pytest.raises(ValueError, match="unknown GPU"):
        targets.by_name("v100")


def test_launch_under_an_assumed_gpu_must_be_recorded():
    """A real launch under `assume` would run the GPU's configuration in the interpreter: refused."""
    s = torch.randn(3, 100)
    with targets.assume("h100"), pytest.raises(RuntimeError, match="outside a recording"):
        kdops.kd_loss(s, torch.randn(3, 100), backend="triton")
