"""Who runs in a sweep: kdops, its reference (eager and compiled), Liger-Kernel's, TRL's and orda-kernel's
distillation losses, the floor; and the builders of their memory knobs' points (`bench.fronts`).

Each `Competitor` has a name, the functions it implements, `applies(case, device) -> (bool, reason)` and
`build(case, inputs) -> Phases`. Every loss is called on the same fresh inputs with all-valid labels and
temperature 1, so each one computes mean over tokens of ℓ (`reduction="batchmean"`).

Liger-Kernel (optional; imported lazily, a missing package is a skip) implements the generalized JSD only.
Its conventions, read from its sources (ops/jsd.py, transformers/jsd.py, ops/fused_linear_jsd.py,
chunked_loss/jsd_loss.py and fused_linear_distillation.py):
* JSD_β = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M), M = βP + (1 − β)Q, P the teacher and Q the student: the same
  β as kdops' `GeneralizedJSD(beta)`; β = 0 is exactly KL(P ‖ Q) (forward_kl), β = 1 exactly KL(Q ‖ P)
  (reverse_kl). (Chunked versions before the fix used M = βQ + (1 − β)P; equal only at β = ½. The `loss`
  of every record is compared with the reference's, which shows such a mismatch.)
* The loss is the sum over tokens divided by the number of non-ignored tokens (all of them here).
* Temperature divides both logits before the log-softmax; no T² factor (T = 1 here anyway).
* `LigerJSD(beta)(log_q, log_p, labels)` takes log-probabilities, student first; the log-softmax is the
  caller's and is part of what is timed here (in the input dtype, as a Liger user writes it).
* `LigerFusedLinearJSD(jsd_beta)(student_input, student_weight, teacher_input, teacher_weight, labels)`
  computes the student gradients during the forward (cuBLAS float32 logits per chunk of tokens, then an inner
  JSD kernel); its backward only scales them. Its chunk is not a knob: ceil(N / ceil(V / (c·H))) rounded up to
  a power of 2, c = 1 before Blackwell (8 on sm_100, 16 on sm_103+: `_CHUNK_MEM_CONST_*`, chosen from the
  device's capability). The inner kernel is the op "jsd_loss_and_grad" of Liger's dispatcher (backends/
  dispatch.py): "nvidia-triton" (everywhere Triton is), "nvidia-cutedsl" (sm_90+, where nvidia-cutlass-dsl is
  installed; auto-selected there), "nvidia-cutile" (sm_100+); an implementation registers only where its
  module imports. `liger_fused_linear_jsd(jsd_impl)` forces one by calling `LigerFusedLinearJSDFunction.apply`
  with its `jsd_impl` argument (what the module passes as None): nothing process-wide (`set_impl`, the
  LIGER_KERNEL_IMPL* variables) is touched.
* `LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss, beta, temperature, compiled, chunk_size)
  (student_input, student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias)` (torch,
  chunks of tokens, torch.compile'd by default): here weight_hard_loss = 0, weight_soft_loss = 1 (its default
  adds ½·cross-entropy); `compiled` only on CUDA. Needs liger-kernel ≥ 0.5.5 (bias arguments). Its memory knob
  is the constructor's `chunk_size` (default 1024): torch.chunk into max(1, N // chunk_size) pieces. The
  hard-label cross-entropy (a float32 log-softmax of every chunk) is skipped by 0.8.5 itself when
  weight_hard_loss = 0 and return_soft_hard_loss is False (fused_linear_distillation.py: `compute_ce_loss and
  (weight_hard_loss != 0 or return_soft_hard_loss)`), so a user without a hard term pays nothing for it and
  there is nothing to turn off. Compiled, each call runs under `static_compile()`: one static graph per chunk
  shape, as a user with one chunk size gets, instead of the dynamic-shape graph that dynamo's automatic
  dynamic shapes would build once the bench has called it with a second shape.

TRL (optional, likewise a skip when missing): `trl.DistillationTrainer` (trl ≥ 1.16) computes its loss with
`trl.trainer.distillation_trainer._chunked_divergence_loss(student_hidden_states, teacher_hidden_states,
student_lm_head_weight, teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
student_final_logit_softcapping=None, teacher_final_logit_softcapping=None, temperature=1.0)
-> (loss, entropy_sum, n_valid)`, read from trainer/distillation_trainer.py and kernels/chunked_divergence.py:
* it takes hidden states and lm_head weights, hidden states first (student, teacher), then the weights:
  a `fused_linear_kd_loss` competitor. Hs ≠ Ht is fine; the vocabulary is the student weight's rows.
* the mixture is m = (1 − β)·q + β·p (q student, p teacher), the loss β·KL(p ‖ m) + (1 − β)·KL(q ‖ m):
  kdops' `GeneralizedJSD(beta)` with the same β; β = 0 is computed as KL(p ‖ q) (forward_kl) and β = 1
  as KL(q ‖ p) (reverse_kl), as in Liger. So `trl_beta` = `liger_beta`.
* `completion_mask` (1 = counted) instead of labels: here `labels != -100`. Without `num_items_in_batch`
  the loss is the sum over counted tokens divided by their number: kdops' "batchmean".
* temperature divides both logits, after the optional logit scale and softcapping (1 and none here); no T².
* the projections run on tiles of 4096 tokens × 32768 vocabulary rows into float32 buffers, folded by
  Triton kernels on CUDA and by torch ops elsewhere (so it runs on the CPU too); the backward recomputes
  the tiles and accumulates dH and dW in float32. The tile is no argument: the module constants
  TOKEN_CHUNK_SIZE and VOCAB_CHUNK_SIZE of trl/kernels/chunked_divergence.py, read at each call by the forward
  and by the backward. `trl_chunked_jsd(token_chunk)` sets TOKEN_CHUNK_SIZE around its forward and its
  backward only (`module_constant`) and restores it after each, so that no other call sees it.

orda-kernel (optional, likewise): `orda_kernel.distillation_loss(student_hidden, weight, labels,
SeparateTeacher(hidden, weight), student_ce_weight, teacher_ce_weight, kl_weight, kl_divergence, kl_beta,
backend, config)` (0.1.0, read from api.py, _torch_backend.py, _config.py, _execution/chunking.py):
* "forward" is KL(teacher ‖ student) (forward_kl), "reverse" KL(student ‖ teacher) (reverse_kl), and
  "skew_js" with kl_beta = b is (1 − b)·KL(t ‖ m) + b·KL(s ‖ m), m = (1 − b)·t + b·s: kdops'
  GeneralizedJSD(β) at b = 1 − β (`orda_divergence`); no other kdops divergence is mapped.
* here student_ce_weight = teacher_ce_weight = 0, kl_weight = 1, reduction "mean" (over the non-ignored
  labels: kdops' "batchmean"), temperature 1 (its T² factor is 1).
* backend="triton" runs its chunked Triton kernel, CUDA only (it raises rather than fall back); its CPU path
  is a torch reference that materializes [N, V] logits, which its chunk size does not change: the competitor
  needs CUDA. The knob is `config=KernelConfig(chunk_size=ChunkSize.nrows(n))` (rows per chunk; default
  `ChunkSize.dynamic()`: from N and V, 512 rows at 8192 × 128256), a per-call argument; profile "balanced"
  (its default: autotuned kernels, cached on disk).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Iterator

import torch

import kdops

from .cases import FUNCTIONS, FUSED, FUSED_TOPK, KD_LOSS, SPARSE, Case
from .floor import build_floor
from .measure import Inputs, Phases


def _always(case: Case, device) -> str | None:
    return None


@dataclass(frozen=True)
class Competitor:
    """`check(case, device)` returns a reason to skip (e.g. the function does not exist yet) or None."""

    name: str
    functions: tuple[str, ...]
    build: Callable[[Case, Inputs], Phases]
    needs_cuda: bool = False
    check: Callable[[Case, object], str | None] = _always

    def applies(self, case: Case, device) -> tuple[bool, str]:
        if case.function not in self.functions:
            return False, f"has no {case.function}"
        if self.needs_cuda and torch.device(device).type != "cuda":
            return False, "needs CUDA"
        reason = self.check(case, device)
        return reason is None, reason or ""


# --- kdops and its reference -------------------------------------------------------------------------------

def _module(name: str):
    return kdops if name == "kdops" else kdops.reference


def _exists(module_name: str) -> Callable[[Case, object], str | None]:
    def check(case: Case, device) -> str | None:
        return None if hasattr(_module(module_name), case.function) else "not available"
    return check


def _loss_call(module_name: str, compile_it: bool = False, **options) -> Callable[[Case, Inputs], Phases]:
    """`module.<case.function>(*inputs, divergence=..., **options)`, optionally through torch.compile."""
    def build(case: Case, inputs: Inputs) -> Phases:
        fn = getattr(_module(module_name), case.function)
        if compile_it:
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no silent fallback to eager
            fn = torch.compile(fn, dynamic=False)
        return Phases.of_loss(lambda: fn(*inputs.args, divergence=case.divergence, **options))
    return build


def kdops_loss(**options) -> Callable[[Case, Inputs], Phases]:
    """`kdops.<case.function>(*inputs, divergence=..., **options)` (e.g. impl, memory_budget)."""
    return _loss_call("kdops", **options)


#: Why kdops cannot run a case (it has no such function yet), or None.
kdops_check = _exists("kdops")


def kdops_epilogue_check(case: Case, device) -> str | None:
    """Why impl="epilogue" cannot run a case on `device` (16-bit operands; a Hopper or Blackwell GPU with
    quack-kernels: `kdops.launchers.epilogue.unavailable`), or None."""
    from kdops.launchers.epilogue import unavailable

    if case.torch_dtype not in (torch.bfloat16, torch.float16):
        return f"16-bit operands only, not {case.dtype}"
    return kdops_check(case, device) or unavailable(torch.device(device))


def _kdops_torch_check(case: Case, device) -> str | None:
    if torch.device(device).type != "cuda":
        return "without CUDA, backend auto is torch: same as kdops"
    return _exists("kdops")(case, device)


# --- knobs that live in a module -----------------------------------------------------------------------------

@contextlib.contextmanager
def module_constant(module_name: str, attribute: str, value) -> Iterator[None]:
    """`<module_name>.<attribute>` = `value` inside the block, its former value restored after it (also on an
    exception); a `value` of None leaves the module as it is."""
    if value is None:
        yield
        return
    module = importlib.import_module(module_name)
    former = getattr(module, attribute)
    setattr(module, attribute, value)
    try:
        yield
    finally:
        setattr(module, attribute, former)


def scoped(phases: Phases, setting: Callable[[], ContextManager]) -> Phases:
    """`phases` with its forward and its backward each run inside `setting()`: a knob held by a module rather
    than by an argument then holds for this competitor's calls only, whoever runs between them."""
    def forward():
        with setting():
            return phases.forward()

    def backward(state):
        with setting():
            return phases.backward(state)
    return replace(phases, forward=forward, backward=backward)


#: dynamo's recompile limit under `static_compile`: a graph per chunk shape and β of a whole sweep.
STATIC_RECOMPILE_LIMIT = 256


def static_compile() -> ContextManager:
    """dynamo's configuration for a compiled peer: no automatic dynamic shapes (each chunk shape its own static
    graph, as a user with one shape gets) and room for every such graph."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(automatic_dynamic_shapes=False, **{limit: STATIC_RECOMPILE_LIMIT})


# --- Liger-Kernel ------------------------------------------------------------------------------------------

def import_liger(module: str):
    """`liger_kernel.<module>`; ImportError (or a broken install) when it cannot be imported."""
    return importlib.import_module(f"liger_kernel.{module}")


def jsd_beta(divergence) -> float | None:
    """The β of a generalized JSD whose mixture is β·teacher + (1 − β)·student (β = 0: forward KL, β = 1:
    reverse KL) equal to a kdops divergence, or None where there is none."""
    d = kdops.as_divergence(divergence)
    if isinstance(d, kdops.GeneralizedJSD):
        return float(d.beta)
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(d.name)


def liger_beta(divergence) -> float | None:
    """Liger's JSD β for a kdops divergence, or None where Liger has no equivalent."""
    return jsd_beta(divergence)


def import_reason(package: str, module: str, needs: str = "") -> str | None:
    """None when `module` imports; else why not, as a skip reason: "<package> not installed", "<package> has no
    <module> (<needs>)" for an older release, "<package> not importable: ..." for a missing dependency."""
    top = module.split(".")[0]
    try:
        installed = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return f"{package} not installed"
    try:
        importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        if missing == top or missing.startswith(top + "."):
            return f"{package} has no {missing}" + (f" ({needs})" if needs else "")
        return f"{package} not importable: no module {missing!r}"
    except Exception as error:  # noqa: BLE001 - a broken optional install is a skip, not a failed sweep
        return f"{package} not importable: {type(error).__name__}"
    return None


def liger_check(case: Case, device) -> str | None:
    if liger_beta(case.divergence) is None:
        return f"liger-kernel has no {case.divergence}"
    return import_reason("liger-kernel", "liger_kernel")


def _liger_jsd(case: Case, inputs: Inputs) -> Phases:
    """LigerJSD on log-probabilities: mean over tokens of JSD_β(teacher ‖ student) = kdops' loss."""
    loss_fn = import_liger("transformers").LigerJSD(beta=liger_beta(case.divergence))
    student, teacher, labels = inputs.args
    return Phases.of_loss(lambda: loss_fn(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), labels))


#: The op of Liger's dispatcher that LigerFusedLinearJSD runs per chunk, and its implementations in
#: liger-kernel 0.8.5 with what each needs (an implementation registers only where its module imports).
LIGER_JSD_OP = "jsd_loss_and_grad"
LIGER_JSD_IMPLS = {"nvidia-triton": "triton", "nvidia-cutedsl": "nvidia-cutlass-dsl and sm_90+",
                   "nvidia-cutile": "cuda-tile and sm_100+"}


def liger_jsd_impls() -> tuple[str, ...]:
    """LIGER_JSD_IMPLS and any other implementation of LIGER_JSD_OP registered here (LIGER_JSD_IMPLS alone
    without liger-kernel: each point then says why it is skipped)."""
    if import_reason("liger-kernel", "liger_kernel.ops.fused_linear_jsd") is not None:
        return tuple(LIGER_JSD_IMPLS)
    from liger_kernel.backends import all_impls

    return tuple(LIGER_JSD_IMPLS) + tuple(i for i in all_impls(LIGER_JSD_OP) if i not in LIGER_JSD_IMPLS)


def liger_jsd_impl_check(impl: str) -> Callable[[Case, object], str | None]:
    """`liger_check`, then why Liger's inner JSD implementation `impl` cannot run on the device: not registered
    here (its module does not import) or its capability's reason (e.g. 'device sm_90 < required sm_100')."""
    def check(case: Case, device) -> str | None:
        reason = liger_check(case, device) or import_reason("liger-kernel", "liger_kernel.ops.fused_linear_jsd")
        if reason is not None:
            return reason
        from liger_kernel.backends.registry import get_registered

        registered = get_registered(LIGER_JSD_OP, impl)
        if registered is None:
            return f"liger-kernel's {impl} is not registered here: it needs {LIGER_JSD_IMPLS.get(impl, 'its module')}"
        return registered.capability.reason_if_unsatisfied(torch.device(device))
    return check


def liger_fused_linear_jsd(jsd_impl: str | None = None) -> Callable[[Case, Inputs], Phases]:
    """LigerFusedLinearJSD (cuBLAS float32 logits per chunk, the inner JSD kernel, gradients computed in the
    forward): the same loss as kdops'. `jsd_impl` forces the inner kernel (`LigerFusedLinearJSDFunction.apply`'s
    argument, for this call only); None: the module as a user calls it, the dispatcher's choice."""
    def build(case: Case, inputs: Inputs) -> Phases:
        beta = liger_beta(case.divergence)
        if jsd_impl is None:
            loss_fn = import_liger("transformers").LigerFusedLinearJSD(jsd_beta=beta)
            return Phases.of_loss(lambda: loss_fn(*inputs.args))
        function = import_liger("ops.fused_linear_jsd").LigerFusedLinearJSDFunction
        return Phases.of_loss(lambda: function.apply(*inputs.args, beta, -100, 1.0, None, jsd_impl, None))
    return build


def liger_chunked_jsd(chunk_size: int | None = None) -> Callable[[Case, Inputs], Phases]:
    """LigerFusedLinearJSDLoss (torch over token chunks of `chunk_size` rows, its default where None) with the
    hard loss off: the same loss as kdops'. torch.compile'd on CUDA only, there under `static_compile`."""
    def build(case: Case, inputs: Inputs) -> Phases:
        cuda = inputs.args[0].device.type == "cuda"
        knob = {} if chunk_size is None else {"chunk_size": chunk_size}
        loss_fn = import_liger("chunked_loss").LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=liger_beta(case.divergence), temperature=1.0,
            compiled=cuda, **knob)
        phases = Phases.of_loss(lambda: loss_fn(*inputs.args, None, None))
        return scoped(phases, static_compile) if cuda else phases
    return build


# --- TRL ----------------------------------------------------------------------------------------------------

TRL_MODULE = "trl.trainer.distillation_trainer"
TRL_FUNCTION = "_chunked_divergence_loss"
#: Where TRL's tile sizes live (module constants TOKEN_CHUNK_SIZE = 4096, VOCAB_CHUNK_SIZE = 32768 in 1.16.0).
TRL_KERNEL_MODULE = "trl.kernels.chunked_divergence"
TRL_TOKEN_CHUNK = "TOKEN_CHUNK_SIZE"


def trl_beta(divergence) -> float | None:
    """The `beta` of TRL's `_chunked_divergence_loss` for a kdops divergence, or None where TRL has none."""
    return jsd_beta(divergence)


def import_trl_loss():
    """TRL's `_chunked_divergence_loss`; ImportError (or a broken install) when it cannot be imported,
    AttributeError when this TRL has no such function (before 1.16)."""
    return getattr(importlib.import_module(TRL_MODULE), TRL_FUNCTION)


def trl_check(case: Case, device) -> str | None:
    if trl_beta(case.divergence) is None:
        return f"trl has no {case.divergence}"
    reason = import_reason("trl", TRL_MODULE, "needs trl >= 1.16")
    if reason is None and not hasattr(sys.modules[TRL_MODULE], TRL_FUNCTION):
        reason = f"trl has no {TRL_FUNCTION} (needs trl >= 1.16)"
    return reason


def trl_chunked_jsd(token_chunk: int | None = None) -> Callable[[Case, Inputs], Phases]:
    """TRL's DistillationTrainer loss: the mean over counted tokens of JSD_β(teacher ‖ student) = kdops' loss; tiles
    of `token_chunk` tokens (TRL_TOKEN_CHUNK set around this competitor's forward and backward only; None: TRL's)."""
    def build(case: Case, inputs: Inputs) -> Phases:
        loss_fn = import_trl_loss()
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs.args
        beta = trl_beta(case.divergence)
        counted = labels != -100  # kdops' ignore_index, as a completion mask

        def forward():
            loss, _entropy, _count = loss_fn(student_hidden, teacher_hidden, student_weight, teacher_weight,
                                             counted, beta, temperature=1.0)
            return loss
        return scoped(Phases.of_loss(forward),
                      functools.partial(module_constant, TRL_KERNEL_MODULE, TRL_TOKEN_CHUNK, token_chunk))
    return build


# --- orda-kernel ----------------------------------------------------------------------------------------------

ORDA_MODULE = "orda_kernel"


def orda_divergence(divergence) -> tuple[str, float | None] | None:
    """orda-kernel's (kl_divergence, kl_beta) equal to a kdops divergence, or None where it has none: "forward"
    (β = 0), "reverse" (β = 1), "skew_js" with kl_beta = 1 − β (its mixture weighs the student by kl_beta)."""
    beta = jsd_beta(divergence)
    if beta is None:
        return None
    return {0.0: ("forward", None), 1.0: ("reverse", None)}.get(beta, ("skew_js", 1.0 - beta))


def orda_check(case: Case, device) -> str | None:
    if orda_divergence(case.divergence) is None:
        return f"orda-kernel has no {case.divergence}"
    return import_reason("orda-kernel", ORDA_MODULE)


def orda_kd(chunk_rows: int | None = None, backend: str = "triton") -> Callable[[Case, Inputs], Phases]:
    """orda_kernel.distillation_loss with a SeparateTeacher and its CE terms off: kdops' loss. Chunks of
    `chunk_rows` rows (its `ChunkSize.dynamic()` plan where None); `backend` "triton" (CUDA only) or "torch" (its
    reference on [N, V] logits, any device)."""
    def build(case: Case, inputs: Inputs) -> Phases:
        orda = importlib.import_module(ORDA_MODULE)
        name, kl_beta = orda_divergence(case.divergence)
        config = None if chunk_rows is None else orda.KernelConfig(chunk_size=orda.ChunkSize.nrows(chunk_rows))
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs.args
        teacher = orda.SeparateTeacher(hidden=teacher_hidden, weight=teacher_weight)
        return Phases.of_loss(lambda: orda.distillation_loss(
            student_hidden, student_weight, labels, teacher, student_ce_weight=0.0, teacher_ce_weight=0.0,
            kl_weight=1.0, kl_divergence=name, kl_beta=kl_beta, backend=backend, config=config).loss)
    return build


# --- sparse teachers: the chunked PyTorch baseline --------------------------------------------------------------

#: Tokens per chunk of the baseline (DistillKit-style: the student's float32 logits of a chunk, in full).
TOPK_BASELINE_CHUNK = 1024


def _torch_chunked_topk(case: Case, inputs: Inputs) -> Phases:
    """What DistillKit and axolotl do with a top-k teacher: the student's logits materialized (in float32, by
    chunks of TOPK_BASELINE_CHUNK tokens under activation checkpointing, so that only one chunk's exist at a
    time), log_softmax, gather at the ids, the tail by logsumexp, the divergence; autograd for the gradients."""
    from torch.utils.checkpoint import checkpoint

    linear = case.function == FUSED_TOPK
    *student, ids, logprobs, labels = inputs.args
    divergence = kdops.as_divergence(case.divergence)

    def rows(x, i, lp):
        logits = torch.nn.functional.linear(x.float(), student[1].float()) if linear else x
        return kdops.reference.topk_rows(logits, i, lp, divergence, 1.0, "bucket")

    def forward():
        parts = [checkpoint(rows, student[0][r:r + TOPK_BASELINE_CHUNK], ids[r:r + TOPK_BASELINE_CHUNK],
                            logprobs[r:r + TOPK_BASELINE_CHUNK], use_reentrant=False)
                 for r in range(0, case.tokens, TOPK_BASELINE_CHUNK)]
        return torch.cat(parts).mean()
    return Phases.of_loss(forward)


# --- the list ------------------------------------------------------------------------------------------------

FLOOR = "floor"
KDOPS = "kdops"
REFERENCE = "reference"

COMPETITORS = (
    Competitor(FLOOR, FUNCTIONS, build_floor),
    Competitor(KDOPS, FUNCTIONS, _loss_call("kdops"), check=_exists("kdops")),
    Competitor("kdops-fused", (FUSED,), _loss_call("kdops", impl="fused", backend="triton"), True, _exists("kdops")),
    Competitor("kdops-chunked", (FUSED,), _loss_call("kdops", impl="chunked", backend="triton"), True,
               _exists("kdops")),
    Competitor("kdops-sliced", (FUSED,), _loss_call("kdops", impl="sliced", backend="triton"), True,
               _exists("kdops")),
    Competitor("kdops-torch", FUNCTIONS, _loss_call("kdops", backend="torch"), check=_kdops_torch_check),
    Competitor(REFERENCE, FUNCTIONS, _loss_call("reference"), check=_exists("reference")),
    Competitor("reference-compiled", (KD_LOSS, FUSED), _loss_call("reference", compile_it=True), True,
               _exists("reference")),
    Competitor("torch-chunked-topk", SPARSE, _torch_chunked_topk),
    Competitor("liger-jsd", (KD_LOSS,), _liger_jsd, True, liger_check),
    Competitor("liger-fused-linear-jsd", (FUSED,), liger_fused_linear_jsd(), True, liger_check),
    Competitor("liger-chunked-jsd", (FUSED,), liger_chunked_jsd(), check=liger_check),
    Competitor("trl-chunked-jsd", (FUSED,), trl_chunked_jsd(), check=trl_check),
    Competitor("orda-kd", (FUSED,), orda_kd(), True, orda_check),
)
