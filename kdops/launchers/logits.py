"""Launchers of the kernels on logits (`kernels/logits.py`, `kernels/partials.py`): block sizes and grids, the
forward's partial states merged over vocabulary parts and over a vocabulary-parallel group, the backward. They
allocate outputs and return tensors; the math is in the kernels."""

from __future__ import annotations

import torch

from .. import targets
from ..divergences import Canonical
from .common import acc_of, cdiv, empty, kernel_modules, launch, next_pow2, rows_of, torch_acc


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
            return dict(BLOCK_R=1, BLOCK_V=min(512, next_pow2(vocab)), num_warps=4, maxnreg=255)
        # The forward: 1024 columns and 4 warps, 7–8 % faster than 2048 and 8 on an H100 (bench.campaign's
        # tune, bench/results/nvidia-h100-campaign: forward KL on bf16 logits 1.81 → 1.67 ms, generalized JSD
        # on float32 ones 4.98 → 4.63 ms at 4096 × 128256); the gradient ran no faster so (1.12 → 1.15 ms).
        block_v = min(1024 if forward else 2048, next_pow2(vocab))
        return dict(BLOCK_R=1, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
                    **(dict(maxnreg=255) if transform or forward else {}))
    return dict(BLOCK_R=min(16, next_pow2(n_rows)), BLOCK_V=min(1024, next_pow2(vocab)))


def kind_of(canon: Canonical):
    """The constexpr kind of `canon` and whether it needs a second pass."""
    divergences = kernel_modules().divergences
    return getattr(divergences, canon.kind.name), int(canon.kind) in divergences.TWO_PASS_KINDS


def logits_args(student, teacher, labels, canon: Canonical, inv_temp: float, soft: float, hard: float, shards,
                parts: bool = False):
    """Row layouts, scalars and constexprs common to both kernels on logits (labels as indices into the
    vocabulary shard under `shards`). With `parts` and labels the hard-label term is computed (HARD) even at
    hard = 0, for its cross-entropy."""
    tl = kernel_modules().tl
    student, (s_inner, s_outer, s_stride) = rows_of(student)
    teacher, (t_inner, t_outer, t_stride) = rows_of(teacher)
    args = (student.shape[-1], s_inner, s_outer, s_stride, t_inner, t_outer, t_stride, inv_temp, canon.c1,
            canon.c2, soft, hard, *canon.transform_args())
    two_pass = kind_of(canon)[1]
    reads_labels = hard > 0 or (parts and labels is not None)
    constexprs = logits_constexprs(canon, 1.0 if reads_labels else 0.0, acc_of(tl, student, teacher))
    labels = flat_labels(labels, 1.0 if reads_labels else 0.0)
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
                   soft: float = 1.0, hard: float = 0.0, shards=None, parts: bool = False, stats=None):
    """Per-row losses soft·D + hard·CE [rows] and statistics [rows, NUM_STATS] of [..., V] logits; with
    `shards` (`kdops.parallel.VocabShards`), of the group's logits, this rank holding its shard of them. With
    `parts` a third output, parts [rows, 4]: D, CE (0 without labels), H(student at T), H(target at T), from the
    same pass (under `shards`, the group's).

    `stats`: the first pass's statistics, computed elsewhere (`launchers.epilogue.statistics`: the log-normalizers,
    r and the cross-entropy's (m_c, ls_c)), for a kind that `second_pass_only` admits; the kernel then runs the
    second pass alone and completes `stats` in place."""
    logits = kernel_modules().logits
    student, teacher, tile_labels, args, constexprs, two_pass = logits_args(student, teacher, labels, canon,
                                                                            inv_temp, soft, hard, shards, parts)
    if stats is not None:
        assert second_pass_only(canon) and shards is None and not parts, "given statistics: second_pass_only kinds"
    n_rows = student.numel() // student.shape[-1]
    out_dtype = torch_acc(constexprs["ACC"])
    config = logits_config(n_rows, student.shape[-1], targets.of_device(student.device), out_dtype, canon.transform,
                           forward=True)
    grid = (cdiv(n_rows, config["BLOCK_R"]),)
    if shards is not None:
        def launch_pass(second, partial, stats, entropy=None):
            launch(
                logits.kd_logits_forward_kernel, grid, student, teacher,
                stats if tile_labels is None else tile_labels, stats, stats, partial,
                stats if entropy is None else entropy, n_rows, *args, TWO_PASS=two_pass,
                STAGE=logits.SECOND_PARTIAL if second else logits.FIRST_PARTIAL, PARTS=entropy is not None,
                **constexprs, **config,
            )

        return staged_forward(launch_pass, n_rows, 1, canon, soft, hard,
                              flat_labels(labels, 1.0 if constexprs["HARD"] else 0.0), shards.vocab, constexprs,
                              student.device, shards, parts)
    loss = empty((n_rows,), out_dtype, student.device)
    given = stats is not None
    stats = stats if given else empty((n_rows, logits.NUM_STATS.value), out_dtype, student.device)
    parts_out = empty((n_rows, 4), out_dtype, student.device) if parts else None
    if n_rows:
        launch(
            logits.kd_logits_forward_kernel, grid, student, teacher, loss if tile_labels is None else tile_labels,
            loss, stats, loss, loss if parts_out is None else parts_out, n_rows, *args, TWO_PASS=two_pass,
            STAGE=logits.GIVEN if given else logits.FULL, PARTS=parts, **constexprs, **config,
        )
    return (loss, stats) if parts_out is None else (loss, stats, parts_out)


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
    partials = kernel_modules().partials
    n, parts = partial.shape[:2]
    block = min(128, next_pow2(n))
    launch(
        partials.merge_partials_kernel, (cdiv(n, block),), partial, partial if maxima is None else maxima,
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
                   vocab: int, constexprs, device, shards=None, parts: bool = False):
    """Loss and statistics of a forward whose kernel writes partial states: launch_pass(second, partial,
    stats) fills partial [rows, n_parts, NUM_PARTIAL] for the first pass (second=False) and, for the two-pass
    kinds, the second; each pass's parts are merged (over the group first, under `shards`) and finished.
    `labels` (global token ids) and `vocab` (the whole vocabulary) serve the labels' range check only.

    With `parts`, launch_pass(False, partial, stats, entropy) also fills the parts' entropy states entropy
    [rows, n_parts, 6] (`kernels/entropy.py`), and a third output holds the rows' parts [rows, 4]: D, CE (of the
    merged hard-label sums: lse − s_label, where the constexprs compute them), and both entropies
    (`merged_entropies`)."""
    modules = kernel_modules()
    divergences, logits, partials = modules.divergences, modules.logits, modules.partials
    dtype = torch_acc(constexprs["ACC"])
    loss = empty((n_rows,), dtype, device)
    stats = empty((n_rows, logits.NUM_STATS.value), dtype, device)
    row_parts = torch.zeros((n_rows, 4), dtype=dtype, device=device) if parts else None
    if n_rows == 0:
        return (loss, stats) if row_parts is None else (loss, stats, row_parts)
    partial = empty((n_rows, n_parts, partials.NUM_PARTIAL.value), dtype, device)
    entropy = empty((n_rows, n_parts, 6), dtype, device) if parts else None
    two_pass = int(canon.kind) in divergences.TWO_PASS_KINDS
    for second in (False, True) if two_pass else (False,):
        if second or entropy is None:
            launch_pass(second, partial, stats)
        else:
            launch_pass(second, partial, stats, entropy)
        merged = partial if shards is None else _combine_over_group(partial, canon, constexprs, second, shards, stats)
        if parts and not second:
            label_logit = merged[:, :, _LABEL_LOGIT_COLUMN].sum(1)  # the one part (rank) holding the label adds it
        merge_partials(merged, labels, loss, stats, canon, vocab, soft, hard, constexprs, second)
    if not parts:
        return loss, stats
    row_parts[:, 0] = stats[:, _DIVERGENCE_STAT]
    if constexprs["HARD"]:
        row_parts[:, 1] = (stats[:, _CE_STATS[0]] + stats[:, _CE_STATS[1]]) - label_logit
    row_parts[:, 2:] = merged_entropies(entropy, shards)
    return loss, stats, row_parts


# Where staged_forward reads the parts: the label's logit among the partial state's columns (kernels/partials.py),
# the divergence L and the hard-label (m_c, ls_c) among the statistics (kernels/passes.py).
_LABEL_LOGIT_COLUMN, _DIVERGENCE_STAT, _CE_STATS = 9, 8, (9, 10)


def merged_entropies(states: torch.Tensor, shards=None) -> torch.Tensor:
    """(H(student), H(target)) [rows, 2] of entropy states [rows, parts, 6] — per part (m, S, A) of the student, then
    of the target, S = Σ e^(v − m), A = Σ e^(v − m)(v − m) over its columns (`kernels/entropy.py`) — merged over the
    parts and, under `shards`, the group: at the max M of the maxima, S = Σ e^(m − M)·S_i and
    A = Σ e^(m − M)·(A_i + (m_i − M)·S_i), then H = log S − A / S (0 for a row without a finite logit)."""
    m, sums, terms = states[..., 0::3], states[..., 1::3], states[..., 2::3]  # [rows, parts, 2] each
    top = m.amax(1)
    if shards is not None:
        top = shards.all_reduce_max(top.contiguous())
    top = torch.where(torch.isfinite(top), top, 0.0)
    seen = torch.isfinite(m)
    shift = torch.where(seen, m - top[:, None], 0.0)
    factor = torch.where(seen, torch.exp(shift), 0.0)
    total = torch.cat([(factor * sums).sum(1), (factor * (terms + shift * sums)).sum(1)], dim=-1)
    if shards is not None:
        total = shards.all_reduce_sum(total.contiguous())
    sums, terms = total[:, :2], total[:, 2:]
    safe = torch.where(sums > 0, sums, 1.0)
    return torch.where(sums > 0, torch.log(safe) - terms / safe, 0.0)


def logits_backward(student, teacher, labels, stats, row_scale, canon: Canonical, inv_temp: float, grad_s: bool,
                    grad_t: bool, soft: float = 1.0, hard: float = 0.0, out_s=None, out_t=None, shards=None,
                    loss=None):
    """(∂/∂student, ∂/∂teacher) of Σ_r row_scale[r]·loss[r], contiguous [..., V] in the logits' dtypes (None
    where not asked for). `out_s` / `out_t` receive them instead when given: contiguous buffers of the
    logits' shape, which may be the logits themselves (the gradient then overwrites them).

    `loss` [rows]: the same pass also writes the rows' losses there, as `logits_forward` computes them, so that
    each logit is read once (the kernel's LOSS). Only where `one_read(canon, grad_t)`: the
    gradient then needs no statistic but the log-normalizers (stats from the logits GEMM's epilogue)."""
    logits = kernel_modules().logits
    student, teacher, labels, args, constexprs, _ = logits_args(student, teacher, labels, canon, inv_temp,
                                                                soft, hard, shards)
    n_rows = stats.shape[0]
    if loss is not None and not (shards is None and one_read(canon, grad_t)):  # a caller's error, not a user's
        raise AssertionError(f"the gradient of {canon.kind.name} (student is P: {canon.student_is_p}, teacher's "
                             f"gradient: {grad_t}) needs the forward's statistics: it cannot write the loss")
    if grad_s and out_s is None:
        out_s = empty(student.shape, student.dtype, student.device)
    if grad_t and out_t is None:
        out_t = empty(teacher.shape, teacher.dtype, teacher.device)
    out_s, out_t = (out_s if grad_s else None), (out_t if grad_t else None)
    if n_rows == 0 or not (grad_s or grad_t or loss is not None):
        return out_s, out_t
    config = logits_config(n_rows, student.shape[-1], targets.of_device(student.device),
                           torch_acc(constexprs["ACC"]), canon.transform, forward=loss is not None)
    grid = (cdiv(n_rows, config["BLOCK_R"]),)
    # An absent gradient, label or loss vector still needs a pointer argument; constexpr flags keep it unused.
    launch(
        logits.kd_logits_backward_kernel, grid, student, teacher, stats if labels is None else labels,
        stats if out_s is None else out_s, stats if out_t is None else out_t, stats, row_scale.contiguous(),
        stats if loss is None else loss, n_rows, *args, GRAD_S=grad_s, GRAD_T=grad_t, LOSS=loss is not None,
        **constexprs, **config,
    )
    return out_s, out_t


def second_pass_only(canon: Canonical) -> bool:
    """Whether `logits_forward` can take the first pass's statistics from elsewhere — the log-normalizers, each to
    the precision of its own size (about 1e-6 at ~12), and r = ls_y − ls_x to the sums' — and run the second pass
    alone: the generalized JSD, untransformed. An error ε in r, or in a log-normalizer, scales Q (or P) by e^ε; the
    JSD then moves by ε·(1 − β)·KL(Q ‖ M) (or ε·β·KL(P ‖ M)), a relative error ε however close the rows are (its
    gradient's sums are taken so that its projection stays exact: `kernels/divergences.py`, `jsd_given_terms`). Skew
    KL and TVD move by ε itself, which near-identical rows (a divergence of 1e-4 and less) do not tolerate: they
    need r to the precision of its own size, which only a pass over both models' logits gives (the first pass's
    Σ (e^dy − e^dx))."""
    return canon.kind.name == "JSD" and canon.transform == 0


def one_read(canon: Canonical, grad_t: bool = False) -> bool:
    """Whether `logits_backward` can write the loss beside the gradient (one read of each logit, given the
    log-normalizers): KL with the student as Q (forward KL and its TAID target, whose gradient is q − p), without
    the teacher's gradient (which needs the loss itself)."""
    return canon.kind.name == "KL" and not canon.student_is_p and not grad_t
