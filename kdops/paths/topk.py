"""topk_kd_loss's path: distillation from a sparse teacher's top-k log-probabilities against the student's logits
(`kdops.topk` says what the tail modes compute). The teacher in the forms the kernels read (`TopKTeacher`), the
student's side — its gathered columns s_ids / T and its complement's log-mass R — by engine (the kernels of
`kernels/topk.py`, or the torch math in row chunks) with its autograd Function, and the per-row loss of the k (+1)
-outcome pair by the dense path on logits (`kdops.paths.logits`), so each divergence's math stays where it is.
"""

from __future__ import annotations

import copy
import math

import torch

from ..divergences import Divergence
from ..launchers.topk import complement_lse, topk_student_backward
from ..problem import Problem
from ..torch_math import softcap, softcap_slope, student_rows_parts, teacher_rest
from . import logits
from .torch_engine import chunk_rows


class TopKTeacher:
    """A validated top-k teacher, flattened to rows, in the forms the paths read.

    gather_ids [rows, k] int64: the ids (indices into this rank's shard under vocabulary parallelism), 0 where
               absent (a safe index; the column is −inf anyway).
    present    [rows, k] bool: the entries whose log-probability is not −inf (and, under vocabulary
               parallelism, whose id is in this rank's shard).
    sorted_ids [rows, k] int32: each row's present ids in increasing order, absent ones as V at the end;
    order      [rows, k] int64: the permutation that sorts a row's entries so (column i of a row is
               column order[i] of the input).
    columns    [rows, k (+1)]: the teacher's log-weights of the k (+1) outcomes in `dtype`.
    """

    def __init__(self, teacher_ids, teacher_logprobs, vocab: int, tail: str, dtype: torch.dtype, shards=None):
        k = teacher_ids.shape[-1]
        ids = teacher_ids.reshape(-1, k).long()
        lp = teacher_logprobs.detach().reshape(-1, k).to(dtype)
        present = lp != -math.inf
        # Under vocabulary parallelism the student's logits are this rank's shard [start, stop): its side reads
        # only the ids there (as shard indices); the teacher's columns stay whole on every rank.
        start, width = (0, vocab) if shards is None else (shards.start, shards.width)
        self.present = present & (ids >= start) & (ids < start + width)
        self.gather_ids = torch.where(self.present, ids - start, 0)
        keys = torch.where(self.present, ids - start, width)
        sorted_keys, self.order = keys.sort(dim=-1)
        self.sorted_ids = sorted_keys.to(torch.int32).contiguous()
        self.tail = tail
        if tail == "renormalize":
            self.columns = lp
        else:
            total = vocab if shards is None else shards.vocab
            log_rest = teacher_rest(lp, total) if tail == "bucket" else torch.full_like(lp[:, :1], -math.inf)
            self.columns = torch.cat([lp, log_rest], dim=-1)

    def rows(self, start: int, end: int) -> "TopKTeacher":
        """The teacher of rows start..end (views)."""
        part = copy.copy(self)
        for name in ("present", "gather_ids", "sorted_ids", "order", "columns"):
            setattr(part, name, getattr(self, name)[start:end])
        return part

    @property
    def has_tail(self) -> bool:
        """Whether the student's side needs its complement's log-mass R."""
        return self.tail != "renormalize"


class StudentTopKFunction(torch.autograd.Function):
    """(s_ids / T [rows, k] in the accumulation dtype, −inf where absent; R [rows], or an empty tensor
    without a tail) of 2-D student logits, by the chosen engine; with `parts`, also the student's parts [rows, 2]
    (its entropy at T, CE against `labels`) from the same pass (no gradient)."""

    @staticmethod
    def forward(ctx, student, teacher: TopKTeacher, temperature: float, engine: str, shards=None, labels=None,
                parts=False):
        columns, lse_rest, student_parts = ENGINES[engine][0](student, teacher, 1.0 / temperature, labels=labels,
                                                              parts=parts)
        if shards is not None:
            columns, lse_rest = over_group(columns, lse_rest, shards)
        ctx.save_for_backward(student, columns, lse_rest)
        ctx.teacher, ctx.temperature, ctx.engine = teacher, temperature, engine
        if not parts:
            return columns, lse_rest
        ctx.mark_non_differentiable(student_parts)
        return columns, lse_rest, student_parts

    @staticmethod
    def backward(ctx, g_columns, g_rest, g_parts=None):
        student, columns, lse_rest = ctx.saved_tensors
        teacher = ctx.teacher
        if teacher.has_tail:
            g_columns, g_rest = split_tail(shift_free(join_tail(g_columns, g_rest), join_tail(columns, lse_rest)))
        else:
            g_columns, g_rest, lse_rest = shift_free(g_columns, columns), None, None
        grad = ENGINES[ctx.engine][1](student, teacher, g_columns, lse_rest, g_rest, 1.0 / ctx.temperature)
        return grad, None, None, None, None, None, None


def join_tail(columns, rest):
    """The k + 1 columns: the ids' [rows, k] and the tail's [rows]."""
    return torch.cat([columns, rest[:, None]], dim=-1)


def split_tail(columns):
    """(the ids' [rows, k], the tail's [rows]) of k + 1 columns."""
    return columns[:, :-1], columns[:, -1]


def shift_free(g, columns):
    """g − (Σ g)·softmax(columns) per row: the gradient of a loss of softmax(columns) with its component along
    the shift removed. Exactly, Σ g = 0 (the loss does not change when every column moves by the same amount)
    and this changes nothing; computed, g carries a rounding error c·softmax(columns) of its row sums' size
    (the dense kernels' G_v − q_v·Σ G), which a softmax over the whole vocabulary would project out again
    but the top-k side's gradient (gathered columns and a tail) would pass on to rows whose own gradient is
    small. Columns of −inf take no share; a row with none finite is left as it is."""
    weights = torch.softmax(columns, dim=-1)
    weights = torch.where(torch.isfinite(weights), weights, 0.0)
    return g - g.sum(-1, keepdim=True) * weights


def over_group(columns, lse_rest, shards):
    """The whole vocabulary's (s_ids / T, R) from each rank's: an entry's column is the one rank's that holds
    its id (the others' are −inf: an all-reduce MAX), and R = log Σ_ranks e^(R_rank). Every rank's own
    gradient then follows from the whole R: ∂R/∂s_j = e^(s_j / T − R) / T on its shard's complement."""
    columns = shards.all_reduce_max(columns.contiguous())
    if lse_rest.numel():
        top = shards.all_reduce_max(lse_rest.clone())
        top = torch.where(top == -math.inf, 0.0, top)
        lse_rest = shards.all_reduce_sum(torch.exp(lse_rest - top)).log() + top
    return columns, lse_rest


def _gathered(student, teacher: TopKTeacher, inv_temp: float, dtype: torch.dtype, cap=None) -> torch.Tensor:
    """s_ids / T in `dtype` (one rounded product per logit, as the kernels scale), −inf where absent; s
    softcapped first by `cap` (None: not)."""
    columns = softcap(student.gather(-1, teacher.gather_ids).to(dtype), cap) * inv_temp
    return torch.where(teacher.present, columns, -math.inf)


def _triton_forward(student, teacher: TopKTeacher, inv_temp: float, cap=None, labels=None, parts=False):
    """(s_ids / T, R, the student's parts or None) by the kernels. With `parts` the complement's pass runs for
    "renormalize" too (the only pass over the student's logits that this tail then makes), for the entropy."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    student_parts = None
    if parts:
        lse_rest, student_parts = complement_lse(student, teacher.sorted_ids, inv_temp, cap, True, labels)
    elif teacher.has_tail:
        lse_rest = complement_lse(student, teacher.sorted_ids, inv_temp, cap)
    if not teacher.has_tail:
        lse_rest = torch.empty(0, dtype=dtype, device=student.device)
    return _gathered(student, teacher, inv_temp, dtype, cap), lse_rest, student_parts


def _triton_backward(student, teacher: TopKTeacher, g_columns, lse_rest, g_rest, inv_temp: float, out=None,
                     cap=None):
    g_ids = torch.where(teacher.present, g_columns, 0.0).gather(-1, teacher.order)
    return topk_student_backward(student, teacher.sorted_ids, g_ids, lse_rest, g_rest, inv_temp, out, cap)


def _members(student, teacher: TopKTeacher, start: int, end: int) -> torch.Tensor:
    """[end − start, V] bool: the entries of rows start..end that are their row's present ids."""
    counts = torch.zeros(end - start, student.shape[-1], dtype=torch.int32, device=student.device)
    counts.scatter_add_(-1, teacher.gather_ids[start:end], teacher.present[start:end].to(torch.int32))
    return counts > 0


def _torch_forward(student, teacher: TopKTeacher, inv_temp: float, cap=None, labels=None, parts=False):
    """The torch math chunked over rows: R = logsumexp of s / T with the ids at −inf (s softcapped by
    `cap` first); with `parts`, the student's parts [rows, 2] (entropy at T, CE at T = 1) in the same loop."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    n_rows, vocab = student.shape
    lse_rest = torch.empty(n_rows if teacher.has_tail else 0, dtype=dtype, device=student.device)
    student_parts = torch.zeros(n_rows, 2, dtype=dtype, device=student.device) if parts else None
    if teacher.has_tail or parts:
        chunk = chunk_rows(vocab)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            z = softcap(student[start:end].to(dtype), cap)
            x = z * inv_temp
            if teacher.has_tail:
                members = _members(student, teacher, start, end)
                lse_rest[start:end] = torch.logsumexp(x.masked_fill(members, -math.inf), -1)
            if parts:
                student_parts[start:end] = student_rows_parts(z, x, None if labels is None else labels[start:end])
    return _gathered(student, teacher, inv_temp, dtype, cap), lse_rest, student_parts


def _torch_backward(student, teacher: TopKTeacher, g_columns, lse_rest, g_rest, inv_temp: float, out=None,
                    cap=None):
    n_rows, vocab = student.shape
    grad = torch.empty_like(student) if out is None else out
    g_ids = torch.where(teacher.present, g_columns, 0.0) * inv_temp
    chunk = chunk_rows(vocab)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        part = torch.zeros(end - start, vocab, dtype=g_columns.dtype, device=student.device)
        if lse_rest is not None:
            x = softcap(student[start:end].to(g_columns.dtype), cap) * inv_temp
            g = g_rest[start:end, None]
            softmax = torch.exp(x - lse_rest[start:end, None])
            tail = torch.where((g != 0) & ~_members(student, teacher, start, end), g * softmax * inv_temp, 0.0)
            part += tail
        part.scatter_add_(-1, teacher.gather_ids[start:end], g_ids[start:end])
        if cap:
            part *= softcap_slope(student[start:end].to(part.dtype), cap)
        grad[start:end] = part
    return grad


ENGINES = {"triton": (_triton_forward, _triton_backward), "torch": (_torch_forward, _torch_backward)}


def rows(student2d, teacher: TopKTeacher, mask, divergence: Divergence, temperature: float, backend: str,
         shards=None, labels=None, parts=False):
    """Per-row losses [rows] (0 where the mask is False): the dense loss of the (k + 1)-outcome pair. With
    `parts`, (rows, their parts [rows, 4]: `with_student_parts`)."""
    columns, lse_rest, *student_parts = StudentTopKFunction.apply(student2d, teacher, temperature, backend, shards,
                                                                  labels, parts)
    if teacher.has_tail:
        columns = join_tail(columns, lse_rest)
    # Both sides are log-weights at T already: the dense loss runs at T = 1.
    if not parts:
        return logits.rows(columns, teacher.columns, mask, divergence, 1.0, backend)
    per_row, pair_parts = logits.rows_and_parts(columns, teacher.columns, mask, None, divergence, 1.0, backend)
    return per_row, with_student_parts(pair_parts, student_parts[0])


def with_student_parts(pair_parts, student_parts):
    """The parts [rows, 4] of a sparse teacher's loss: the pair's divergence and the teacher's entropy over its
    k (+1) outcomes (the pair's parts), the student's CE and its entropy over the whole vocabulary (`student_parts`
    [rows, 2]: entropy, CE; not the pair's, which would be its entropy over the k (+1) outcomes)."""
    return torch.stack([pair_parts[:, 0], student_parts[:, 1], student_parts[:, 0], pair_parts[:, 3]], dim=-1)


def pair_loss_and_grads(columns, teacher: TopKTeacher, scale, divergence: Divergence, engine: str, soft: float,
                        parts: bool = False):
    """soft · D of the k (+1)-outcome pair per row, and (where `scale` is given) ∂(Σ_r scale_r·ℓ_r)/∂columns,
    by the dense loss's own math (autograd over the small [rows, k (+1)] pair); with `parts`, also the pair's
    parts [rows, 4] (`kdops.paths.logits.rows_and_parts`)."""
    mask = torch.ones(columns.shape[0], dtype=torch.bool, device=columns.device)
    need = scale is not None
    columns = columns.detach().requires_grad_(need)
    with torch.set_grad_enabled(need):
        pair = logits.rows_and_parts(columns, teacher.columns, mask, None, divergence, 1.0, engine) if parts else (
            logits.rows(columns, teacher.columns, mask, divergence, 1.0, engine), None)
        loss = soft * pair[0]
        grad = shift_free(torch.autograd.grad(loss, columns, scale)[0], columns.detach()) if need else None
    return (loss.detach(), grad) if not parts else (loss.detach(), grad, pair[1])


def loss(problem: Problem) -> torch.Tensor:
    """topk_kd_loss of a Problem whose path is "topk"."""
    o, student = problem.options, problem.student
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    teacher = TopKTeacher(*problem.topk, o.vocab, o.tail, dtype, problem.shards)
    labels = None if problem.labels is None else problem.labels.reshape(-1)
    result = rows(student.reshape(-1, o.vocab), teacher, problem.mask, o.divergence, o.temperature, o.engine,
                  problem.shards, labels, problem.parts)
    return problem.result(*result) if problem.parts else problem.reduce(result)
