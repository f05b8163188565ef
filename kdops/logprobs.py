"""Log-probabilities of given tokens from hidden states and an lm_head, without the [tokens, V] logits: the
building block of on-policy distillation estimators (k1 = log p_s − log p_t of the reverse KL on sampled tokens,
k2, k3) and of RL trainers' log-prob heads, with each row's entropy beside them.

This module holds the public function and its argument checks; the path is `kdops.paths.token_logprobs`.
"""

from __future__ import annotations

import torch

from . import parallel
from ._validation import (
    check_head,
    check_ids_in_range,
    check_ignore_index,
    check_memory_budget,
    check_same_device,
    check_softcap,
    check_temperature,
    resolve_backend,
)
from .paths.token_logprobs import token_logprobs as _path


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    memory_budget: int | None = None,
    backend: str = "auto",
    vocab_parallel: parallel.VocabParallel | None = None,
):
    """log p(token) [...] of each row's `token_ids` under softmax(y), y = softcap(hidden · weightᵀ + bias) / T,
    for hidden states [..., H], an lm_head weight [V, H] (+ bias [V]) and token ids [...] (hidden's leading
    shape); float32 (float64 for float64 inputs), 0 where the id is `ignore_index`. `softcap` c: the logits are
    c·tanh(z / c) before the temperature (None: as they are). With `return_entropy=True` returns
    (log-probabilities, entropies), the entropy H = −Σ_v p_v log p_v of each row's softmax(y) (0 on ignored rows).

    Both are differentiable with respect to hidden, weight and bias (in their dtypes): ∂ log p(token)/∂y =
    onehot(token) − p and ∂H/∂y = −p·(log p + H), then / T and through the softcap. The [tokens, V] logits
    never exist: rows go in chunks whose float32 logits and temporaries take at most `memory_budget` bytes (default
    `kdops.paths.token_logprobs.TOKEN_LOGPROBS_BUDGET` = 1 GiB; at least one row per chunk), and the backward
    recomputes each chunk's logits. A 16-bit weight's gradient is summed over the chunks in a float32 [V, H]
    accumulator when there are several (outside the budget), then rounded once.

    `backend`: "triton" (one kernel reads a chunk's logits once for the log-sum-exp, entropy and token logit; one
    writes their gradient), "torch" (the torch math per chunk), "auto" (Triton on CUDA, torch elsewhere). Inside
    torch.compile the torch backend is traced (its chunks under activation checkpointing); the Triton one runs
    outside the graph. Inside torch.autocast the inputs are used as they are (float32 logits either way).

    Errors name the argument: hidden / weight / bias shapes (`kdops.fused_linear_kd_loss`'s), token_ids of
    another shape than hidden's leading dimensions or of a non-integer dtype, a non-positive temperature,
    softcap or memory_budget. On CPU tensors also ids outside [0, V) other than ignore_index; on an accelerator
    (unchecked: a device synchronization) such an id gives a NaN log-probability.

    `vocab_parallel`: a `kdops.VocabParallel(start, stop, group)` when weight (and bias) are this rank's shard of
    the vocabulary, rows [start, stop) (rows past stop − start are padding); hidden states and token ids are
    global. The log-sum-exps, entropies and token logits are combined over the group; the results are the whole
    vocabulary's on every rank, each rank's weight and bias gradients are its shard's, and hidden-state gradients
    are summed over the group (unless `reduce_hidden_grad=False`).
    """
    temperature, cap = check_token_logprobs(hidden, weight, token_ids, temperature, bias, softcap, ignore_index,
                                            return_entropy, memory_budget)
    engine = resolve_backend(backend, hidden.device)
    shards = None
    if vocab_parallel is not None:
        needs = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
        shards = parallel.resolve(vocab_parallel, width=None, weight_rows=(weight.shape[0],), rows=token_ids.numel(),
                                  device=hidden.device,
                                  options=("token_logprobs", temperature, cap, ignore_index, engine, memory_budget,
                                           return_entropy, needs))
        check_token_range(token_ids, ignore_index, shards.vocab)
    else:
        check_token_range(token_ids, ignore_index, weight.shape[0])
    out = _path(hidden, weight, bias, token_ids, ignore_index, temperature, cap, engine, memory_budget, shards)
    return (out[0], out[1]) if return_entropy else out[0]


def check_token_logprobs(hidden, weight, token_ids, temperature, bias, softcap, ignore_index, return_entropy,
                         memory_budget):
    """token_logprobs's argument checks but the ids' values (shared with `kdops.reference.token_logprobs`):
    returns (temperature, softcap) as floats (softcap None where absent)."""
    check_head("", hidden, weight, bias)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    if weight.shape[0] == 0:
        raise ValueError(f"weight: the vocabulary (first dimension) is empty, got shape {tuple(weight.shape)}")
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"token_ids: expected an integer torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids: expected an integer dtype, got {token_ids.dtype}")
    if token_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"token_ids: expected shape {tuple(hidden.shape[:-1])} (the leading dimensions of hidden), "
                         f"got {tuple(token_ids.shape)}")
    if token_ids.device != hidden.device:
        raise ValueError(f"token_ids: expected a tensor on {hidden.device} (where hidden is), got one on "
                         f"{token_ids.device}")
    check_ignore_index(ignore_index)
    temperature = check_temperature(temperature)
    cap = check_softcap("softcap", softcap)
    check_memory_budget(memory_budget)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    return temperature, cap


def check_token_range(token_ids: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Ids other than ignore_index must index the vocabulary [0, vocab) (`check_ids_in_range`); on an accelerator
    such an id gives a NaN log-probability instead."""
    check_ids_in_range("token_ids", token_ids, ignore_index, vocab, "the vocabulary of the weight")
