"""Launchers of the token log-probability and entropy kernels (`kernels/token_logprobs.py`)."""

from __future__ import annotations

import torch

from .. import targets
from .common import acc_of, cdiv, empty, kernel_modules, launch, rows_of, torch_acc
from .logits import logits_config

#: Per-row statistics of the forward kernel: m, ls (lse = m + ls), the entropy H and the token's y (see the kernels).
NUM_STATS = 4


def token_logprobs_forward(logits: torch.Tensor, labels: torch.Tensor, inv_temp: float,
                           softcap: float | None = None) -> torch.Tensor:
    """Statistics [rows, NUM_STATS] (m, ls, H, y_label) of y = softcap(logits) / T for [..., V] logits, in the
    accumulation dtype; `labels` [rows] are column indices of the logits (−1: none)."""
    modules = kernel_modules()
    tl, kernels = modules.tl, modules.token_logprobs
    logits, (inner, outer, stride) = rows_of(logits)
    vocab = logits.shape[-1]
    n_rows = logits.numel() // vocab
    acc = acc_of(tl, logits)
    stats = empty((n_rows, NUM_STATS), torch_acc(acc), logits.device)
    if n_rows == 0:
        return stats
    config = logits_config(n_rows, vocab, targets.of_device(logits.device), torch_acc(acc), int(bool(softcap)),
                           forward=True)
    launch(kernels.token_logprobs_forward_kernel, (cdiv(n_rows, config["BLOCK_R"]),), logits,
           labels.reshape(-1).contiguous(), stats, n_rows, vocab, inner, outer, stride, inv_temp, float(softcap or 0.0),
           SOFTCAP=bool(softcap), ACC=acc, **config)
    return stats


def token_logprobs_backward(logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, grad: torch.Tensor,
                            inv_temp: float, softcap: float | None = None, out: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """∂(g_lp·log p(label) + g_H·H)/∂logits, contiguous [..., V] in the logits' dtype, for grad [rows, 2] = (g_lp,
    g_H) and the forward's statistics [rows, NUM_STATS] (the whole vocabulary's: m, ls and H are read). `out`
    receives it instead when given: a contiguous buffer of the logits' shape in any float dtype, which may be the
    logits themselves."""
    modules = kernel_modules()
    tl, kernels = modules.tl, modules.token_logprobs
    shape = logits.shape
    logits, (inner, outer, stride) = rows_of(logits)
    vocab = shape[-1]
    n_rows = logits.numel() // vocab
    out = empty(shape, logits.dtype, logits.device) if out is None else out
    if n_rows == 0:
        return out
    acc = acc_of(tl, logits)
    config = logits_config(n_rows, vocab, targets.of_device(logits.device), torch_acc(acc), int(bool(softcap)))
    launch(kernels.token_logprobs_backward_kernel, (cdiv(n_rows, config["BLOCK_R"]),), logits,
           labels.reshape(-1).contiguous(), stats.contiguous(), grad.contiguous(), out, n_rows, vocab, inner, outer,
           stride, inv_temp, float(softcap or 0.0), SOFTCAP=bool(softcap), ACC=acc, **config)
    return out
