"""kdops.token_logprobs's path: the log-probabilities of given tokens (and each row's entropy) from hidden states and
an lm_head, in row chunks of float32 logits that never exceed a memory budget.

Per chunk of C rows the logits z [C, V] come from one matmul into a reused float32 buffer (`LMHead.logits`), then

* engine "triton": one kernel reads them once for each row's log-sum-exp, entropy and token logit
  (`kernels/token_logprobs.py`), kept as statistics [rows, 4]; the backward recomputes the chunk's logits and a
  second kernel writes the logit gradient G over them (or into a buffer in the weight's dtype), followed by
  dH = G·W and dW += Gᵀ·h (`LMHead.backprop`);
* engine "torch": the torch math (`kdops.torch_math.token_logprob_rows`) on the chunk, and in the backward its
  autograd on the recomputed chunk gives G, followed by the same two matmuls.

Under vocabulary parallelism each rank holds a shard of the vocabulary: the kernels' statistics are combined over
the group once per call (`over_group`), the torch math all-reduces its normalizers per chunk
(`kdops.paths.torch_engine.log_softmax_across`). Inside torch.compile the torch engine is traced, its chunks under
activation checkpointing (`kdops._autograd.checkpointed_rows`); the kernels and collectives run outside the graph.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .._autograd import TokenLogprobsFunction, checkpointed_rows
from ..launchers.common import empty
from ..launchers.matmul import LMHead
from ..launchers.token_logprobs import NUM_STATS, token_logprobs_backward, token_logprobs_forward
from ..torch_math import compute_dtype, entropy_of, linear_logits, softcap, token_logprob_rows
from .torch_engine import _LossOverGroup, chunk_rows, log_softmax_across

#: Default memory of one chunk's float32 logits and temporaries, in bytes (`memory_budget` overrides it).
TOKEN_LOGPROBS_BUDGET = 2**30


def logprobs_chunk_rows(width: int, engine: str, acc_dtype: torch.dtype, weight_dtype: torch.dtype,
                        budget: int | None = None) -> int:
    """Rows per chunk within `budget` bytes (default TOKEN_LOGPROBS_BUDGET), at least one: engine "triton" holds a
    row's logits in acc_dtype and, for a weight of another dtype, its gradient in the weight's dtype (the matmuls'
    operand); engine "torch" the logits and its autograd's temporaries (`torch_engine.chunk_rows`)."""
    budget = TOKEN_LOGPROBS_BUDGET if budget is None else budget
    if engine == "torch":
        return chunk_rows(width, acc_dtype.itemsize, budget)
    per_row = width * (acc_dtype.itemsize + (weight_dtype.itemsize if weight_dtype != acc_dtype else 0))
    return max(1, budget // per_row)


class TokenLogprobsProblem:
    """One call's inputs, prepared for the chunked passes: `forward` gives (out [2, rows] = (log p(token), H), 0
    on ignored rows; what the backward keeps), `backward` the gradients (hidden, weight, bias) of Σ grad · out."""

    def __init__(self, hidden, weight, bias, token_ids, ignore_index: int, temperature: float, cap: float | None,
                 engine: str, budget: int | None, shards=None):
        self.acc_dtype = compute_dtype(hidden, weight)
        self.vocab = weight.shape[0] if shards is None else shards.width
        self.head = LMHead(hidden, weight, bias, self.vocab, self.acc_dtype)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.temperature, self.cap, self.engine, self.shards = temperature, cap, engine, shards
        ids = token_ids.reshape(-1)
        self.n_rows = ids.numel()
        self.mask = ids != ignore_index
        # a token outside the vocabulary (unchecked on an accelerator: that would synchronize) gives NaN, never a
        # silently wrong value
        self.in_range = (ids >= 0) & (ids < (self.vocab if shards is None else shards.vocab))
        counted = self.mask & self.in_range
        # column indices of this rank's logits, −1 where the row has none (ignored, another shard's, out of range)
        local = torch.where(counted, ids, -1)
        self.local = (local if shards is None else shards.local_labels(local)).to(torch.int32)
        self.counted = counted
        width = self.vocab if shards is None else shards.max_width  # every rank runs the same chunks
        self.chunk = logprobs_chunk_rows(width, engine, self.acc_dtype, weight.dtype, budget)

    # --- the per-chunk math of each engine ---

    def _torch_rows(self, z, r0: int, r1: int) -> torch.Tensor:
        """(log p(token), H) [rows, 2] of a chunk's logits by the torch math (over the group under `shards`)."""
        local = self.local[r0:r1].long()
        if self.shards is None:
            return token_logprob_rows(z, local, self.temperature, self.cap, local >= 0)
        (log_p,) = log_softmax_across(self.shards, softcap(z, self.cap) / self.temperature)
        here = local >= 0
        picked = torch.where(here, log_p.gather(-1, torch.where(here, local, 0)[:, None]).squeeze(-1), 0.0)
        return _LossOverGroup.apply(torch.stack([picked, entropy_of(log_p)], dim=-1), self.shards)

    def _torch_grad(self, z, r0: int, r1: int, grad) -> torch.Tensor:
        leaf = z.detach().requires_grad_(True)
        with torch.enable_grad():
            rows = self._torch_rows(leaf, r0, r1)
            (g,) = torch.autograd.grad(rows, leaf, grad)
        return g

    # --- the passes ---

    def forward(self):
        n, acc, inv_temp = self.n_rows, self.acc_dtype, 1.0 / self.temperature
        device = self.hidden.device
        stats = empty((n, NUM_STATS), acc, device) if self.engine == "triton" else None
        out = empty((n, 2), acc, device) if stats is None else None
        buffer = torch.empty((min(self.chunk, max(n, 1)), self.vocab), dtype=acc, device=device)
        for r0 in range(0, n, self.chunk):
            r1 = min(r0 + self.chunk, n)
            z = self.head.logits(self.head.rows(r0, r1), buffer[: r1 - r0])
            if stats is not None:
                stats[r0:r1] = token_logprobs_forward(z, self.local[r0:r1], inv_temp, self.cap)
            else:
                out[r0:r1] = self._torch_rows(z, r0, r1)
        if stats is not None:
            if self.shards is not None:
                stats = over_group(stats, self.shards)
            m, ls, entropy, y_label = stats.unbind(-1)
            out = torch.stack([(y_label - m) - ls, entropy])
        else:
            out = out.t()
        out = torch.stack([torch.where(self.mask & ~self.in_range, math.nan, out[0]), out[1]])
        return torch.where(self.mask, out, 0.0), [] if stats is None else [stats]

    def backward(self, saved, grad, needs):
        """(dH, dW, dB) of Σ grad · out (grad [2, rows]), each where `needs` asks for it."""
        head, acc, n, inv_temp = self.head, self.acc_dtype, self.n_rows, 1.0 / self.temperature
        device, weight = self.hidden.device, self.weight
        need_h, need_w = needs[0], needs[1]
        need_b = needs[2] and self.bias is not None
        if not (need_h or need_w or need_b):
            return None, None, None
        grad = torch.where(self.mask, grad, 0.0).to(acc).t().contiguous()  # [rows, 2]
        (stats,) = saved if self.engine == "triton" else (None,)
        grad_h = empty((n, head.width), self.hidden.dtype, device) if need_h else None
        # dW: summed over the chunks in a float32 accumulator, unless the weight is float32 itself (its own) or one
        # chunk writes it once (rows past the shard are padding: zeros)
        single = 0 < n <= self.chunk and weight.dtype != acc
        accumulate = not single
        grad_w = None
        if need_w:
            if single:
                grad_w = empty(weight.shape, weight.dtype, device)
                grad_w[self.vocab:].zero_()
            else:
                grad_w = torch.zeros(weight.shape, dtype=acc, device=device)
        grad_b = torch.zeros(self.vocab, dtype=acc, device=device) if need_b else None
        rows = min(self.chunk, max(n, 1))
        buffer = torch.empty((rows, self.vocab), dtype=acc, device=device)
        # G in the weight's dtype for the matmuls (the logits buffer itself when that is the accumulation dtype)
        store = torch.empty((rows, self.vocab), dtype=weight.dtype, device=device) if weight.dtype != acc else None
        for r0 in range(0, n, self.chunk):
            r1 = min(r0 + self.chunk, n)
            h = head.rows(r0, r1)
            z = head.logits(h, buffer[: r1 - r0])
            if self.engine == "triton":
                # straight into the store, unless the bias gradient needs G summed before its rounding to it
                target = z if store is None or need_b else store[: r1 - r0]
                g = token_logprobs_backward(z, self.local[r0:r1], stats[r0:r1], grad[r0:r1], inv_temp, self.cap,
                                            out=target)
            else:
                g = self._torch_grad(z, r0, r1, grad[r0:r1])
            if need_b:
                grad_b += g.sum(0, dtype=acc)
            if store is not None and g.dtype != weight.dtype:
                g = store[: r1 - r0].copy_(g)
            head.backprop(h, g, r0, r1, grad_h, grad_w, accumulate, self.shards)
        buffer = store = g = z = None
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            full = torch.zeros(self.bias.shape, dtype=self.bias.dtype, device=device)
            full[: self.vocab] = grad_b
            grad_b = full
        return (None if grad_h is None else grad_h.view(self.hidden.shape)), grad_w, grad_b


def over_group(stats: torch.Tensor, shards) -> torch.Tensor:
    """The group's statistics (m, ls, H, y_label) of every row from each rank's over its shard of the vocabulary
    (in float64, then in the statistics' dtype): m the group's max; the shards' sums e^(m_r + ls_r − m) added, ls
    their log; H = Σ_r w_r·(H_r + (m + ls) − (m_r + ls_r)), w_r = the shard's share of the mass (each term ≥ 0);
    y_label from the one shard that holds the token (the others add 0)."""
    m_r, ls_r, h_r, y_r = stats.double().unbind(-1)
    top = shards.all_reduce_max(m_r.clone())
    ref = torch.where(top == -math.inf, 0.0, top)
    share = torch.exp((m_r - ref) + ls_r)
    total = shards.all_reduce_sum(share.clone())
    ls = torch.log(total)
    terms = torch.where(share > 0, share / total * (h_r + (ref - m_r) + (ls - ls_r)), 0.0)
    sums = shards.all_reduce_sum(torch.stack([terms, y_r], dim=-1))
    return torch.stack([top, ls, sums[:, 0], sums[:, 1]], dim=-1).to(stats.dtype)


def compiled_rows(hidden, weight, bias, token_ids, ignore_index: int, temperature: float, cap: float | None,
                  budget: int | None) -> torch.Tensor:
    """(log p(token), H) [2, rows] by the torch math inside torch.compile: traced, its row chunks under activation
    checkpointing (only their inputs kept; the backward recomputes one chunk at a time)."""
    acc, vocab = compute_dtype(hidden, weight), weight.shape[0]
    ids = token_ids.reshape(-1)
    n = ids.numel()
    mask = ids != ignore_index
    in_range = (ids >= 0) & (ids < vocab)
    counted = mask & in_range
    # Cast once, outside the chunks: autograd then sums the chunks' weight gradients in float32, rounded once.
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)

    def rows(h, token, count, keep):
        z = linear_logits(h, w, b, vocab, acc)
        return torch.where(keep[:, None], token_logprob_rows(z, token, temperature, cap, count), 0.0)

    if n == 0:
        return hidden.new_zeros((2, 0), dtype=acc)
    chunk = logprobs_chunk_rows(vocab, "torch", acc, weight.dtype, budget)
    out = checkpointed_rows(rows, n, chunk, hidden.reshape(n, hidden.shape[-1]), torch.where(counted, ids, 0).long(),
                            counted, mask)
    return torch.stack([torch.where(mask & ~in_range, math.nan, out[:, 0]), out[:, 1]])


def eager_rows(hidden, weight, bias, token_ids, ignore_index: int, temperature: float, cap: float | None,
               engine: str, budget: int | None, shards=None) -> torch.Tensor:
    """(log p(token), H) [2, rows] through `TokenLogprobsFunction` (differentiable in hidden, weight, bias)."""
    problem = TokenLogprobsProblem(hidden, weight, bias, token_ids, ignore_index, temperature, cap, engine, budget,
                                   shards)
    return TokenLogprobsFunction.apply(problem, hidden, weight, bias)


_eager_outside_the_graph = torch.compiler.disable(eager_rows)


def token_logprobs(hidden, weight, bias, token_ids, ignore_index: int, temperature: float, cap: float | None,
                   engine: str, budget: int | None, shards=None) -> torch.Tensor:
    """(log p(token), H) [2, ...] of validated inputs (`kdops.logprobs`), 0 on ignored rows. Inside torch.compile
    the torch engine is traced; the kernels and a vocabulary shard's collectives run outside the graph."""
    with _autocast_off(hidden.device.type):
        if not torch.compiler.is_compiling():
            out = eager_rows(hidden, weight, bias, token_ids, ignore_index, temperature, cap, engine, budget, shards)
        elif engine == "torch" and shards is None:
            out = compiled_rows(hidden, weight, bias, token_ids, ignore_index, temperature, cap, budget)
        else:
            out = _eager_outside_the_graph(hidden, weight, bias, token_ids, ignore_index, temperature, cap, engine,
                                           budget, shards)
    return out.view(2, *token_ids.shape)


def _autocast_off(device_type: str):
    """autocast off: the logits are float32 (float64) products of the inputs as they are, whatever autocast
    would have cast them to."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError):  # a device type without autocast
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()
