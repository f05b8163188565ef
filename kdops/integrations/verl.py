"""verl 0.9.1's distillation losses computed by kdops: drop-ins with verl's arguments and returns.

verl's on-policy distillation (`distillation.distillation_loss.loss_mode`) has two kinds of loss:

* "forward_kl_topk": a forward KL on the teacher's top-k log-probabilities, computed from the student's
  logits while they exist (verl's "logits processor"), by
  `verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk(student_logits, teacher_topk_log_probs,
  teacher_topk_ids, config, data_format)` for the FSDP, FSDP2 and VeOmni strategies and by a Megatron
  function of the same signature for tensor-parallel vocabularies. Here: `compute_forward_kl_topk`, the FSDP
  function's values and gradients from `kdops.topk_kd_loss`, without verl's [tokens, V] log-softmax.
* "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3": single-sample estimators of the reverse KL on the
  student's sampled tokens, `verl.trainer.ppo.core_algos.kl_penalty(logprob, ref_logprob, kl_penalty)` and
  `kl_penalty_forward` (the same three arguments). Here: `kl_penalty` and `kl_penalty_forward`, elementwise
  on the two [batch, response] log-probabilities. verl 0.9.1 has no full-vocabulary variant ("full" raises
  NotImplementedError there and here); the exact reverse KL over the vocabulary is
  `kdops.kd_loss(..., divergence="reverse_kl")`.

verl picks the top-k function by strategy at each call, as an attribute of its module, so

    import kdops.integrations.verl
    kdops.integrations.verl.patch()          # verl's FSDP / VeOmni top-k loss is kdops' from here on

makes every "forward_kl_topk" step of an FSDP, FSDP2 or VeOmni run in this process use kdops
(`unpatch()` puts verl's back). verl computes its losses in its Ray worker processes: the patch must run in
each of them, e.g. from a module of yours that calls it, named in the environment variable
VERL_USE_EXTERNAL_MODULES (which verl imports in every process that imports verl). The Megatron strategy
(vocabulary shards over a tensor-parallel group) keeps verl's own function, and so does VeOmni's fused
lm_head kernel where it computes the top-k loss itself. The estimators are not patched: they are a few
elementwise operations on log-probabilities that verl's engine has already computed.

`patch(tail="bucket")` switches the objective instead of reproducing it: the teacher's top-k plus one
bucket holding the rest of each side's mass (`kdops.topk`), a true KL between distributions over k + 1
outcomes — never negative, and with the student's mass outside the teacher's top-k in the loss. It is the
objective proposed for verl as "forward_kl_topk_tail" (verl issue #7856, pull request #7855), which computes
the student's tail as 1 − Σ q_i with a clamp; kdops sums the tail over its own tokens, exact however small.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys

import torch

from ..topk import topk_kd_loss

__all__ = ["compute_forward_kl_topk", "kl_penalty", "kl_penalty_forward", "patch", "unpatch", "VERL_VERSION"]

VERL_VERSION = "0.9.1"  # the verl release whose functions these reproduce (tests/test_verl_integration.py)
IGNORE_INDEX = -100
# Bytes of float32 logits per chunk of the no-grad pass that reads log q at the teacher's ids.
LOGSUMEXP_BUDGET = 256 << 20

_FSDP_LOSSES = "verl.trainer.distillation.fsdp.losses"
_TAILS = (None, "bucket")
_replaced = {}  # verl's function, while patched


def compute_forward_kl_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format="thd",
                            *, tail=None, backend="auto"):
    """verl's FSDP top-k forward KL (`verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk`, 0.9.1):
    the same arguments, the same dict of per-token tensors, the loss's value and gradient computed by
    `kdops.topk_kd_loss`.

    `student_logits` [B, T, V] (verl passes the packed tokens as [1, tokens, V], already divided by the
    temperature); `teacher_topk_log_probs` and `teacher_topk_ids` [B, T, k], nested (jagged, as verl passes
    them: their values are the packed tokens) or plain; `config` verl's `DistillationConfig`, of which
    `distillation_loss.log_prob_min_clamp` c (None: no clamp) is read; `data_format` is unused, as in verl's.

    Per token, with S the teacher's k ids, q = softmax(student_logits) over the whole vocabulary and
    p̃_i = exp(max(lp_i, c)) (the teacher's log-probabilities clamped from below):

        ℓ = Σ_{i ∈ S} p̃_i · (log p̃_i − max(log q_i, c))

    This is not a divergence (neither side sums to 1 over S, so ℓ can be negative; verl's loss function then
    clamps it at 0). With A = {i ∈ S : log q_i ≥ c} (the ids whose student log-probability is not clamped, the
    only ones with a gradient) and m_A = Σ_A p̃_i, it is exactly

        ℓ = m_A · (KL(P̂ ‖ Q) + log m_A) + Σ_{i ∈ S∖A} p̃_i · (log p̃_i − c),    P̂ = p̃ / m_A on A, 0 elsewhere

    where KL(P̂ ‖ Q) against the student's whole distribution is `kdops.topk_kd_loss(..., tail="zero")` with
    the teacher's entries outside A absent: its gradient, scaled by m_A, is verl's, m_A · q_j − p̃_j · [j ∈ A].
    (tail="bucket" would add the bucket term of the rest of the mass, which verl 0.9.1 does not have;
    tail="renormalize" renormalizes q over the ids, which changes the gradient.) A token with A empty has no
    gradient and ℓ = Σ_S p̃_i (log p̃_i − c). A is known before the loss from a no-grad pass over the logits
    (a float32 log-sum-exp in chunks of at most `LOGSUMEXP_BUDGET` bytes), which also gives the diagnostics.

    Returns verl's dict of [B, T] tensors: "distillation_losses" (float32, the only one with a gradient),
    "student_mass" Σ_S q_i (in the logits' dtype), "teacher_mass" Σ_S exp(lp_i) (unclamped, in the teacher's
    dtype), "overlap_count" (int64: how many of S are among the student's k most likely tokens) and
    "overlap_token_advantage" (float32, float64 for float64 logits: the mean of −p̃_i (log p̃_i − max(log q_i, c))
    over those, 0 where none). verl's FSDP function leaves its diagnostics attached to the graph and only logs
    them (its Megatron function marks them non-differentiable); here they carry no gradient.

    Memory: verl's default path keeps the [tokens, V] log-softmax in the logits' dtype for its backward;
    kdops keeps O(tokens · k) and writes the gradient once. Differences from verl's numbers: everything is
    computed in float32 (verl's default path takes the log-softmax in the logits' dtype, so with bfloat16
    logits its log q carries bfloat16 rounding); an absent teacher entry (log-probability −inf) without a
    clamp contributes 0 where verl's gives NaN. An id listed twice in a teacher row is an error on CPU tensors
    (`kdops.topk_kd_loss`' check; teacher engines list each id once). The config's `use_chunked_topk` and
    `chunked_topk_chunk_size` are not read: no [tokens, V] tensor is made either way.

    Keyword-only, beyond verl's arguments: `backend` as in `kdops.topk_kd_loss`; `tail="bucket"` computes the
    tail-bucket KL of the module docstring instead (`kdops.topk_kd_loss(tail="bucket")` on the unclamped
    log-probabilities: finite and ≥ 0 without a clamp, so `log_prob_min_clamp` does not enter the loss; the
    diagnostics are verl's as above).
    """
    _check_tail(tail)
    teacher_lp = _packed(teacher_topk_log_probs)
    teacher_ids = _packed(teacher_topk_ids)
    if teacher_lp.shape[:2] != student_logits.shape[:2] or teacher_ids.shape[:2] != student_logits.shape[:2]:
        shapes = [list(t.shape) for t in (teacher_ids, teacher_lp, student_logits)]
        raise ValueError(f"teacher_topk_ids, teacher_topk_log_probs: expected the tokens [B, T] of student_logits, "
                         f"got shapes (ids, log-probs, logits) {shapes}")
    clamp = config.distillation_loss.log_prob_min_clamp

    log_q = _student_logprobs(student_logits, teacher_ids)  # no grad, float32 (float64 for float64 logits)
    student_mass = log_q.exp().sum(-1).to(student_logits.dtype)
    teacher_mass = teacher_lp.exp().sum(-1)
    lp = teacher_lp.float()
    if clamp is not None:
        lp = lp.clamp_min(clamp)
        active = log_q >= clamp  # torch's clamp_min passes the gradient where x ≥ c
        log_q_clamped = log_q.clamp_min(clamp)
    else:
        active = torch.ones_like(log_q, dtype=torch.bool)
        log_q_clamped = log_q
    p = lp.exp()

    if tail is None:
        losses = _truncated_kl(student_logits, teacher_ids, lp, p, active, clamp, backend)
    else:
        losses = topk_kd_loss(student_logits, teacher_ids, teacher_lp, divergence="forward_kl", tail=tail,
                              reduction="none", backend=backend)

    # verl's diagnostics (the overlap of the two top-k, arXiv:2604.13016), from the clamped terms. Membership
    # by a search in the student's sorted ids: O(tokens · k) memory where an all-pairs test takes O(tokens · k²).
    k = teacher_ids.shape[-1]
    student_ids = torch.topk(student_logits.detach(), k=k, dim=-1).indices.sort(-1).values
    teacher_ids = teacher_ids.to(student_ids.dtype).contiguous()
    found = torch.searchsorted(student_ids, teacher_ids).clamp_max(k - 1)
    overlap = student_ids.gather(-1, found) == teacher_ids
    overlap_count = overlap.sum(-1)
    token_terms = torch.where(p > 0, p * (lp - log_q_clamped), 0.0)  # an absent teacher entry: 0
    advantage = (-token_terms * overlap).sum(-1) / overlap_count.clamp_min(1)
    advantage = torch.where(overlap_count > 0, advantage, torch.zeros_like(advantage))
    return {
        "distillation_losses": losses.float(),
        "student_mass": student_mass,
        "teacher_mass": teacher_mass,
        "overlap_count": overlap_count,
        "overlap_token_advantage": advantage.to(torch.promote_types(teacher_lp.dtype, student_logits.dtype)),
    }


def _check_tail(tail):
    if tail not in _TAILS:
        raise ValueError(f"tail: expected None (verl 0.9.1's truncated KL) or 'bucket', got {tail!r}")


def _truncated_kl(student_logits, teacher_ids, lp, p, active, clamp, backend):
    """verl 0.9.1's ℓ per token from the kdops loss on A (see `compute_forward_kl_topk`)."""
    mass = (p * active).sum(-1)
    # Tokens with A empty: no teacher entry left for kdops, so the row is masked out (ℓ_kdops = 0).
    labels = torch.where(mass > 0, 0, IGNORE_INDEX)
    kl = topk_kd_loss(student_logits, teacher_ids, lp.masked_fill(~active, -math.inf), labels,
                      divergence="forward_kl", tail="zero", ignore_index=IGNORE_INDEX, reduction="none",
                      backend=backend)
    losses = mass.to(kl.dtype) * kl + torch.xlogy(mass, mass).to(kl.dtype)
    if clamp is not None:
        losses = losses + torch.where(active, 0.0, p * (lp - clamp)).sum(-1).to(kl.dtype)
    return losses


def _packed(tensor):
    """verl's nested [B, jagged T, k] tensors as its packed [1, tokens, k] (this rank's part of the tokens under
    sequence parallelism, as verl slices them); plain tensors as they are (already the student's tokens)."""
    if tensor.is_nested:
        return _sequence_parallel_slice(tensor.values().unsqueeze(0))
    return tensor


def _sequence_parallel_slice(tensor):
    """This rank's part of the tokens under verl's Ulysses sequence parallelism (all of them without it).
    verl's group lives in verl.utils.ulysses: where that module was never imported there is none."""
    ulysses = sys.modules.get("verl.utils.ulysses")
    if ulysses is not None and ulysses.get_ulysses_sequence_parallel_world_size() > 1:
        return ulysses.slice_input_tensor(tensor, dim=1)
    return tensor


@torch.no_grad()
def _student_logprobs(logits, ids):
    """log softmax(logits) at ids [..., k], float32 (float64 for float64 logits), rows in chunks of at most
    `LOGSUMEXP_BUDGET` bytes of upcast logits."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab, k = logits.shape[-1], ids.shape[-1]
    flat, flat_ids = logits.reshape(-1, vocab), ids.reshape(-1, k).long()
    out = torch.empty(flat_ids.shape, dtype=dtype, device=logits.device)
    step = max(1, LOGSUMEXP_BUDGET // (vocab * 4))
    for start in range(0, flat.shape[0], step):
        chunk = flat[start:start + step].to(dtype)
        out[start:start + step] = chunk.gather(-1, flat_ids[start:start + step]) - chunk.logsumexp(-1, True)
    return out.reshape(ids.shape)


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """verl's single-sample KL estimators (`verl.trainer.ppo.core_algos.kl_penalty_forward`, 0.9.1), elementwise
    on the student's log-probability log q(x) (`logprob`) and the teacher's log p(x) (`ref_logprob`) of the
    sampled tokens x ~ q, d = log q − log p (J. Schulman, "Approximating KL divergence", 2020):

        "kl", "k1"            d                      (unbiased for KL(q ‖ p), can be negative)
        "abs"                 |d|
        "mse", "k2"           d² / 2
        "low_var_kl", "k3"    clamp(e^r − r − 1, −10, 10),  r = clamp(−d, −20, 20)   (unbiased, ≥ 0)

    k3 is written e^r − 1 − r = expm1(r) − r (no cancellation for small r); the clamps are verl's, with torch's
    gradients (zero outside them). "full" raises NotImplementedError, as verl's: the exact KL over the
    vocabulary is `kdops.kd_loss(..., divergence="reverse_kl")` on the logits.
    """
    d = logprob - ref_logprob
    if kl_penalty in ("kl", "k1"):
        return d
    if kl_penalty == "abs":
        return d.abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * d.square()
    if kl_penalty in ("low_var_kl", "k3"):
        r = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.expm1(r) - r, min=-10, max=10)
    if kl_penalty == "full":
        raise NotImplementedError(
            "kl_penalty: 'full' needs every token's log-probability; verl 0.9.1 does not implement it either: "
            "use kdops.kd_loss(student_logits, teacher_logits, divergence='reverse_kl')")
    raise NotImplementedError(
        f"kl_penalty: expected 'kl', 'k1', 'abs', 'mse', 'k2', 'low_var_kl' or 'k3' (with '+' for the k2 "
        f"gradient), got {kl_penalty!r}")


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's `verl.trainer.ppo.core_algos.kl_penalty` (0.9.1): `kl_penalty_forward`'s estimate, and with a
    trailing "+" (e.g. "k3+") the same value with the gradient of k2 = d² / 2 (straight-through: k1 and k3 are
    unbiased estimates of the KL but their gradients are not of its gradient; k2's is):

        value(name) + (k2 − sg(k2)) − sg(value(name))        sg: no gradient
    """
    name = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    value = kl_penalty_forward(logprob, ref_logprob, name)
    if name == kl_penalty or name in ("mse", "k2"):
        return value
    k2 = 0.5 * (logprob - ref_logprob).square()
    return k2 - k2.detach() + value.detach()


def patch(*, tail=None, backend="auto"):
    """Replace verl's FSDP / FSDP2 / VeOmni top-k loss (`verl.trainer.distillation.fsdp.losses.
    compute_forward_kl_topk`, read by verl at each step) with `compute_forward_kl_topk` in this process, with
    these keywords (`tail="bucket"`: the tail-bucket KL instead of verl's objective). Patching again replaces
    the keywords; `unpatch()` restores verl's function. Imports verl's module (and so verl)."""
    _check_tail(tail)
    module = importlib.import_module(_FSDP_LOSSES)
    _replaced.setdefault(_FSDP_LOSSES, module.compute_forward_kl_topk)
    replacement = functools.partial(compute_forward_kl_topk, tail=tail, backend=backend)
    module.compute_forward_kl_topk = functools.update_wrapper(replacement, compute_forward_kl_topk)


def unpatch():
    """Put verl's own top-k loss back (nothing to do if `patch` was not called)."""
    original = _replaced.pop(_FSDP_LOSSES, None)
    if original is not None:
        sys.modules[_FSDP_LOSSES].compute_forward_kl_topk = original
