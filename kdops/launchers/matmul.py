"""cuBLAS for the paths that compute logits and their gradients by matmuls (chunked, sliced, fused backward):
products with every 16-bit product summed in float32, one model's lm_head with row access to its hidden states,
and the gradients of an lm_head summed over vocabulary slices."""

from __future__ import annotations

import contextlib

import torch

#: Bytes of the float32 [slice, H] product a one-group weight gradient is computed through off CUDA, slice by
#: slice of the vocabulary, before its one rounding to the weight dtype (cuBLAS writes it directly).
DW_SLICE_BYTES = 64 * 2**20


@contextlib.contextmanager
def float32_sums():
    """cuBLAS sums 16-bit products in float32 (PyTorch's CUBLAS_COMPUTE_32F); its split-K partial sums stay
    float32 too only while PyTorch's reduced-precision reductions are off: off for the duration."""
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = flags.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction = saved


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
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


class LMHead:
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
        mm_into(h.to(self.mm_dtype), self.mm_weight.t(), out)
        if self.bias is not None:
            out += self.bias
        return out

    def backprop(self, h, g, r0: int, r1: int, grad_h, grad_w, accumulate: bool, shards=None) -> None:
        """Add a group's logit gradient g [rows, V] (in the weight's dtype, for the tensor cores) into the
        hidden and weight gradients, products summed in float32 (ACC): dH[r0:r1] = g·W, rounded once;
        dW += gᵀ·h into a float32 accumulator (`accumulate`: several groups, cast once by the caller), or
        with a single group dW = gᵀ·h rounded once (by cuBLAS; elsewhere vocabulary slice by slice
        through a float32 product).
        Under `shards` the group's dH is this rank's part of a sum over the vocabulary: it is summed over
        the group of ranks in float32 too, then rounded once."""
        if grad_h is not None:
            if shards is not None and shards.reduce_hidden_grad:
                part = mm_into(g, self.weight, torch.empty((r1 - r0, self.width), dtype=self.acc_dtype,
                                                           device=g.device))
                grad_h[r0:r1] = shards.all_reduce_sum(part)
            elif grad_h.dtype == g.dtype:
                with float32_sums():
                    torch.mm(g, self.weight, out=grad_h[r0:r1])
            else:
                grad_h[r0:r1] = torch.mm(g, self.weight)
        if grad_w is None:
            return
        h = h.to(self.weight.dtype)
        if accumulate or grad_w.dtype == self.acc_dtype:
            mm_into(g.t(), h, grad_w[: g.shape[1]], accumulate=accumulate)
            return
        if g.is_cuda:  # float32 sums, one rounding to grad_w's dtype
            with float32_sums():
                torch.mm(g.t(), h, out=grad_w[: g.shape[1]])
            return
        step = max(1, DW_SLICE_BYTES // (self.width * self.acc_dtype.itemsize))
        product = torch.empty((min(step, g.shape[1]), self.width), dtype=self.acc_dtype, device=g.device)
        for v0 in range(0, g.shape[1], step):
            v1 = min(v0 + step, g.shape[1])
            grad_w[v0:v1] = mm_into(g[:, v0:v1].t(), h, product[: v1 - v0])


def hidden_matrix(hidden: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states as a [rows, width] matrix of `dtype` (copied only where a view cannot be taken)."""
    return hidden.reshape(-1, width).to(dtype)


class LMHeadGrads:
    """One model's gradients in the fused backward: dH summed over the vocabulary slices in float32 (or in the
    gradient itself, when that is float32 or wider), dW and db written slice by slice."""

    def __init__(self, hidden, weight, bias, n, need_h, need_w, need_b, dot, acc_dtype):
        device = weight.device
        self.width = hidden.shape[-1]
        self.hidden, self.weight, self.dot, self.acc_dtype = hidden, weight, dot, acc_dtype
        self.any = need_h or need_w or need_b
        self.grad_h = torch.zeros((n, self.width), dtype=hidden.dtype, device=device) if need_h else None
        wider = need_h and hidden.dtype.itemsize >= acc_dtype.itemsize
        self.hidden_sums = self.grad_h if wider or not need_h else torch.zeros((n, self.width), dtype=acc_dtype,
                                                                               device=device)
        self.grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=device) if need_w else None
        self.grad_b = torch.zeros(bias.shape, dtype=bias.dtype, device=device) if need_b else None
        self._matrix = None

    @classmethod
    def both(cls, hidden, weights, biases, n, needs, dots, acc_dtype) -> list:
        """The student's and the teacher's, from pairs and `needs` = (hs, ws, bs, ht, wt, bt) flags."""
        return [cls(h, w, b, n, needs[3 * i], needs[3 * i + 1], needs[3 * i + 2] and b is not None, dot, acc_dtype)
                for i, (h, w, b, dot) in enumerate(zip(hidden, weights, biases, dots))]

    def add_slice(self, g: torch.Tensor, start: int, end: int) -> None:
        """The contributions of G = ∂/∂logits[:, start:end] (in the dot dtype) to dH, dW[start:end], db[start:end]."""
        if self.grad_w is not None:
            if self._matrix is None:
                self._matrix = hidden_matrix(self.hidden, self.width, self.dot)
            out = self.grad_w[start:end]
            # cuBLAS sums 16-bit products in float32 and rounds once into a 16-bit output; elsewhere (CPU, or a
            # gradient dtype other than the operands') the float32 product is rounded by a copy.
            if out.dtype == g.dtype and (g.is_cuda or out.dtype.itemsize >= self.acc_dtype.itemsize):
                mm_into(g.t(), self._matrix, out)
            else:
                product = torch.empty(out.shape, dtype=self.acc_dtype, device=g.device)
                out.copy_(mm_into(g.t(), self._matrix, product))
        if self.grad_b is not None:
            self.grad_b[start:end] = g.sum(0, dtype=self.acc_dtype)
        if self.hidden_sums is not None:
            mm_into(g, self.weight[start:end].to(self.dot), self.hidden_sums, accumulate=True)

    def results(self):
        if self.grad_h is not None and self.hidden_sums is not self.grad_h:
            self.grad_h.copy_(self.hidden_sums)
        return self.grad_h, self.grad_w, self.grad_b
