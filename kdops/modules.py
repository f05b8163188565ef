"""nn.Module wrappers: the constructor takes the keyword options, forward the tensors."""

from __future__ import annotations

import torch

from ._validation import (
    BACKENDS,
    IMPLS,
    REDUCTIONS,
    TOPK_IMPLS,
    check_choice,
    check_ignore_index,
    check_memory_budget,
    check_mix_type,
    check_softcap,
    check_tail,
    check_temperature,
    check_weight_factor,
)
from .api import fused_linear_kd_loss, kd_loss
from .divergences import as_divergence
from .parallel import VocabParallel
from .topk import fused_linear_topk_kd_loss, topk_kd_loss


def _check_options(temperature, ignore_index, reduction, backend, vocab_parallel) -> None:
    """Options are checked when the module is built, not at its first forward."""
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel: expected a kdops.VocabParallel or None, got {type(vocab_parallel).__name__}")
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)


class KDLoss(torch.nn.Module):
    """`kdops.kd_loss` as a module: ``KDLoss(divergence="reverse_kl", temperature=2.0)(s, t, labels)``."""

    def __init__(self, *, divergence="forward_kl", temperature=1.0, ignore_index=-100, reduction="batchmean",
                 backend="auto", vocab_parallel=None, teacher_mix=None):
        super().__init__()
        self.divergence = as_divergence(divergence)
        _check_options(temperature, ignore_index, reduction, backend, vocab_parallel)
        self.options = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                            backend=backend, vocab_parallel=vocab_parallel, teacher_mix=check_mix_type(teacher_mix))

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None, weights=None,
                return_parts=False):
        return kd_loss(student_logits, teacher_logits, labels, divergence=self.divergence,
                       num_items_in_batch=num_items_in_batch, weights=weights, return_parts=return_parts,
                       **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearKDLoss(torch.nn.Module):
    """`kdops.fused_linear_kd_loss` as a module: the constructor takes the options, forward the tensors.

    ``FusedLinearKDLoss(divergence="generalized_jsd", hard_weight=0.5)(student_hidden, student_weight,
    teacher_hidden, teacher_weight, labels)``; biases and `num_items_in_batch` are forward arguments.
    """

    def __init__(self, *, divergence="forward_kl", temperature=1.0, ignore_index=-100, reduction="batchmean",
                 hard_weight=0.0, soft_weight=1.0, impl="auto", backend="auto", memory_budget=None,
                 vocab_parallel=None, student_softcap=None, teacher_softcap=None, teacher_mix=None):
        super().__init__()
        self.divergence = as_divergence(divergence)
        _check_options(temperature, ignore_index, reduction, backend, vocab_parallel)
        check_choice("impl", impl, IMPLS)
        check_memory_budget(memory_budget)
        self.options = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                            hard_weight=check_weight_factor("hard_weight", hard_weight),
                            soft_weight=check_weight_factor("soft_weight", soft_weight), impl=impl, backend=backend,
                            memory_budget=memory_budget, vocab_parallel=vocab_parallel,
                            student_softcap=check_softcap("student_softcap", student_softcap),
                            teacher_softcap=check_softcap("teacher_softcap", teacher_softcap),
                            teacher_mix=check_mix_type(teacher_mix))

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, num_items_in_batch=None, weights=None, return_parts=False):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    divergence=self.divergence, student_bias=student_bias, teacher_bias=teacher_bias,
                                    num_items_in_batch=num_items_in_batch, weights=weights,
                                    return_parts=return_parts, **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TopKKDLoss(torch.nn.Module):
    """`kdops.topk_kd_loss` as a module: ``TopKKDLoss(tail="zero")(student_logits, teacher_ids, teacher_logprobs)``;
    labels and `num_items_in_batch` are forward arguments."""

    def __init__(self, *, divergence="forward_kl", temperature=1.0, tail="bucket", ignore_index=-100,
                 reduction="batchmean", backend="auto"):
        super().__init__()
        self.divergence = as_divergence(divergence)
        _check_options(temperature, ignore_index, reduction, backend, None)
        check_tail(tail, self.divergence.canonical(), self.divergence.name)
        self.options = dict(temperature=temperature, tail=tail, ignore_index=ignore_index, reduction=reduction,
                            backend=backend)

    def forward(self, student_logits, teacher_ids, teacher_logprobs, labels=None, num_items_in_batch=None,
                weights=None, return_parts=False):
        return topk_kd_loss(student_logits, teacher_ids, teacher_logprobs, labels, divergence=self.divergence,
                            num_items_in_batch=num_items_in_batch, weights=weights, return_parts=return_parts,
                            **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearTopKKDLoss(torch.nn.Module):
    """`kdops.fused_linear_topk_kd_loss` as a module: ``FusedLinearTopKKDLoss(tail="bucket", hard_weight=0.5)(
    student_hidden, student_weight, teacher_ids, teacher_logprobs, labels)``; the bias and `num_items_in_batch`
    are forward arguments."""

    def __init__(self, *, divergence="forward_kl", temperature=1.0, tail="bucket", ignore_index=-100,
                 reduction="batchmean", hard_weight=0.0, soft_weight=1.0, impl="auto", backend="auto",
                 memory_budget=None, student_softcap=None):
        super().__init__()
        self.divergence = as_divergence(divergence)
        _check_options(temperature, ignore_index, reduction, backend, None)
        check_tail(tail, self.divergence.canonical(), self.divergence.name)
        check_choice("impl", impl, TOPK_IMPLS)
        check_memory_budget(memory_budget)
        self.options = dict(temperature=temperature, tail=tail, ignore_index=ignore_index, reduction=reduction,
                            hard_weight=check_weight_factor("hard_weight", hard_weight),
                            soft_weight=check_weight_factor("soft_weight", soft_weight), impl=impl, backend=backend,
                            memory_budget=memory_budget,
                            student_softcap=check_softcap("student_softcap", student_softcap))

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None, student_bias=None,
                num_items_in_batch=None, weights=None, return_parts=False):
        return fused_linear_topk_kd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                                         divergence=self.divergence, student_bias=student_bias,
                                         num_items_in_batch=num_items_in_batch, weights=weights,
                                         return_parts=return_parts, **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
