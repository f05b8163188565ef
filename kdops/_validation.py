"""Input checks shared by every public entry point: each raises before any kernel runs and names the
argument, what was expected and what was given."""

from __future__ import annotations

import math
import numbers
import os

import torch

from .divergences import Canonical, Kind
from .ensemble import TeacherMix
from .launchers.common import is_recording

REDUCTIONS = ("batchmean", "sum", "none")


BACKENDS = ("auto", "triton", "torch")


def _is_dtensor(value: torch.Tensor) -> bool:
    if type(value) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def check_tensor(name: str, value, *, floating: bool = True, min_dim: int = 1) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if _is_dtensor(value):
        raise TypeError(
            f"{name}: got a DTensor (placements {tuple(value.placements)}); kdops' kernels read plain local "
            "tensors. Under FSDP2 (fully_shard) a parameter read outside its module's forward is still sharded: "
            "compute the loss inside the forward of the FSDP unit that owns the lm_head, where the weight is "
            "gathered and its gradient is reduce-scattered afterwards (docs/integrations.md, 'Data parallelism'); for a frozen "
            "teacher, pass weight.full_tensor() under torch.no_grad(). For a tensor-parallel weight sharded "
            "along the vocabulary, pass its local shard (.to_local()) with vocab_parallel=kdops.VocabParallel(...)"
        )
    if floating and not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(value.shape)}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_labels(labels, leading_shape: torch.Size, device: torch.device) -> None:
    """Labels: None, or an integer tensor of the leading shape on the logits' device."""
    _check_row_tensor("labels", labels, leading_shape, device, floating=False)


def check_row_weights(weights, leading_shape: torch.Size, device: torch.device) -> None:
    """Per-row loss weights: None, or a floating-point tensor of the labels' (leading) shape on the logits' device.
    Values may be signed; they are constants (never differentiated)."""
    _check_row_tensor("weights", weights, leading_shape, device, floating=True)


def _check_row_tensor(name: str, x, leading_shape: torch.Size, device: torch.device, floating: bool) -> None:
    """None, or a tensor of one value per row (integer or floating-point) of the leading shape on `device`."""
    if x is None:
        return
    kind = "a floating-point" if floating else "an integer"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected {kind} torch.Tensor or None, got {type(x).__name__}")
    if x.is_floating_point() != floating or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected {kind} dtype, got {x.dtype}")
    if x.shape != leading_shape:
        raise ValueError(
            f"{name}: expected shape {tuple(leading_shape)} (the leading dimensions of the logits / hidden "
            f"states), got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the logits are), got one on {x.device}")


def _positive_number(name: str, value, expected: str) -> float:
    """`value` as a float, if it is a positive finite real number (TypeError / ValueError naming `name`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_temperature(temperature) -> float:
    return _positive_number("temperature", temperature, "a positive finite number")


def check_softcap(name: str, cap) -> float | None:
    """A final-logit softcap c (logits c·tanh(z / c)): None, or a positive finite number."""
    return None if cap is None else _positive_number(name, cap, "None or a positive finite number")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def check_num_items(num_items_in_batch) -> None:
    """A positive finite number, or a one-element tensor (as transformers passes it). A tensor's value is
    checked when it lives on the CPU; on an accelerator that would cost a synchronization, so it is used
    as given."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch: expected a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.device.type != "cpu" or torch.compiler.is_compiling():
            return
        value = num_items_in_batch.item()
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch: expected a positive number or None, got "
                        f"{type(num_items_in_batch).__name__}")
    else:
        value = num_items_in_batch
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"num_items_in_batch: expected a positive finite number, got {value!r}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


def check_loss_options(labels, leading_shape, device, temperature, ignore_index, reduction,
                       num_items_in_batch, weights=None) -> float:
    """The checks common to every loss; returns the temperature as a float."""
    check_labels(labels, leading_shape, device)
    check_row_weights(weights, leading_shape, device)
    check_ignore_index(ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_num_items(num_items_in_batch)
    return check_temperature(temperature)


def check_logits_pair(student_logits, teacher_logits, teacher_name: str = "teacher_logits") -> None:
    check_tensor("student_logits", student_logits)
    check_tensor(teacher_name, teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and {teacher_name}: expected the same shape [..., V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits: the vocabulary (last dimension) is empty, got shape "
                         f"{tuple(student_logits.shape)}")
    check_same_device(**{"student_logits": student_logits, teacher_name: teacher_logits})


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, device: torch.device) -> str:
    """'triton' or 'torch' for `backend` on `device`; ValueError if Triton was asked for and cannot run."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if backend == "triton":
        # (While launches are recorded, `kdops.launchers.common.recording`, nothing runs: any device will do.)
        runnable = _triton_importable() and (
            device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())
            or is_recording()
        )
        if not runnable:
            raise ValueError(
                f"backend='triton': cannot run Triton on {device} tensors here (needs triton and CUDA "
                "tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported); "
                "use backend='torch' or backend='auto'"
            )
    return backend


IMPLS = ("auto", "fused", "chunked", "sliced", "epilogue")


def check_weight_factor(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a non-negative finite number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
    return float(value)


def check_fused_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                       teacher_bias, hard_weight, soft_weight, impl) -> int:
    """Checks of fused_linear_kd_loss's tensors and weights; returns the shared vocabulary size. The teacher's
    tensors may be lists (several teachers, `teacher_mix`): the same checks for each, named teacher_hidden[i]
    etc., and one vocabulary size for all of them."""
    check_head("student_", student_hidden, student_weight, student_bias)
    several = isinstance(teacher_hidden, list)
    teachers = zip(teacher_hidden, teacher_weight, teacher_bias) if several else [
        (teacher_hidden, teacher_weight, teacher_bias)]
    vocab = student_weight.shape[0]
    for i, (hidden, weight, bias) in enumerate(teachers):
        index = f"[{i}]" if several else ""
        names = [f"teacher_{x}{index}" for x in ("hidden", "weight", "bias")]
        check_head("", hidden, weight, bias, names)
        if student_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"student_hidden and {names[0]}: expected the same leading shape, got "
                             f"{tuple(student_hidden.shape[:-1])} and {tuple(hidden.shape[:-1])}")
        if several and weight.shape[0] != teacher_weight[0].shape[0]:
            raise ValueError(f"{names[1]}: the teachers' vocabularies differ: {weight.shape[0]} rows, teacher_weight"
                             f"[0] has {teacher_weight[0].shape[0]}; a mix needs one vocabulary")
        vocab = min(vocab, weight.shape[0])
        check_same_device(student_hidden=student_hidden, **{names[0]: hidden, names[1]: weight, names[2]: bias})
    if vocab == 0:
        first = teacher_weight[0] if several else teacher_weight
        raise ValueError("student_weight / teacher_weight: the shared vocabulary is empty, got weight shapes "
                         f"{tuple(student_weight.shape)} and {tuple(first.shape)}")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias)
    check_loss_weights(labels, hard_weight, soft_weight)
    check_choice("impl", impl, IMPLS)
    return vocab


def check_head(prefix: str, hidden, weight, bias, names=None) -> None:
    """One model's hidden states [..., H], lm_head weight [V, H] and optional bias [V], named
    {prefix}hidden, {prefix}weight and {prefix}bias in errors (or `names`, in that order)."""
    names = dict(zip(("hidden", "weight", "bias"), names or [f"{prefix}{x}" for x in ("hidden", "weight", "bias")]))
    check_tensor(names["hidden"], hidden)
    check_tensor(names["weight"], weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{names['weight']}: expected a 2-D [V, H] weight, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{names['hidden']} and {names['weight']}: expected the hidden width of {names['hidden']} "
                         f"(last dimension, {hidden.shape[-1]}) to equal {names['weight']}.shape[1], got weight "
                         f"shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(names["bias"], bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{names['bias']}: expected shape ({weight.shape[0]},) (one entry per weight row), got "
                             f"{tuple(bias.shape)}")


def check_loss_weights(labels, hard_weight, soft_weight) -> None:
    hard_weight = check_weight_factor("hard_weight", hard_weight)
    check_weight_factor("soft_weight", soft_weight)
    if hard_weight > 0 and labels is None:
        raise ValueError("hard_weight: a hard-label loss (hard_weight > 0) needs labels, got labels=None")


def check_memory_budget(memory_budget) -> None:
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        raise TypeError(f"memory_budget: expected a positive int (bytes) or None, got {type(memory_budget).__name__}")
    if memory_budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {memory_budget!r}")


def check_label_range(labels, ignore_index: int, vocab: int) -> None:
    """Labels of the hard-label term must index the shared vocabulary (`check_ids_in_range`); on an accelerator the
    kernels give a NaN loss for such a label instead."""
    check_ids_in_range("labels", labels, ignore_index, vocab, "the shared vocabulary")


def check_ids_in_range(name: str, ids: torch.Tensor, ignore_index: int, vocab: int, vocabulary: str) -> None:
    """Ids other than ignore_index must index [0, vocab) (`vocabulary` says which). Checked for CPU tensors only:
    on an accelerator the check would synchronize."""
    if ids.device.type != "cpu" or torch.compiler.is_compiling():
        return
    valid = ids[ids != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(f"{name}: expected values in [0, {vocab}) ({vocabulary}) or ignore_index={ignore_index}, got "
                         f"values in [{int(valid.min())}, {int(valid.max())}]")


def resolve_impl(impl: str, backend: str, fits_chunk: bool) -> str:
    """'fused', 'chunked', 'sliced' or 'epilogue' for the fused API (see `kdops.fused_linear_kd_loss` for the rule of
    "auto")."""
    if backend == "torch":
        if impl in ("fused", "sliced", "epilogue"):
            raise ValueError(f"impl={impl!r}: the {impl} path runs Triton kernels and needs backend='triton' (CUDA "
                             "tensors, or CPU tensors with TRITON_INTERPRET=1); backend='torch' runs the chunked "
                             "path (impl='chunked' or 'auto')")
        return "chunked"
    if impl == "auto":
        return "chunked" if fits_chunk else "sliced"
    return impl


# --- several teachers (`teacher_mix`) -----------------------------------------------------------------------------

def as_teachers(name: str, teachers) -> list:
    """A tensor (one teacher) or a sequence of tensors, as a list (elements may be None only for biases)."""
    if teachers is None or isinstance(teachers, torch.Tensor):
        return [teachers]
    if isinstance(teachers, (list, tuple)):
        if not teachers:
            raise ValueError(f"{name}: expected a tensor or a non-empty sequence of tensors, got an empty sequence")
        return list(teachers)
    raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(teachers).__name__}")


def check_mix_type(mix) -> TeacherMix | None:
    """None, or a mix (whose weights `check_mix` checks against the teachers of a call)."""
    if mix is not None and not isinstance(mix, TeacherMix):
        raise TypeError(f"teacher_mix: expected kdops.Ensemble or kdops.LogitSum, got {type(mix).__name__}")
    return mix


def check_mix(mix, count: int, name: str) -> TeacherMix | None:
    """`teacher_mix` for `count` teachers given as `name`: None for one teacher, else a TeacherMix with one
    weight per teacher."""
    if check_mix_type(mix) is None:
        if count != 1:
            raise ValueError(f"{name}: {count} teachers need teacher_mix=kdops.Ensemble(weights) or "
                             "kdops.LogitSum(weights) to say how they make one target")
        return None
    if len(mix.weights) != count:
        raise ValueError(f"teacher_mix: {len(mix.weights)} weights for {count} teachers ({name}); give one weight "
                         "per teacher")
    return mix


def linear_teachers(teacher_hidden, teacher_weight, teacher_bias, teacher_mix):
    """The teachers' tensors as given (one teacher, no mix), or as three lists of one entry per teacher (a bias
    list of Nones when none is given) and the validated mix."""
    several = isinstance(teacher_hidden, (list, tuple)) or isinstance(teacher_weight, (list, tuple))
    if not several and teacher_mix is None:
        return teacher_hidden, teacher_weight, teacher_bias, None
    hidden, weight = as_teachers("teacher_hidden", teacher_hidden), as_teachers("teacher_weight", teacher_weight)
    bias = [None] * len(hidden) if teacher_bias is None else as_teachers("teacher_bias", teacher_bias)
    if len(weight) != len(hidden):
        raise ValueError(f"teacher_hidden has {len(hidden)} tensors and teacher_weight {len(weight)}: give one "
                         "of each per teacher")
    if len(bias) != len(hidden):
        raise ValueError(f"teacher_bias has {len(bias)} entries for {len(hidden)} teachers: give one per teacher "
                         "(None for a teacher without a bias), or None")
    return hidden, weight, bias, check_mix(teacher_mix, len(hidden), "teacher_hidden")


# --- a sparse (top-k) teacher ------------------------------------------------------------------------------------

TAILS = ("bucket", "renormalize", "zero")


TOPK_IMPLS = ("auto", "chunked", "gathered")


#: Σp may exceed 1 by this much in "bucket" mode (rounding of the teacher's log-probabilities), no more.
MASS_SLACK = 1e-3


def check_tail(tail, canon: Canonical, name: str) -> None:
    """`tail` is one of TAILS, and "zero" only with a divergence that is finite where P̂ = 0 < Q."""
    if not isinstance(tail, str) or tail not in TAILS:
        raise ValueError(f"tail: expected one of {', '.join(map(repr, TAILS))}, got {tail!r}")
    if canon.teacher_share != 1.0:
        raise ValueError(f"divergence {name!r} with a top-k teacher: TAID interpolates the student's and the "
                         "teacher's logits over the whole vocabulary, which a sparse teacher does not have; use "
                         "kdops.kd_loss or kdops.fused_linear_kd_loss with the dense teacher")
    if tail != "zero":
        return
    # Canonical D(P ‖ Q) with the student as P weighs the teacher's zeros by log(q / 0): KL(q ‖ p̂) is infinite,
    # and so is the skew KL(q ‖ αq + (1 − α)p̂) at α = 0. Every other kind stays finite.
    if canon.student_is_p and (canon.kind == Kind.KL or (canon.kind == Kind.SKEW and canon.c1 == 0)):
        raise ValueError(
            f"tail='zero' with divergence {name!r}: the teacher's distribution is 0 outside its ids while the "
            "student's is not, and this divergence weighs that by log(q / 0) = ∞; use tail='bucket' or "
            "'renormalize', or a divergence that stays finite there (forward_kl, generalized_jsd with β < 1, "
            "skew_forward_kl, skew_reverse_kl with α > 0, tvd, alpha_beta)")


def check_topk_teacher(teacher_ids, teacher_logprobs, leading: torch.Size, vocab: int, tail: str,
                       device: torch.device) -> None:
    """Shapes, dtypes and (on the CPU, where it costs no synchronization) values of a top-k teacher."""
    check_tensor("teacher_ids", teacher_ids, floating=False)
    check_tensor("teacher_logprobs", teacher_logprobs)
    if teacher_ids.is_complex() or teacher_ids.dtype == torch.bool or teacher_ids.is_floating_point():
        raise TypeError(f"teacher_ids: expected an integer dtype, got {teacher_ids.dtype}")
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"teacher_ids and teacher_logprobs: expected the same shape [..., k], got "
                         f"{tuple(teacher_ids.shape)} and {tuple(teacher_logprobs.shape)}")
    if teacher_ids.shape[:-1] != leading:
        raise ValueError(f"teacher_ids: expected leading dimensions {tuple(leading)} (the student's), got shape "
                         f"{tuple(teacher_ids.shape)}")
    if teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids: k (the last dimension) is 0, got shape {tuple(teacher_ids.shape)}")
    for name, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (where the student is), got one on {t.device}")
    if device.type != "cpu" or torch.compiler.is_compiling():
        return
    lp = teacher_logprobs.detach()
    present = lp != -math.inf
    if bool(torch.isnan(lp).any()) or bool((lp > 0).any()):
        bad = lp[torch.isnan(lp) | (lp > 0)][0].item()
        raise ValueError(f"teacher_logprobs: expected log-probabilities (≤ 0, or -inf for an absent entry), got {bad!r}")
    ids = teacher_ids[present]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"teacher_ids: expected ids in [0, {vocab}) (the student's vocabulary) where the "
                         f"log-probability is not -inf, got values in [{int(ids.min())}, {int(ids.max())}]")
    flat_ids = torch.where(present, teacher_ids, -1 - torch.arange(teacher_ids.shape[-1], device=device))
    ordered = flat_ids.reshape(-1, flat_ids.shape[-1]).sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        row = int((ordered[:, 1:] == ordered[:, :-1]).any(-1).nonzero()[0])
        raise ValueError(f"teacher_ids: a row lists an id twice (flattened row {row}); each id may appear once")
    if tail == "bucket":
        mass = lp.double().exp().sum(-1)
        if bool((mass > 1 + MASS_SLACK).any()):
            raise ValueError(f"teacher_logprobs: with tail='bucket' a row's probabilities must sum to at most 1 "
                             f"(+{MASS_SLACK:g} for rounding), got {float(mass.max()):.6g}")
