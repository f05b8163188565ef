"""fused_linear_kd_loss's impl="chunked" (Triton) and backend="torch": token chunks with float32 logits.

Per chunk of C rows: the logits of both models by matmuls into reused float32 [C, V] buffers (on CUDA,
cuBLAS with a float32 output: no bf16 rounding before the softmax); the loss and the logit gradient
G = ∂ℓ/∂logits of the chunk from them, by the kernels on logits (engine "triton", which write G straight in
the weight's dtype) or by the torch math under autograd (engine "torch"). G is kept, in the weight's
dtype, for a *group* of rows (several chunks); per group, dH[group] = G·W and dW += Gᵀ·h[group] by one
matmul each.

The loop order is the cost model's (`python -m bench.model`): a weight gradient summed over token chunks
needs a float32 [V, H] accumulator read and written once per group (2 GiB and 4 GiB of traffic per group at
V = 128k, H = 4096), where keeping G for every row (one group, [N, V] in 16 bits: 2 GiB at 8192 tokens)
needs no accumulator at all: dW = Gᵀ·h is then one matmul whose products are summed in float32 and rounded
once. `plan` picks the rows per chunk and per group under a memory budget (`memory_budget`, default
MEMORY_BUDGET = 4 GiB): one group whenever every row's G and a chunk of MIN_CHUNK_ROWS rows fit, else
the float32 accumulators and the rest split evenly between the chunk's logits and the group's G; never
chunks thinner than MIN_CHUNK_ROWS (a budget too small for that is exceeded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..launchers.common import empty
from ..launchers.logits import logits_backward, logits_forward
from ..launchers.matmul import DW_SLICE_BYTES, LMHead
from ..torch_math import compute_dtype, linear_kd_rows
from .torch_engine import parts_rows, vocab_parallel_rows

#: Default extra memory of the chunked path, in bytes (`memory_budget` of the fused API overrides it): the
#: chunk's logits, the group's G and the weight gradients' float32 accumulators.
MEMORY_BUDGET = 4 * 2**30


#: The fewest rows per chunk (or every row): thinner chunks re-read both weights for too few rows. Below it a
#: single group gives way to several (a float32 accumulator), and a budget too small for either is exceeded.
MIN_CHUNK_ROWS = 256


# Float32 [C, V] temporaries of the torch engine's autograd, on top of the two logits buffers (JSD, the
# worst divergence, peaks at 14; tests/test_memory.py checks the bound).
TORCH_TEMPORARIES = 16


@dataclass(frozen=True)
class SideNeeds:
    """What one model's lm_head contributes to the plan: its weight's dtype and [V, H] width, and which of
    its gradients are asked for (any of dH, dW, db makes its G kept; dW in 16 bits needs an accumulator
    when there are several groups)."""

    weight_dtype: torch.dtype
    width: int
    grad: bool
    weight_grad: bool


@dataclass(frozen=True)
class Plan:
    """Rows per chunk (logits) and per group (G kept, dH and dW products); group is a multiple of chunk,
    or every row. `accumulate`: several groups, weight gradients summed in float32 accumulators."""

    chunk: int
    group: int
    accumulate: bool

    def extra_bytes(self, vocab: int, engine: str, acc_dtype: torch.dtype, sides, logit_rows: int = 2) -> int:
        """The plan's buffers: logits (and the torch engine's temporaries), G, accumulators or the dW slice."""
        total = (self.chunk * logits_row_bytes(vocab, engine, acc_dtype, logit_rows)
                 + self.group * store_row_bytes(vocab, sides))
        if self.accumulate:
            return total + accumulator_bytes(vocab, acc_dtype, sides)
        sliced = [s for s in sides if s.weight_grad and s.weight_dtype != acc_dtype]
        return total + (DW_SLICE_BYTES if sliced else 0)


def logits_row_bytes(vocab: int, engine: str, acc_dtype: torch.dtype, logit_rows: int = 2) -> int:
    """One row of a chunk: `logit_rows` float32 logits rows (two: the student's and the teacher's; a sparse
    teacher's chunks hold the student's logits and its float32 gradient, or the hard-label term's temporaries;
    several teachers more, `kdops.ensemble`), plus the autograd temporaries of engine "torch"."""
    return vocab * acc_dtype.itemsize * (logit_rows + (TORCH_TEMPORARIES if engine == "torch" else 0))


def store_row_bytes(vocab: int, sides) -> int:
    """One row of a group: G in each weight's dtype, for the sides whose gradients are asked for."""
    return sum(vocab * s.weight_dtype.itemsize for s in sides if s.grad)


def accumulator_bytes(vocab: int, acc_dtype: torch.dtype, sides) -> int:
    """The float32 [V, H] sums of 16-bit weight gradients over several groups (a float32 weight's gradient
    is its own accumulator)."""
    return sum(vocab * s.width * acc_dtype.itemsize for s in sides if s.weight_grad and s.weight_dtype != acc_dtype)


def _rows(count: int, n_rows: int) -> int:
    """count rows, at least 1 and at most n_rows, a multiple of 16 when at least 16 and fewer than n_rows."""
    count = max(1, min(count, n_rows))
    return count if count >= n_rows or count < 16 else count - count % 16


def logits_chunk_rows(n_rows: int, vocab: int, engine: str, acc_dtype: torch.dtype, budget: int | None = None) -> int:
    """`plan(...).chunk` when no G is kept (no gradient asked for, or autograd keeping what it needs: the
    torch engine under torch.compile): the budget's worth of logits rows, at least min(rows, MIN_CHUNK_ROWS)."""
    budget = MEMORY_BUDGET if budget is None else budget
    return max(_rows(budget // logits_row_bytes(vocab, engine, acc_dtype), max(n_rows, 1)),
               min(max(n_rows, 1), MIN_CHUNK_ROWS))


def plan(n_rows: int, vocab: int, engine: str, acc_dtype: torch.dtype, sides, budget: int | None = None,
         logit_rows: int = 2) -> Plan:
    """Rows per chunk and per group under `budget` bytes (default MEMORY_BUDGET). One group when every
    row's G and a chunk of min(rows, MIN_CHUNK_ROWS) rows fit beside it (no accumulator; dW one matmul);
    else several groups: the budget less the accumulators, half for the chunk's logits and half for the
    group's G (a group is a whole number of chunks). Chunks never get thinner than MIN_CHUNK_ROWS (each
    re-reads both weights): a budget below both smallest plans is exceeded by the one-group plan of
    MIN_CHUNK_ROWS-row chunks, or by the several-group one where that one takes 20 % less memory."""
    n_rows = max(n_rows, 1)
    budget = MEMORY_BUDGET if budget is None else budget
    logits_row, store_row = logits_row_bytes(vocab, engine, acc_dtype, logit_rows), store_row_bytes(vocab, sides)
    least = min(n_rows, MIN_CHUNK_ROWS)
    one_group = Plan(least, n_rows, False)
    room = budget - one_group.extra_bytes(vocab, engine, acc_dtype, sides) + least * logits_row
    if room >= least * logits_row:
        return Plan(_rows(room // logits_row, n_rows), n_rows, False)
    room = budget - accumulator_bytes(vocab, acc_dtype, sides)
    if room < least * (logits_row + store_row):  # over budget: the faster one group, unless 1.25x the memory
        groups = Plan(least, least, least < n_rows)
        one, several = (p.extra_bytes(vocab, engine, acc_dtype, sides) for p in (one_group, groups))
        return one_group if 4 * one <= 5 * several else groups
    chunk = max(_rows(room // 2 // logits_row, n_rows), least)
    per_group = (room - chunk * logits_row) // store_row if store_row else n_rows
    group = min(max(chunk, per_group // chunk * chunk), n_rows)
    return Plan(chunk, group, group < n_rows)


class ChunkedProblem:
    """The inputs of one fused-linear loss, prepared for chunked passes."""

    def __init__(self, hs, ws, bs, ht, wt, bt, labels, divergence, temperature: float, vocab: int, soft: float,
                 hard: float, ignore_index: int, engine: str, budget: int | None, shards=None, softcaps=(None, None)):
        self.acc_dtype = compute_dtype(hs, ws, ht, wt)
        self.softcaps = softcaps
        self.student = LMHead(hs, ws, bs, vocab, self.acc_dtype)
        self.teacher = LMHead(ht, wt, bt, vocab, self.acc_dtype)
        self.sides = (self.student, self.teacher)
        self._options(hs, labels, divergence, temperature, vocab, soft, hard, ignore_index, engine, budget, shards)

    def _options(self, hs, labels, divergence, temperature: float, vocab: int, soft: float, hard: float,
                 ignore_index: int, engine: str, budget: int | None, shards) -> None:
        self.n_rows, self.vocab, self.device = hs.numel() // hs.shape[-1], vocab, hs.device
        self.labels = None if labels is None else labels.reshape(-1)
        self.divergence, self.temperature = divergence, temperature
        self.soft, self.hard, self.ignore_index, self.engine = soft, hard, ignore_index, engine
        self.shards, self.budget = shards, budget

    def _sides(self, needs):
        """The plan's width and one SideNeeds per side, from `needs` (dH, dW, db per side, in order)."""
        width = self.vocab if self.shards is None else self.shards.max_width
        return width, tuple(SideNeeds(side.weight.dtype, side.width, any(needs[3 * i: 3 * i + 3]), needs[3 * i + 1])
                            for i, side in enumerate(self.sides))

    def plan(self, needs) -> Plan:
        """The chunks and groups for the gradients `needs` (hs, ws, bs, ht, wt, bt) asks for. Under vocabulary
        parallelism every rank must run the same chunks (each chunk communicates): they are planned for the
        widest shard."""
        width, sides = self._sides(needs)
        return plan(self.n_rows, width, self.engine, self.acc_dtype, sides, self.budget, self.logit_rows)

    def plan_bytes(self, needs) -> int:
        """The extra memory of `plan(needs)`: its buffers (`Plan.extra_bytes`)."""
        width, sides = self._sides(needs)
        return self.plan(needs).extra_bytes(width, self.engine, self.acc_dtype, sides, self.logit_rows)

    #: float32 [chunk, V] rows per chunk row (`logits_row_bytes`): the two models' logits
    logit_rows = 2

    @property
    def num_inputs(self) -> int:
        """The tensors the autograd Function takes: (hidden, weight, bias) per side, at least two sides' worth."""
        return 3 * max(2, len(self.sides))

    eager = True  # each chunk's logits are there in the forward: its gradients are computed at once

    #: Where the chunks write their rows' `kdops.LossParts` [rows, 4] (`return_parts`), or None.
    row_parts = None

    def forward(self):
        return self.run(None, (False,) * self.num_inputs)[0], []

    def backward(self, saved, row_scale, needs):
        return self.run(row_scale, needs)[1]

    def loss_and_grads(self, row_scale, needs):
        return self.run(row_scale, needs)

    def _loss_and_logit_grads(self, zs, zt, labels, scale, out_s, out_t, parts=None):
        """Per-row losses of a chunk and, where an output is given, the row-scaled gradients of its logits:
        written into out_s / out_t (engine "triton", in their dtype), or returned in float32 (engine "torch").
        `parts` [chunk, 4]: where the chunk's `kdops.LossParts` go (from the kernels' forward pass, or the torch
        math on the chunk's logits)."""
        need_s, need_t = out_s is not None, out_t is not None
        if parts is not None and self.engine == "torch":
            parts.copy_(parts_rows(zs, zt, labels, self.divergence, self.temperature, self.softcaps, self.shards))
        if self.engine == "triton":
            canon, inv_temp = self.divergence.canonical().with_softcaps(*self.softcaps), 1.0 / self.temperature
            loss, stats, *chunk_parts = logits_forward(zs, zt, labels, canon, inv_temp, self.soft, self.hard,
                                                       self.shards, parts=parts is not None,
                                                       stats=self._given_statistics(parts))
            if parts is not None:
                parts.copy_(chunk_parts[0])
            if need_s or need_t:
                logits_backward(zs, zt, labels, stats, scale, canon, inv_temp, need_s, need_t, self.soft,
                                self.hard, out_s=out_s, out_t=out_t, shards=self.shards)
            return loss, out_s, out_t
        if not (need_s or need_t):
            with torch.no_grad():
                return self._torch_rows(zs, zt, labels), None, None
        zs, zt = zs.detach().requires_grad_(need_s), zt.detach().requires_grad_(need_t)
        with torch.enable_grad():
            loss = self._torch_rows(zs, zt, labels)
            inputs = [z for z, need in ((zs, need_s), (zt, need_t)) if need]
            # (TAID at t = 0 leaves the teacher out of the graph: a zero gradient)
            grads = list(torch.autograd.grad(loss, inputs, scale, allow_unused=True, materialize_grads=True))
        live = (scale != 0)[:, None]
        g_s = torch.where(live, grads.pop(0), 0.0) if need_s else None
        g_t = torch.where(live, grads.pop(0), 0.0) if need_t else None
        return loss.detach(), g_s, g_t

    def _given_statistics(self, parts):
        """The chunk's first-pass statistics where something other than the kernels' first pass computed them
        (`logits_forward(..., stats=...)`: its second pass alone), else None. The chunked path computes none."""
        return None

    def _torch_rows(self, zs, zt, labels):
        if self.shards is None:
            return linear_kd_rows(zs, zt, labels, self.divergence, self.temperature, self.soft, self.hard,
                                  self.ignore_index, self.softcaps)
        return vocab_parallel_rows(self.shards, zs, zt, labels, self.divergence, self.temperature, self.soft,
                                   self.hard, self.softcaps)

    def _grad_out(self, store, logits, need_bias: bool):
        """Where the kernels write a chunk's G: straight into the group's store (its dtype) — unless the bias
        gradient, a float32 sum of G, needs G before its rounding to a 16-bit store: then over the logits."""
        if store is None:
            return None
        direct = self.engine == "triton" and not (need_bias and store.dtype != self.acc_dtype)
        return store if direct else logits

    def _logits(self, r0: int, r1: int, buffers):
        """The logits of rows r0..r1, one per side, in the chunk's float32 buffers."""
        return tuple(side.logits(side.rows(r0, r1), buf[: r1 - r0]) for side, buf in zip(self.sides, buffers))

    def _chunk(self, logits, labels, scale, outs, r0: int, r1: int):
        """(per-row losses, logit gradients per side) of rows r0..r1 from their logits (one per side)."""
        zs, zt = logits
        parts = None if self.row_parts is None else self.row_parts[r0:r1]
        loss, g_s, g_t = self._loss_and_logit_grads(zs, zt, labels, scale, *outs, parts=parts)
        return loss, (g_s, g_t)

    def run(self, row_scale, needs):
        """(per-row losses [rows], gradients (hs, ws, bs, ht, wt, bt)) of Σ_r row_scale[r]·loss[r]; gradients
        only where `needs` says (row_scale may be None when none is needed). Generic over the sides (the
        models whose logits are computed): `_chunk` turns a chunk's logits into its losses and gradients."""
        sides = self.sides
        flags = needs if row_scale is not None else (False,) * self.num_inputs
        # per side: (dH, dW, db) asked for (db only where there is a bias), and whether G is kept at all
        asked = [(flags[3 * i], flags[3 * i + 1], flags[3 * i + 2] and side.bias is not None)
                 for i, side in enumerate(sides)]
        keep = [any(a) for a in asked]
        device, acc = self.device, self.acc_dtype
        plan = self.plan(tuple(f for a in asked for f in a) + (False,) * (self.num_inputs - 3 * len(sides)))

        def zeros_if(shape, dtype, need):
            return torch.zeros(shape, dtype=dtype, device=device) if need else None

        def empty_if(shape, dtype, need):
            return torch.empty(shape, dtype=dtype, device=device) if need else None

        grad_h = [empty_if((self.n_rows, side.width), side.hidden.dtype, a[0]) for side, a in zip(sides, asked)]
        grad_w = [self._weight_grad(side, plan.accumulate) if a[1] else None for side, a in zip(sides, asked)]
        grad_b = [zeros_if((self.vocab,), acc, a[2]) for a in asked]
        rows = torch.empty(self.n_rows, dtype=acc, device=device)
        chunk, group = plan.chunk, plan.group
        buffers = [torch.empty((chunk, self.vocab), dtype=acc, device=device) for _ in sides]
        stores = [empty_if((group, self.vocab), side.weight.dtype, k) for side, k in zip(sides, keep)]
        for g0 in range(0, self.n_rows, group):
            g1 = min(g0 + group, self.n_rows)
            for r0 in range(g0, g1, chunk):
                r1 = min(r0 + chunk, g1)
                logits = self._logits(r0, r1, buffers)
                labels = None if self.labels is None else self.labels[r0:r1]
                scale = None if row_scale is None else row_scale[r0:r1]
                outs = [None if store is None else store[r0 - g0: r1 - g0] for store in stores]
                rows[r0:r1], grads = self._chunk(
                    logits, labels, scale,
                    tuple(self._grad_out(out, z, a[2]) for out, z, a in zip(outs, logits, asked)), r0, r1)
                for g, out, g_b in zip(grads, outs, grad_b):
                    if g_b is not None:
                        g_b += g.sum(0, dtype=acc)
                    if g is not None and g is not out:
                        out.copy_(g)
            for side, store, g_h, g_w, k in zip(sides, stores, grad_h, grad_w, keep):
                if k:
                    side.backprop(side.rows(g0, g1), store[: g1 - g0], g0, g1, g_h, g_w, plan.accumulate,
                                  self.shards)
        # The chunk and group buffers go before the weight gradients are cast: the casts' copies take their place.
        buffers = stores = logits = grads = g = out = outs = None
        out = []
        for side, g_h, g_w, g_b in zip(sides, grad_h, grad_w, grad_b):
            out += [g_h, _cast(g_w, side.weight.dtype), self._bias_grad(g_b, side)]
        return rows, tuple(out + [None] * (self.num_inputs - len(out)))

    def _weight_grad(self, side: LMHead, accumulate: bool) -> torch.Tensor:
        """Where a side's weight gradient is summed: over several groups, a float32 (ACC) accumulator of zeros,
        rounded once at the end; with a single group, the gradient itself, whose rows of the shared vocabulary
        `LMHead.backprop` writes once (only the padding rows past it are zeroed here: a zero fill of the whole
        [V, H] gradient costs a pass over it, 0.3 ms at V = 128256, H = 4096 in bf16)."""
        shape = (side.weight_rows, side.width)
        if accumulate or self.n_rows == 0:  # no rows: no group writes it
            return torch.zeros(shape, dtype=self.acc_dtype if accumulate else side.weight.dtype, device=self.device)
        grad = empty(shape, side.weight.dtype, self.device)  # NaN under the tests: every row must be written
        grad[self.vocab:].zero_()
        return grad

    @staticmethod
    def _bias_grad(g, side: LMHead):
        """The float32 sums over the shared vocabulary as a gradient of the whole bias (zeros past it)."""
        if g is None:
            return None
        full = torch.zeros(side.weight_rows, dtype=side.bias.dtype, device=g.device)
        full[: g.shape[0]] = g
        return full


def _cast(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if g is None else g.to(dtype)
