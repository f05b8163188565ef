"""Masking and reduction of per-row losses, shared by the reference and the kernels' paths."""

from __future__ import annotations

import torch

from .launchers.scale import scale_unless_one


def row_mask(labels, ignore_index: int, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """m_i = (labels_i != ignore_index), or all ones without labels."""
    if labels is None:
        return torch.ones(leading_shape, dtype=torch.bool, device=device)
    return labels != ignore_index


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor, reduction: str, num_items_in_batch=None) -> torch.Tensor:
    """Reduce per-row losses that are already 0 where the mask is False (docs/api.md, `reduction`).

    batchmean: Σ m_i ℓ_i / max(Σ m_i, 1), or / num_items_in_batch; sum: Σ m_i ℓ_i; none: the rows.
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / _divisor(mask, num_items_in_batch, total)


def _divisor(mask: torch.Tensor, num_items_in_batch, like: torch.Tensor):
    """max(Σ m_i, 1), or num_items_in_batch (a tensor moved to `like`'s device and dtype)."""
    if num_items_in_batch is None:
        return mask.sum().clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=like.device, dtype=like.dtype).reshape(())
    return num_items_in_batch


def row_weights(mask: torch.Tensor, reduction: str, num_items_in_batch=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w with Σ_i w_i ℓ_i equal to `reduce_rows` of a scalar reduction: m_i / divisor, or m_i for "sum"."""
    weights = mask.to(dtype)
    return weights if reduction == "sum" else weights / _divisor(mask, num_items_in_batch, weights)


def scale_by_upstream(grads, upstream: torch.Tensor, on_device: bool) -> list:
    """The gradients (None where absent; the contiguous buffers the chunked paths fill) times the scalar upstream
    gradient, in place. `on_device` (the Triton engine): by `scale_unless_one` (kernels/scale.py), which leaves them
    untouched where the upstream is 1 without the host reading it; otherwise the host reads it (one
    synchronization) and multiplies, in the gradients' dtype, unless it is 1. loss.backward() passes 1: skipping
    the multiply saves a pass over dW and dH (2 GiB of traffic at V = 128k, H = 4096 in bf16)."""
    if on_device:
        return [None if g is None else scale_unless_one(g, upstream) for g in grads]
    if upstream.numel() == 1 and upstream.item() == 1.0:
        return list(grads)
    return [None if g is None else g.mul_(upstream.to(g.dtype)) for g in grads]
