"""The dense-teacher losses: `kd_loss` on logits that exist, `fused_linear_kd_loss` from hidden states and lm_head
weights. Each validates its arguments and describes the call once (`kdops.problem`), then runs the path the
description names (`kdops.paths`)."""

from __future__ import annotations

import torch

from . import paths
from .divergences import Divergence
from .ensemble import TeacherMix
from .parallel import VocabParallel
from .problem import LossParts, describe_fused_linear, describe_kd_loss


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str | Divergence = "forward_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    backend: str = "auto",
    vocab_parallel: VocabParallel | None = None,
    teacher_mix: TeacherMix | None = None,
    weights: torch.Tensor | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
    """Distillation loss between student and teacher logits of shape [..., V], in float32.

    Per row, ℓ = D(softmax(teacher / T), softmax(student / T)) for the chosen divergence (a name or a
    `kdops.Divergence`); rows whose label equals `ignore_index` are left out. `reduction`: "batchmean"
    (mean over valid rows, or Σ / num_items_in_batch), "sum", or "none" (per-row, 0 where ignored).
    The loss is not multiplied by T². Gradients flow to the student logits, and to the teacher logits
    when they require grad; they are returned in each input's dtype.

    `backend`: "triton" (vocabulary-blocked kernels: extra memory O(rows)), "torch" (the torch math
    chunked over rows: extra memory bounded by `kdops.paths.torch_engine.BUDGET_BYTES`), "auto" (Triton on
    CUDA, torch elsewhere).

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the logits are this rank's shard
    [..., stop − start] of the vocabulary (see `kdops.parallel`): the loss is the whole vocabulary's, the
    same on every rank, and each rank's gradient is that of its shard.

    `teacher_mix`: with a sequence of teachers' logits (each [..., V]), `kdops.Ensemble(weights)` (the target is
    Σ w_i softmax(z_i / T)) or `kdops.LogitSum(weights)` (softmax(Σ w_i z_i / T)); see `kdops.ensemble`. Rows go
    in chunks (`kdops.paths.torch_engine.BUDGET_BYTES`), the mix recomputed in the backward; not with
    `vocab_parallel`, and eager under torch.compile (a graph break).

    `weights`: per-row loss weights, a floating-point tensor of the labels' (leading) shape, signed values allowed,
    constants (no gradient): each row's loss (soft and hard terms) is multiplied by w inside the same pass and its
    gradients alike; "none" gives w·ℓ per row, "sum" Σ w·ℓ, "batchmean" Σ w·ℓ / (valid rows or
    num_items_in_batch). Ignored rows stay 0.

    `return_parts=True` returns (loss, parts), parts a `kdops.LossParts` of detached float32 per-row tensors (see
    `kdops.LossParts`), from the passes the loss makes anyway.
    """
    return paths.loss(describe_kd_loss(
        student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch, backend=backend,
        vocab_parallel=vocab_parallel, teacher_mix=teacher_mix, weights=weights, return_parts=return_parts))


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str | Divergence = "forward_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    impl: str = "auto",
    backend: str = "auto",
    memory_budget: int | None = None,
    vocab_parallel: VocabParallel | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    teacher_mix: TeacherMix | None = None,
    weights: torch.Tensor | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
    """Distillation loss from hidden states and lm_head weights, without the [tokens, V] logits in memory.

    Logits s = student_hidden · student_weightᵀ (+ student_bias) and t likewise for the teacher, over the
    shared vocabulary [0, min(Vs, Vt)) (rows of the larger weight past it are padding). Per row,

        ℓ = soft_weight · D(softmax(t / T), softmax(s / T)) + hard_weight · CE(s, label)   (CE at T = 1)

    masked and reduced like `kd_loss`. `student_softcap` / `teacher_softcap` (a model's
    `final_logit_softcapping`, e.g. Gemma 2's 30): that side's logits are c·tanh(z / c) everywhere above
    (CE included), applied to each logit tile inside the kernels, gradients through the tanh.
    Hidden states are [..., Hs] and [..., Ht] (Hs != Ht is fine),
    weights [V, H]; all logit math is float32 whatever the input dtype. Gradients flow to every input that
    requires grad, and are returned in its dtype.

    `impl`: "fused" computes the logits inside Triton kernels, vocabulary block by block (extra memory
    O(rows) statistics, float32 sums of the hidden gradients, and one vocabulary slice of the logit gradient
    for every row, at most `kdops.launchers.linear.GRADIENT_BYTES`); "chunked"
    runs matmuls on token chunks with float32 [chunk, V] logits and the kernels on logits, keeping each
    row's logit gradient in the weight's dtype for the dH and dW matmuls (extra memory about
    `memory_budget` bytes, default `kdops.paths.chunked.MEMORY_BUDGET` = 4 GiB: a larger budget means fewer
    chunks and fewer float32 weight-gradient sums; see `kdops.paths.chunked.plan`); "sliced" runs the matmuls
    on vocabulary slices for every row at once (`kdops.paths.sliced`: float32 [rows, slice] logits, the kernels
    on logits, each slice's logits computed again in the backward; extra memory: the slice's buffers, at
    most `memory_budget` less the float32 dH sums, default `kdops.paths.sliced.SLICE_BYTES` = 64 MiB, plus those
    sums and O(rows) statistics); "auto" takes "chunked" — its four matmuls are cheaper than the six of
    "sliced" and "fused" — unless a `memory_budget` was given that even its smallest plan exceeds: then
    "sliced". "epilogue" (experimental, never taken by "auto"; `pip install "kdops[quack]"`, CUDA compute
    capability 9.x or 10.x) is "chunked" whose logits GEMMs keep each row's maximum and sum of exponentials in
    their epilogue (`kdops.paths.epilogue`): for KL(teacher ‖ student), with or without the hard-label term, the
    kernels then read each float32 logit once instead of twice. `backend="torch"` (the default off CUDA) runs the
    chunked path with the torch math instead of the kernels.

    With reduction "batchmean" or "sum", the chunked paths compute the gradients during the forward
    (the backward multiplies them by the upstream gradient), so the loss supports a single backward.

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when the weights (and biases) are this
    rank's shard of the vocabulary, rows [start, stop) (rows past stop − start are padding); hidden states
    and labels (global token ids) are the same on every rank. The loss is the whole vocabulary's, the same
    on every rank; weight and bias gradients are the shard's, and the hidden-state gradients are summed over
    the group unless `VocabParallel(reduce_hidden_grad=False)` (see `kdops.parallel`).

    `teacher_mix`: with sequences `teacher_hidden`, `teacher_weight` (and `teacher_bias`, or None) of one entry
    per teacher — widths may differ, vocabularies may not — `kdops.Ensemble(weights)` or
    `kdops.LogitSum(weights)` (`kdops.ensemble`): the target is the mix of the teachers' (softcapped) logits.
    The chunked path only (every model's chunk logits; "auto" takes it, "fused" and "sliced" raise); not with
    `vocab_parallel`; eager under torch.compile (a graph break).

    `weights`, `return_parts`: as in `kdops.kd_loss` (per-row loss weights; the loss's `kdops.LossParts`).
    """
    return paths.loss(describe_fused_linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence=divergence,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, student_bias=student_bias, teacher_bias=teacher_bias,
        hard_weight=hard_weight, soft_weight=soft_weight, impl=impl, backend=backend, memory_budget=memory_budget,
        vocab_parallel=vocab_parallel, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        teacher_mix=teacher_mix, weights=weights, return_parts=return_parts))
