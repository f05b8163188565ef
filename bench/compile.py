"""The CUDA compile gate: every kernel specialization kdops' launchers produce, compiled ahead of time for
named GPUs on a machine without one, with registers, spills, shared memory and tensor-core instructions
read from the binary.

    python -m bench.compile [--arch {sm_90,sm_80,sm_100} ...] [--quick] [--transforms] [--dtype ...]
                            [--divergence ...] [--kernel ...] [--output FILE] [--jobs N]

Without `--arch` it gates sm_90 (H100) and sm_80 (A100) and writes bench/results/KERNELS.md; a run that includes
sm_100 (Blackwell: B200, sm_100a) writes bench/results/KERNELS_SM100.md instead (`default_output`), so that
KERNELS.md stays the record of those two.

How the specializations are found: the public API (`kd_loss`, `fused_linear_kd_loss` with both impls, and
both under vocabulary parallelism on a one-rank group; `token_logprobs`) is called on small CPU tensors over the
grid of dtypes, divergences, hard-label term, biases and gradient flags, with `kdops.targets.assume(gpu)` (so the
launchers pick the configurations they pick on that GPU) and `kdops.launchers.common.recording` (so each launch is
recorded, not run). Each distinct (kernel, signature, constexprs, warps, stages) is then compiled with
Triton's own argument specialization (`triton.runtime.jit.create_function_from_signature`, as a launch
would) for `GPUTarget("cuda", capability, 32)`, and its cubin is read with the `cuobjdump` that Triton's
wheel ships: `-res-usage` for registers and local memory (spills), `-sass` for the arch's tensor-core
instructions (TENSOR_CORE_OPCODES: HGMMA / HMMA on sm_90, HMMA on sm_80, UTCHMMA — tcgen05.mma — on sm_100).

The gate fails (exit 1) on any compile error, any specialization that uses local memory (a spill) — but the
fused kernels' 16-bit 128 × 128 tiles from Hopper on, measured faster on an H100 despite theirs, up to
WIDEST_SPILL_LIMIT bytes —, float64 arithmetic in a float32-accumulating kernel, and any fused lm_head kernel whose
dot operands are 16-bit but whose SASS has none of its arch's tensor-core instructions.
Float32 fused kernels multiply exactly ("ieee", FFMA on the CUDA cores) by design: they are reported,
not failed. The report is markdown: a summary per kernel and architecture, then one row per
specialization. `--quick` compiles a representative subset (every kernel; bf16, and fp32 for one divergence;
the heaviest divergences with every optional term) for the CI test.

This module must not run under TRITON_INTERPRET (an interpreted kernel cannot be compiled): it refuses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
from unittest import mock
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "KERNELS.md"
BLACKWELL_RESULTS = RESULTS.with_name("KERNELS_SM100.md")
ARCHS = {"sm_90": (9, 0), "sm_80": (8, 0), "sm_100": (10, 0)}
DEFAULT_ARCHS = ("sm_90", "sm_80")  # what KERNELS.md records
GPU_OF_ARCH = {"sm_90": "h100", "sm_80": "a100", "sm_100": "b200"}
# A B200's SM count: the one property of a Blackwell part, besides its capability, that the launchers read
# (kdops.launchers.linear's split count, kdops.launchers.scale's programs).
B200_SM_COUNT = 148
# The SASS opcodes that count as tensor-core instructions on each arch: what a 16-bit fused kernel must issue.
# sm_80: warp-level HMMA (mma.sync). sm_90: warpgroup HGMMA (wgmma), or HMMA, which Triton emits there for a dot
# of fewer than 64 rows. sm_100: tcgen05.mma, which ptxas writes as UTCHMMA (kinds f16 and tf32) or UTCQMMA
# (f8f6f4). Every 16-bit fused tile the launchers pick on sm_100 (64 or 128 rows) compiles to UTCHMMA; HMMA there
# is Triton's mma.sync fallback (a dot of fewer than 64 rows), which leaves tcgen05 unused: it does not count.
TENSOR_CORE_OPCODES = {"sm_80": ("HMMA",), "sm_90": ("HGMMA", "HMMA"), "sm_100": ("UTCHMMA", "UTCQMMA")}
DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
               "alpha_beta")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Which gradients are asked for: (student hidden, student weight+bias, teacher hidden, teacher weight+bias).
GRADS = {"student": (True, True, False, False), "all": (True, True, True, True), "hidden": (True, False, False, False)}
BIASES = {"none": (False, False), "student": (True, False), "teacher": (False, True), "both": (True, True)}
FUSED_KERNELS = ("fused_forward_kernel", "fused_gradient_kernel")

# Sizes of the recorded calls: odd, and large enough that every launcher takes its general path.
ROWS, HIDDEN_S, HIDDEN_T, VOCAB = 37, 64, 96, 1000
TOPK = 7


@dataclasses.dataclass(frozen=True)
class Call:
    """One public call whose launches are recorded."""

    function: str  # "kd_loss" | "fused" | "chunked" | "sliced" | "epilogue" | "topk" | "token_logprobs"
    dtype: str
    divergence: str
    hard: bool = False
    bias: str = "none"
    grads: str = "student"
    vocab_parallel: bool = False
    tail: str = ""  # topk only
    # The tile transforms (kernels/transforms.py): "softcap" (both models' logits; the student's for topk),
    # "taid" (TAID's target, in place of a forward_kl divergence), or both joined by "+"; "ensemble": two
    # teachers mixed into a float32 target (kd_loss: a student in its dtype against a float32 target).
    transform: str = ""
    # return_parts=True (kd_loss and topk): the forward kernels' PARTS specializations, which stream the entropies
    # and the cross-entropy beside their first pass (kernels/entropy.py)
    parts: bool = False

    @property
    def label(self) -> str:
        parts = [self.function, self.dtype, self.divergence] + ([f"transform={self.transform}"] if self.transform
                                                                else []) + (["parts"] if self.parts else [])
        if self.function == "topk":
            return " ".join(parts + [f"tail={self.tail}"])
        if self.function == "token_logprobs":  # no divergence
            return " ".join([self.function, self.dtype, f"bias={self.bias}"] + parts[3:])
        if self.function != "kd_loss":
            parts += [f"hard={int(self.hard)}", f"bias={self.bias}"]
        parts.append(f"grads={self.grads}")
        if self.vocab_parallel:
            parts.append("vocab_parallel")
        return " ".join(parts)


def calls(quick: bool, dtypes=None, divergences=None, transforms_only: bool = False) -> list[Call]:
    """The grid of public calls (the quick subset: bf16 with the kinds that have the most live state, fp32 with the
    first of them: a float32 specialization differs from the bf16 one by its loads and dtypes, not by its kind).
    Under vocabulary parallelism only the launchers' staging differs (partial states, their merge across
    ranks): one set of fused options per hard-label flag covers it. The tile transforms add their work to
    every element of every pass: the full grid adds softcapped calls with every optional term (TAID's too,
    for forward KL, and on logits); the quick grid's calls with every optional term carry them instead
    (softcaps, and TAID for forward KL: the most live state), as does its sparse-teacher call (the
    student's softcap). `divergences` narrows either grid; `transforms_only` keeps its transformed calls."""
    only = divergences
    heaviest = dict(hard=True, bias="both", grads="all")
    if quick:
        dtypes, divergences = dtypes or ("bf16", "fp32"), ("forward_kl", "skew_reverse_kl", "alpha_beta")
        fused = [dict(heaviest, transform="softcap"), dict(hard=False, bias="none", grads="student")]
    else:
        dtypes, divergences = dtypes or tuple(DTYPES), DIVERGENCES
        fused = [dict(hard=h, bias=b, grads=g) for h in (False, True) for b in BIASES for g in GRADS]
        fused.append(dict(heaviest, transform="softcap"))
    divergences = tuple(only) if only else divergences
    staged = [dict(hard=h, bias="none", grads="student") for h in (False, True)]
    out = []
    for dtype, divergence in itertools.product(dtypes, divergences):
        if quick and dtype != dtypes[0] and divergence != divergences[0]:
            continue
        # The sparse teacher's student side (kernels/topk.py) differs by dtype and tail only; the dense pair it
        # feeds runs kd_loss's kernels on k + 1 columns (other block sizes). The quick gate: one dtype, one
        # divergence, tail "bucket" (both kernels; "renormalize" only drops the tail from the gradient kernel).
        if not quick:
            out += [Call("topk", dtype, divergence, tail=tail) for tail in ("bucket", "renormalize")]
            out.append(Call("topk", dtype, divergence, tail="bucket", transform="softcap"))
        elif divergence == divergences[0] and dtype == dtypes[0]:
            out.append(Call("topk", dtype, divergence, tail="bucket", transform="softcap"))
        # return_parts: the PARTS specializations of the forward kernels on logits (with labels: the hard-label
        # sums too; their vocabulary-shard stage under vocab_parallel, as the sliced path runs it), of the fused
        # forward and of the top-k student's pass; the quick gate: those of its first dtype and divergence
        if not quick or (dtype == dtypes[0] and divergence == divergences[0]):
            out += [Call("kd_loss", dtype, divergence, grads="all", parts=True),
                    Call("fused", dtype, divergence, parts=True),
                    Call("topk", dtype, divergence, tail="bucket", parts=True)]
            if not quick:
                out.append(Call("kd_loss", dtype, divergence, grads="all", vocab_parallel=True, parts=True))
        # kdops.token_logprobs' kernels (kernels/token_logprobs.py) differ by dtype, softcap and the dtype of the
        # gradient they write (the weight's; float32 with a bias): one call without either and one with both; the
        # quick gate: those of the first dtype
        if divergence == divergences[0] and (not quick or dtype == dtypes[0]):
            out += [Call("token_logprobs", dtype, divergence, bias="none", grads="all"),
                    Call("token_logprobs", dtype, divergence, bias="student", grads="all", transform="softcap")]
        taid = divergence == "forward_kl"
        if taid and (not quick or dtype == dtypes[0]):
            out.append(Call("kd_loss", dtype, divergence, grads="all", transform="ensemble"))
        for vp in (False, True):
            out += [Call("kd_loss", dtype, divergence, grads=g, vocab_parallel=vp) for g in ("student", "all")]
            if taid and not quick:
                out.append(Call("kd_loss", dtype, divergence, grads="all", vocab_parallel=vp, transform="taid"))
            for impl in ("fused", "chunked") if vp else ("fused", "chunked", "sliced"):
                # the sliced path runs the kernels on logits in their vocabulary-shard stages: in the quick grid,
                # its call with every optional term only
                for options in (staged if vp else fused[:1] if quick and impl == "sliced" else fused):
                    if taid and options.get("transform") == "softcap" and (quick or vp):
                        options = dict(options, transform="softcap+taid")
                    out.append(Call(impl, dtype, divergence, vocab_parallel=vp, **options))
                if taid and not quick and not vp:
                    out.append(Call(impl, dtype, divergence, **heaviest, transform="softcap+taid"))
        # impl="epilogue": the merge of its GEMMs' tile statistics, then forward KL's one-read gradient (LOSS) or the
        # JSD's second pass from them (STAGE=GIVEN); its GEMM is recorded as its PyTorch definition
        # (`ReferenceGEMM`). After the chunked calls, so that the specializations the two share are theirs. The
        # quick gate: forward KL's of its first dtype, and the JSD's (not among its divergences) with the
        # hard-label term and every gradient, in its first dtype
        if (taid or divergence == "generalized_jsd") and (not quick or dtype == dtypes[0]):
            out += [Call("epilogue", dtype, divergence, hard=h) for h in (False, True)]
        if quick and divergence == divergences[0] and dtype == dtypes[0]:
            out.append(Call("epilogue", dtype, "generalized_jsd", hard=True, grads="all"))
    return [call for call in out if call.transform] if transforms_only else out


def _one_rank_group():
    """A one-process gloo group, so that the vocabulary-parallel launchers can be recorded."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def _run_call(call: Call) -> None:
    import kdops

    torch.manual_seed(0)
    dtype = DTYPES[call.dtype]
    g_sh, g_sw, g_th, g_tw = GRADS[call.grads]
    labels = torch.randint(0, VOCAB, (ROWS,))
    transforms = call.transform.split("+")
    divergence = kdops.TAID(0.6) if "taid" in transforms else call.divergence
    options = dict(divergence=divergence, backend="triton")
    if call.vocab_parallel:
        options["vocab_parallel"] = kdops.VocabParallel(0, VOCAB)
    caps = dict(student_softcap=30.0, teacher_softcap=50.0) if "softcap" in transforms else {}
    if call.function == "topk":
        logprobs, ids = torch.log_softmax(torch.randn(ROWS, VOCAB), -1).topk(TOPK, dim=-1)
        if caps:  # the student's softcap is an option of the loss from hidden states
            hs = torch.randn(ROWS, HIDDEN_S, dtype=dtype, requires_grad=True)
            ws = torch.randn(VOCAB, HIDDEN_S, dtype=dtype, requires_grad=True)
            kdops.fused_linear_topk_kd_loss(hs, ws, ids, logprobs, tail=call.tail, impl="chunked",
                                            student_softcap=caps["student_softcap"], **options).backward()
            return
        student = torch.randn(ROWS, VOCAB, dtype=dtype, requires_grad=True)
        loss = kdops.topk_kd_loss(student, ids, logprobs, labels if call.parts else None, tail=call.tail,
                                  return_parts=call.parts, **options)
        (loss[0] if call.parts else loss).backward()
        return
    if call.function == "kd_loss":
        student = torch.randn(ROWS, VOCAB, dtype=dtype, requires_grad=True)
        teacher = torch.randn(ROWS, VOCAB, dtype=dtype, requires_grad=g_tw)
        if "ensemble" in transforms:
            other = torch.randn(ROWS, VOCAB, dtype=dtype)
            options["teacher_mix"] = kdops.Ensemble((0.5, 0.5))
            teacher = [teacher, other]
        loss = kdops.kd_loss(student, teacher, labels, return_parts=call.parts, **options)
        (loss[0] if call.parts else loss).backward()
        return
    has_bs, has_bt = BIASES[call.bias]

    def leaf(*shape, grad):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    if call.function == "token_logprobs":
        hs, ws = leaf(ROWS, HIDDEN_S, grad=True), leaf(VOCAB, HIDDEN_S, grad=True)
        logp, entropy = kdops.token_logprobs(hs, ws, labels, bias=leaf(VOCAB, grad=True) if has_bs else None,
                                             softcap=caps.get("student_softcap"), return_entropy=True, backend="triton")
        (logp.sum() + entropy.sum()).backward()
        return
    hs, ws = leaf(ROWS, HIDDEN_S, grad=g_sh), leaf(VOCAB, HIDDEN_S, grad=g_sw)
    ht, wt = leaf(ROWS, HIDDEN_T, grad=g_th), leaf(VOCAB, HIDDEN_T, grad=g_tw)
    bs = leaf(VOCAB, grad=g_sw) if has_bs else None
    bt = leaf(VOCAB, grad=g_tw) if has_bt else None
    # impl="epilogue" with its GEMM's PyTorch definition: the CuTe DSL GEMM has its own compile check (`python -m
    # bench.epilogue`); here only the Triton kernels around it are recorded
    reference = {"KDOPS_EPILOGUE_REFERENCE": "1"} if call.function == "epilogue" else {}
    with mock.patch.dict(os.environ, reference):
        loss = kdops.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt,
                                          hard_weight=0.5 if call.hard else 0.0, impl=call.function, **caps,
                                          return_parts=call.parts, **options)
    (loss[0] if call.parts else loss).backward()


@dataclasses.dataclass
class Spec:
    """One kernel specialization: what `triton.compile` takes, and the first call that produced it."""

    kernel: object
    args: tuple
    kwargs: dict
    call: Call
    arch: str
    key: tuple = ()

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def arguments(self) -> dict:
        """Every argument by name: the positional ones, then the keywords (constexprs, launch options)."""
        return {**dict(zip(self.kernel.arg_names, self.args)), **self.kwargs}


def _constexpr_text(value) -> str:
    text = str(getattr(value, "value", value))
    return {"True": "1", "False": "0"}.get(text, text)


def _target(arch: str):
    """Triton's `GPUTarget` of an arch (capability 100 is sm_100a: Triton appends the "a" from sm_90 on)."""
    from triton.backends.compiler import GPUTarget

    major, minor = ARCHS[arch]
    return GPUTarget("cuda", major * 10 + minor, 32)


def gpu_of_arch(arch: str):
    """The `kdops.targets.GPU` whose launch configurations are compiled for `arch`: the named one where
    kdops.targets has it; otherwise (a B200) the H100's description with the part's capability and SM count, the
    only fields the launchers read (the rates serve the cost model), as `targets.of_device` builds one for a
    device it does not name."""
    from kdops import targets

    name = GPU_OF_ARCH[arch]
    if name in targets.GPUS:
        return targets.by_name(name)
    assert arch == "sm_100", arch
    return dataclasses.replace(targets.H100, name=name, capability=ARCHS[arch], sm_count=B200_SM_COUNT)


def record(arch: str, quick: bool, dtypes=None, divergences=None, transforms_only: bool = False) -> list[Spec]:
    """The distinct launches of every call of the grid, as the launchers make them for the arch's GPU."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    import kdops.launchers.common
    from kdops import targets

    backend = make_backend(_target(arch))
    found: dict[tuple, Spec] = {}
    current: list[Call] = []

    binders = {}  # per kernel: Triton's argument specialization, built once (it is generated code)

    def recorder(kernel, grid, args, kwargs):
        if kernel not in binders:
            binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
        _, specialization, options = binders[kernel](*args, **kwargs)
        key = (kernel.__name__, tuple((str(t), _constexpr_text(v) if t == "constexpr" else str(v))
                                      for t, v in specialization),
               tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in found:
            found[key] = Spec(kernel, args, dict(kwargs), current[-1], arch, key)

    _one_rank_group()
    with targets.assume(gpu_of_arch(arch)), kdops.launchers.common.recording(recorder):
        for call in calls(quick, dtypes, divergences, transforms_only):
            current.append(call)
            _run_call(call)
    return list(found.values())


@dataclasses.dataclass
class Compiled:
    """One specialization's compile: what the report shows of it, and what fails the gate (`failures`)."""

    name: str
    arch: str
    call: str
    constexprs: str
    config: str
    error: str = ""
    registers: int = 0
    local_bytes: int = 0
    spill_instructions: int = 0
    shared_bytes: int = 0
    tensor_core_instructions: int = 0
    seconds: float = 0.0
    sixteen_bit_dot: bool = False
    float64_instructions: int = 0  # float64 arithmetic in a kernel that accumulates in float32 (`float64_math`)
    spill_limit: int = 0  # the local memory it may use: WIDEST_SPILL_LIMIT for the fused 128 × 128 tiles (sm_90 on)

    @property
    def failures(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
        if self.local_bytes > self.spill_limit or (self.spill_instructions and not self.spill_limit):
            limit = f", over the {self.spill_limit} B allowed" if self.spill_limit else ""
            out.append(f"spills ({self.local_bytes} B local, {self.spill_instructions} STL/LDL{limit})")
        if self.float64_instructions:
            out.append(f"{self.float64_instructions} float64 arithmetic instructions in a float32 kernel")
        if self.name in FUSED_KERNELS and self.sixteen_bit_dot and not self.tensor_core_instructions:
            out.append("16-bit dot without tensor-core instructions")
        return out


_CONFIG_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "BLOCK_R", "num_warps", "num_stages", "maxnreg")
_HIDDEN_CONSTEXPRS = set(_CONFIG_KEYS) | {"MMA_S", "MMA_T", "PREC_S", "PREC_T", "ACC"}


def _pointer_types(spec: Spec):
    """The element types of the kernel's pointer arguments, as the specialization key holds them."""
    return [t for t, _ in spec.key[1] if t.startswith("*")]


def _describe(spec: Spec) -> tuple[str, str, bool]:
    """(pointer types and the constexprs that tell specializations apart, launch config, whether a dot
    operand is 16-bit)."""
    names = spec.kernel.arg_names
    values = spec.arguments
    shown = ["/".join(sorted({t.lstrip("*") for t in _pointer_types(spec)}))]
    shown += [f"{name}={_constexpr_text(values[name])}" for name, param in zip(names, spec.kernel.params)
              if param.is_constexpr and name not in _HIDDEN_CONSTEXPRS and name in values]
    config = " ".join(f"{k}={values[k]}" for k in _CONFIG_KEYS if k in values)
    dots = [str(values.get(k, "")) for k in ("DOT_S", "DOT_T")]
    return " ".join(shown), config, any(d in ("bf16", "fp16") for d in dots)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# an instruction's opcode after its offset (four hex digits, more past 64 KiB of code) and predicate
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def tensor_core_instructions(sass_text: str, arch: str) -> int:
    """The instructions of `sass_text` (`cuobjdump -sass`) that are `arch`'s tensor-core ones
    (TENSOR_CORE_OPCODES)."""
    return sum(op.startswith(TENSOR_CORE_OPCODES[arch]) for op in _OPCODE.findall(sass_text))


def analyse_cubin(cubin: bytes, arch: str, has_dot: bool = True) -> dict:
    """Registers, local (spill) bytes, STL/LDL and `arch`'s tensor-core instruction counts of one kernel's cubin.
    The SASS is read (one `cuobjdump -res-usage -sass`) where it can hold either: a kernel with a dot (`has_dot`)
    or with local memory; without both, its counts are 0 and `-res-usage` alone says so (half the time)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()

        def dump(*options):
            return subprocess.run([_tool("cuobjdump"), *options, f.name], capture_output=True, text=True,
                                  check=True).stdout

        out = dump("-res-usage", *(("-sass",) if has_dot else ()))
        match = _RES_USAGE.search(out)
        if match is None:
            raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{out[:2000]}")
        registers, stack, _, local = map(int, match.groups())
        if not has_dot and (local or stack):
            out = dump("-sass")
    spills = sum(op.startswith(("STL", "LDL")) for op in _OPCODE.findall(out))
    return dict(registers=registers, local_bytes=max(local, stack), spill_instructions=spills,
                tensor_core_instructions=tensor_core_instructions(out, arch))


_JOBS: list[Spec] = []


def compile_spec(spec: Spec):
    """Triton's compiled kernel of one specialization for its arch (`.asm["cubin"]`, `.metadata`)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = _target(spec.arch)
    backend = make_backend(target)
    kernel = spec.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*spec.args, **spec.kwargs)
    options, signature, constants, attrs = kernel._pack_args(backend, spec.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=target, options=options.__dict__)


def sass(cubin: bytes) -> str:
    """The SASS of a cubin (`cuobjdump -sass`)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


_FLOAT64_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z]+)(?:\.[a-z0-9]+)*\.f64\b", re.MULTILINE)


def float64_math(ptx: str) -> int:
    """float64 arithmetic instructions in a kernel's PTX: none may remain in one that accumulates in float32. The
    kernels take their float arguments as float64 (`kernels/divergences.py`, FLOAT) and convert them to the
    accumulation dtype on entry; a use before that conversion would run on the GPU's float64 units (1/64 of the
    float32 rate on most parts). Loading a float64 parameter and converting it is no arithmetic, nor is a
    comparison: LLVM moves libdevice's range test of a converted argument (logf's x < 2^-126) onto the float64
    value, once per program."""
    return sum(op not in ("ld", "cvt", "mov", "setp") for op in _FLOAT64_OP.findall(ptx))


# The fused kernels' 16-bit 128 × 128 tiles on Hopper (`kdops.launchers.linear.tile_width`, WIDEST) spill, and ran
# faster on an H100 than the narrower tiles that do not, in every kind measured (the comment above
# `kdops.launchers.linear._HOPPER_TILES`), spilling up to 2008 B (generalized JSD's second pass) and 1464 B (skew
# reverse KL's gradient). The grid's largest, 2128 B, is skew reverse KL's gradient with the hard-label term and the
# student's bias (not measured). Their spills are reported and bounded, so that a kernel change that spills
# more still fails the gate before a GPU measures it. The launchers pick the same tiles on every GPU from Hopper
# on (compute capability 9.0 and later: sm_100 too), and the gate holds them to the same bound there; no
# Blackwell part has measured them.
WIDEST_SPILL_LIMIT = 2304
WIDEST_TILES_FROM = (9, 0)  # the capability from which the launchers pick the widest tiles (and TMA loads)


def spill_limit(spec: Spec, sixteen_bit_dot: bool) -> int:
    """The local memory (bytes a thread) `spec` may use: WIDEST_SPILL_LIMIT for a fused kernel's 16-bit
    128 × 128 tiles on sm_90 and later (sm_100), 0 for any other specialization."""
    values = spec.arguments
    widest = (values.get("BLOCK_N"), values.get("BLOCK_V")) == (128, 128)
    return WIDEST_SPILL_LIMIT if spec.name in FUSED_KERNELS and ARCHS[spec.arch] >= WIDEST_TILES_FROM and \
        sixteen_bit_dot and widest else 0


def _compile_job(index: int) -> Compiled:
    """Compile _JOBS[index] (a forked worker reads the list it inherited)."""
    spec = _JOBS[index]
    constexprs, config, sixteen = _describe(spec)
    result = Compiled(spec.name, spec.arch, spec.call.label, constexprs, config, sixteen_bit_dot=sixteen,
                      spill_limit=spill_limit(spec, sixteen))
    start = time.perf_counter()
    try:
        compiled = compile_spec(spec)
        result.seconds = time.perf_counter() - start
        result.shared_bytes = int(compiled.metadata.shared)
        for field, value in analyse_cubin(compiled.asm["cubin"], spec.arch, spec.name in FUSED_KERNELS).items():
            setattr(result, field, value)
        if str(spec.arguments.get("ACC")) != "fp64":
            result.float64_instructions = float64_math(compiled.asm["ptx"])
    except Exception as error:  # noqa: BLE001 - every failure is a row of the report
        result.seconds = time.perf_counter() - start
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    return result


def compile_all(specs: list[Spec], jobs: int) -> list[Compiled]:
    global _JOBS
    _JOBS = specs
    if jobs <= 1:
        return [_compile_job(i) for i in range(len(specs))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_job, range(len(specs)), chunksize=1)


def _summary_rows(results: list[Compiled]):
    groups: dict[tuple[str, str], list[Compiled]] = {}
    for r in results:
        groups.setdefault((r.arch, r.name), []).append(r)
    for (arch, name), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        sixteen = [r for r in ok if r.sixteen_bit_dot]
        yield (arch, name, len(rs), len(rs) - len(ok), max((r.registers for r in ok), default=0),
               max((r.local_bytes for r in ok), default=0), max((r.shared_bytes for r in ok), default=0),
               (min(r.tensor_core_instructions for r in sixteen) if sixteen else "-"),
               sum(r.seconds for r in rs))


def report(results: list[Compiled], archs, quick: bool, wall: float, dtypes=None, divergences=None,
           transforms_only: bool = False, kernels=None) -> str:
    import triton

    command = f"python -m bench.compile --arch {' '.join(archs)}{' --quick' if quick else ''}"
    command += " --transforms" if transforms_only else ""
    command += f" --dtype {' '.join(dtypes)}" if dtypes else ""
    command += f" --divergence {' '.join(divergences)}" if divergences else ""
    command += f" --kernel {' '.join(kernels)}" if kernels else ""
    failures = [(r, f) for r in results for f in r.failures]
    # each arch's first tensor-core opcode names its instructions; sm_100 shares the widest tiles' spill bound
    tensor_cores = ", ".join(f"{TENSOR_CORE_OPCODES[arch][0]} on {arch}" for arch in archs)
    blackwell = "sm_100" in archs
    lines = [
        "# Kernels compiled for CUDA",
        "",
        f"Made by `{command}` with Triton "
        f"{triton.__version__} and torch {torch.__version__}, on a machine without a GPU (ahead-of-time "
        f"compile, {wall:.0f} s wall). Registers and local memory from `cuobjdump -res-usage`, tensor-core "
        f"instructions ({tensor_cores}) counted in the SASS; shared memory is Triton's "
        "dynamic allocation. A specialization is one (kernel, argument types, constexprs, warps, stages) "
        "that the launchers produce (see bench/compile.py). A spill fails the gate, but those of the fused "
        f"kernels' 16-bit 128 × 128 tiles on sm_90{' and sm_100' if blackwell else ''} up to {WIDEST_SPILL_LIMIT} "
        "B a thread (WIDEST_SPILL_LIMIT: measured faster on an H100 despite them, kdops/launchers/linear.py"
        f"{'; the same tiles and bound on sm_100, not measured there' if blackwell else ''}).",
        "",
        f"**{len(results)} specializations, {len(failures)} failures.**",
        "",
    ]
    if failures:
        lines += ["## Failures", "", "| arch | kernel | constexprs | failure |", "|---|---|---|---|"]
        lines += [f"| {r.arch} | {r.name} | {r.constexprs} | {f} |" for r, f in failures]
        lines.append("")
    lines += ["## Summary", "",
              "| arch | kernel | specializations | errors | max registers | max spill B | max shared B | "
              "min TC instr. (16-bit) | compile s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in _summary_rows(results)]
    lines += ["", "## Every specialization", "",
              "| arch | kernel | constexprs | config | regs | spill B | shared B | TC instr. | s |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r.arch, r.name, r.constexprs, r.config)):
        regs = "error" if r.error else r.registers
        lines.append(f"| {r.arch} | {r.name} | {r.constexprs} | {r.config} | {regs} | {r.local_bytes} | "
                     f"{r.shared_bytes} | {r.tensor_core_instructions} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _fresh_cache():
    """A fresh Triton cache: compile times are real, and nothing stale is reused."""
    with tempfile.TemporaryDirectory(prefix="kdops-compile-") as cache:
        previous = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


def run(archs, quick: bool, jobs: int, dtypes=None, divergences=None,
        transforms_only: bool = False, kernels=None) -> tuple[list[Compiled], float]:
    """Record and compile; `kernels`: only the specializations of these kernel names."""
    start = time.perf_counter()
    specs = [spec for arch in archs for spec in record(arch, quick, dtypes, divergences, transforms_only)
             if not kernels or spec.name in kernels]
    with _fresh_cache():
        results = compile_all(specs, jobs)
    return results, time.perf_counter() - start


def default_output(archs) -> Path:
    """Where a run over `archs` writes its report without `--output`: bench/results/KERNELS.md, the record of
    sm_90 and sm_80, unless the run includes sm_100 (bench/results/KERNELS_SM100.md)."""
    return BLACKWELL_RESULTS if "sm_100" in archs else RESULTS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=tuple(ARCHS), default=list(DEFAULT_ARCHS),
                        help="the archs to gate (default: sm_90 sm_80)")
    parser.add_argument("--quick", action="store_true", help="a representative subset (the CI test's)")
    parser.add_argument("--output", help="markdown report (default: bench/results/KERNELS.md; with sm_100 among "
                                         "the archs, bench/results/KERNELS_SM100.md)")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), help="only these input dtypes")
    parser.add_argument("--divergence", nargs="+", choices=tuple(DIVERGENCES), help="only these divergences")
    parser.add_argument("--transforms", action="store_true",
                        help="only the grid's calls with tile transforms (softcaps, TAID)")
    parser.add_argument("--kernel", nargs="+", help="only these kernels (e.g. fused_forward_kernel)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    results, wall = run(args.arch, args.quick, args.jobs, args.dtype, args.divergence, args.transforms, args.kernel)
    args.output = args.output or str(default_output(args.arch))
    Path(args.output).write_text(report(results, args.arch, args.quick, wall, args.dtype, args.divergence,
                                        args.transforms, args.kernel))
    failures = [(r, f) for r in results for f in r.failures]
    for row in _summary_rows(results):
        print("{} {:<26} {:>4} specs {:>2} errors  regs ≤ {:>3}  spill ≤ {:>5} B  shared ≤ {:>6} B  TC ≥ {:>4}  "
              "{:6.1f} s".format(*row))
    for r, failure in failures:
        print(f"FAIL {r.arch} {r.name} [{r.constexprs}] ({r.call}): {failure}")
    print(f"{len(results)} specializations compiled in {wall:.0f} s, {len(failures)} failures; "
          f"report: {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
