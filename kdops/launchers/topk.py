"""Launchers of the student's side of a sparse (top-k) teacher (`kernels/topk.py`)."""

from __future__ import annotations

import torch

from .. import targets
from .common import acc_of, cdiv, empty, kernel_modules, launch, rows_of, torch_acc
from .logits import logits_config


def topk_config(n_rows: int, vocab: int, gpu: targets.GPU | None, acc: torch.dtype, softcap: bool = False) -> dict:
    """`logits_config`'s blocks, and BLOCK_C ids compared with each tile at a time ([rows, BLOCK_V, BLOCK_C]
    comparisons, one window after another until a window is not full). On GPU one id per window: the sm_90
    loops take 38 and 33 instructions per element with their first window and 4.6 and 7.4 per further one,
    against 71 and 105, and 35 and 77, with windows of 4 — cheaper at any number of ids per tile
    (`bench.model.TOPK_LOOP_INSTRUCTIONS`). Under the interpreter, wide windows (fewer steps)."""
    return dict(logits_config(n_rows, vocab, gpu, acc, int(softcap)), BLOCK_C=1 if gpu is not None else 8)


def complement_lse(student: torch.Tensor, sorted_ids: torch.Tensor, inv_temp: float, softcap: float | None = None,
                   parts: bool = False, labels: torch.Tensor | None = None):
    """R[r] = log Σ_{j ∉ ids_r} e^(s_rj / T) [rows] of [..., V] logits, with `sorted_ids` [rows, k] int32 sorted
    per row (absent entries as V); in the accumulation dtype. With `softcap` c, of c·tanh(s / c). With `parts`,
    (R, parts [rows, 2]): the entropy of softmax(s / T) over the whole row and CE(s at T = 1, labels) (0 without
    labels), from the same pass."""
    modules = kernel_modules()
    tl, topk = modules.tl, modules.topk
    student, (s_inner, s_outer, s_stride) = rows_of(student)
    vocab = student.shape[-1]
    n_rows, k = sorted_ids.shape
    acc = acc_of(tl, student)
    out = empty((n_rows,), torch_acc(acc), student.device)
    row_parts = empty((n_rows, 2), torch_acc(acc), student.device) if parts else None
    hard = parts and labels is not None
    if n_rows:
        config = topk_config(n_rows, vocab, targets.of_device(student.device), torch_acc(acc), bool(softcap))
        launch(topk.complement_lse_kernel, (cdiv(n_rows, config["BLOCK_R"]),), student, sorted_ids, out,
               out if row_parts is None else row_parts, labels.reshape(-1).contiguous() if hard else out, n_rows,
               vocab, k, s_inner, s_outer, s_stride, inv_temp, float(softcap or 0.0), SOFTCAP=bool(softcap),
               PARTS=parts, HARD=hard, ACC=acc, **config)
    return out if row_parts is None else (out, row_parts)


def topk_student_backward(student: torch.Tensor, sorted_ids: torch.Tensor, g_ids: torch.Tensor, lse_rest, g_rest,
                          inv_temp: float, out: torch.Tensor | None = None, softcap: float | None = None
                          ) -> torch.Tensor:
    """∂ℓ/∂s, contiguous [..., V] in the student's dtype, of ℓ(s_ids / T, R) given g_ids = ∂ℓ/∂(s_ids / T)
    [rows, k] (in the order of `sorted_ids`) and, for a tail (`lse_rest` = R and `g_rest` = ∂ℓ/∂R [rows], or
    both None), the softmax over the complement; with `softcap` c, of ℓ(c·tanh(s / c)) (times the tanh's
    slope). `out` receives it instead when given: a contiguous buffer of the logits' shape, in any float dtype,
    which may be the logits themselves."""
    modules = kernel_modules()
    tl, topk = modules.tl, modules.topk
    shape = student.shape
    student, (s_inner, s_outer, s_stride) = rows_of(student)
    vocab = shape[-1]
    n_rows, k = sorted_ids.shape
    out = empty(shape, student.dtype, student.device) if out is None else out
    if n_rows == 0:
        return out
    acc = acc_of(tl, student)
    tail = lse_rest is not None
    config = topk_config(n_rows, vocab, targets.of_device(student.device), torch_acc(acc), bool(softcap))
    launch(topk.topk_student_backward_kernel, (cdiv(n_rows, config["BLOCK_R"]),), student, sorted_ids,
           g_ids.contiguous(), lse_rest.contiguous() if tail else g_ids, g_rest.contiguous() if tail else g_ids, out,
           n_rows, vocab, k, s_inner, s_outer, s_stride, inv_temp, float(softcap or 0.0), TAIL=tail,
           SOFTCAP=bool(softcap), ACC=acc, **config)
    return out
