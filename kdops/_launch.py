"""Launchers: allocate outputs, pick block sizes and grids, call the kernels of `kdops.kernels`, return
tensors. No math here; the kernels are imported lazily so that TRITON_INTERPRET can be set first."""

from __future__ import annotations

import functools

import torch

from .divergences import Canonical

#: Tests set this: every output starts as NaN, so an element a kernel forgets to write shows up.
POISON_OUTPUTS = False


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton.language as tl

    from .kernels import divergences, logits

    return tl, divergences, logits


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_layout(t: torch.Tensor):
    """(n_inner, stride_outer, stride_inner) addressing the rows of [..., V] `t` in place, or None.

    Leading dimensions are merged where their strides allow; two remaining dimensions are addressed as
    (row // n_inner)·stride_outer + (row % n_inner)·stride_inner. The last dimension must be unit-stride.
    """
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    dims = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged:
        return 1, 0, 0
    if len(merged) == 1:
        return merged[0][0], 0, merged[0][1]
    if len(merged) == 2:
        return merged[1][0], merged[0][1], merged[1][1]
    return None


def _rows_of(t: torch.Tensor):
    """`t` (copied only when its layout cannot be addressed in place) and its row layout."""
    layout = row_layout(t)
    if layout is None:
        t = t.contiguous()
        layout = row_layout(t)
    return t, layout


def logits_config(n_rows: int, vocab: int, device: torch.device) -> dict:
    """Block sizes of the kernels on logits. On GPU a program per row with wide vocabulary blocks (the
    kernels are bandwidth-bound); under the interpreter, large tiles amortize its per-op cost."""
    if device.type == "cuda":
        block_v = min(2048, _next_pow2(vocab))
        return dict(BLOCK_R=1, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return dict(BLOCK_R=min(16, _next_pow2(n_rows)), BLOCK_V=min(1024, _next_pow2(vocab)))


def _acc(tl, *tensors):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _common_args(x, y, canon: Canonical, inv_temp: float):
    tl, divergences, _ = _kernels()
    x, (x_inner, x_outer, x_stride) = _rows_of(x)
    y, (y_inner, y_outer, y_stride) = _rows_of(y)
    args = (x.shape[-1], x_inner, x_outer, x_stride, y_inner, y_outer, y_stride, inv_temp, canon.c1, canon.c2)
    kind = getattr(divergences, canon.kind.name)
    return x, y, args, kind, _acc(tl, x, y)


def logits_forward(x: torch.Tensor, y: torch.Tensor, canon: Canonical, inv_temp: float):
    """Per-row losses D(P ‖ Q) [rows] and statistics [rows, 7] for logits x (P) and y (Q), [..., V]."""
    _, divergences, logits = _kernels()
    x, y, args, kind, acc = _common_args(x, y, canon, inv_temp)
    n_rows = x.numel() // x.shape[-1]
    out_dtype = torch.float64 if acc.primitive_bitwidth == 64 else torch.float32
    loss = _empty((n_rows,), out_dtype, x.device)
    stats = _empty((n_rows, logits.NUM_STATS.value), out_dtype, x.device)
    if n_rows == 0:
        return loss, stats
    config = logits_config(n_rows, x.shape[-1], x.device)
    grid = (_cdiv(n_rows, config["BLOCK_R"]),)
    logits.kd_logits_forward_kernel[grid](
        x, y, loss, stats, n_rows, *args, KIND=kind,
        TWO_PASS=int(canon.kind) in divergences.TWO_PASS_KINDS, ACC=acc, **config,
    )
    return loss, stats


def logits_backward(x, y, loss, stats, row_scale, canon: Canonical, inv_temp: float, grad_x: bool,
                    grad_y: bool):
    """(∂/∂x, ∂/∂y) of Σ_r row_scale[r]·loss[r], contiguous like x, in x's and y's dtypes (None where not
    asked for)."""
    _, _, logits = _kernels()
    x, y, args, kind, acc = _common_args(x, y, canon, inv_temp)
    n_rows = loss.shape[0]
    out_x = _empty(x.shape, x.dtype, x.device) if grad_x else None
    out_y = _empty(y.shape, y.dtype, y.device) if grad_y else None
    if n_rows == 0 or not (grad_x or grad_y):
        return out_x, out_y
    config = logits_config(n_rows, x.shape[-1], x.device)
    grid = (_cdiv(n_rows, config["BLOCK_R"]),)
    # An absent gradient still needs a pointer argument; the constexpr flag keeps it unused.
    logits.kd_logits_backward_kernel[grid](
        x, y, out_x if grad_x else loss, out_y if grad_y else loss, loss, stats, row_scale.contiguous(),
        n_rows, *args, KIND=kind, GRAD_X=grad_x, GRAD_Y=grad_y, ACC=acc, **config,
    )
    return out_x, out_y
