"""Masking and reduction of per-row losses, shared by the reference and the kernels' paths."""

from __future__ import annotations

import torch


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
