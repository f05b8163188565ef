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
"""

from __future__ import annotations

import contextlib
import functools

from ..compat.trl import chunked_divergence_loss
from ..divergences import as_divergence

__all__ = ["DistillationTrainer"]


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


def __getattr__(name):
    if name == "DistillationTrainer":  # built on first use: importing this module needs no TRL
        return _trainer_class()
    raise AttributeError(name)
