"""Who runs in a sweep: kdops, its reference (eager and compiled), Liger-Kernel's distillation losses, the floor.

Each `Competitor` has a name, the functions it implements, `applies(case, device) -> (bool, reason)` and
`build(case, inputs) -> Phases`. Every loss is called on the same fresh inputs with all-valid labels and
temperature 1, so each one computes mean over tokens of ℓ (SPEC "batchmean").

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
  computes the student gradients during the forward (Triton); its backward only scales them.
* `LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss, beta, temperature, compiled)(student_input,
  student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias)` (torch, chunks of
  tokens, torch.compile'd by default): here weight_hard_loss = 0, weight_soft_loss = 1 (its default adds
  ½·cross-entropy); `compiled` only on CUDA. Needs liger-kernel ≥ 0.5.5 (bias arguments).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

import kdops

from .cases import FUNCTIONS, FUSED, KD_LOSS, Case
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


def _kdops_torch_check(case: Case, device) -> str | None:
    if torch.device(device).type != "cuda":
        return "without CUDA, backend auto is torch: same as kdops"
    return _exists("kdops")(case, device)


# --- Liger-Kernel ------------------------------------------------------------------------------------------

def import_liger(module: str):
    """`liger_kernel.<module>`; ImportError (or a broken install) when it cannot be imported."""
    return importlib.import_module(f"liger_kernel.{module}")


def liger_beta(divergence: str) -> float | None:
    """Liger's JSD β for a kdops divergence, or None where Liger has no equivalent."""
    d = kdops.as_divergence(divergence)
    if isinstance(d, kdops.GeneralizedJSD):
        return float(d.beta)
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(d.name)


def _liger_check(case: Case, device) -> str | None:
    if liger_beta(case.divergence) is None:
        return f"liger-kernel has no {case.divergence}"
    try:
        importlib.import_module("liger_kernel")
    except ImportError:
        return "liger-kernel not installed"
    except Exception as error:  # noqa: BLE001 - a broken optional install is a skip, not a failed sweep
        return f"liger-kernel not importable: {type(error).__name__}"
    return None


def _liger_jsd(case: Case, inputs: Inputs) -> Phases:
    """LigerJSD on log-probabilities: mean over tokens of JSD_β(teacher ‖ student) = kdops' loss."""
    loss_fn = import_liger("transformers").LigerJSD(beta=liger_beta(case.divergence))
    student, teacher, labels = inputs.args
    return Phases.of_loss(lambda: loss_fn(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), labels))


def _liger_fused_linear_jsd(case: Case, inputs: Inputs) -> Phases:
    """LigerFusedLinearJSD (Triton, gradients computed in the forward): the same loss as kdops'."""
    loss_fn = import_liger("transformers").LigerFusedLinearJSD(jsd_beta=liger_beta(case.divergence))
    return Phases.of_loss(lambda: loss_fn(*inputs.args))


def _liger_chunked_jsd(case: Case, inputs: Inputs) -> Phases:
    """LigerFusedLinearJSDLoss (torch over token chunks) with the hard loss off: the same loss as kdops'."""
    cuda = inputs.args[0].device.type == "cuda"
    loss_fn = import_liger("chunked_loss").LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=liger_beta(case.divergence), temperature=1.0,
        compiled=cuda)
    return Phases.of_loss(lambda: loss_fn(*inputs.args, None, None))


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
    Competitor("kdops-torch", FUNCTIONS, _loss_call("kdops", backend="torch"), check=_kdops_torch_check),
    Competitor(REFERENCE, FUNCTIONS, _loss_call("reference"), check=_exists("reference")),
    Competitor("reference-compiled", FUNCTIONS, _loss_call("reference", compile_it=True), True,
               _exists("reference")),
    Competitor("liger-jsd", (KD_LOSS,), _liger_jsd, True, _liger_check),
    Competitor("liger-fused-linear-jsd", (FUSED,), _liger_fused_linear_jsd, True, _liger_check),
    Competitor("liger-chunked-jsd", (FUSED,), _liger_chunked_jsd, check=_liger_check),
)
