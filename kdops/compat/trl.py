"""TRL: `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd, TRL ≥ 0.16 conventions), the chunked loss of
TRL 1.16's `DistillationTrainer` (`trl.trainer.distillation_trainer._chunked_divergence_loss`), and the sparse-teacher
losses of TRL 1.16's `trl.experimental.server_distillation.ServerDistillationTrainer` and
`trl.experimental.iw_opd.IWOPDTrainer` (a teacher server's top-k log-probabilities, `loss_top_k` /
`loss_add_tail`, the top-1 support of β > 0, and the importance-weighted on-policy objective) on
`kdops.topk_kd_loss`.

TRL's `loss_add_tail=True` is kdops' tail="bucket" and `loss_add_tail=False` its tail="renormalize": the same
divergence between the same k + 1 (k) outcomes. Where they can differ: TRL builds a tail's log-mass as
log(1 − exp(min(logsumexp(lp), −1e-7))), so a tail is never below 1 − e^(−1e-7) ≈ 1e-7 (no gradient through that
floor), and the student's is 1 − Σ q_ids in the log-probabilities' dtype (cancellation: in float32 a tail of
1e-4 keeps about 3 digits); kdops sums the student's tail over the complement of the ids and the teacher's
1 − Σp in float64, exact to their own size. The two agree to rounding wherever Σp and Σ q_ids ≤ 1 − 1e-7. A
teacher log-probability of −inf inside the support is, for kdops, an absent entry (the student's mass there joins its
tail), where TRL keeps an outcome of p = 0 (infinite for reverse KL): only a local teacher's −inf logits reach that
(the server paths drop or reject such entries). The losses are float32 (float64 for float64 inputs) whatever the
dtype of the log-probabilities TRL passes, which TRL's own keep (bfloat16 for a bfloat16 model).
"""

from __future__ import annotations

import math

import torch

from ..api import fused_linear_kd_loss, kd_loss
from .._validation import check_choice
from ..divergences import GeneralizedJSD, ReverseKL
from ..torch_math import kl_terms, log_mix
from ..topk import topk_kd_loss

IGNORE_INDEX = -100  # TRL's, fixed

__all__ = ["generalized_jsd_loss", "chunked_divergence_loss", "student_entropy_sum", "server_forward_kl_loss",
           "sparse_top_1_divergence_loss", "server_sparse_top_1_divergence_loss",
           "local_sparse_top_1_divergence_loss", "topk_generalized_jsd_loss", "iw_opd_advantages", "iw_opd_loss"]


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's generalized JSD: β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = βp + (1 − β)q (β = 0: KL(p ‖ q),
    β = 1: KL(q ‖ p)) over logits / T, tokens whose label is -100 left out, then

    * `num_items_in_batch` given: Σ / num_items_in_batch, whatever the reduction;
    * "batchmean": Σ / max(#valid tokens, 1) with labels, Σ / max(first dim, 1) without (the batch);
    * "sum": Σ; "mean": Σ / (#valid tokens · V) (all elements of the masked [tokens, V] terms);
    * anything else: the elementwise [..., V] terms (masked rows dropped), which are the output itself and
      so are materialized (in float32).
    """
    divergence = GeneralizedJSD(beta)
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        return _elementwise(student_logits, teacher_logits, labels, divergence, temperature)
    total = kd_loss(student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature,
                    ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    valid = None if labels is None else (labels != IGNORE_INDEX).sum()
    if reduction == "batchmean":
        return total / (valid.clamp_min(1) if valid is not None else max(student_logits.shape[0], 1))
    # "mean": torch's mean over every element, NaN when no element is left (as TRL's jsd[mask].mean())
    rows = valid if valid is not None else student_logits.numel() // student_logits.shape[-1]
    return total / (rows * student_logits.shape[-1])


def _elementwise(student_logits, teacher_logits, labels, divergence: GeneralizedJSD, temperature):
    """The per-entry terms of reduction="none", with the reference's conventions (float32)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, -1)
    beta = divergence.beta
    if beta == 0:
        terms = kl_terms(log_p, log_q)
    elif beta == 1:
        terms = kl_terms(log_q, log_p)
    else:
        log_m = log_mix(log_p, log_q, beta)
        terms = beta * kl_terms(log_p, log_m) + (1 - beta) * kl_terms(log_q, log_m)
    return terms if labels is None else terms[labels != IGNORE_INDEX]


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0, *, divergence=None):
    """A drop-in for TRL 1.16's `_chunked_divergence_loss`, same arguments and returns: over the completion
    positions (`completion_mask` != 0) of hidden states [B, K, H] and lm_heads [V, H] (+ bias), TRL's generalized
    JSD with `beta` (0: forward KL, 1: reverse KL) of the logits scale·z (softcapped c·tanh(·/c) where given)
    at `temperature`, by `kdops.fused_linear_kd_loss` — or any kdops `divergence` instead.

    Returns (loss, student-entropy sum, number of valid positions): the loss Σ / num_items_in_batch, or
    Σ / max(valid, 1) without it; the sum of the student's per-token entropy −Σ q log q at T (nats, no gradient)
    over the valid positions, from the loss's own pass (`return_parts=True`: `kdops.LossParts.student_entropy`;
    TRL runs one more pass over the student's logits for it).

    Logit scales are folded into the hidden states and biases. FSDP2's DTensor lm_head weights are gathered
    with full_tensor() and cast to the hidden states' dtype, as TRL does.
    """
    divergence = GeneralizedJSD(beta) if divergence is None else divergence
    student_lm_head_weight, student_lm_head_bias = _gathered(student_lm_head_weight, student_lm_head_bias,
                                                             student_hidden_states.dtype)
    teacher_lm_head_weight, teacher_lm_head_bias = _gathered(teacher_lm_head_weight, teacher_lm_head_bias,
                                                             teacher_hidden_states.dtype)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    h_s, b_s = _scaled(h_s, student_lm_head_bias, student_logit_scale)
    h_t, b_t = _scaled(h_t, teacher_lm_head_bias, teacher_logit_scale)
    total, parts = fused_linear_kd_loss(h_s, student_lm_head_weight, h_t, teacher_lm_head_weight,
                                        divergence=divergence, temperature=temperature, reduction="sum",
                                        student_bias=b_s, teacher_bias=b_t,
                                        student_softcap=student_final_logit_softcapping,
                                        teacher_softcap=teacher_final_logit_softcapping, impl="chunked",
                                        return_parts=True)
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    entropy_sum = parts.student_entropy.double().sum().to(parts.student_entropy.dtype)
    return loss, entropy_sum, n_valid


def student_entropy_sum(hidden, weight, bias, temperature: float, softcap=None) -> torch.Tensor:
    """Σ over the rows of −Σ_v q log q, q = softmax(softcap(h·Wᵀ + b) / T), without the logits: reverse KL to the
    uniform distribution over V (a teacher whose logits are all 0), H = log V − KL(q ‖ u)."""
    vocab = weight.shape[0]
    if hidden.shape[0] == 0:
        return torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        uniform_hidden = hidden.new_zeros((hidden.shape[0], 1))
        uniform_weight = weight.new_zeros((vocab, 1))
        kl = fused_linear_kd_loss(hidden, weight, uniform_hidden, uniform_weight, divergence=ReverseKL(),
                                  temperature=temperature, reduction="none", student_bias=bias,
                                  student_softcap=softcap)
    return (math.log(vocab) - kl.double()).sum().to(kl.dtype)


def _gathered(weight, bias, dtype):
    """A DTensor lm_head (FSDP2) as one plain tensor in the hidden states' dtype (its bias gathered too)."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and isinstance(weight, dtensor):
        weight = weight.full_tensor().to(dtype)
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


def _scaled(hidden, bias, scale):
    """(scale·h, scale·b): logits scale·(h·Wᵀ + b) as an lm_head of scaled inputs."""
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


# TRL 1.16's sparse-teacher losses (trl.experimental.server_distillation, trl.experimental.iw_opd) on kdops' top-k
# loss. The trainers pass the student's log-probabilities at the temperature, log_softmax(s / T): kdops reads them as
# logits at temperature 1 (their log-softmax is themselves, to rounding); the raw logits s with temperature=T give
# the same loss without the [B, T, V] log-probabilities.

TAILS = {True: "bucket", False: "renormalize"}  # TRL's loss_add_tail → kdops' tail: the same outcomes
TOP1_MODES = ("sampled", "argmax")


def server_forward_kl_loss(teacher_result, student_log_probs, labels, loss_add_tail=True, *, temperature=1.0,
                           backend="auto"):
    """A drop-in for `_compute_server_forward_kl_loss(teacher_result, student_log_probs, labels)` of TRL 1.16's
    `ServerDistillationTrainer` and `IWOPDTrainer` (their β = 0 server path), the trainer's `loss_add_tail` an
    argument.

    `teacher_result["topk_token_ids"]`, `["topk_logprobs"]` [B, T, K]: the teacher's top K at the temperature
    (−inf: no entry, e.g. past a shorter completion's end); `student_log_probs` [B, T, V]: log_softmax(s / T) as TRL
    passes them (temperature=1), or the raw logits s with temperature=T; `labels` [B, T], -100 where no loss is
    taken. Per position, with p = exp(lp) and the student's q = softmax(s / T) over the whole vocabulary:

        loss_add_tail=True    KL((p_ids, 1 − Σp) ‖ (q_ids, Σ_{j ∉ ids} q_j))          kdops' tail="bucket"
        loss_add_tail=False   KL(p / Σp ‖ q_ids / Σ q_ids) over the ids (0 for K = 1)   kdops' tail="renormalize"

    loss = Σ over the positions whose label is not -100 / max(their number, 1) (the server path takes no
    num_items_in_batch); a position without any teacher entry counts with ℓ = 0, as in TRL. Float32 (float64 for
    float64 inputs); the gradient flows to `student_log_probs` (to the logits through TRL's log-softmax, the same
    as TRL's there; TRL's own gradient with respect to the log-probabilities themselves differs off the simplex).
    """
    counted = labels != IGNORE_INDEX
    total = _sparse_sum(student_log_probs, teacher_result["topk_token_ids"], teacher_result["topk_logprobs"],
                        counted, GeneralizedJSD(0.0), loss_add_tail, temperature, backend)
    return _per_token_mean(total, counted, None)


def sparse_top_1_divergence_loss(student_log_probs, teacher_top1_token_ids, teacher_top1_logprobs,
                                 reverse_token_ids, reverse_teacher_logprobs, labels, num_items_in_batch=None, *,
                                 beta, loss_add_tail=True, temperature=1.0, backend="auto"):
    """A drop-in for `_compute_sparse_top_1_divergence_loss` of TRL 1.16's `ServerDistillationTrainer` and
    `IWOPDTrainer` (the β > 0, top-1 loss), the trainer's `beta` and `loss_add_tail` arguments.

    Per position [B, T]: the support is the teacher's top-1 token t and the reverse-KL token x (the sampled one,
    or the student's argmax), x listed once when it is t; β = 1 takes x alone. The teacher's log-probabilities
    there (`teacher_top1_logprobs`, `reverse_teacher_logprobs`, at the temperature) against the student's q =
    softmax(s / T) (`student_log_probs` as in `server_forward_kl_loss`), TRL's generalized JSD

        ℓ = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M), M = βP + (1 − β)Q   (β = 1: KL(Q ‖ P))

    over the support plus one outcome holding the rest of each side's mass (loss_add_tail=True, kdops'
    tail="bucket"), or over the support renormalized (loss_add_tail=False, tail="renormalize"; 0 where the support
    is one token). loss = Σ over labels ≠ -100 / num_items_in_batch, or / max(their number, 1) without it.
    """
    if beta == 1:
        ids, logprobs = reverse_token_ids.unsqueeze(-1), reverse_teacher_logprobs.unsqueeze(-1)
    else:
        ids = torch.stack([teacher_top1_token_ids, reverse_token_ids], dim=-1)
        reverse = reverse_teacher_logprobs.to(teacher_top1_logprobs.dtype)
        # one outcome per token: where the sampled token is the teacher's top-1, its second listing is absent
        reverse = torch.where(reverse_token_ids == teacher_top1_token_ids, -math.inf, reverse)
        logprobs = torch.stack([teacher_top1_logprobs, reverse], dim=-1)
    counted = labels != IGNORE_INDEX
    total = _sparse_sum(student_log_probs, ids, logprobs, counted, GeneralizedJSD(beta), loss_add_tail, temperature,
                        backend)
    return _per_token_mean(total, counted, num_items_in_batch)


def server_sparse_top_1_divergence_loss(teacher_result, student_log_probs, completion_tokens, labels, *, beta,
                                        loss_add_tail=True, temperature=1.0, backend="auto"):
    """A drop-in for `_compute_server_sparse_top_1_divergence_loss(teacher_result, student_log_probs,
    completion_tokens, labels)` of TRL 1.16's `ServerDistillationTrainer` and `IWOPDTrainer` (the β > 0 server
    path; the server scores the sampled tokens, reverse_kl_top_1_mode="sampled"): `sparse_top_1_divergence_loss`
    with the teacher's top-1 (`teacher_result["topk_token_ids"]`, `["topk_logprobs"]` [B, T, 1]) and its
    log-probability of each completion token (`teacher_result["actual_logprobs"]` [B, T]), per position / max(the
    positions whose label is not -100, 1). As TRL, raises where the teacher has no finite log-probability at such
    a position (for the top-1 only when β < 1): a check of the values, one device synchronization.
    """
    counted = labels != IGNORE_INDEX
    actual = teacher_result["actual_logprobs"]
    top1_ids, top1_logprobs = teacher_result["topk_token_ids"][..., 0], teacher_result["topk_logprobs"][..., 0]
    missing, required = _missing(actual, counted)
    if missing:
        raise ValueError(f"teacher_result['actual_logprobs']: the teacher's log-probability of the sampled token is "
                         f"missing (not finite) at {missing}/{required} positions whose label is not -100")
    if beta < 1:
        missing, required = _missing(top1_logprobs, counted)
        if missing:
            raise ValueError(f"teacher_result['topk_logprobs']: the teacher's top-1 log-probability is missing (not "
                             f"finite) at {missing}/{required} positions whose label is not -100")
    return sparse_top_1_divergence_loss(student_log_probs, top1_ids, top1_logprobs, completion_tokens, actual, labels,
                                        beta=beta, loss_add_tail=loss_add_tail, temperature=temperature,
                                        backend=backend)


def local_sparse_top_1_divergence_loss(student_logits, teacher_logits, completion_tokens, labels,
                                       num_items_in_batch=None, *, beta, temperature=1.0, loss_add_tail=True,
                                       reverse_kl_top_1_mode="sampled", backend="auto"):
    """A drop-in for `IWOPDTrainer._compute_local_sparse_top_1_divergence_loss` (TRL 1.16; a local teacher with
    β > 0 and loss_top_k = 1), the trainer's `beta`, `temperature`, `loss_add_tail` and `reverse_kl_top_1_mode`
    arguments: `sparse_top_1_divergence_loss` of the student's raw logits at `temperature`, the teacher's argmax
    as its top-1 and the completion token ("sampled") or the student's argmax ("argmax") as the reverse-KL token,
    both scored by the teacher's log_softmax(teacher_logits / T) (only those two columns are formed).
    """
    check_choice("reverse_kl_top_1_mode", reverse_kl_top_1_mode, TOP1_MODES)
    with torch.no_grad():
        scaled = teacher_logits.detach() / temperature
        log_norm = torch.logsumexp(scaled, dim=-1)
        top1 = teacher_logits.argmax(dim=-1)
        reverse = completion_tokens if reverse_kl_top_1_mode == "sampled" else student_logits.detach().argmax(dim=-1)
        top1_logprobs = scaled.gather(-1, top1.unsqueeze(-1)).squeeze(-1) - log_norm
        reverse_logprobs = scaled.gather(-1, reverse.unsqueeze(-1)).squeeze(-1) - log_norm
    return sparse_top_1_divergence_loss(student_logits, top1, top1_logprobs, reverse, reverse_logprobs, labels,
                                        num_items_in_batch, beta=beta, loss_add_tail=loss_add_tail,
                                        temperature=temperature, backend=backend)


def topk_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                              reduction="batchmean", top_k=0, add_tail=True, num_items_in_batch=None, *,
                              backend="auto"):
    """A drop-in for `IWOPDTrainer.generalized_jsd_loss` (TRL 1.16, a static method; a local teacher), same
    arguments and value. With 0 < top_k < V the loss is restricted to a support of k ids per position, chosen on
    the logits / T: the teacher's top k for β = 0, the student's for β = 1, both (the teacher's, then the student's
    not already listed) for 0 < β < 1; there TRL's generalized JSD (see `sparse_top_1_divergence_loss`) of the
    teacher's and the student's log_softmax(· / T) over those ids plus a tail outcome (`add_tail`, kdops'
    tail="bucket") or renormalized over them (tail="renormalize"). top_k = 0 or ≥ V: the whole vocabulary,
    `generalized_jsd_loss`.

    Reductions as TRL's: `num_items_in_batch` given: Σ / num_items_in_batch; "batchmean": Σ / max(valid positions,
    1) with labels, Σ / max(first dimension, 1) without; "sum": Σ; "mean": Σ over the number of TRL's per-entry
    terms, valid positions × (support width + 1 with the tail), NaN without any. With top_k > 0 there are no
    per-entry terms to return: other reductions raise.
    """
    vocab = student_logits.shape[-1]
    if not 0 < top_k < vocab:
        return generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                    num_items_in_batch)
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"reduction: with 0 < top_k < V the loss has no per-entry terms to return; expected "
                         f"'batchmean', 'sum' or 'mean', got {reduction!r}")
    divergence = GeneralizedJSD(beta)  # checks β ∈ [0, 1] first
    with torch.no_grad():
        teacher = teacher_logits.detach() / temperature
        student = student_logits.detach() / temperature
        if beta == 0:
            ids = teacher.topk(top_k, dim=-1).indices
        elif beta == 1:
            ids = student.topk(top_k, dim=-1).indices
        else:
            ids = torch.cat([teacher.topk(top_k, dim=-1).indices, student.topk(top_k, dim=-1).indices], dim=-1)
        logprobs = teacher.gather(-1, ids) - torch.logsumexp(teacher, dim=-1, keepdim=True)
        if 0 < beta < 1:
            # the student's picks that the teacher listed too are one outcome, already counted
            repeated = (ids[..., top_k:, None] == ids[..., None, :top_k]).any(-1)
            logprobs[..., top_k:] = logprobs[..., top_k:].masked_fill(repeated, -math.inf)
    counted = (labels != IGNORE_INDEX if labels is not None
               else torch.ones(ids.shape[:-1], dtype=torch.bool, device=ids.device))
    total = _sparse_sum(student_logits, ids, logprobs, counted, divergence, add_tail, temperature, backend)
    if num_items_in_batch is not None or reduction == "batchmean":
        if labels is None and num_items_in_batch is None:
            return total / max(student_logits.shape[0], 1)
        return _per_token_mean(total, counted, num_items_in_batch)
    if reduction == "sum":
        return total
    return total / (counted.sum() * (ids.shape[-1] + int(bool(add_tail))))


def iw_opd_advantages(teacher_actual_logprobs, rollout_logprobs, labels, iw_opd_gamma=0.5, iw_opd_epsilon=1e-8):
    """IW-OPD's per-token advantages (TRL 1.16, `IWOPDTrainer._compute_iw_opd_loss`), [B, T], no gradient: with
    a_t = log p_teacher(x_t) − log π_rollout(x_t) (0 where the label is -100) and each sequence's absolute
    advantages ordered by position,

        w_t = 1 + γ · (1 − Σ_{u < t} |a_u| / max(Σ_u |a_u|, ε)),   A_t = w_t · a_t

    Returns (A, |a|, w), the last two as TRL logs them.
    """
    counted = labels != IGNORE_INDEX
    with torch.no_grad():
        gap = torch.where(counted, teacher_actual_logprobs, 0.0) - torch.where(counted, rollout_logprobs, 0.0)
        gap = torch.where(counted, gap, 0.0)
        size = gap.abs()
        before = size.cumsum(dim=1) - size  # Σ_{u < t} |a_u|
        whole = size.sum(dim=1, keepdim=True).clamp_min(iw_opd_epsilon)
        weights = 1.0 + iw_opd_gamma * (1.0 - before / whole)
        return weights * gap, size, weights


def iw_opd_loss(student_logits, completion_tokens, labels, teacher_actual_logprobs, rollout_logprobs=None,
                num_items_in_batch=None, *, temperature=1.0, iw_opd_gamma=0.5, iw_opd_epsilon=1e-8, backend="auto",
                return_advantages=False):
    """A drop-in for `IWOPDTrainer._compute_iw_opd_loss` (TRL 1.16, distillation_objective="iw_opd"), same tensors,
    the trainer's `temperature`, `iw_opd_gamma`, `iw_opd_epsilon` arguments:

        loss = −Σ_t A_t · log q(x_t) / (num_items_in_batch, or max(valid positions, 1))

    over the positions whose label is not -100, q = softmax(student_logits / T) [B, T, V], x the completion
    tokens [B, T], A `iw_opd_advantages` of the teacher's log-probabilities of x [B, T] and the rollout policy's
    (`rollout_logprobs`, or the student's own log q(x), detached, where None). −log q(x) is kdops' forward KL
    from a teacher certain of x (tail="bucket": P = (1, 0)) — one pass over the logits, no log-softmax tensor; with
    `rollout_logprobs` the advantages go in as kdops' per-row `weights`. As TRL, raises where the teacher has no
    finite log-probability at such a position (a check of the values: one device synchronization).

    `return_advantages=True` returns (loss, A, |a|, w) (what TRL's trainer logs).
    """
    counted = labels != IGNORE_INDEX
    missing, required = _missing(teacher_actual_logprobs, counted)
    if missing:
        raise ValueError(f"teacher_actual_logprobs: the teacher's log-probability of the sampled token is missing "
                         f"(not finite) at {missing}/{required} positions whose label is not -100; IW-OPD needs "
                         f"one for every completion token")
    ids = completion_tokens.unsqueeze(-1)
    # the teacher of −log q(x): all its mass on x (log 1 = 0); positions without a loss list nothing
    certain = torch.where(counted, 0.0, -math.inf).unsqueeze(-1)
    kd_labels = torch.where(counted, 0, IGNORE_INDEX)
    options = dict(divergence="forward_kl", temperature=temperature, tail="bucket", backend=backend)
    if rollout_logprobs is None:
        nll = topk_kd_loss(student_logits, ids, certain, kd_labels, reduction="none", **options)
        advantages, size, weights = iw_opd_advantages(teacher_actual_logprobs, -nll.detach(), labels, iw_opd_gamma,
                                                      iw_opd_epsilon)
        total = (nll * advantages.to(nll.dtype)).sum()
    else:
        advantages, size, weights = iw_opd_advantages(teacher_actual_logprobs, rollout_logprobs, labels,
                                                      iw_opd_gamma, iw_opd_epsilon)
        total = topk_kd_loss(student_logits, ids, certain, kd_labels, reduction="sum", weights=advantages, **options)
    loss = _per_token_mean(total, counted, num_items_in_batch)
    return (loss, advantages, size, weights) if return_advantages else loss


def _sparse_sum(student, ids, logprobs, counted, divergence, add_tail, temperature, backend):
    """Σ over the counted positions of kdops' top-k loss of the teacher (ids, logprobs) [..., k]."""
    # TRL fills the teacher's side where no loss is taken with placeholders (log-probabilities 0 or −inf, id 0) that
    # its mask drops afterwards; here those positions list nothing, so no placeholder is ever read or checked.
    logprobs = logprobs.masked_fill(~counted.unsqueeze(-1), -math.inf)
    # A counted position without any teacher entry is 0 in TRL (its NaNs zeroed) and stays in its denominator;
    # kdops' renormalized pair would be 0 / 0 there, so it leaves the sum (the caller's count keeps it).
    listed = counted & (logprobs != -math.inf).any(-1)
    return topk_kd_loss(student, ids.long(), logprobs, torch.where(listed, 0, IGNORE_INDEX), divergence=divergence,
                        temperature=temperature, tail=TAILS[bool(add_tail)], reduction="sum", backend=backend)


def _per_token_mean(total, counted, num_items_in_batch):
    """TRL's per-token normalization: Σ / num_items_in_batch, or Σ / max(counted positions, 1)."""
    if num_items_in_batch is None:
        return total / counted.sum().clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _missing(values, counted):
    """(positions where a loss is taken whose value is not finite, positions where a loss is taken)."""
    return int((counted & ~torch.isfinite(values)).sum()), int(counted.sum())
