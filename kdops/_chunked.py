"""impl="chunked" (Triton) and backend="torch" of the fused API: token chunks with float32 logits.

Per chunk of C rows: the logits of both models by matmuls into reused float32 [C, V] buffers (on CUDA,
cuBLAS with a float32 output: no bf16 rounding before the softmax); the loss and the logit gradient
G = ∂ℓ/∂logits of the chunk from them, by the kernels on logits writing G over the logits (engine
"triton") or by the reference math under autograd (engine "torch"); then dH[chunk] = G·W and
dW += Gᵀ·h_chunk by matmuls. Extra memory is the chunk's buffers, sized from a budget in bytes.
"""

from __future__ import annotations

import torch

from . import _launch
from .parallel import vocab_parallel_rows
from .reference import compute_dtype, linear_kd_rows

#: Default bytes for one chunk's buffers (`chunk_bytes` of the fused API overrides it).
CHUNK_BYTES = 256 * 2**20

# Float32 [C, V] temporaries of the torch engine's autograd, on top of the two logits buffers (JSD, the
# worst divergence, peaks at 14; tests/test_memory.py checks the bound).
TORCH_TEMPORARIES = 16


def bytes_per_row(vocab: int, engine: str, weight_dtypes, acc_dtype: torch.dtype) -> int:
    """Bytes one row of a chunk needs: two float32 logits rows, plus the casts of G to each weight dtype
    (engine "triton") or the autograd temporaries (engine "torch")."""
    acc = torch.empty((), dtype=acc_dtype).element_size()
    if engine == "torch":
        return vocab * acc * (2 + TORCH_TEMPORARIES)
    casts = sum(torch.empty((), dtype=d).element_size() for d in weight_dtypes if d != acc_dtype)
    return vocab * (2 * acc + casts)


def chunk_rows(n_rows: int, per_row: int, budget: int | None) -> int:
    """Rows per chunk under `budget` bytes (default CHUNK_BYTES), a multiple of 16 when at least 16."""
    rows = max(1, (CHUNK_BYTES if budget is None else budget) // per_row)
    if rows >= n_rows:
        return max(n_rows, 1)
    return rows - rows % 16 if rows >= 16 else rows


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """out = a · b (or out += a · b) in out's dtype, for a, b of one dtype, with every product summed in out's
    dtype: cuBLAS with a float32 output for bf16 / fp16 on CUDA; elsewhere the operands upcast, which
    multiplies the same rounded values exactly."""
    if a.dtype != out.dtype and not a.is_cuda:
        a, b = a.to(out.dtype), b.to(out.dtype)
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if accumulate:
        return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


class _Side:
    """One model's lm_head over the shared vocabulary, with row access to its hidden states."""

    def __init__(self, hidden, weight, bias, vocab: int, acc_dtype: torch.dtype):
        self.width, self.weight_rows = hidden.shape[-1], weight.shape[0]
        self.weight = weight[:vocab]
        self.bias = None if bias is None else bias[:vocab]
        self.leading = hidden.shape[:-1]
        try:
            self.flat = hidden.view(-1, self.width)
        except RuntimeError:  # a strided view such as hidden[:, :-1]: chunks are gathered, never the whole
            self.flat = None
        self.hidden = hidden
        self.acc_dtype = acc_dtype
        # The matmul's operands: one dtype, float32 output. Where cuBLAS cannot produce that directly
        # (CPU, or mixed dtypes), the weight is upcast once per pass.
        fast = hidden.dtype == self.weight.dtype and (hidden.dtype == acc_dtype or hidden.is_cuda)
        self.mm_dtype = hidden.dtype if fast else acc_dtype
        self._mm_weight = self.weight if fast else None

    @property
    def mm_weight(self) -> torch.Tensor:
        if self._mm_weight is None:
            self._mm_weight = self.weight.to(self.mm_dtype)
        return self._mm_weight

    def rows(self, start: int, end: int) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[start:end]
        index = torch.arange(start, end, device=self.hidden.device)
        return self.hidden[torch.unravel_index(index, self.leading)]

    def logits(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        _mm_into(h.to(self.mm_dtype), self.mm_weight.t(), out)
        if self.bias is not None:
            out += self.bias
        return out

    def backprop(self, h, g, r0: int, r1: int, grad_h, grad_w, grad_b, shards=None) -> None:
        """Add the chunk's logit gradient g [C, V] into the hidden, weight and bias gradients: g is rounded
        to the weight dtype for the matmuls (tensor cores), whose products are summed in float32 (ACC) —
        grad_w and grad_b are float32 sums over the chunks, cast once by the caller. Under `shards` the
        chunk's dH is this rank's part of a sum over the vocabulary: it is summed over the group in float32
        too, then rounded once."""
        if grad_b is not None:
            grad_b += g.sum(0)
        if grad_h is None and grad_w is None:
            return
        g = g.to(self.weight.dtype)
        if grad_h is not None:
            if shards is not None and shards.reduce_hidden_grad:
                part = _mm_into(g, self.weight, torch.empty((r1 - r0, self.width), dtype=self.acc_dtype,
                                                             device=g.device))
                grad_h[r0:r1] = shards.all_reduce_sum(part)
            elif grad_h.dtype == g.dtype:
                torch.mm(g, self.weight, out=grad_h[r0:r1])
            else:
                grad_h[r0:r1] = torch.mm(g, self.weight)
        if grad_w is not None:
            _mm_into(g.t(), h.to(self.weight.dtype), grad_w[: g.shape[1]], accumulate=True)


class ChunkedProblem:
    """The inputs of one fused-linear loss, prepared for chunked passes."""

    def __init__(self, hs, ws, bs, ht, wt, bt, labels, divergence, temperature: float, vocab: int, soft: float,
                 hard: float, ignore_index: int, engine: str, budget: int | None, shards=None):
        self.acc_dtype = compute_dtype(hs, ws, ht, wt)
        self.student = _Side(hs, ws, bs, vocab, self.acc_dtype)
        self.teacher = _Side(ht, wt, bt, vocab, self.acc_dtype)
        self.n_rows, self.vocab, self.device = hs.numel() // hs.shape[-1], vocab, hs.device
        self.labels = None if labels is None else labels.reshape(-1)
        self.divergence, self.temperature = divergence, temperature
        self.soft, self.hard, self.ignore_index, self.engine = soft, hard, ignore_index, engine
        self.shards = shards
        # Under vocabulary parallelism every rank must run the same chunks (each chunk communicates): they
        # are sized for the widest shard.
        width = vocab if shards is None else shards.max_width
        per_row = bytes_per_row(width, engine, (ws.dtype, wt.dtype), self.acc_dtype)
        self.chunk = chunk_rows(self.n_rows, per_row, budget)

    eager = True  # each chunk's logits are there in the forward: its gradients are computed at once

    def forward(self):
        return self.run(None, (False,) * 6)[0], []

    def backward(self, saved, row_scale, needs):
        return self.run(row_scale, needs)[1]

    def loss_and_grads(self, row_scale, needs):
        return self.run(row_scale, needs)

    def _loss_and_logit_grads(self, zs, zt, labels, scale, need_s: bool, need_t: bool):
        """Per-row losses of a chunk and, where asked for, the row-scaled gradients of its logits."""
        if self.engine == "triton":
            canon, inv_temp = self.divergence.canonical(), 1.0 / self.temperature
            loss, stats = _launch.logits_forward(zs, zt, labels, canon, inv_temp, self.soft, self.hard, self.shards)
            if need_s or need_t:
                _launch.logits_backward(zs, zt, labels, stats, scale, canon, inv_temp, need_s, need_t, self.soft,
                                        self.hard, out_s=zs, out_t=zt, shards=self.shards)
            return loss, zs, zt
        if not (need_s or need_t):
            with torch.no_grad():
                return self._reference_rows(zs, zt, labels), None, None
        zs, zt = zs.detach().requires_grad_(need_s), zt.detach().requires_grad_(need_t)
        with torch.enable_grad():
            loss = self._reference_rows(zs, zt, labels)
            inputs = [z for z, need in ((zs, need_s), (zt, need_t)) if need]
            grads = list(torch.autograd.grad(loss, inputs, scale))
        live = (scale != 0)[:, None]
        g_s = torch.where(live, grads.pop(0), 0.0) if need_s else None
        g_t = torch.where(live, grads.pop(0), 0.0) if need_t else None
        return loss.detach(), g_s, g_t

    def _reference_rows(self, zs, zt, labels):
        if self.shards is None:
            return linear_kd_rows(zs, zt, labels, self.divergence, self.temperature, self.soft, self.hard,
                                  self.ignore_index)
        return vocab_parallel_rows(self.shards, zs, zt, labels, self.divergence, self.temperature, self.soft,
                                   self.hard)

    def run(self, row_scale, needs):
        """(per-row losses [rows], gradients (hs, ws, bs, ht, wt, bt)) of Σ_r row_scale[r]·loss[r]; gradients
        only where `needs` says (row_scale may be None when none is needed)."""
        need_hs, need_ws, need_bs, need_ht, need_wt, need_bt = needs if row_scale is not None else (False,) * 6
        s, t = self.student, self.teacher
        need_bs = need_bs and s.bias is not None
        need_bt = need_bt and t.bias is not None
        need_s, need_t = need_hs or need_ws or need_bs, need_ht or need_wt or need_bt
        device, acc = self.device, self.acc_dtype

        def zeros(shape, dtype, need):
            return torch.zeros(shape, dtype=dtype, device=device) if need else None

        g_hs = zeros((self.n_rows, s.width), s.hidden.dtype, need_hs)
        g_ht = zeros((self.n_rows, t.width), t.hidden.dtype, need_ht)
        # Weight gradients are sums over every chunk: float32 (ACC) accumulators, one rounding at the end.
        g_ws = zeros((s.weight_rows, s.width), acc, need_ws)
        g_wt = zeros((t.weight_rows, t.width), acc, need_wt)
        g_bs, g_bt = zeros((self.vocab,), acc, need_bs), zeros((self.vocab,), acc, need_bt)
        rows = torch.empty(self.n_rows, dtype=acc, device=device)
        chunk = self.chunk
        zs_buf = torch.empty((chunk, self.vocab), dtype=acc, device=device)
        zt_buf = torch.empty((chunk, self.vocab), dtype=acc, device=device)
        for r0 in range(0, self.n_rows, chunk):
            r1 = min(r0 + chunk, self.n_rows)
            h_s, h_t = s.rows(r0, r1), t.rows(r0, r1)
            zs, zt = s.logits(h_s, zs_buf[: r1 - r0]), t.logits(h_t, zt_buf[: r1 - r0])
            labels = None if self.labels is None else self.labels[r0:r1]
            scale = None if row_scale is None else row_scale[r0:r1]
            rows[r0:r1], gs, gt = self._loss_and_logit_grads(zs, zt, labels, scale, need_s, need_t)
            if need_s:
                s.backprop(h_s, gs, r0, r1, g_hs, g_ws, g_bs, self.shards)
            if need_t:
                t.backprop(h_t, gt, r0, r1, g_ht, g_wt, g_bt, self.shards)
        # The chunk buffers go before the weight gradients are cast: the casts' copies take their place.
        zs_buf = zt_buf = zs = zt = gs = gt = None
        return rows, (g_hs, _cast(g_ws, s.weight.dtype), self._bias_grad(g_bs, s), g_ht, _cast(g_wt, t.weight.dtype),
                      self._bias_grad(g_bt, t))

    @staticmethod
    def _bias_grad(g, side: _Side):
        """The float32 sums over the shared vocabulary as a gradient of the whole bias (zeros past it)."""
        if g is None:
            return None
        full = torch.zeros(side.weight_rows, dtype=side.bias.dtype, device=g.device)
        full[: g.shape[0]] = g
        return full


def _cast(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if g is None else g.to(dtype)
