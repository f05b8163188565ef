"""Launchers: allocate outputs, pick block sizes and grids, call the kernels of `kdops.kernels`, return
tensors. No math here; the kernels are imported lazily so that TRITON_INTERPRET can be set first."""

from __future__ import annotations

import contextlib
import functools

import torch

from . import targets
from .divergences import Canonical

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
def _kernels():
    import triton.language as tl

    from .kernels import divergences, logits, partials

    return tl, divergences, logits, partials


@functools.lru_cache(maxsize=None)
def _topk_kernels():
    from .kernels import topk

    return topk


@functools.lru_cache(maxsize=None)
def _scale_kernels():
    from .kernels import scale

    return scale


#: scale_unless_one's programs: elements a program's block takes per step, and programs per SM on a GPU.
SCALE_BLOCK, SCALE_PROGRAMS_PER_SM = 2048, 4


def scale_unless_one(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ·= scale in place, for a contiguous x and a one-element `scale` on x's device, unless scale is exactly
    1 (`kernels/scale.py`: the kernel reads it, the host does not; the product in float32, float64 for float64
    x). Returns x."""
    # an invariant of the callers (the chunked paths' own gradient buffers), not a user error: the kernel walks
    # the elements in memory order
    assert x.is_contiguous(), f"scale_unless_one takes a contiguous tensor, got strides {x.stride()}"
    kernel = _scale_kernels().scale_unless_one_kernel
    tl = _kernels()[0]
    gpu = targets.of_device(x.device)
    blocks = _cdiv(x.numel(), SCALE_BLOCK)
    programs = max(1, min(blocks, SCALE_PROGRAMS_PER_SM * gpu.sm_count if gpu is not None else 4))
    launch(kernel, (programs,), x, scale.reshape(1), x.numel(), BLOCK=SCALE_BLOCK,
           ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=4)
    return x


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


def logits_config(n_rows: int, vocab: int, gpu: targets.GPU | None, acc: torch.dtype = torch.float32,
                  transform: int = 0, forward: bool = False) -> dict:
    """Block sizes of the kernels on logits for `gpu` (None: the interpreter), accumulating in `acc`, with the
    tile transforms `transform` (`Canonical.transform`), for the forward kernel or the backward one. On GPU a
    program per row with wide vocabulary blocks. Float64 blocks are narrower; they, the transformed kernels and
    the forward (whose sums are kept in lanes: kernels/divergences.py) may take 255 registers: ptxas otherwise
    squeezes them into 80–128 and spills (the two-pass kinds with softcaps, or with the hard-label term: 8 B on
    sm_90; `python -m bench.compile`). Under the interpreter, large tiles amortize its per-op cost."""
    if gpu is not None:
        if acc == torch.float64:
            return dict(BLOCK_R=1, BLOCK_V=min(512, _next_pow2(vocab)), num_warps=4, maxnreg=255)
        # The forward: 1024 columns and 4 warps, 7–8 % faster than 2048 and 8 on an H100 (bench.campaign's
        # tune, bench/results/nvidia-h100-campaign: forward KL on bf16 logits 1.81 → 1.67 ms, generalized JSD
        # on float32 ones 4.98 → 4.63 ms at 4096 × 128256); the gradient ran no faster so (1.12 → 1.15 ms).
        block_v = min(1024 if forward else 2048, _next_pow2(vocab))
        return dict(BLOCK_R=1, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
                    **(dict(maxnreg=255) if transform or forward else {}))
    return dict(BLOCK_R=min(16, _next_pow2(n_rows)), BLOCK_V=min(1024, _next_pow2(vocab)))


def _acc(tl, *tensors):
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def _acc_torch(acc) -> torch.dtype:
    return torch.float64 if acc.primitive_bitwidth == 64 else torch.float32


def kind_of(canon: Canonical):
    """The constexpr kind of `canon` and whether it needs a second pass."""
    _, divergences, *_ = _kernels()
    return getattr(divergences, canon.kind.name), int(canon.kind) in divergences.TWO_PASS_KINDS


def _logits_args(student, teacher, labels, canon: Canonical, inv_temp: float, soft: float, hard: float, shards):
    """Row layouts, scalars and constexprs common to both kernels on logits (labels as indices into the
    vocabulary shard under `shards`)."""
    tl, *_ = _kernels()
    student, (s_inner, s_outer, s_stride) = _rows_of(student)
    teacher, (t_inner, t_outer, t_stride) = _rows_of(teacher)
    args = (student.shape[-1], s_inner, s_outer, s_stride, t_inner, t_outer, t_stride, inv_temp, canon.c1,
            canon.c2, soft, hard, *canon.transform_args())
    two_pass = kind_of(canon)[1]
    constexprs = logits_constexprs(canon, hard, _acc(tl, student, teacher))
    labels = flat_labels(labels, hard)
    return student, teacher, labels if shards is None else shards.local_labels(labels), args, constexprs, two_pass


def logits_constexprs(canon: Canonical, hard: float, acc) -> dict:
    """The constexprs of the kernels on logits (and of the merge of their partial states), accumulating in acc
    (a Triton dtype)."""
    return dict(KIND=kind_of(canon)[0], HARD=hard > 0, STUDENT_IS_P=canon.student_is_p, TRANSFORM=canon.transform,
                ACC=acc)


def flat_labels(labels, hard: float):
    """Labels as one contiguous row vector, only where the hard-label term reads them."""
    return labels.reshape(-1).contiguous() if hard > 0 else None


def logits_forward(student: torch.Tensor, teacher: torch.Tensor, labels, canon: Canonical, inv_temp: float,
                   soft: float = 1.0, hard: float = 0.0, shards=None):
    """Per-row losses soft·D + hard·CE [rows] and statistics [rows, NUM_STATS] of [..., V] logits; with
    `shards` (`kdops.parallel.VocabShards`), of the group's logits, this rank holding its shard of them."""
    logits = _kernels()[2]
    student, teacher, tile_labels, args, constexprs, two_pass = _logits_args(student, teacher, labels, canon,
                                                                              inv_temp, soft, hard, shards)
    n_rows = student.numel() // student.shape[-1]
    out_dtype = _acc_torch(constexprs["ACC"])
    config = logits_config(n_rows, student.shape[-1], targets.of_device(student.device), out_dtype, canon.transform,
                           forward=True)
    grid = (_cdiv(n_rows, config["BLOCK_R"]),)
    if shards is not None:
        def launch_pass(second, partial, stats):
            launch(
                logits.kd_logits_forward_kernel, grid, student, teacher,
                stats if tile_labels is None else tile_labels, stats, stats, partial, n_rows, *args,
                TWO_PASS=two_pass, STAGE=logits.SECOND_PARTIAL if second else logits.FIRST_PARTIAL, **constexprs,
                **config,
            )

        return staged_forward(launch_pass, n_rows, 1, canon, soft, hard, flat_labels(labels, hard), shards.vocab,
                              constexprs, student.device, shards)
    loss = _empty((n_rows,), out_dtype, student.device)
    stats = _empty((n_rows, logits.NUM_STATS.value), out_dtype, student.device)
    if n_rows == 0:
        return loss, stats
    launch(
        logits.kd_logits_forward_kernel, grid, student, teacher, loss if tile_labels is None else tile_labels, loss,
        stats, loss, n_rows, *args, TWO_PASS=two_pass, STAGE=logits.FULL, **constexprs, **config,
    )
    return loss, stats


# Columns of the first-pass partial state (kernels/partials.py) that the group combines: the maxima (an
# all-reduce MAX), then in one all-reduce SUM the sums (per kind; the hard-label CE adds its own) and the
# flags "this rank holds the max" that the merge kernel leaves in the max columns. Their sum k completes the
# excesses at that max: u = Σ addends + (k − 1). Columns 4..6 are the divergence's sums: ALPHA_BETA's power
# sums (5, 6 are excesses too), KL's centred sums, and the two-pass kinds' Σ (e^dy − e^dx) (5), plain sums.
_MAX_COLUMNS, _CE_MAX_COLUMNS = (0, 2), (7,)
_SUM_COLUMNS = {"KL": (1, 3, 4, 5, 6), "ALPHA_BETA": (1, 3, 4, 5, 6)}
_TWO_PASS_SUM_COLUMNS, _CE_SUM_COLUMNS = (1, 3, 5), (8, 9)
_EXCESS_COLUMNS = {"ALPHA_BETA": {0: [1, 5], 2: [3, 6], 7: [8]}}
_PLAIN_EXCESS_COLUMNS = {0: [1], 2: [3], 7: [8]}


def merge_partials(partial, labels, loss, stats, canon: Canonical, vocab: int, soft: float, hard: float, constexprs,
                   second: bool, maxima=None, out=None):
    """Launch `merge_partials_kernel` on partial [rows, parts, NUM_PARTIAL]: finish loss and stats, or with
    `maxima` [rows, 3] re-express the merged state relative to them into `out` [rows, 1, NUM_PARTIAL], as
    this rank's addends of the group's sums (and flags, in the max columns, of the maxima it holds)."""
    partials = _kernels()[3]
    n, parts = partial.shape[:2]
    block = min(128, _next_pow2(n))
    launch(
        partials.merge_partials_kernel, (_cdiv(n, block),), partial, partial if maxima is None else maxima,
        partial if out is None else out, partial if labels is None else labels, loss, stats, n, parts, vocab,
        canon.c1, canon.c2, soft, hard, KIND=constexprs["KIND"], SECOND_PASS=second, RESCALE=maxima is not None,
        HARD=constexprs["HARD"], BLOCK_N=block, ACC=constexprs["ACC"],
    )


def _combine_over_group(partial, canon: Canonical, constexprs, second: bool, shards, stats):
    """This rank's partial state [rows, parts, NUM_PARTIAL] → the group's [rows, 1, NUM_PARTIAL], by
    all-reduces of the columns the pass needs."""
    n = partial.shape[0]
    combined = torch.zeros((n, 1, partial.shape[2]), dtype=partial.dtype, device=partial.device)
    if second:  # (y1, y2, y3): plain sums
        combined[:, 0, :3] = shards.all_reduce_sum(partial[:, :, :3].sum(1))
        return combined
    hard = bool(constexprs["HARD"])
    max_columns = list(_MAX_COLUMNS + (_CE_MAX_COLUMNS if hard else ()))
    maxima = torch.zeros((n, 3), dtype=partial.dtype, device=partial.device)
    maxima[:, : len(max_columns)] = shards.all_reduce_max(partial[:, :, max_columns].amax(1))
    merge_partials(partial, None, stats, stats, canon, shards.vocab, 0.0, 0.0, constexprs, False, maxima=maxima,
                   out=combined)
    sum_columns = max_columns + list(_SUM_COLUMNS.get(canon.kind.name, _TWO_PASS_SUM_COLUMNS) +
                                     (_CE_SUM_COLUMNS if hard else ()))
    combined[:, 0, sum_columns] = shards.all_reduce_sum(combined[:, 0, sum_columns])
    for i, column in enumerate(max_columns):
        holders = combined[:, 0, column]
        excess = _EXCESS_COLUMNS.get(canon.kind.name, _PLAIN_EXCESS_COLUMNS)
        combined[:, 0, excess[column]] += (holders - 1)[:, None]
        combined[:, 0, column] = maxima[:, i]
    return combined


def staged_forward(launch_pass, n_rows: int, n_parts: int, canon: Canonical, soft: float, hard: float, labels,
                   vocab: int, constexprs, device, shards=None):
    """Loss and statistics of a forward whose kernel writes partial states: launch_pass(second, partial,
    stats) fills partial [rows, n_parts, NUM_PARTIAL] for the first pass (second=False) and, for the two-pass
    kinds, the second; each pass's parts are merged (over the group first, under `shards`) and finished.
    `labels` (global token ids) and `vocab` (the whole vocabulary) serve the labels' range check only."""
    _, divergences, logits, partials = _kernels()
    dtype = _acc_torch(constexprs["ACC"])
    loss = _empty((n_rows,), dtype, device)
    stats = _empty((n_rows, logits.NUM_STATS.value), dtype, device)
    if n_rows == 0:
        return loss, stats
    partial = _empty((n_rows, n_parts, partials.NUM_PARTIAL.value), dtype, device)
    two_pass = int(canon.kind) in divergences.TWO_PASS_KINDS
    for second in (False, True) if two_pass else (False,):
        launch_pass(second, partial, stats)
        merged = partial if shards is None else _combine_over_group(partial, canon, constexprs, second, shards, stats)
        merge_partials(merged, labels, loss, stats, canon, vocab, soft, hard, constexprs, second)
    return loss, stats


def logits_backward(student, teacher, labels, stats, row_scale, canon: Canonical, inv_temp: float, grad_s: bool,
                    grad_t: bool, soft: float = 1.0, hard: float = 0.0, out_s=None, out_t=None, shards=None):
    """(∂/∂student, ∂/∂teacher) of Σ_r row_scale[r]·loss[r], contiguous [..., V] in the logits' dtypes (None
    where not asked for). `out_s` / `out_t` receive them instead when given: contiguous buffers of the
    logits' shape, which may be the logits themselves (the gradient then overwrites them)."""
    logits = _kernels()[2]
    student, teacher, labels, args, constexprs, _ = _logits_args(student, teacher, labels, canon, inv_temp,
                                                                  soft, hard, shards)
    n_rows = stats.shape[0]
    if grad_s and out_s is None:
        out_s = _empty(student.shape, student.dtype, student.device)
    if grad_t and out_t is None:
        out_t = _empty(teacher.shape, teacher.dtype, teacher.device)
    out_s, out_t = (out_s if grad_s else None), (out_t if grad_t else None)
    if n_rows == 0 or not (grad_s or grad_t):
        return out_s, out_t
    config = logits_config(n_rows, student.shape[-1], targets.of_device(student.device),
                           _acc_torch(constexprs["ACC"]), canon.transform)
    grid = (_cdiv(n_rows, config["BLOCK_R"]),)
    # An absent gradient or label vector still needs a pointer argument; constexpr flags keep it unused.
    launch(
        logits.kd_logits_backward_kernel, grid, student, teacher, stats if labels is None else labels,
        stats if out_s is None else out_s, stats if out_t is None else out_t, stats, row_scale.contiguous(), n_rows,
        *args, GRAD_S=grad_s, GRAD_T=grad_t, **constexprs, **config,
    )
    return out_s, out_t


# --- the student's side of a sparse (top-k) teacher (kernels/topk.py) ------------------------------------------

def topk_config(n_rows: int, vocab: int, gpu: targets.GPU | None, acc: torch.dtype, softcap: bool = False) -> dict:
    """`logits_config`'s blocks, and BLOCK_C ids compared with each tile at a time ([rows, BLOCK_V, BLOCK_C]
    comparisons, one window after another until a window is not full). On GPU one id per window: the sm_90
    loops take 38 and 33 instructions per element with their first window and 4.6 and 7.4 per further one,
    against 71 and 105, and 35 and 77, with windows of 4 — cheaper at any number of ids per tile
    (`bench.model.TOPK_LOOP_INSTRUCTIONS`). Under the interpreter, wide windows (fewer steps)."""
    return dict(logits_config(n_rows, vocab, gpu, acc, int(softcap)), BLOCK_C=1 if gpu is not None else 8)


def complement_lse(student: torch.Tensor, sorted_ids: torch.Tensor, inv_temp: float, softcap: float | None = None
                   ) -> torch.Tensor:
    """R[r] = log Σ_{j ∉ ids_r} e^(s_rj / T) [rows] of [..., V] logits, with `sorted_ids` [rows, k] int32 sorted
    per row (absent entries as V); in the accumulation dtype. With `softcap` c, of c·tanh(s / c)."""
    tl, topk = _kernels()[0], _topk_kernels()
    student, (s_inner, s_outer, s_stride) = _rows_of(student)
    vocab = student.shape[-1]
    n_rows, k = sorted_ids.shape
    acc = _acc(tl, student)
    out = _empty((n_rows,), _acc_torch(acc), student.device)
    if n_rows == 0:
        return out
    config = topk_config(n_rows, vocab, targets.of_device(student.device), _acc_torch(acc), bool(softcap))
    launch(topk.complement_lse_kernel, (_cdiv(n_rows, config["BLOCK_R"]),), student, sorted_ids, out, n_rows, vocab,
           k, s_inner, s_outer, s_stride, inv_temp, float(softcap or 0.0), SOFTCAP=bool(softcap), ACC=acc, **config)
    return out


def topk_student_backward(student: torch.Tensor, sorted_ids: torch.Tensor, g_ids: torch.Tensor, lse_rest, g_rest,
                          inv_temp: float, out: torch.Tensor | None = None, softcap: float | None = None
                          ) -> torch.Tensor:
    """∂ℓ/∂s, contiguous [..., V] in the student's dtype, of ℓ(s_ids / T, R) given g_ids = ∂ℓ/∂(s_ids / T)
    [rows, k] (in the order of `sorted_ids`) and, for a tail (`lse_rest` = R and `g_rest` = ∂ℓ/∂R [rows], or
    both None), the softmax over the complement; with `softcap` c, of ℓ(c·tanh(s / c)) (times the tanh's
    slope). `out` receives it instead when given: a contiguous buffer of the logits' shape, in any float dtype,
    which may be the logits themselves."""
    tl, topk = _kernels()[0], _topk_kernels()
    shape = student.shape
    student, (s_inner, s_outer, s_stride) = _rows_of(student)
    vocab = shape[-1]
    n_rows, k = sorted_ids.shape
    out = _empty(shape, student.dtype, student.device) if out is None else out
    if n_rows == 0:
        return out
    acc = _acc(tl, student)
    tail = lse_rest is not None
    config = topk_config(n_rows, vocab, targets.of_device(student.device), _acc_torch(acc), bool(softcap))
    launch(topk.topk_student_backward_kernel, (_cdiv(n_rows, config["BLOCK_R"]),), student, sorted_ids,
           g_ids.contiguous(), lse_rest.contiguous() if tail else g_ids, g_rest.contiguous() if tail else g_ids, out,
           n_rows, vocab, k, s_inner, s_outer, s_stride, inv_temp, float(softcap or 0.0), TAIL=tail,
           SOFTCAP=bool(softcap), ACC=acc, **config)
    return out
