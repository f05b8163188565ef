"""The paths of the sparse-teacher losses (`kdops.topk`): the teacher in the forms they read, the student's side by
engine (Triton kernels of `kernels/topk.py`, or the reference math in row chunks) and its autograd Function,
the per-row loss of the k (+1)-outcome pair, and the problems from hidden states that `FusedLinearKDFunction`
drives (chunked over tokens, or the k gathered weight rows)."""

from __future__ import annotations

import copy
import math

import torch

from . import _chunked, _launch
from .divergences import Divergence
from .reference import compute_dtype, softcap, softcap_slope


def teacher_rest(lp: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(1 − Σp) [rows, 1] of log-probabilities lp [rows, k], from a float64 sum: −inf (empty) where the
    listed mass reaches 1, and where the present ids cover the whole vocabulary (k = V), as the student's
    complement is then empty too."""
    present = lp != -math.inf
    mass = lp.double().exp().sum(-1, keepdim=True)
    rest = torch.log1p(-mass.clamp(max=1.0))
    if lp.shape[-1] >= vocab:
        rest = rest.masked_fill(present.sum(-1, keepdim=True) >= vocab, -math.inf)
    return rest.to(lp.dtype)


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
    without a tail) of 2-D student logits, by the chosen engine."""

    @staticmethod
    def forward(ctx, student, teacher: TopKTeacher, temperature: float, engine: str, shards=None):
        columns, lse_rest = _ENGINES[engine][0](student, teacher, 1.0 / temperature)
        if shards is not None:
            columns, lse_rest = over_group(columns, lse_rest, shards)
        ctx.save_for_backward(student, columns, lse_rest)
        ctx.teacher, ctx.temperature, ctx.engine = teacher, temperature, engine
        return columns, lse_rest

    @staticmethod
    def backward(ctx, g_columns, g_rest):
        student, columns, lse_rest = ctx.saved_tensors
        teacher = ctx.teacher
        if teacher.has_tail:
            g_columns, g_rest = split_tail(shift_free(join_tail(g_columns, g_rest), join_tail(columns, lse_rest)))
        else:
            g_columns, g_rest, lse_rest = shift_free(g_columns, columns), None, None
        grad = _ENGINES[ctx.engine][1](student, teacher, g_columns, lse_rest, g_rest, 1.0 / ctx.temperature)
        return grad, None, None, None, None


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


def _triton_forward(student, teacher: TopKTeacher, inv_temp: float, cap=None):
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    if teacher.has_tail:
        lse_rest = _launch.complement_lse(student, teacher.sorted_ids, inv_temp, cap)
    else:
        lse_rest = torch.empty(0, dtype=dtype, device=student.device)
    return _gathered(student, teacher, inv_temp, dtype, cap), lse_rest


def _triton_backward(student, teacher: TopKTeacher, g_columns, lse_rest, g_rest, inv_temp: float, out=None,
                     cap=None):
    g_ids = torch.where(teacher.present, g_columns, 0.0).gather(-1, teacher.order)
    return _launch.topk_student_backward(student, teacher.sorted_ids, g_ids, lse_rest, g_rest, inv_temp, out, cap)


def _members(student, teacher: TopKTeacher, start: int, end: int) -> torch.Tensor:
    """[end − start, V] bool: the entries of rows start..end that are their row's present ids."""
    counts = torch.zeros(end - start, student.shape[-1], dtype=torch.int32, device=student.device)
    counts.scatter_add_(-1, teacher.gather_ids[start:end], teacher.present[start:end].to(torch.int32))
    return counts > 0


def _torch_forward(student, teacher: TopKTeacher, inv_temp: float, cap=None):
    """The reference math chunked over rows: R = logsumexp of s / T with the ids at −inf (s softcapped by
    `cap` first)."""
    from ._torch_backend import chunk_rows

    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    n_rows, vocab = student.shape
    lse_rest = torch.empty(n_rows if teacher.has_tail else 0, dtype=dtype, device=student.device)
    if teacher.has_tail:
        chunk = chunk_rows(vocab)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            x = softcap(student[start:end].to(dtype), cap) * inv_temp
            lse_rest[start:end] = torch.logsumexp(x.masked_fill(_members(student, teacher, start, end), -math.inf), -1)
    return _gathered(student, teacher, inv_temp, dtype, cap), lse_rest


def _torch_backward(student, teacher: TopKTeacher, g_columns, lse_rest, g_rest, inv_temp: float, out=None,
                    cap=None):
    from ._torch_backend import chunk_rows

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


_ENGINES = {"triton": (_triton_forward, _triton_backward), "torch": (_torch_forward, _torch_backward)}


def topk_rows(student2d, teacher: TopKTeacher, mask, divergence: Divergence, temperature: float, backend: str,
              shards=None):
    """Per-row losses [rows] (0 where the mask is False): the dense loss of the (k + 1)-outcome pair."""
    from .api import kd_loss_rows_eager

    columns, lse_rest = StudentTopKFunction.apply(student2d, teacher, temperature, backend, shards)
    if teacher.has_tail:
        columns = join_tail(columns, lse_rest)
    # Both sides are log-weights at T already: the dense loss runs at T = 1.
    return kd_loss_rows_eager(columns, teacher.columns, mask, divergence, 1.0, backend)


# --- from hidden states ------------------------------------------------------------------------------------------

def _columns_loss_and_grads(columns, teacher: TopKTeacher, scale, divergence: Divergence, engine: str, soft: float):
    """soft · D of the k (+1)-outcome pair per row, and (where `scale` is given) ∂(Σ_r scale_r·ℓ_r)/∂columns,
    by the dense loss's own math (autograd over the small [rows, k (+1)] pair)."""
    from .api import kd_loss_rows_eager

    mask = torch.ones(columns.shape[0], dtype=torch.bool, device=columns.device)
    need = scale is not None
    columns = columns.detach().requires_grad_(need)
    with torch.set_grad_enabled(need):
        loss = soft * kd_loss_rows_eager(columns, teacher.columns, mask, divergence, 1.0, engine)
        grad = shift_free(torch.autograd.grad(loss, columns, scale)[0], columns.detach()) if need else None
    return loss.detach(), grad


class TopKChunkedProblem(_chunked.ChunkedProblem):
    """The student's lm_head against a sparse teacher, in token chunks (`kdops._chunked`): per chunk the
    student's float32 logits, the k (+1)-outcome loss and its gradient G = ∂ℓ/∂logits, one write per logit
    (`kernels/topk.py`); per group dH = G·W and dW = Gᵀ·h. The plan is the dense path's with one side."""

    def __init__(self, hs, ws, bs, teacher: TopKTeacher, labels, divergence, temperature: float, vocab: int,
                 soft: float, hard: float, ignore_index: int, engine: str, budget: int | None, shards=None,
                 student_softcap=None):
        self.acc_dtype = compute_dtype(hs, ws)
        self.softcap = student_softcap
        self.student = _chunked._Side(hs, ws, bs, vocab, self.acc_dtype)
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
        forward, backward = _ENGINES[self.engine]
        columns, lse_rest = forward(zs, teacher, inv_temp, self.softcap)
        if self.shards is not None:
            columns, lse_rest = over_group(columns, lse_rest, self.shards)
        tail = teacher.has_tail
        if tail:
            columns = join_tail(columns, lse_rest)
        loss, g_columns = _columns_loss_and_grads(columns, teacher, scale if need else None, self.divergence,
                                                  self.engine, self.soft)
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

    def __init__(self, hs, ws, bs, teacher: TopKTeacher, divergence, temperature: float, soft: float, engine: str,
                 budget: int | None, shards=None, student_softcap=None):
        self.softcap = student_softcap
        self.hs, self.ws, self.bs, self.teacher = hs.reshape(-1, hs.shape[-1]), ws, bs, teacher
        self.shards = shards
        self.divergence, self.temperature, self.soft, self.engine = divergence, temperature, soft, engine
        self.acc_dtype = compute_dtype(hs, ws)
        k, width = teacher.columns.shape[1], hs.shape[-1]
        budget = _chunked.MEMORY_BUDGET if budget is None else budget
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
            rows[r0:r1], g = _columns_loss_and_grads(columns, part, scale, self.divergence, self.engine, self.soft)
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
