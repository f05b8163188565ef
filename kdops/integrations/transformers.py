"""Distillation of Hugging Face causal LMs without their logits: the decoders' final hidden states and
the lm_head weights go straight into `kdops.fused_linear_kd_loss`.

    loss = distillation_loss(student, teacher, batch, divergence="reverse_kl", hard_weight=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=..., train_dataset=...)

The loss equals, on full logits, the divergence between ``student(ids).logits[:, :-1]`` and
``teacher(ids).logits[:, :-1]`` masked by ``labels[:, 1:]`` (plus hard_weight × the causal LM
cross-entropy): labels are shifted left with ignore_index appended, and every hidden position is used,
so no hidden state is copied.
"""

from __future__ import annotations

import functools

import torch

from ..api import fused_linear_kd_loss
from ..taid import TAIDSchedule

__all__ = [
    "distillation_loss", "DistillationTrainer", "logit_transform", "logit_multiplier", "logit_softcap",
    "final_hidden_and_head", "shift_labels",
]

IGNORE_INDEX = -100

# Config options that post-process the logits after the lm_head: folded into the hidden states (a
# multiplier m turns logits into m · h · Wᵀ), or passed to the loss (a final softcap c: c·tanh(z / c), applied
# by the kernels to each logit tile after the multiplier, as the models apply it).
_MULTIPLIERS = {"logit_scale": lambda v: v, "logits_scaling": lambda v: 1.0 / v}
_SOFTCAPS = ("final_logit_softcapping",)
# Options with "logit" in their name that do not touch the output logits.
_HARMLESS = ("attn_logit_softcapping", "output_logits", "logits_to_keep", "num_logits_to_keep")


def _unwrap(model):
    """The causal LM under a PEFT / DDP wrapper (attribute access reaches it through the wrappers)."""
    if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
        model = model.module
    return model


def logit_transform(model) -> tuple[float, float | None]:
    """(multiplier, softcap) that the model applies to its logits after the lm_head: logits are
    softcap·tanh(multiplier·z / softcap) (multiplier 1.0 and softcap None for most models).

    Raises ValueError, naming the model and the option, where a config option with "logit" in its name is
    one kdops does not know (it may change the logits in a way the fused loss would not reproduce).
    """
    config = _unwrap(model).config
    name = type(_unwrap(model)).__name__
    multiplier, softcap = 1.0, None
    for key, value in config.to_dict().items():
        if "logit" not in key or key in _HARMLESS or value is None or value is False:
            continue
        if key in _MULTIPLIERS:
            multiplier *= float(_MULTIPLIERS[key](value))
        elif key in _SOFTCAPS:
            softcap = float(value)
        else:
            raise ValueError(f"{name}: config.{key}={value!r} may change the logits after the lm_head, and kdops "
                             "does not know this option; distill on logits with kdops.kd_loss instead")
    return multiplier, softcap


def logit_multiplier(model) -> float:
    """The factor the model applies to its logits after the lm_head (1.0 for most models); see
    `logit_transform`."""
    return logit_transform(model)[0]


def logit_softcap(model) -> float | None:
    """The model's final-logit softcap c (logits c·tanh(z / c)), or None; see `logit_transform`."""
    return logit_transform(model)[1]


def final_hidden_and_head(model, input_ids, attention_mask=None):
    """(final hidden states [B, L, H] with the logit multiplier folded in, lm_head weight, lm_head bias). The
    decoder runs without its key-value cache (`use_cache=False`): a loss reads each position once, and a cache
    would hold every layer's keys and values for nothing (half a gigabyte for an 8B teacher at 4096 tokens)."""
    lm = _unwrap(model)
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(lm).__name__}: the output embeddings are a {type(head).__name__}, not an "
                         "nn.Linear; kdops' fused loss needs the lm_head weight")
    multiplier = logit_multiplier(model)
    if model is not lm:
        # A DistributedDataParallel wrapper: its forward must run, or its hooks never average the
        # gradients. The whole model runs, with logits for the last position only.
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                       logits_to_keep=1, use_cache=False).hidden_states[-1]
    else:
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
    if multiplier != 1.0:
        hidden = hidden * multiplier
    return hidden, head.weight, head.bias


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels[:, 1:] with ignore_index appended: position t of the hidden states predicts token t + 1."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def distillation_loss(student, teacher, batch, *, divergence="forward_kl", temperature=1.0, hard_weight=0.0,
                      soft_weight=1.0, impl="auto", num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                      backend="auto"):
    """The distillation loss of a causal-LM batch (``input_ids``, ``labels``, optional ``attention_mask``):
    per predicted token, soft_weight · D(teacher ‖ student at T) + hard_weight · CE(student, next token),
    averaged over tokens whose shifted label is not ignore_index (or summed and divided by
    `num_items_in_batch`). The teacher runs in eval mode under no_grad, in its own dtype and on its own
    device (its hidden states and lm_head are moved to the student's device if they differ). The models'
    logit multipliers and final-logit softcaps (`logit_transform`) are applied as the models apply them.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    attention_mask = batch.get("attention_mask")
    hidden, weight, bias = final_hidden_and_head(student, input_ids, attention_mask)
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            t_device = next(teacher.parameters()).device
            t_hidden, t_weight, t_bias = final_hidden_and_head(
                teacher, input_ids.to(t_device), None if attention_mask is None else attention_mask.to(t_device))
    finally:
        teacher.train(was_training)
    device = hidden.device
    t_hidden, t_weight = t_hidden.to(device), t_weight.to(device)
    t_bias = None if t_bias is None else t_bias.to(device)
    with torch.autocast(device.type, enabled=False):  # the kernels take each tensor in its own dtype
        return fused_linear_kd_loss(hidden, weight, t_hidden, t_weight, shift_labels(labels, ignore_index).to(device),
                                    divergence=divergence, temperature=temperature, ignore_index=ignore_index,
                                    num_items_in_batch=num_items_in_batch, student_bias=bias, teacher_bias=t_bias,
                                    hard_weight=hard_weight, soft_weight=soft_weight, impl=impl, backend=backend,
                                    student_softcap=logit_softcap(student), teacher_softcap=logit_softcap(teacher))


@functools.lru_cache(maxsize=None)
def _trainer_class():
    import transformers

    class DistillationTrainer(transformers.Trainer):
        """`transformers.Trainer` whose loss is `distillation_loss` against `teacher_model` (`model` is the
        student). Keyword arguments besides the Trainer's own: divergence, temperature, hard_weight,
        soft_weight, impl, and `taid` — a `kdops.TAIDSchedule`: the divergence is then `kdops.TAID(t)` at the
        schedule's t, which the trainer updates after every optimizer step with that step's loss (the mean
        over its accumulated micro-batches) and logs as ``taid_t``. Gradient accumulation: the loss is
        divided by the `num_items_in_batch` the Trainer passes, as a transformers model's own loss is.
        """

        def __init__(self, *args, teacher_model, divergence="forward_kl", temperature=1.0, hard_weight=0.0,
                     soft_weight=1.0, impl="auto", taid=None, **kwargs):
            if taid is not None:
                if not isinstance(taid, TAIDSchedule):
                    raise TypeError(f"taid: expected a kdops.TAIDSchedule, got {type(taid).__name__}")
                if divergence != "forward_kl":
                    raise ValueError(f"taid: TAID is its own divergence (KL to the interpolated target); got "
                                     f"divergence={divergence!r} as well: leave divergence at its default")
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.distillation_options = dict(divergence=divergence, temperature=temperature,
                                             hard_weight=hard_weight, soft_weight=soft_weight, impl=impl)
            self.taid = taid
            self._taid_losses = []
            if taid is not None:
                self.add_callback(_TAIDCallback(self))
            # compute_loss normalizes by num_items_in_batch itself: the Trainer must not divide again.
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            options = self.distillation_options
            if self.taid is not None:
                options = dict(options, divergence=self.taid.divergence)
            loss = distillation_loss(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                     **options)
            if self.taid is not None and model.training:
                self._taid_losses.append((loss.detach(), num_items_in_batch is not None))
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self.taid is not None:
                logs = dict(logs, taid_t=self.taid.t)
            return super().log(logs, *args, **kwargs)

    class _TAIDCallback(transformers.TrainerCallback):
        """Updates the trainer's TAID schedule after each optimizer step."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            losses = self.trainer._taid_losses
            if losses:
                # Micro-batch losses divided by the step's num_items_in_batch add up to the step's loss;
                # per-micro-batch means average to it.
                values = torch.stack([loss for loss, _ in losses])
                step_loss = values.sum() if all(whole for _, whole in losses) else values.mean()
                self.trainer.taid.update(step_loss, step=state.global_step)
                losses.clear()

    return DistillationTrainer


def __getattr__(name):
    if name == "DistillationTrainer":  # built on first use: importing this module needs no transformers
        return _trainer_class()
    raise AttributeError(name)
