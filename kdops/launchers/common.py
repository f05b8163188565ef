"""What every launcher shares: the launch itself (or its record, `recording`), outputs that tests poison, the
rows' memory layouts, and the kernels' modules, imported lazily so that TRITON_INTERPRET can be set first."""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from .. import targets

#: Tests set this: every output starts as NaN, so an element a kernel forgets to write shows up.
POISON_OUTPUTS = False


#: While set (`recording`), launches are handed to it instead of run: recorder(kernel, grid, args, kwargs).
_recorder = None


@contextlib.contextmanager
def recording(recorder):
    """Within the block every kernel launch calls recorder(kernel, grid, args, kwargs) and runs nothing (its
    outputs stay unwritten): how `python -m bench.compile` collects the specializations the launchers
    produce for an assumed GPU (`kdops.targets.assume`) on a machine without one."""
    global _recorder
    previous, _recorder = _recorder, recorder
    try:
        yield
    finally:
        _recorder = previous


def is_recording() -> bool:
    return _recorder is not None


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or its record while `recording`."""
    if _recorder is not None:
        _recorder(kernel, grid, args, kwargs)
        return
    if targets.assumed() is not None:
        raise RuntimeError("kdops: a kernel launch under kdops.targets.assume(...) outside a recording; assume "
                           "serves the tools that compile or model kernels for a GPU that is not here")
    kernel[grid](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def kernel_modules() -> types.SimpleNamespace:
    """triton.language (`tl`) and the kernels' modules by name (`logits`, `linear`, ...).

    Imported here, on the first launch, not when kdops is imported: triton.jit decides between compiling and
    interpreting a kernel (TRITON_INTERPRET) when it decorates it, so the environment must be set before
    (tests/conftest.py sets it on a machine without a GPU)."""
    import triton.language as tl

    from ..kernels import divergences, linear, logits, partials, scale, token_logprobs, topk

    return types.SimpleNamespace(tl=tl, divergences=divergences, linear=linear, logits=logits, partials=partials,
                                 scale=scale, token_logprobs=token_logprobs, topk=topk)


def empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
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


def rows_of(t: torch.Tensor):
    """`t` (copied only when its layout cannot be addressed in place) and its row layout."""
    layout = row_layout(t)
    if layout is None:
        t = t.contiguous()
        layout = row_layout(t)
    return t, layout


def acc_of(tl, *tensors):
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def torch_acc(acc) -> torch.dtype:
    return torch.float64 if acc.primitive_bitwidth == 64 else torch.float32
