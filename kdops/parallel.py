"""Vocabulary (tensor) parallelism on torch.distributed: each rank holds a contiguous shard of the vocabulary.

Megatron-style vocab-parallel lm_heads split the rows of the weight (and so the logits' last dimension)
over a process group. kdops then runs its passes on the local shard and combines the per-row state
across the group with all-reduces of O(rows) floats, so that the loss is the single-process loss:

* first pass: all-reduce MAX of the row maxima, then all-reduce SUM of the online sums re-expressed
  relative to those maxima (the log-sum-exps, the one-pass divergences' sums, the hard-label CE's sums
  and its label logit, which only the shard holding the label contributes), with a flag per max of
  whether the rank holds it (log-sums are summed as excesses over the max's 1, kernels/partials.py);
* second pass (JSD, skew KLs, TVD): all-reduce SUM of the per-row sums of normalized terms;
* backward: each rank's gradient tiles use the group's statistics, so the weight (and bias) gradient is
  local to its shard; the hidden-state gradient is a sum over the shards, all-reduced unless
  `reduce_hidden_grad=False` leaves that to the caller (e.g. a Megatron "copy to tensor-parallel region"
  whose backward already all-reduces).

Every call also all-gathers each rank's shard and call signature (a few integers) to check that the shards
tile [0, V) without gaps or overlaps and that every rank computes the same loss over the same rows; an
inconsistency raises the same ValueError on every rank instead of hanging a collective.

The torch backend runs the plain-PyTorch math on the shard, with the log-softmax normalizers all-reduced
inside autograd (`kdops.paths.torch_engine.log_softmax_across`).
"""

from __future__ import annotations

import numbers
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from .divergences import Divergence


@dataclass(frozen=True)
class VocabParallel:
    """This rank's shard [start, stop) of the shared vocabulary, over process group `group` (None: the
    default group). Labels stay global token ids.

    `vocab_size`: the size of the whole vocabulary, checked against the shards when given.
    `reduce_hidden_grad`: all-reduce (sum) the hidden-state gradients over the group (default); set False
    when the caller's own communication does it.
    """

    start: int
    stop: int
    group: Any = None
    vocab_size: int | None = None
    reduce_hidden_grad: bool = True

    def __post_init__(self):
        for name in ("start", "stop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"VocabParallel: {name} must be an int, got {type(value).__name__}")
        if not 0 <= self.start < self.stop:
            raise ValueError(f"VocabParallel: expected 0 <= start < stop, got start={self.start}, stop={self.stop}")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool)
                                            or not isinstance(self.vocab_size, numbers.Integral)
                                            or self.vocab_size < self.stop):
            raise ValueError(f"VocabParallel: vocab_size must be an int >= stop ({self.stop}), got {self.vocab_size!r}")
        if not isinstance(self.reduce_hidden_grad, bool):
            raise TypeError(f"VocabParallel: reduce_hidden_grad must be a bool, got {self.reduce_hidden_grad!r}")

    @property
    def width(self) -> int:
        return self.stop - self.start


def _dist():
    import torch.distributed as dist

    return dist


def labels_in_range(labels: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Token ids as indices into the vocabulary columns [start, stop), and −1 (no column: a kernel's tiles run
    past the range's end) for ids outside it and ignore_index; None stays None."""
    if labels is None:
        return None
    return torch.where((labels >= start) & (labels < stop), labels - start, -1)


class VocabShards:
    """A `VocabParallel` checked against the whole group: the global layout every rank agrees on, and the
    collectives of the loss."""

    def __init__(self, spec: VocabParallel, vocab: int, max_width: int):
        self.spec, self.group = spec, spec.group
        self.start, self.stop, self.width = spec.start, spec.stop, spec.width
        self.vocab, self.max_width = vocab, max_width
        self.reduce_hidden_grad = spec.reduce_hidden_grad

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=self.group)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=self.group)
        return t

    def local_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Labels as indices into this shard, and −1 for those of other shards and ignore_index."""
        return labels_in_range(labels, self.start, self.stop)

    def reduce_hidden(self, *grads):
        """Sum the shards' hidden-state gradients over the group (unless the caller asked to do it)."""
        if self.reduce_hidden_grad:
            for g in grads:
                if g is not None:
                    self.all_reduce_sum(g)
        return grads


@torch.compiler.disable  # collectives: outside any compiled graph
def resolve(spec, *, width: int, rows: int, device: torch.device, options: tuple, weight_rows=None) -> VocabShards:
    """Check `spec` on every rank of its group and return the agreed layout; raises the same ValueError on
    every rank when a shard, a width or the call itself differs.

    `width`: the local logits' last dimension (kd_loss), or None with `weight_rows` (the fused API: each
    weight needs at least stop − start rows; rows past them are padding). `options`: what every rank must
    agree on (divergence, temperature, weights...), hashed.
    """
    if not isinstance(spec, VocabParallel):
        raise TypeError(f"vocab_parallel: expected a kdops.VocabParallel or None, got {type(spec).__name__}")
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first")
    problem = 0
    if weight_rows is not None:
        width = min(weight_rows)
        problem = 2 if width < spec.width else 0
    elif width != spec.width:
        problem = 1
    signature = zlib.crc32(repr(options).encode()) & 0x7FFFFFFF
    mine = torch.tensor([spec.start, spec.stop, -1 if spec.vocab_size is None else spec.vocab_size, rows, width,
                         problem, signature], dtype=torch.int64, device=device)
    world = dist.get_world_size(spec.group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=spec.group)
    table = [tuple(int(v) for v in t.tolist()) for t in gathered]
    _check_table(table)
    vocab = max(stop for _, stop, *_ in table)
    return VocabShards(spec, vocab, max(stop - start for start, stop, *_ in table))


def _check_table(table) -> None:
    """The all-gathered (start, stop, vocab_size, rows, width, problem, signature) of each rank."""
    def fail(what: str):
        listed = ", ".join(f"rank {r}: [{start}, {stop})" for r, (start, stop, *_) in enumerate(table))
        raise ValueError(f"vocab_parallel: {what} (shards of the group: {listed})")

    for rank, (start, stop, _, _, width, problem, _) in enumerate(table):
        if problem == 1:
            fail(f"rank {rank}'s logits have {width} vocabulary entries, but its shard [{start}, {stop}) has "
                 f"{stop - start}")
        if problem == 2:
            fail(f"rank {rank}'s weights have {width} rows, fewer than its shard [{start}, {stop}) needs "
                 f"({stop - start}; rows past the shard are padding)")
    ordered = sorted(range(len(table)), key=lambda r: (table[r][0], table[r][1]))
    end = 0
    for rank in ordered:
        start, stop = table[rank][:2]
        if start > end:
            fail(f"the shards leave a gap: no rank holds [{end}, {start})")
        if start < end:
            fail(f"the shards overlap: rank {rank}'s [{start}, {stop}) overlaps [{start}, {min(end, stop)})")
        end = stop
    sizes = {vocab_size for _, _, vocab_size, *_ in table if vocab_size >= 0}
    if len(sizes) > 1 or (sizes and sizes != {end}):
        given = ", ".join(f"rank {r}: {t[2]}" for r, t in enumerate(table) if t[2] >= 0)
        fail(f"the vocabulary sizes given differ from the {end} entries the shards cover ({given})")
    if len({rows for _, _, _, rows, *_ in table}) > 1:
        listed = ", ".join(f"rank {r}: {t[3]}" for r, t in enumerate(table))
        fail(f"every rank must pass the same rows (the same tokens, labels and hidden states), got {listed} rows")
    if len({signature for *_, signature in table}) > 1:
        fail("the ranks called the loss with different options (divergence, temperature, weights, reduction, "
             "impl or backend)")


def options_of(divergence: Divergence, **options) -> tuple:
    """What the ranks of a group must agree on, in a form `resolve` hashes."""
    return (repr(divergence.canonical()), *sorted((k, repr(v)) for k, v in options.items()))
