"""Who runs in a sweep: kdops, its reference (eager and compiled), Liger-Kernel's and TRL's distillation losses,
the floor.

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
  computes the student gradients during the forward (Triton); its backward only scales them.
* `LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss, beta, temperature, compiled)(student_input,
  student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias)` (torch, chunks of
  tokens, torch.compile'd by default): here weight_hard_loss = 0, weight_soft_loss = 1 (its default adds
  ½·cross-entropy); `compiled` only on CUDA. Needs liger-kernel ≥ 0.5.5 (bias arguments).

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
  the tiles and accumulates dH and dW in float32.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable

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


def _kdops_torch_check(case: Case, device) -> str | None:
    if torch.device(device).type != "cuda":
        return "without CUDA, backend auto is torch: same as kdops"
    return _exists("kdops")(case, device)


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


def _import_reason(package: str, module: str, needs: str = "") -> str | None:
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


def _liger_check(case: Case, device) -> str | None:
    if liger_beta(case.divergence) is None:
        return f"liger-kernel has no {case.divergence}"
    return _import_reason("liger-kernel", "liger_kernel")


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


# --- TRL ----------------------------------------------------------------------------------------------------

TRL_MODULE = "trl.trainer.distillation_trainer"
TRL_FUNCTION = "_chunked_divergence_loss"


def trl_beta(divergence) -> float | None:
    """The `beta` of TRL's `_chunked_divergence_loss` for a kdops divergence, or None where TRL has none."""
    return jsd_beta(divergence)


def import_trl_loss():
    """TRL's `_chunked_divergence_loss`; ImportError (or a broken install) when it cannot be imported,
    AttributeError when this TRL has no such function (before 1.16)."""
    return getattr(importlib.import_module(TRL_MODULE), TRL_FUNCTION)


def _trl_check(case: Case, device) -> str | None:
    if trl_beta(case.divergence) is None:
        return f"trl has no {case.divergence}"
    reason = _import_reason("trl", TRL_MODULE, "needs trl >= 1.16")
    if reason is None and not hasattr(sys.modules[TRL_MODULE], TRL_FUNCTION):
        reason = f"trl has no {TRL_FUNCTION} (needs trl >= 1.16)"
    return reason


def _trl_chunked_jsd(case: Case, inputs: Inputs) -> Phases:
    """TRL's DistillationTrainer loss: the mean over counted tokens of JSD_β(teacher ‖ student) = kdops' loss."""
    loss_fn = import_trl_loss()
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs.args
    beta = trl_beta(case.divergence)
    counted = labels != -100  # kdops' ignore_index, as a completion mask

    def forward():
        loss, _entropy, _count = loss_fn(student_hidden, teacher_hidden, student_weight, teacher_weight, counted,
                                         beta, temperature=1.0)
        return loss
    return Phases.of_loss(forward)


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
    Competitor("liger-jsd", (KD_LOSS,), _liger_jsd, True, _liger_check),
    Competitor("liger-fused-linear-jsd", (FUSED,), _liger_fused_linear_jsd, True, _liger_check),
    Competitor("liger-chunked-jsd", (FUSED,), _liger_chunked_jsd, check=_liger_check),
    Competitor("trl-chunked-jsd", (FUSED,), _trl_chunked_jsd, check=_trl_check),
)
