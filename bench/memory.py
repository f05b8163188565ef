"""Live-memory accounting on any device, from inside PyTorch's dispatcher.

`AllocationTracker` sees every tensor an operator creates while it is active (forward and backward),
counts its storage as live until the storage is freed, and reports the peak of live bytes and the
largest single allocation. Storages that existed before it started (the inputs) are not counted; on
CUDA, `torch.cuda.max_memory_allocated` gives the same figure for the whole allocator.

Triton's interpreter (TRITON_INTERPRET=1) copies every tensor argument of a launch to a host buffer and
back; those copies do not exist on a GPU and are not counted.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _inside_triton_interpreter(depth: int = 40) -> bool:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_filename.replace("\\", "/").endswith("triton/runtime/interpreter.py"):
            return True
        frame = frame.f_back
    return False


class AllocationTracker(TorchDispatchMode):
    """`count_meta=True` also counts tensors on the "meta" device: a computation on meta tensors allocates
    nothing, so it gives the exact allocation profile of a size that would not fit in memory."""

    def __init__(self, count_meta: bool = False):
        super().__init__()
        self.count_meta = count_meta
        self.live = 0
        self.peak = 0
        self.allocations: list[tuple[int, str]] = []  # (bytes, operator) of every new storage
        self._live_ids: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live_ids.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (t.device.type == "meta" and not self.count_meta):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._live_ids or _inside_triton_interpreter():
                continue  # a view, an in-place result, or the interpreter's host copy
            nbytes = storage.nbytes()
            self._live_ids.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.allocations.append((nbytes, str(func)))
            weakref.finalize(storage, self._free, key, nbytes)
        return out

    @property
    def largest(self) -> int:
        return max((n for n, _ in self.allocations), default=0)
