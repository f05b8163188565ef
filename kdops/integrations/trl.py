"""TRL's `DistillationTrainer` (TRL ≥ 1.16: on-policy distillation with vLLM or in-process generation), its loss
computed by kdops.

    from kdops.integrations.trl import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trl.DistillationConfig(...),
                                  train_dataset=..., processing_class=tokenizer, divergence=kdops.TAID(0.5))

Everything but the loss is TRL's (generation, data, masks, logging, distribution): the subclass runs TRL's own
`_compute_loss` with its chunked loss `trl.trainer.distillation_trainer._chunked_divergence_loss` replaced, for
that call, by `kdops.compat.trl.chunked_divergence_loss` — TRL's generalized JSD with the config's `beta` by
default (the same numbers, and the student entropy TRL logs), or any kdops divergence given as `divergence=`.
Logit scales and final-logit softcaps are read by TRL from the models' configs and applied by kdops.

The replacement lasts one `_compute_loss` call and is undone after it (also on an exception); it is a module
global, so two trainers stepping at the same time in two threads of one process would see each other's loss.

TRL 1.16's sparse-teacher trainers, their losses computed by kdops' top-k loss (`kdops.compat.trl`):

    from kdops.integrations.trl import IWOPDTrainer, ServerDistillationTrainer

`ServerDistillationTrainer` (trl.experimental.server_distillation) and `IWOPDTrainer` (trl.experimental.iw_opd),
same constructors and configs, override only the loss methods, each by its drop-in of the same arguments: the
server's top-k forward KL (`_compute_server_forward_kl_loss`) and the β > 0 top-1 loss
(`_compute_sparse_top_1_divergence_loss`, reached by both trainers' server and local paths); `IWOPDTrainer` also the
local teacher's top-1 loss from the logits (`_compute_local_sparse_top_1_divergence_loss`), its top-k generalized
JSD (`generalized_jsd_loss`) and the IW-OPD objective (`_compute_iw_opd_loss`, with TRL's metrics).
`loss_add_tail=True` runs kdops' tail="bucket", False tail="renormalize". The server paths' student
log-probabilities are still TRL's log_softmax over the vocabulary (formed by TRL's `compute_loss`).
"""

from __future__ import annotations

import contextlib
import functools

from ..compat.trl import (
    chunked_divergence_loss,
    iw_opd_loss,
    local_sparse_top_1_divergence_loss,
    server_forward_kl_loss,
    sparse_top_1_divergence_loss,
    topk_generalized_jsd_loss,
)
from ..divergences import as_divergence

__all__ = ["DistillationTrainer", "ServerDistillationTrainer", "IWOPDTrainer"]


@contextlib.contextmanager
def _loss_replaced(module, loss):
    """module._chunked_divergence_loss is `loss` inside the block (and what it was again after it)."""
    original = module._chunked_divergence_loss
    module._chunked_divergence_loss = loss
    try:
        yield
    finally:
        module._chunked_divergence_loss = original


@functools.lru_cache(maxsize=None)
def _trainer_class():
    import trl
    from trl.trainer import distillation_trainer as module

    class DistillationTrainer(trl.DistillationTrainer):
        """`trl.DistillationTrainer` (same constructor and config) whose loss is computed by kdops from the
        hidden states. Extra keyword: `divergence` — None (default) for TRL's generalized JSD with the config's
        `beta`, or a kdops divergence (name or object, e.g. "tvd", `kdops.TAID(t)`), used at the config's
        temperature with TRL's masks and `num_items_in_batch`."""

        def __init__(self, *args, divergence=None, **kwargs):
            self.kdops_divergence = None if divergence is None else as_divergence(divergence)
            super().__init__(*args, **kwargs)

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            loss = functools.partial(chunked_divergence_loss, divergence=self.kdops_divergence)
            with _loss_replaced(module, loss):
                return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    return DistillationTrainer


class _SparseTeacherLosses:
    """The loss methods of TRL 1.16's ServerDistillationTrainer / IWOPDTrainer, computed by kdops (same arguments,
    the config values read from the trainer as TRL does)."""

    def _compute_server_forward_kl_loss(self, teacher_result, student_log_probs, labels):
        return server_forward_kl_loss(teacher_result, student_log_probs, labels, self.loss_add_tail)

    def _compute_sparse_top_1_divergence_loss(self, student_log_probs, teacher_top1_token_ids, teacher_top1_logprobs,
                                              reverse_token_ids, reverse_teacher_logprobs, labels,
                                              num_items_in_batch=None):
        return sparse_top_1_divergence_loss(student_log_probs, teacher_top1_token_ids, teacher_top1_logprobs,
                                            reverse_token_ids, reverse_teacher_logprobs, labels, num_items_in_batch,
                                            beta=self.beta, loss_add_tail=self.loss_add_tail)


class _IWOPDLosses(_SparseTeacherLosses):
    """IWOPDTrainer's further loss methods: the local teacher's top-1 and top-k losses, and IW-OPD."""

    generalized_jsd_loss = staticmethod(topk_generalized_jsd_loss)

    def _compute_local_sparse_top_1_divergence_loss(self, student_logits, teacher_logits, completion_tokens, labels,
                                                    num_items_in_batch=None):
        return local_sparse_top_1_divergence_loss(
            student_logits, teacher_logits, completion_tokens, labels, num_items_in_batch, beta=self.beta,
            temperature=self.temperature, loss_add_tail=self.loss_add_tail,
            reverse_kl_top_1_mode=self.reverse_kl_top_1_mode)

    def _compute_iw_opd_loss(self, student_logits, completion_tokens, labels, teacher_actual_logprobs,
                             rollout_logprobs=None, num_items_in_batch=None):
        loss, advantages, size, weights = iw_opd_loss(
            student_logits, completion_tokens, labels, teacher_actual_logprobs, rollout_logprobs, num_items_in_batch,
            temperature=self.temperature, iw_opd_gamma=self.iw_opd_gamma, iw_opd_epsilon=self.iw_opd_epsilon,
            return_advantages=True)
        counted = labels != -100
        if bool(counted.any()):  # TRL's IW-OPD metrics, over the positions that take a loss
            metrics = self._metrics["train" if self.model.training else "eval"]
            for key, values in (("mean_advantage", advantages), ("mean_abs_advantage", size),
                                ("mean_weight", weights)):
                metrics[f"iw_opd/{key}"].append(values[counted].mean().item())
            metrics["iw_opd/min_weight"].append(weights[counted].min().item())
            metrics["iw_opd/max_weight"].append(weights[counted].max().item())
        return loss


_SPARSE_TRAINERS = {  # name: (TRL module, the kdops loss methods)
    "ServerDistillationTrainer": ("trl.experimental.server_distillation", _SparseTeacherLosses),
    "IWOPDTrainer": ("trl.experimental.iw_opd", _IWOPDLosses),
}


@functools.lru_cache(maxsize=None)
def _sparse_trainer_class(name):
    import importlib

    module, losses = _SPARSE_TRAINERS[name]
    base = getattr(importlib.import_module(module), name)
    return type(name, (losses, base), {
        "__module__": __name__,
        "__doc__": f"`{module}.{name}` (same constructor and config) whose losses are computed by kdops' top-k "
                   "loss (`kdops.compat.trl`): loss_add_tail=True as tail='bucket', False as tail='renormalize'.",
    })


def __getattr__(name):
    if name == "DistillationTrainer":  # built on first use: importing this module needs no TRL
        return _trainer_class()
    if name in _SPARSE_TRAINERS:
        return _sparse_trainer_class(name)
    raise AttributeError(name)
