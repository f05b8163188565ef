"""The torch paths, counted op by op: their code runs once on the CPU at a small probe shape under a dispatch
mode that records every aten operator (inputs read, outputs written, matmul dimensions) and every allocation;
`torch_kernels` maps the probe's dimensions to the real ones, each operator a bandwidth-bound kernel (no
fusion) or a rooflined matmul, and the peak of live bytes to the real sizes. An estimate."""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kdops
import kdops.paths.chunked
import kdops.paths.torch_engine

from kdops.divergences import Divergence

from .kernels import Ctx, Kernel

# Probe dimensions: distinct values, so that every dimension of every tensor the code makes is identified.
PROBE_ROWS, PROBE_CHUNK, PROBE_VOCAB, PROBE_HS, PROBE_HT = 36, 12, 1000, 40, 56
_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "lift_fresh", "_to_copy_noop"}
_WRITE_ONLY = {"fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros",
               "new_ones", "new_full", "scalar_tensor", "arange"}


@dataclass
class _Op:
    stage: str
    name: str
    reads: list  # (shape, itemsize)
    writes: list
    mm: tuple | None  # probe dims (m, k, n) and the operand dtype of a matmul
    chunked: bool = False


class _Probe(TorchDispatchMode):
    """Records every aten operator (inputs read, outputs written, matmul dims) and every allocation (for the
    peak of live bytes), at the probe's shapes; `_replay` and `_peak` map them to a real shape."""

    def __init__(self):
        super().__init__()
        self.stage = "fwd"
        self.ops: list[_Op] = []
        self.events: list[tuple] = []  # ("alloc", key, shape, itemsize) / ("free", key)
        self._live: set[int] = set()

    def _free(self, key: int) -> None:
        self._live.discard(key)
        self.events.append(("free", key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _NO_TRAFFIC:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name == "copy_":
            inputs = inputs[1:]  # the destination is written, not read
        elif name in _WRITE_ONLY:
            inputs = []
        reads = [(tuple(t.shape), t.element_size()) for t in inputs]
        writes = [(tuple(t.shape), t.element_size()) for t in outputs]
        mm = None
        if name in _MATMULS:
            a, w = inputs[-2], inputs[-1]
            mm = (tuple(a.shape), tuple(w.shape), a.dtype)
        self.ops.append(_Op(self.stage, name, reads, writes, mm))
        seen = {id(t.untyped_storage()) for t in inputs}
        for t in outputs:
            storage = t.untyped_storage()
            key = id(storage)
            if key in seen or key in self._live:
                continue  # in place, or a view of a new storage already counted
            self._live.add(key)
            self.events.append(("alloc", key, tuple(t.shape), t.element_size()))
            weakref.finalize(storage, self._free, key)
        return out


def _numel(shape, dims: dict) -> int:
    return math.prod(dims.get(d, d) for d in shape)


def _mm_flops(mm, dims: dict) -> float:
    a, w, _ = mm
    return 2.0 * _numel(a, dims) * dims.get(w[-1], w[-1])


def _replay(probe: _Probe, dims: dict, stage_names: dict, per_chunk: float = 1.0, every_op: bool = False
            ) -> list[Kernel]:
    """The probe's operators as kernels at the real shape: `dims` maps probe dimensions to real ones;
    operators on chunk-sized tensors (a dimension `PROBE_CHUNK`), or all of them with `every_op`, run
    `per_chunk` times as often."""
    kernels = []
    for op in probe.ops:
        shapes = [s for s, _ in op.reads + op.writes]
        launches = per_chunk if every_op or any(PROBE_CHUNK in s for s in shapes) else 1.0
        if op.mm is not None:
            phase = stage_names[(op.stage, "mm")]
            read = sum(_numel(s, dims) * i for s, i in op.reads)
            kernels.append(Kernel(phase, mm_flops=_mm_flops(op.mm, dims), mm_dtype=op.mm[2], launches=launches,
                                  items=[("matmul operands read", read),
                                         ("matmul outputs written", sum(_numel(s, dims) * i for s, i in op.writes))]))
            continue
        phase = stage_names[(op.stage, "ew")]
        kernels.append(Kernel(phase, launches=launches,
                              items=[("tensors read", sum(_numel(s, dims) * i for s, i in op.reads)),
                                     ("tensors written", sum(_numel(s, dims) * i for s, i in op.writes))]))
    return kernels


def _peak(probe: _Probe, dims: dict) -> int:
    """The most bytes live at once during the probe, at the real shape."""
    live = peak = 0
    sizes = {}
    for event in probe.events:
        if event[0] == "alloc":
            _, key, shape, itemsize = event
            sizes[key] = _numel(shape, dims) * itemsize
            live += sizes[key]
            peak = max(peak, live)
        else:
            live -= sizes.pop(event[1], 0)
    return peak


def _record_loss(probe: _Probe, loss_fn) -> None:
    """Record `loss_fn()`'s forward, then its backward (stage "bwd")."""
    with probe:
        loss = loss_fn()
        probe.stage = "bwd"
        loss.backward()


def _record_kd_loss_torch(probe: _Probe, randn, divergence: Divergence, caps: tuple) -> None:
    """kd_loss backend="torch" on [PROBE_ROWS, PROBE_VOCAB] logits, in chunks of PROBE_CHUNK rows."""
    student = randn(PROBE_ROWS, PROBE_VOCAB, scale=4.0, grad=True)
    teacher = randn(PROBE_ROWS, PROBE_VOCAB, scale=4.0)
    # Chunks of PROBE_CHUNK rows: the budget that gives them, through the code's own chunk_rows.
    budget = PROBE_CHUNK * PROBE_VOCAB * max(4,
                                             student.element_size()) * kdops.paths.torch_engine.TEMPORARIES_PER_ELEMENT
    saved, kdops.paths.torch_engine.BUDGET_BYTES = kdops.paths.torch_engine.BUDGET_BYTES, budget
    try:
        assert kdops.paths.torch_engine.chunk_rows(PROBE_VOCAB, max(4, student.element_size())) == PROBE_CHUNK
        _record_loss(probe, lambda: kdops.kd_loss(student, teacher, divergence=divergence, backend="torch"))
    finally:
        kdops.paths.torch_engine.BUDGET_BYTES = saved


def _record_kd_loss_reference(probe: _Probe, randn, divergence: Divergence, caps: tuple) -> None:
    """kdops.reference.kd_loss on [PROBE_ROWS, PROBE_VOCAB] logits."""
    student = randn(PROBE_ROWS, PROBE_VOCAB, scale=4.0, grad=True)
    teacher = randn(PROBE_ROWS, PROBE_VOCAB, scale=4.0)
    _record_loss(probe, lambda: kdops.reference.kd_loss(student, teacher, divergence=divergence))


def _record_reference(probe: _Probe, randn, divergence: Divergence, caps: tuple) -> None:
    """kdops.reference.fused_linear_kd_loss from [PROBE_ROWS, H] hidden states (the student's require grad)."""
    hs, ws = randn(PROBE_ROWS, PROBE_HS, grad=True), randn(PROBE_VOCAB, PROBE_HS, scale=PROBE_HS ** -0.5, grad=True)
    ht, wt = randn(PROBE_ROWS, PROBE_HT), randn(PROBE_VOCAB, PROBE_HT, scale=PROBE_HT ** -0.5)
    _record_loss(probe, lambda: kdops.reference.fused_linear_kd_loss(
        hs, ws, ht, wt, divergence=divergence, student_softcap=caps[0], teacher_softcap=caps[1]))


def _record_fused_torch(probe: _Probe, randn, divergence: Divergence, caps: tuple) -> None:
    """The per-chunk math of ChunkedProblem (engine "torch") on one chunk's float32 logits buffers; the
    matmuls around it are counted like the chunked path's."""
    hs, ws = randn(PROBE_CHUNK, PROBE_HS), randn(PROBE_VOCAB, PROBE_HS)
    ht, wt = randn(PROBE_CHUNK, PROBE_HT), randn(PROBE_VOCAB, PROBE_HT)
    problem = kdops.paths.chunked.ChunkedProblem(hs, ws, None, ht, wt, None, None, divergence, 1.0, PROBE_VOCAB, 1.0,
                                                 0.0,
                                                 -100, "torch", None, softcaps=caps)
    zs = randn(PROBE_CHUNK, PROBE_VOCAB, dtype=problem.acc_dtype, scale=4.0)
    zt = randn(PROBE_CHUNK, PROBE_VOCAB, dtype=problem.acc_dtype, scale=4.0)
    scale = torch.full((PROBE_CHUNK,), 1.0 / PROBE_CHUNK, dtype=problem.acc_dtype)
    with probe:
        problem._loss_and_logit_grads(zs, zt, None, scale, True, False)


_RECORDERS = {"kd_loss-torch": _record_kd_loss_torch, "kd_loss-reference": _record_kd_loss_reference,
              "reference": _record_reference, "fused-torch": _record_fused_torch}


@functools.lru_cache(maxsize=None)
def _probe(path: str, divergence: Divergence, dtype: torch.dtype, softcaps: int = 0) -> _Probe:
    """Run `path`'s torch code once at the probe shape on the CPU, recording it (with `softcaps` of the two
    sides' logits softcapped on the fused-API paths)."""
    if path not in _RECORDERS:
        raise ValueError(path)
    gen = torch.Generator().manual_seed(0)
    caps = ((30.0, 50.0)[:softcaps] + (None, None))[:2]

    def randn(*shape, dtype=dtype, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(grad)

    probe = _Probe()
    _RECORDERS[path](probe, randn, divergence, caps)
    return probe


def torch_kernels(ctx: Ctx, path: str, dims: dict, stage_names: dict, per_chunk: float = 1.0,
                  every_op: bool = False) -> tuple[list[Kernel], int, int]:
    """`path`'s probe (cached per divergence, dtype and softcaps) at the real dimensions `dims`: (kernels, peak
    of live bytes, how many operators), the phases named by `stage_names[(stage, "mm" or "ew")]`."""
    probe = _probe(path, ctx.divergence, ctx.dtype, ctx.softcaps)
    return _replay(probe, dims, stage_names, per_chunk, every_op), _peak(probe, dims), len(probe.ops)
