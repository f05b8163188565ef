"""The torch engine: the plain-PyTorch math (`kdops.torch_math`) as the paths run it where the Triton kernels do not
(backend="torch", the default off CUDA) — rows in chunks whose float32 temporaries stay within a budget, and over a
vocabulary-parallel group, where each rank holds a shard of the logits and the log-softmax normalizers are
all-reduced inside autograd (`log_softmax_across`).

The forward runs the per-row math chunk by chunk without a graph; the backward recomputes each chunk under autograd
and writes its slice of the gradient (`kdops._autograd.ChunkedRowsFunction`). Peak extra memory is one chunk's
float32 temporaries, never proportional to the batch.
"""

from __future__ import annotations

import torch

from .._autograd import ChunkedRowsFunction
from ..divergences import Divergence
from ..parallel import VocabShards
from ..torch_math import CANONICAL, compute_dtype, divergence_rows, entropy_of, loss_logits, loss_parts_rows

#: Default budget for one chunk's temporaries, in bytes (`chunk_rows` sizes chunks from it).
BUDGET_BYTES = 256 * 2**20


# Upper bound on the number of [chunk, V] float32 temporaries alive at once while a chunk is recomputed
# and differentiated: the worst divergence, JSD, peaks at 14 (tests/test_memory.py checks the bound).
TEMPORARIES_PER_ELEMENT = 16


def chunk_rows(vocab_size: int, itemsize: int = 4, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that the chunk's temporaries fit in `budget_bytes` (default BUDGET_BYTES)."""
    budget = BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (vocab_size * itemsize * TEMPORARIES_PER_ELEMENT))


def chunked_kd_rows(student, teacher, mask, divergence: Divergence, temperature: float, shards=None):
    """The torch backend of `kd_loss` on 2-D logits: the per-row divergence of the torch math, chunk by chunk
    (`ChunkedRowsFunction`). Under vocabulary parallelism each chunk communicates: every rank sizes them for
    the widest shard."""
    width = student.shape[1] if shards is None else shards.max_width
    chunk = chunk_rows(width, itemsize=max(4, student.element_size()))
    return ChunkedRowsFunction.apply(lambda s, t: _rows(divergence, s, t, temperature, shards), chunk, mask,
                                     student, teacher)


def _rows(divergence: Divergence, student, teacher, temperature: float, shards):
    """The per-row divergence of the torch math, over the group's vocabulary under `shards`."""
    if shards is None:
        return divergence_rows(divergence, student, teacher, temperature)
    return vocab_parallel_rows(shards, student, teacher, None, divergence, temperature)


def chunked_parts(student, teacher, labels, divergence: Divergence, temperature: float, softcaps=(None, None),
                  shards=None):
    """The `kdops.LossParts` of [..., V] logits per row, [rows, 4] (`parts_rows`), in row chunks within
    `BUDGET_BYTES`, without gradients: the torch engine's parts, a loop of its own over the chunks (the Triton
    kernels take them from the loss's pass instead); under `shards`, of the group's logits."""
    vocab = student.shape[-1]
    student, teacher = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    labels = None if labels is None else labels.reshape(-1)
    chunk = chunk_rows(vocab)
    return torch.cat([parts_rows(student[i:i + chunk], teacher[i:i + chunk],
                                 None if labels is None else labels[i:i + chunk], divergence, temperature, softcaps,
                                 shards)
                      for i in range(0, max(student.shape[0], 1), chunk)])


def parts_rows(student, teacher, labels, divergence: Divergence, temperature: float, softcaps=(None, None),
               shards=None) -> torch.Tensor:
    """`kdops.torch_math.loss_parts_rows` [rows, 4] of [rows, width] logits; under `shards`, this rank's shard of the
    group's: the divergence by `vocab_parallel_rows`, the entropies and the cross-entropy (labels global) as sums of
    every shard's share of −Σ p log p and of −log q(label), over the group (normalizers by `log_softmax_across`)."""
    if shards is None:
        return loss_parts_rows(divergence, student, teacher, labels, temperature, softcaps)
    with torch.no_grad():
        soft = vocab_parallel_rows(shards, student, teacher, None, divergence, temperature, softcaps=softcaps)
        c = divergence.canonical().with_softcaps(*softcaps)
        dtype = compute_dtype(student, teacher)
        student, target = loss_logits(c, student.to(dtype), teacher.to(dtype))
        log_q, log_p, log_q1 = log_softmax_across(shards, student / temperature, target / temperature, student)
        hard = torch.zeros_like(soft)
        if labels is not None:
            local = shards.local_labels(labels)
            here = local >= 0
            hard = -torch.where(here, log_q1.gather(-1, torch.where(here, local, 0)[:, None]).squeeze(-1), 0.0)
        shares = torch.stack([hard, entropy_of(log_q), entropy_of(log_p)], dim=-1)
        return torch.cat([soft[:, None], shards.all_reduce_sum(shares.contiguous())], dim=-1)


class _SumOverGroup(torch.autograd.Function):
    """Σ over the ranks of a per-rank quantity that every rank then uses in its own way: the gradient of
    each rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x, shards: VocabShards):
        ctx.shards = shards
        return shards.all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return ctx.shards.all_reduce_sum(grad.contiguous().clone()), None


class _LossOverGroup(torch.autograd.Function):
    """Σ over the ranks of their shares of the loss: every rank holds the same loss and receives the same
    upstream gradient, which is its share's gradient as it is."""

    @staticmethod
    def forward(ctx, x, shards: VocabShards):
        return shards.all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def log_softmax_across(shards: VocabShards, *logits: torch.Tensor):
    """log-softmax over the whole vocabulary of each [rows, width] shard of logits, with one all-reduce MAX
    (the stabilizing shifts, outside autograd) and one all-reduce SUM (the normalizers) for all of them."""
    with torch.no_grad():
        shift = torch.stack([z.amax(-1) for z in logits], -1)
        shards.all_reduce_max(shift)
        shift = torch.where(shift == float("-inf"), 0.0, shift)
    sums = torch.stack([(z - shift[:, i, None]).exp().sum(-1) for i, z in enumerate(logits)], -1)
    log_norm = _SumOverGroup.apply(sums, shards).log() + shift
    return [z - log_norm[:, i, None] for i, z in enumerate(logits)]


def vocab_parallel_rows(shards: VocabShards, student, teacher, labels, divergence: Divergence, temperature: float,
                        soft_weight: float = 1.0, hard_weight: float = 0.0, softcaps=(None, None)) -> torch.Tensor:
    """Per-row soft·D(teacher ‖ student at T) + hard·CE(student, label) [rows] of this rank's shard of the
    logits [rows, width]: the same for every rank of the group, differentiable with respect to the shard.
    Every canonical divergence is a sum over the vocabulary of terms of (log p, log q), so each rank sums its
    shard's terms and the shares add up; CE is −log q(label), from the shard that holds the label."""
    c = divergence.canonical().with_softcaps(*softcaps)
    dtype = compute_dtype(student, teacher)
    student, teacher = loss_logits(c, student.to(dtype), teacher.to(dtype))
    hard = hard_weight > 0
    scaled = [student / temperature, teacher / temperature] + ([student] if hard else [])
    log_q, log_p, *log_q1 = log_softmax_across(shards, *scaled)
    if c.student_is_p:
        log_p, log_q = log_q, log_p
    share = soft_weight * CANONICAL[c.kind](log_p, log_q, c)
    if hard:
        local = shards.local_labels(labels)
        here = local >= 0
        picked = log_q1[0].gather(-1, torch.where(here, local, 0)[:, None]).squeeze(-1)
        share = share - hard_weight * torch.where(here, picked, 0.0)
    return _LossOverGroup.apply(share, shards)
