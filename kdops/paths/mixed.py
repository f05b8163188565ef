"""Several teachers for one student (`teacher_mix`): the paths that compute, row chunk by row chunk, the mixed
target's logits of every teacher (`kdops.ensemble.TeacherMix.target_logits`, float32) and then the loss of (student,
target) by the engine — on logits that exist (`logits_loss`), or from the models' lm_heads in token chunks
(`linear_loss`, the chunked path with one side per model). Never more than a chunk's rows of any [rows, V] tensor
at a time; the mix is recomputed in the backward, and its gradient to each teacher comes by autograd through it.
Eager only: inside torch.compile the paths run outside the graph (`Problem.mode` "graph_break").
"""

from __future__ import annotations

import torch

from .._autograd import ChunkedRowsFunction, problem_loss
from ..ensemble import TeacherMix
from ..launchers.matmul import LMHead
from ..problem import Problem
from ..torch_math import compute_dtype, divergence_rows, softcap
from . import logits, torch_engine
from .chunked import ChunkedProblem

#: float32 [chunk, V] temporaries per teacher of the mix on a chunk (z / T, its log-softmax and weighted copy, the
#: stack and its exponentials; measured: 12.3 rows with 2 teachers, 17.3 with 3, of the 13 and 18 counted).
MIX_TEMPORARIES = 4


def mixed_chunk_rows(vocab: int, teachers: int, backend: str) -> int:
    """Rows per chunk of `kd_loss` with several teachers: the torch backend's budget
    (`kdops.paths.torch_engine.BUDGET_BYTES`) over the mix's temporaries, the target and its gradient, and the
    torch math's temporaries (backend "torch"; the kernels' are the target, the two gradients they write and
    their masked copy, and the chunk's share of the rest: 16.3 rows measured with three teachers, of the 17
    counted)."""
    loss_rows = torch_engine.TEMPORARIES_PER_ELEMENT if backend == "torch" else 5
    per_row = vocab * 4 * (loss_rows + MIX_TEMPORARIES * teachers)
    return max(1, torch_engine.BUDGET_BYTES // per_row)


def mixed_kd_rows(student, teachers, mask, mix: TeacherMix, divergence, temperature: float, backend: str,
                  labels=None, parts=None):
    """`kd_loss`'s per-row losses [rows] against the mixed target of several teachers' [..., V] logits: row chunk
    by row chunk, the chunk's target logits (`TeacherMix.target_logits`, float32) and the loss of the pair by
    `backend` (the kernels, or the torch math); recomputed chunk by chunk in the backward
    (`kdops._autograd.ChunkedRowsFunction`). `parts` [rows, 4]: where the forward's chunks write their
    `kdops.LossParts` (the cross-entropy against `labels`), from the pair's pass."""
    vocab = student.shape[-1]
    dtype = compute_dtype(student, *teachers)
    written = [0]  # the forward's chunks come in order: the next one's first row

    def rows(s, m, y, *ts):
        target = mix.target_logits([t.to(dtype) for t in ts], temperature)
        if parts is not None and not torch.is_grad_enabled():  # the forward (the backward recomputes with a graph)
            loss, chunk_parts = logits.rows_and_parts(s, target, m, None if labels is None else y, divergence,
                                                      temperature, backend)
            parts[written[0]:written[0] + s.shape[0]] = chunk_parts
            written[0] += s.shape[0]
            return loss
        if backend == "triton":
            return logits.rows(s, target, m, divergence, temperature, backend)
        return torch.where(m, divergence_rows(divergence, s, target, temperature), 0.0)

    flat = [t.reshape(-1, vocab) for t in teachers]
    y = mask if labels is None else labels.reshape(-1)  # (a stand-in without labels: never read)
    return ChunkedRowsFunction.apply(rows, mixed_chunk_rows(vocab, len(teachers), backend), mask,
                                     student.reshape(-1, vocab), mask, y, *flat)


class MixedChunkedProblem(ChunkedProblem):
    """`fused_linear_kd_loss` with several teachers, in token chunks (`kdops.paths.chunked`, one side per model): per
    chunk the student's and every teacher's float32 logits, each teacher's softcapped, the mixed target's logits
    from them, the loss of (student, target) by the engine — the kernels write the student's G, and the
    target's where a teacher needs a gradient — and the teachers' G by autograd through the mix. The plan
    counts every model's logits, the target, its G and the mix's temporaries (`logit_rows`)."""

    def __init__(self, hs, ws, bs, teachers, labels, divergence, temperature: float, vocab: int, soft: float,
                 hard: float, ignore_index: int, engine: str, budget: int | None, softcaps, mix: TeacherMix):
        self.acc_dtype = compute_dtype(hs, ws, *[t for h, w, _ in teachers for t in (h, w)])
        self.student = LMHead(hs, ws, bs, vocab, self.acc_dtype)
        self.sides = (self.student, *[LMHead(h, w, b, vocab, self.acc_dtype) for h, w, b in teachers])
        # The kernels see (student, target): the student's cap is theirs; each teacher's is applied before the mix.
        self.softcaps, self.teacher_cap, self.mix = (softcaps[0], None), softcaps[1], mix
        self.logit_rows = len(self.sides) + 2 + MIX_TEMPORARIES * len(teachers)
        self._options(hs, labels, divergence, temperature, vocab, soft, hard, ignore_index, engine, budget, None)

    def _chunk(self, logits, labels, scale, outs, r0: int, r1: int):
        zs, *zts = logits
        need = [out is not None for out in outs[1:]]
        leaves = [z.detach().requires_grad_(n) for z, n in zip(zts, need)]
        with torch.set_grad_enabled(any(need)):
            target = self.mix.target_logits([softcap(z, self.teacher_cap) for z in leaves],
                                            self.temperature)
        # The target's G: the kernels write it into a float32 buffer; the torch engine returns its own (the
        # argument only says that it is wanted)
        g_target = None if not any(need) else torch.empty_like(target) if self.engine == "triton" else target
        parts = None if self.row_parts is None else self.row_parts[r0:r1]
        loss, g_s, g_y = self._loss_and_logit_grads(zs, target.detach(), labels, scale, outs[0], g_target, parts)
        if not any(need):
            return loss, (g_s, *[None] * len(zts))
        grads = iter(torch.autograd.grad(target, [x for x in leaves if x.requires_grad], g_y, allow_unused=True,
                                         materialize_grads=True))
        return loss, (g_s, *[next(grads) if n else None for n in need])


def logits_loss(problem: Problem) -> torch.Tensor:
    """kd_loss of a Problem whose path is "mixed_logits"."""
    o = problem.options
    parts = torch.empty((problem.mask.numel(), 4), dtype=compute_dtype(problem.student, *problem.teachers),
                        device=problem.device) if problem.parts else None
    rows = mixed_kd_rows(problem.student, list(problem.teachers), problem.mask, problem.mix, o.divergence,
                         o.temperature, o.engine, problem.labels, parts)
    return problem.result(rows, parts)


def linear_loss(problem: Problem) -> torch.Tensor:
    """fused_linear_kd_loss of a Problem whose path is "mixed_linear": the chunked path, one side per model."""
    o = problem.options
    prepared = MixedChunkedProblem(*problem.student.tensors(), [t.tensors() for t in problem.teachers],
                                   problem.labels, o.divergence, o.temperature, o.vocab, o.soft_weight, o.hard_weight,
                                   o.ignore_index, o.engine, o.memory_budget, o.softcaps, problem.mix)
    return problem_loss(prepared, problem.tensors(), problem)
