"""fused_linear_topk_kd_loss's paths: the student's lm_head against a sparse teacher, without its [tokens, V]
logits — in token chunks of float32 logits (`TopKChunkedProblem`, the chunked path with one side), or, for
tail="renormalize" without the hard-label term, through the k gathered weight rows alone (`TopKGatheredProblem`);
and the teacher's side, `top_logprobs`: a model's k most likely tokens from its hidden states, in row chunks.
"""

from __future__ import annotations

import math

import torch

from .._autograd import problem_loss
from ..launchers.matmul import LMHead
from ..problem import Problem
from ..torch_math import compute_dtype, softcap, softcap_slope
from . import chunked
from .topk import ENGINES, TopKTeacher, join_tail, over_group, pair_loss_and_grads, split_tail, with_student_parts


class TopKChunkedProblem(chunked.ChunkedProblem):
    """The student's lm_head against a sparse teacher, in token chunks (`kdops.paths.chunked`): per chunk the
    student's float32 logits, the k (+1)-outcome loss and its gradient G = ∂ℓ/∂logits, one write per logit
    (`kernels/topk.py`); per group dH = G·W and dW = Gᵀ·h. The plan is the dense path's with one side."""

    def __init__(self, hs, ws, bs, teacher: TopKTeacher, labels, divergence, temperature: float, vocab: int,
                 soft: float, hard: float, ignore_index: int, engine: str, budget: int | None, shards=None,
                 student_softcap=None):
        self.acc_dtype = compute_dtype(hs, ws)
        self.softcap = student_softcap
        self.student = LMHead(hs, ws, bs, vocab, self.acc_dtype)
        self.sides = (self.student,)
        self.target = teacher
        self._options(hs, labels, divergence, temperature, vocab, soft, hard, ignore_index, engine, budget, shards)

    def _grad_out(self, store, logits, need_bias: bool):
        """The top-k kernel writes G straight into the group's store; with the hard-label term (added to G in
        float32) or a 16-bit store and a bias gradient (a float32 sum of G), over the chunk's logits instead
        (each element read before it is overwritten), and the caller rounds it into the store once."""
        if store is None:
            return None
        direct = self.engine == "triton" and self.hard == 0 and not (need_bias and store.dtype != self.acc_dtype)
        return store if direct else logits

    def _chunk(self, logits, labels, scale, outs, r0: int, r1: int):
        (zs,) = logits
        teacher = self.target.rows(r0, r1)
        inv_temp = 1.0 / self.temperature
        need = outs[0] is not None
        forward, backward = ENGINES[self.engine]
        parts = None if self.row_parts is None else self.row_parts[r0:r1]
        columns, lse_rest, student_parts = forward(zs, teacher, inv_temp, self.softcap, labels=labels,
                                                   parts=parts is not None)
        if self.shards is not None:
            columns, lse_rest = over_group(columns, lse_rest, self.shards)
        tail = teacher.has_tail
        if tail:
            columns = join_tail(columns, lse_rest)
        loss, g_columns, *pair_parts = pair_loss_and_grads(columns, teacher, scale if need else None,
                                                           self.divergence, self.engine, self.soft, parts is not None)
        if parts is not None:
            parts.copy_(with_student_parts(pair_parts[0], student_parts))
        if self.hard > 0:
            ce, g_ce = hard_label(softcap(zs, self.softcap), labels, self.ignore_index,
                                  scale * self.hard if need else None, self.shards)
            if need and self.softcap:  # before the kernel below may overwrite zs with its gradient
                g_ce *= softcap_slope(zs, self.softcap)
            loss = loss + self.hard * ce
        if not need:
            return loss, (None,)
        g_ids, g_rest = split_tail(g_columns) if tail else (g_columns, None)
        grad = backward(zs, teacher, g_ids, lse_rest if tail else None, g_rest, inv_temp, outs[0], self.softcap)
        if self.hard > 0:
            grad += g_ce
        return loss, (grad,)


def hard_label(logits, labels, ignore_index: int, scale, shards=None):
    """CE(s, label) = lse(s) − s_label per row of float32 logits [rows, V] (T = 1; 0 where ignored), and with
    `scale` its row-scaled gradient scale·(softmax(s) − onehot(label)) (exact zeros in rows whose scale is 0).
    Under `shards` the logits are this rank's shard: lse and s_label are combined over the group (labels
    global), and the gradient is the shard's."""
    with torch.no_grad():
        local = labels if shards is None else shards.local_labels(labels)
        counted = labels != ignore_index
        here = counted & (local >= 0) & (local < logits.shape[1])
        top = logits.amax(-1)
        if shards is not None:
            top = shards.all_reduce_max(top)
        top = torch.where(top == -math.inf, 0.0, top)
        sums = torch.exp(logits - top[:, None]).sum(-1)
        label_logit = torch.where(here, logits.gather(-1, torch.where(here, local, 0)[:, None])[:, 0], -math.inf)
        if shards is not None:
            sums = shards.all_reduce_sum(sums)
            label_logit = shards.all_reduce_max(label_logit)
        lse = sums.log() + top
        ce = torch.where(counted, lse - label_logit, 0.0)
        if scale is None:
            return ce, None
        live = (scale != 0) & counted
        grad = torch.where(live[:, None], torch.exp(logits - lse[:, None]) * scale[:, None], 0.0)
        grad.scatter_add_(-1, torch.where(here, local, 0)[:, None], torch.where(here & live, -scale, 0.0)[:, None])
        return ce, grad


class TopKGatheredProblem:
    """tail="renormalize" without the hard-label term: only the k gathered weight rows are multiplied,
    s_ids = h · W[ids]ᵀ (+ b[ids]), O(rows·k·H) flops, and the rest of the vocabulary is never read. Rows go in
    chunks whose gathered [rows, k, H] float32 weights take a quarter of `memory_budget`; the weight and bias
    gradients are index-added into float32 accumulators ([V, H]: the size of the weight in float32)."""

    eager = True
    num_inputs = 6  # the autograd Function's (hidden, weight, bias) of the student, and an absent teacher's

    def __init__(self, hs, ws, bs, teacher: TopKTeacher, divergence, temperature: float, soft: float, engine: str,
                 budget: int | None, shards=None, student_softcap=None):
        self.softcap = student_softcap
        self.hs, self.ws, self.bs, self.teacher = hs.reshape(-1, hs.shape[-1]), ws, bs, teacher
        self.shards = shards
        self.divergence, self.temperature, self.soft, self.engine = divergence, temperature, soft, engine
        self.acc_dtype = compute_dtype(hs, ws)
        k, width = teacher.columns.shape[1], hs.shape[-1]
        budget = chunked.MEMORY_BUDGET if budget is None else budget
        self.chunk = max(1, budget // 4 // (k * width * self.acc_dtype.itemsize))

    def forward(self):
        return self.run(None, (False,) * self.num_inputs)[0], []

    def loss_and_grads(self, row_scale, needs):
        return self.run(row_scale, needs)

    def backward(self, saved, row_scale, needs):
        return self.run(row_scale, needs)[1]

    def run(self, row_scale, needs):
        hs, ws, bs, acc, teacher = self.hs, self.ws, self.bs, self.acc_dtype, self.teacher
        need_h, need_w, need_b = (needs[:3] if row_scale is not None else (False,) * 3)
        need_b = need_b and bs is not None
        n_rows = hs.shape[0]
        rows = torch.empty(n_rows, dtype=acc, device=hs.device)
        grad_h = torch.empty_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if need_w else None
        grad_b = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if need_b else None
        inv_temp = 1.0 / self.temperature
        for r0 in range(0, n_rows, self.chunk):
            r1 = min(r0 + self.chunk, n_rows)
            part = teacher.rows(r0, r1)
            h, ids = hs[r0:r1].to(acc), part.gather_ids
            gathered = ws[ids].to(acc)  # [rows, k, H]
            logits = torch.einsum("rh,rkh->rk", h, gathered)
            if bs is not None:
                logits = logits + bs[ids].to(acc)
            columns = torch.where(part.present, softcap(logits, self.softcap) * inv_temp, -math.inf)
            if self.shards is not None:
                columns = over_group(columns, columns.new_empty(0), self.shards)[0]
            scale = None if row_scale is None else row_scale[r0:r1]
            rows[r0:r1], g = pair_loss_and_grads(columns, part, scale, self.divergence, self.engine, self.soft)
            if g is None:
                continue
            g = torch.where(part.present, g, 0.0) * inv_temp  # ∂/∂logits at the ids
            if self.softcap:
                g = g * softcap_slope(logits, self.softcap)
            if need_h:
                part_h = torch.einsum("rk,rkh->rh", g, gathered)
                if self.shards is not None and self.shards.reduce_hidden_grad:
                    part_h = self.shards.all_reduce_sum(part_h)
                grad_h[r0:r1] = part_h
            if need_w:
                grad_w.index_add_(0, ids.reshape(-1), (g[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
            if need_b:
                grad_b.index_add_(0, ids.reshape(-1), g.reshape(-1))
        cast = [None if x is None else x.to(like.dtype) for x, like in ((grad_w, ws), (grad_b, bs))]
        return rows, (grad_h, cast[0], cast[1], None, None, None)


def ordered_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ids [rows, k] of each row's k largest entries of x [rows, V], largest first, ties broken by the
    smaller id (torch.topk leaves the order of ties, and which tied entries make the cut, unspecified)."""
    values, ids = torch.topk(x, k, dim=-1)
    cut = values[:, -1:]
    tied = (x == cut).sum(-1) > (values == cut).sum(-1)  # rows where more entries tie at the cut than are taken
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        xr, cr = x[rows], cut[rows]
        equal = xr == cr
        wanted = k - (xr > cr).sum(-1, keepdim=True)
        chosen = (xr > cr) | (equal & (equal.cumsum(-1) <= wanted))  # the cut's smallest ids
        ids[rows] = chosen.nonzero()[:, 1].view(-1, k)
    ids = ids.sort(dim=-1).values  # id order, then a stable sort by value keeps it among ties
    order = torch.sort(x.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)


def loss(problem: Problem) -> torch.Tensor:
    """fused_linear_topk_kd_loss of a Problem whose path is "linear_topk": the k gathered weight rows where they
    suffice (tail="renormalize" without the hard-label term) unless impl="chunked" or the parts are asked for (the
    student's entropy needs its whole rows), else token chunks."""
    o, (hs, ws, bs) = problem.options, problem.student.tensors()
    teacher = TopKTeacher(*problem.topk, o.vocab, o.tail, compute_dtype(hs, ws), problem.shards)
    cap = o.softcaps[0]
    gathered = o.impl == "gathered" or (o.impl == "auto" and not problem.parts)
    if o.tail == "renormalize" and o.hard_weight == 0 and gathered:
        prepared = TopKGatheredProblem(hs, ws, bs, teacher, o.divergence, o.temperature, o.soft_weight, o.engine,
                                       o.memory_budget, problem.shards, cap)
    else:
        prepared = TopKChunkedProblem(hs, ws, bs, teacher, problem.labels, o.divergence, o.temperature, o.vocab,
                                      o.soft_weight, o.hard_weight, o.ignore_index, o.engine, o.memory_budget,
                                      problem.shards, cap)
    return problem_loss(prepared, (hs, ws, bs, None, None, None), problem)


#: Default memory of `top_logprobs`' float32 [chunk, V] logits and their temporaries, in bytes.
TOPK_LOGPROBS_BUDGET = 256 * 2**20


@torch.no_grad()
def top_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, temperature: float,
                 memory_budget: int | None = None):
    """(ids [..., k] int64, log-probabilities [..., k]) of the k most likely tokens under
    softmax((hidden · weightᵀ + bias) / T), most likely first (ties to the smaller id, `ordered_topk`), in row chunks
    whose float32 logits and temporaries take at most `memory_budget` bytes (default TOPK_LOGPROBS_BUDGET)."""
    vocab = weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    side = LMHead(hidden, weight, bias, vocab, dtype)
    n_rows = hidden.numel() // hidden.shape[-1]
    budget = TOPK_LOGPROBS_BUDGET if memory_budget is None else memory_budget
    # the logits, a scaled copy, and topk's and the tie check's temporaries: about four float32 rows per row
    chunk = max(1, budget // (4 * vocab * dtype.itemsize))
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty((n_rows, k), dtype=dtype, device=hidden.device)
    buffer = torch.empty((min(chunk, max(n_rows, 1)), vocab), dtype=dtype, device=hidden.device)
    for r0 in range(0, n_rows, chunk):
        r1 = min(r0 + chunk, n_rows)
        x = side.logits(side.rows(r0, r1), buffer[: r1 - r0])
        if temperature != 1.0:
            x.mul_(1.0 / temperature)
        top = ordered_topk(x, k)
        ids[r0:r1] = top
        logprobs[r0:r1] = x.gather(-1, top) - torch.logsumexp(x, dim=-1, keepdim=True)
    leading = hidden.shape[:-1]
    return ids.view(*leading, k), logprobs.view(*leading, k)
