"""kd_loss's path on logits that exist: per-row losses by the kernels on logits (engine "triton": Triton's
vocabulary-blocked passes, extra memory O(rows)) or by the torch math in row chunks (engine "torch"), over this
rank's vocabulary shard under vocabulary parallelism.

Inside torch.compile ("compiled" mode) the kernels run as the custom op `kdops::kd_loss_rows`, opaque to Dynamo, so
that a training step calling the loss compiles with fullgraph=True; its backward recomputes the per-row statistics
(one more forward pass than in eager mode, where they are saved). The torch engine is traced instead, its chunks
under activation checkpointing. Divergences travel to the op as their repr, e.g. "GeneralizedJSD(beta=0.3)".
"""

from __future__ import annotations

import torch

from .._autograd import KDLogitsFunction, checkpointed_rows
from ..divergences import Divergence
from ..launchers.logits import logits_backward, logits_forward
from ..problem import Problem, divergence_from_repr, divergence_repr
from ..torch_math import compute_dtype, divergence_rows
from .torch_engine import chunk_rows, chunked_kd_rows, chunked_parts


def rows(student_logits, teacher_logits, mask, divergence: Divergence, temperature: float, engine: str,
         shards=None) -> torch.Tensor:
    """Per-row losses [rows] (0 where the mask is False) of [..., V] logits by `engine`; under `shards`, this rank's
    shard of the group's logits."""
    if engine == "triton":
        return KDLogitsFunction.apply(student_logits, teacher_logits, mask, divergence.canonical(), temperature,
                                      shards)
    vocab = student_logits.shape[-1]
    return chunked_kd_rows(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), mask, divergence,
                           temperature, shards)


def rows_and_parts(student_logits, teacher_logits, mask, labels, divergence: Divergence, temperature: float,
                   engine: str, shards=None):
    """(`rows`, their `kdops.LossParts` [rows, 4]): engine "triton" from the kernels' own pass, engine "torch" by
    the torch math in a chunk loop of its own (`chunked_parts`); under `shards`, the group's."""
    labels = None if labels is None else labels.reshape(-1)
    if engine == "triton":
        return KDLogitsFunction.apply(student_logits, teacher_logits, mask, divergence.canonical(), temperature,
                                      shards, labels, True)
    per_row = rows(student_logits, teacher_logits, mask, divergence, temperature, engine, shards)
    return per_row, chunked_parts(student_logits, teacher_logits, labels, divergence, temperature, shards=shards)


def compiled_rows(student_logits, teacher_logits, mask, divergence: Divergence, temperature: float,
                  engine: str) -> torch.Tensor:
    """`rows` inside torch.compile: the custom op, or the torch math traced in checkpointed row chunks."""
    if engine == "triton":
        return kd_loss_rows(student_logits, teacher_logits, mask, divergence_repr(divergence), temperature)
    vocab = student_logits.shape[-1]

    def chunk(s, t, m):
        return torch.where(m, divergence_rows(divergence, s, t, temperature), 0.0)

    return checkpointed_rows(chunk, mask.numel(), chunk_rows(vocab), student_logits.reshape(-1, vocab),
                             teacher_logits.reshape(-1, vocab), mask)


def loss(problem: Problem) -> torch.Tensor:
    """kd_loss of a Problem whose path is "logits"."""
    o = problem.options
    (teacher,) = problem.teachers
    if problem.mode == "compiled":
        per_row = compiled_rows(problem.student, teacher, problem.mask, o.divergence, o.temperature, o.engine)
    elif problem.parts:
        return problem.result(*rows_and_parts(problem.student, teacher, problem.mask, problem.labels, o.divergence,
                                              o.temperature, o.engine, problem.shards))
    else:
        per_row = rows(problem.student, teacher, problem.mask, o.divergence, o.temperature, o.engine, problem.shards)
    return problem.reduce(per_row)


def _or_empty(grad, like):
    """Custom ops return tensors only: an absent gradient travels as an empty tensor."""
    return like.new_empty(0) if grad is None else grad


# --- inside torch.compile: the kernels as a custom op, opaque to Dynamo (the torch engine is traced instead) ---------

@torch.library.custom_op("kdops::kd_loss_rows", mutates_args=())
def kd_loss_rows(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, divergence: str,
                 temperature: float) -> torch.Tensor:
    canon = divergence_from_repr(divergence).canonical()
    loss, _ = logits_forward(student, teacher, None, canon, 1.0 / temperature)
    return torch.where(mask.reshape(-1), loss, 0.0)


@kd_loss_rows.register_fake
def _(student, teacher, mask, divergence, temperature):
    return student.new_empty((mask.numel(),), dtype=compute_dtype(student, teacher))


@torch.library.custom_op("kdops::kd_loss_rows_backward", mutates_args=())
def kd_loss_rows_backward(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                          mask: torch.Tensor, divergence: str, temperature: float, need_student: bool,
                          need_teacher: bool) -> list[torch.Tensor]:
    canon, inv_temp = divergence_from_repr(divergence).canonical(), 1.0 / temperature
    _, stats = logits_forward(student, teacher, None, canon, inv_temp)
    row_scale = torch.where(mask.reshape(-1), grad_rows, 0.0)
    g_s, g_t = logits_backward(student, teacher, None, stats, row_scale, canon, inv_temp, need_student,
                               need_teacher)
    return [_or_empty(g_s, student), _or_empty(g_t, teacher)]


@kd_loss_rows_backward.register_fake
def _(grad_rows, student, teacher, mask, divergence, temperature, need_student, need_teacher):
    return [torch.empty(student.shape, dtype=student.dtype, device=student.device) if need_student
            else student.new_empty(0),
            torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) if need_teacher
            else teacher.new_empty(0)]


def _kd_setup(ctx, inputs, output):
    student, teacher, mask, *options = inputs
    ctx.save_for_backward(student, teacher, mask)
    ctx.options = options


def _kd_backward(ctx, grad_rows):
    student, teacher, mask = ctx.saved_tensors
    need = ctx.needs_input_grad[:2]
    g_s, g_t = kd_loss_rows_backward(grad_rows, student, teacher, mask, *ctx.options, need[0], need[1])
    return (g_s if need[0] else None), (g_t if need[1] else None), None, None, None


kd_loss_rows.register_autograd(_kd_backward, setup_context=_kd_setup)
