"""impl="sliced" of the fused API: the vocabulary in slices of S columns, every row at once.

Per slice [v0, v1): both models' logits for every row by cuBLAS into float32 [N, S] buffers (as the chunked
path computes a token chunk's), and the kernels on logits on them:

* forward: each slice's partial per-row state — the stage that vocabulary-parallel ranks compute for their
  shards — merged over the slices like the fused kernels' vocabulary splits (`kdops.launchers.logits.staged_forward`);
* backward: the logits recomputed slice by slice, the gradient kernel writing the slice's G = ∂ℓ/∂logits in
  the matmul operands' dtype, then cuBLAS: dW[slice] = Gᵀ·h over every row (summed in float32, rounded once)
  and dH += G·W[slice] into float32 sums (`kdops.launchers.matmul.LMHeadGrads`, shared with the fused path).

Under vocabulary parallelism (`shards`) each rank slices its own shard; the slices' partial states are merged
and combined over the group as the fused kernels' splits are, and the hidden gradients summed over the group
in float32. So the loss takes six matmuls (both logits twice, dW, dH) where the chunked path takes four, all at cuBLAS's
rate, and its memory does not grow with the vocabulary: the slice's buffers (at most the budget), the
float32 dH sums and per-row statistics — no [N, V] and no [V, H] buffer.
"""

from __future__ import annotations

import torch

from .. import targets
from ..divergences import Canonical
from ..launchers.common import cdiv, kernel_modules, launch
from ..launchers.logits import (
    flat_labels,
    logits_args,
    logits_backward,
    logits_config,
    logits_constexprs,
    staged_forward,
)
from ..launchers.matmul import LMHead, LMHeadGrads, float32_sums, mm_into
from ..parallel import labels_in_range
from ..torch_math import compute_dtype

#: Default bytes of one slice's buffers: both float32 logits and the logit gradients kept for dW and dH.
SLICE_BYTES = 64 * 2**20


#: Rows per chunk of the forward (each chunk re-reads the weights): its partial states, one per row and slice,
#: stay bounded whatever the number of rows.
FORWARD_ROWS = 4096


#: Columns of a slice are a multiple of this (and at least this many, whatever the budget).
SLICE_ALIGN = 128


class VocabSlice:
    """Columns [start, stop) of the vocabulary: the labels as indices into them, −1 outside (as a rank's
    vocabulary shard takes them, `kdops.parallel.VocabShards`)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def local_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return labels_in_range(labels, self.start, self.stop)


def slice_bytes_per_column(n_rows: int, acc_dtype: torch.dtype, grad_dtypes) -> int:
    """Bytes one column of a slice takes: both float32 logits and each kept gradient, for every row."""
    return n_rows * (2 * acc_dtype.itemsize + sum(d.itemsize for d in grad_dtypes))


def slice_width(n_rows: int, vocab: int, acc_dtype: torch.dtype, grad_dtypes, budget: int | None = None) -> int:
    """Columns per slice: a multiple of SLICE_ALIGN whose buffers fit `budget` bytes (default SLICE_BYTES), at
    least SLICE_ALIGN (a smaller budget is exceeded), at most the vocabulary."""
    budget = SLICE_BYTES if budget is None else budget
    columns = budget // max(1, slice_bytes_per_column(n_rows, acc_dtype, grad_dtypes)) // SLICE_ALIGN * SLICE_ALIGN
    return min(max(columns, SLICE_ALIGN), vocab)


def _contiguous(buffer: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """The first n_rows × width elements of a buffer as a contiguous [n_rows, width] matrix."""
    return buffer.view(-1)[: n_rows * width].view(n_rows, width)


class SlicedProblem:
    """The inputs of one fused-linear loss, prepared for vocabulary slices (the `FusedLinearKDFunction`
    protocol of `kdops.launchers.linear.FusedProblem`: statistics from the forward, gradients in the backward)."""

    eager = False

    #: Where the forward writes the rows' `kdops.LossParts` [rows, 4] (`return_parts`), or None.
    row_parts = None

    def __init__(self, hs, ws, bs, ht, wt, bt, labels, canon: Canonical, inv_temp: float, vocab: int, soft: float,
                 hard: float, budget: int | None = None, shards=None, parts: bool = False):
        self.acc_dtype = compute_dtype(hs, ws, ht, wt)
        self.n_rows = hs.numel() // hs.shape[-1]
        self.vocab, self.canon, self.inv_temp, self.soft, self.hard = vocab, canon, inv_temp, soft, hard
        self.hidden = (hs, ht)
        self.weights = (ws, wt)
        self.biases = (bs, bt)
        self.dot_dtypes = tuple(torch.promote_types(h.dtype, w.dtype) for h, w in ((hs, ws), (ht, wt)))
        # Global token ids (the range check of the merge), and as indices into this rank's vocabulary shard
        # under `shards` (`kdops.parallel.VocabShards`: then `vocab` is the shard's width).
        # With `parts` the forward reads the labels for the cross-entropy even at hard = 0.
        self.parts = parts
        self.reads_labels = 1.0 if hard > 0 or (parts and labels is not None) else 0.0
        self.global_labels = flat_labels(labels, self.reads_labels)
        self.labels = self.global_labels if shards is None else shards.local_labels(self.global_labels)
        self.shards = shards
        self.budget = budget
        self.device = hs.device

    def width(self, grad_dtypes=(), held: int = 0) -> int:
        """Columns per slice: the budget (the whole extra memory, when the user gave one) less `held` bytes."""
        budget = None if self.budget is None else self.budget - held
        return slice_width(self.n_rows, self.vocab, self.acc_dtype, grad_dtypes, budget)

    def slices(self, width: int):
        return [(start, min(self.vocab, start + width)) for start in range(0, self.vocab, width)]

    def _operands(self):
        """Per side, for one pass: (the lm_head, its hidden states as a [rows, H] matrix in the matmul dtype).
        Made anew per pass, so that no upcast copy (off CUDA, or mixed dtypes) lives from forward to backward."""
        sides = [LMHead(h, w, b, self.vocab, self.acc_dtype) for h, w, b in zip(self.hidden, self.weights, self.biases)]
        return [(side, side.rows(0, self.n_rows).to(side.mm_dtype)) for side in sides]

    def _logits(self, operands, start: int, end: int, buffers, rows=None):
        """Both models' float32 logits over columns [start, end) of every row (or of `rows`, a slice), in the
        (reused) buffers."""
        out = []
        for (side, hidden), buffer in zip(operands, buffers):
            h = hidden if rows is None else hidden[rows]
            z = _contiguous(buffer, h.shape[0], end - start)
            mm_into(h, side.mm_weight[start:end].t(), z)
            if side.bias is not None:
                z += side.bias[start:end]
            out.append(z)
        return out

    def _buffers(self, rows: int, width: int):
        return [torch.empty((rows, width), dtype=self.acc_dtype, device=self.device) for _ in range(2)]

    def forward(self):
        """Per-row losses [rows] and statistics [rows, NUM_STATS]: per chunk of at most FORWARD_ROWS rows, each
        slice's partial state, then their merge (so that the partial states, [rows, slices, NUM_PARTIAL], stay
        bounded whatever the number of rows)."""
        tl = kernel_modules().tl
        constexprs = logits_constexprs(self.canon, self.reads_labels,
                                       tl.float64 if self.acc_dtype == torch.float64 else tl.float32)
        parts = self.row_parts is not None
        num_stats = kernel_modules().logits.NUM_STATS.value
        loss = torch.empty((self.n_rows,), dtype=self.acc_dtype, device=self.device)
        stats = torch.empty((self.n_rows, num_stats), dtype=self.acc_dtype, device=self.device)
        operands = self._operands() if self.n_rows else None
        chunk = min(self.n_rows, FORWARD_ROWS)
        width = slice_width(chunk, self.vocab, self.acc_dtype, (), self.budget)
        slices = self.slices(width)
        buffers = self._buffers(chunk, width) if self.n_rows else None
        vocab = self.vocab if self.shards is None else self.shards.vocab
        for r0 in range(0, self.n_rows, max(chunk, 1)):  # under `shards`, every rank has the same rows and chunks
            rows = slice(r0, min(self.n_rows, r0 + chunk))
            labels, local = (None, None) if self.labels is None else (self.global_labels[rows], self.labels[rows])
            loss[rows], stats[rows], *row_parts = staged_forward(
                self._partials(operands, rows, local, slices, buffers), rows.stop - r0, len(slices), self.canon,
                self.soft, self.hard, labels, vocab, constexprs, self.device, self.shards, parts)
            if parts:
                self.row_parts[rows] = row_parts[0]
        return loss, [stats]

    def _partials(self, operands, rows: slice, labels, slices, buffers):
        """`staged_forward`'s launch_pass for a chunk of rows: slice by slice, the logits and their partial state
        (the kernels' stage for a vocabulary shard) into partial[:, slice]."""
        logits_kernels = kernel_modules().logits
        n_rows = rows.stop - rows.start

        def launch_pass(second, partial, stats, entropy=None):
            part = torch.empty((n_rows, 1, partial.shape[2]), dtype=partial.dtype, device=self.device)
            part_entropy = None if entropy is None else torch.empty((n_rows, 6), dtype=partial.dtype,
                                                                    device=self.device)
            stage = logits_kernels.SECOND_PARTIAL if second else logits_kernels.FIRST_PARTIAL
            for j, (start, end) in enumerate(slices):
                s, t = self._logits(operands, start, end, buffers, rows)
                s, t, local, args, constexprs, two_pass = logits_args(
                    s, t, labels, self.canon, self.inv_temp, self.soft, self.hard, VocabSlice(start, end), self.parts)
                config = logits_config(n_rows, end - start, targets.of_device(self.device),
                                       self.acc_dtype, self.canon.transform, forward=True)
                launch(logits_kernels.kd_logits_forward_kernel, (cdiv(n_rows, config["BLOCK_R"]),), s, t,
                       stats if local is None else local, stats, stats, part,
                       stats if part_entropy is None else part_entropy, n_rows, *args, TWO_PASS=two_pass, STAGE=stage,
                       PARTS=part_entropy is not None, **constexprs, **config)
                partial[:, j] = part[:, 0]
                if entropy is not None:
                    entropy[:, j] = part_entropy

        return launch_pass

    def backward(self, saved, row_scale, needs):
        """Gradients (hs, ws, bs, ht, wt, bt) of Σ_r row_scale[r]·loss[r], slice by slice."""
        (stats,) = saved
        grads = LMHeadGrads.both(self.hidden, self.weights, self.biases, self.n_rows, needs, self.dot_dtypes,
                                 self.acc_dtype)
        if self.n_rows == 0 or not any(g.any for g in grads):
            return tuple(x for g in grads for x in g.results())
        sums = sum(g.hidden_sums.numel() * g.hidden_sums.element_size() for g in grads
                   if g.hidden_sums is not None and g.hidden_sums is not g.grad_h)
        width = self.width([g.dot for g in grads if g.any], sums)
        logits_buffers = self._buffers(self.n_rows, width)
        grad_buffers = [torch.empty((self.n_rows, width), dtype=g.dot, device=self.device) if g.any else None
                        for g in grads]
        row_scale = row_scale.contiguous()
        operands = self._operands()
        for start, end in self.slices(width):
            s, t = self._logits(operands, start, end, logits_buffers)
            outs = [None if b is None else _contiguous(b, self.n_rows, end - start) for b in grad_buffers]
            logits_backward(s, t, self.labels, stats, row_scale, self.canon, self.inv_temp, grads[0].any,
                            grads[1].any, self.soft, self.hard, out_s=outs[0], out_t=outs[1],
                            shards=VocabSlice(start, end))
            with float32_sums():
                for g, out in zip(grads, outs):
                    if g.any:
                        g.add_slice(out, start, end)
        if self.shards is not None:  # this rank's part of a sum over the vocabulary: summed in float32
            self.shards.reduce_hidden(grads[0].hidden_sums, grads[1].hidden_sums)
        return tuple(x for g in grads for x in g.results())
