"""Property-based tests (hypothesis) of kdops.kd_loss and kdops.fused_linear_kd_loss.

Drawn: shapes (one row, V of 1, 2, 3, odd, several tiles; up to 3 leading dimensions; k-sliced, transposed
and vocabulary-strided views), dtypes (fp32, bf16, fp16, fp64 and mixes of them), every divergence with
drawn parameters, temperature, labels (none, some or all ignored), reductions and `num_items_in_batch`,
`-inf` entries (shared by both models, or on one side where the divergence stays finite), biases, both
backends and every impl, small tiles / chunks, and frozen or trainable teachers.

Each example checks SPEC "Accuracy" — kdops' error against the float64 oracle is at most the same-dtype
reference's error plus TOLERANCE (of the least precise input dtype), for the loss and every gradient, with
errors relative to the largest oracle magnitude or, for outputs tiny next to their terms, to a floor (see
FLOOR) — plus dtypes, shapes, non-finite entries, and exact zeros for an all-ignored batch; and it checks
kdops against itself: a second backend / impl agrees with the first within twice the reference's error
plus TOLERANCE, and a non-contiguous view gives the numbers of its contiguous copy.

Inputs are built from a drawn seed with a torch.Generator: randn · 4 logits, some rows peaked (+30),
students near their teacher, per-row offsets. Every failing example a hypothesis run found is pinned
as an explicit regression test at the end of this file.

Profiles (registered in conftest.py): "ci", the default (few examples, derandomized), and "thorough":
    python -m pytest tests/test_properties.py --hypothesis-profile=thorough
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdops
import kdops.launchers.logits
import kdops.divergences
import kdops.launchers.linear
import kdops.torch_math
from kdops import reference
from kdops.divergences import Kind
from conftest import DEVICE
from oracle import TOLERANCE, rel_error

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
FUSED_TENSORS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                 "teacher_bias")
IMPLS = [("fused", "triton"), ("chunked", "triton"), ("chunked", "torch"), ("sliced", "triton"), ("auto", "triton"),
         ("auto", "torch")]


# ---------------------------------------------------------------------------------------------------------
# Strategies: plain dicts of parameters (printed as is by hypothesis), built into tensors by the checks.

def _rounded(low, high, digits=3):
    return st.floats(low, high).map(lambda v: round(v, digits))


DIVERGENCE = st.one_of(
    st.sampled_from(list(kdops.DIVERGENCES)),
    st.builds(kdops.GeneralizedJSD, beta=st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.9]), _rounded(0.01, 0.99))),
    st.builds(kdops.SkewForwardKL, alpha=st.one_of(st.sampled_from([0.0, 0.1, 0.001]), _rounded(0.0, 0.95))),
    st.builds(kdops.SkewReverseKL, alpha=st.one_of(st.sampled_from([0.0, 0.1, 0.001]), _rounded(0.0, 0.95))),
    st.builds(kdops.AlphaBeta, alpha=st.one_of(st.just(0.5), _rounded(0.1, 2.0, 2)),
              beta=st.one_of(st.just(0.5), _rounded(0.1, 2.0, 2))),
)
TEMPERATURE = st.one_of(st.sampled_from([1.0, 2.0, 0.5]), _rounded(0.25, 5.0, 2))
# V: 1, 2, 3, odd, and several tiles (kernels on logits with small tiles; the fused kernels' 128-wide
# blocks and 3 vocabulary splits under the interpreter).
VOCAB = st.one_of(st.sampled_from([1, 2, 3]), st.integers(2, 50).map(lambda v: 2 * v + 1), st.integers(200, 700))
REDUCTION = st.sampled_from(["batchmean", "sum", "none", "num_items", "num_items_tensor"])
LABELS = st.sampled_from([None, "none_ignored", "some_ignored", "all_ignored"])


@st.composite
def leading_shapes(draw, max_rows=40):
    """0 to 3 leading dimensions, at most `max_rows` rows, and a view of them that the layout allows."""
    dims = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    while dims and _numel(dims) > max_rows:
        dims[dims.index(max(dims))] -= 1
    views = ["contiguous"] + (["k_sliced"] if dims else []) + (["transposed"] if len(dims) >= 2 else [])
    return tuple(dims), draw(st.sampled_from(views))


def _numel(dims):
    n = 1
    for d in dims:
        n *= d
    return n


@st.composite
def dtype_pair(draw):
    first = draw(st.sampled_from(list(DTYPES)))
    second = draw(st.one_of(st.just(first), st.sampled_from(list(DTYPES))))
    return first, second


def finite_with_zeros(divergence, side: str) -> bool:
    """Whether `divergence` stays finite when only `side` ("teacher" or "student") has probabilities 0:
    zeros of P drop out of every kind; zeros of Q make KL(P ‖ Q) infinite, and the skew KL with α = 0."""
    c = kdops.as_divergence(divergence).canonical()
    zero_is_q = (side == "teacher") == c.student_is_p
    if not zero_is_q:
        return True
    return not (c.kind == Kind.KL or (c.kind == Kind.SKEW and c.c1 == 0))


@st.composite
def inf_entries(draw, divergence, vocab):
    """-inf entries: none, shared by both models, or on one side where the divergence stays finite."""
    modes = ["none"]
    if vocab >= 2:
        modes.append("shared")
        modes += [f"{side}_only" for side in ("teacher", "student") if finite_with_zeros(divergence, side)]
    mode = draw(st.sampled_from(modes))
    count = 0 if mode == "none" else draw(st.sampled_from([1, max(1, vocab // 10), vocab - 1]))
    return mode, count


@st.composite
def kd_cases(draw):
    leading, view = draw(leading_shapes())
    vocab = draw(VOCAB)
    if draw(st.booleans()) and view == "contiguous":
        view = "strided_vocab"
    divergence = draw(DIVERGENCE)
    inf_mode, inf_count = draw(inf_entries(divergence, vocab))
    student_dtype, teacher_dtype = draw(dtype_pair())
    backend = draw(st.sampled_from(["triton", "torch"]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), leading=leading, vocab=vocab, view=view,
        student_dtype=student_dtype, teacher_dtype=teacher_dtype, divergence=divergence,
        temperature=draw(TEMPERATURE), labels=draw(LABELS), ignore_index=draw(st.sampled_from([-100, -1])),
        reduction=draw(REDUCTION), upstream=draw(st.sampled_from([1.0, 2.5, 0.3])),
        inf_mode=inf_mode, inf_count=inf_count, peaked=draw(st.sampled_from(["teacher", "both", "none"])),
        near=draw(st.booleans()), offsets=draw(st.booleans()), backend=backend,
        tiles=draw(st.sampled_from([None, (2, 3), (3, 5), (5, 2)])) if backend == "triton" else None,
        teacher_grad=draw(st.booleans()),
    )


@st.composite
def fused_cases(draw):
    leading, view = draw(leading_shapes(max_rows=24))
    vocab = draw(VOCAB)
    divergence = draw(DIVERGENCE)
    inf_mode, inf_count = draw(inf_entries(divergence, vocab))
    bias = draw(st.sampled_from(["none", "student", "teacher", "both"]))
    need = {"shared": "both", "teacher_only": "teacher", "student_only": "student"}.get(inf_mode)
    if need and bias not in (need, "both"):
        bias = "both" if bias != "none" else need
    dtype_mode = draw(st.sampled_from(["same", "same", "by_model", "hidden_vs_weight"]))
    a, b = draw(dtype_pair())
    dtypes = {"same": (a, a, a, a), "by_model": (a, a, b, b), "hidden_vs_weight": (a, b, a, b)}[dtype_mode]
    soft_weight, hard_weight = draw(st.sampled_from([(1.0, 0.0), (0.75, 0.25), (0.5, 1.0), (0.0, 1.0)]))
    labels = draw(LABELS if hard_weight == 0 else LABELS.filter(lambda v: v is not None))
    primary = draw(st.sampled_from(IMPLS))
    secondary = draw(st.sampled_from([x for x in IMPLS if x != primary]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), leading=leading, view=view, vocab=vocab,
        hs=draw(st.integers(1, 80)), ht=draw(st.integers(1, 80)),
        pad=draw(st.sampled_from([(0, 0), (0, 0), (3, 0), (0, 70)])),
        weight_transposed=draw(st.booleans()),
        dtypes=dtypes, bias=bias, inf_mode=inf_mode, inf_count=inf_count, divergence=divergence,
        temperature=draw(TEMPERATURE), soft_weight=soft_weight, hard_weight=hard_weight, labels=labels,
        ignore_index=draw(st.sampled_from([-100, -1])), reduction=draw(REDUCTION),
        upstream=draw(st.sampled_from([1.0, 2.5, 0.3])), peaked=draw(st.booleans()),
        impls=(primary, secondary), chunk_rows=draw(st.sampled_from([None, None, 1, 5, 16])),
        tiles=draw(st.sampled_from([None, None, (3, 16, 1), (5, 32, 2), (8, 16, 1)])),
        teacher_grad=draw(st.booleans()),
    )


# ---------------------------------------------------------------------------------------------------------
# Inputs: realistic values from the case's seed, then laid out as the case's view.

def _randn(g, *shape):
    return torch.randn(tuple(shape), generator=g, dtype=F64)


def _layout(final: torch.Tensor, view: str, g):
    """(base, fn) with fn(base) equal to `final` and laid out as `view`; the base's other entries are junk
    (large values) that must never be read."""
    if view == "contiguous":
        return final, lambda x: x
    if view == "k_sliced":  # x[..., :-1, :] of a tensor one longer along the last leading dimension
        junk = (_randn(g, *final.shape[:-2], 1, final.shape[-1]) * 50).to(final.dtype)
        return torch.cat([final, junk], dim=-2), lambda x: x[..., :-1, :]
    if view == "transposed":  # [L, B, ...] of a [B, L, ...] tensor
        return final.transpose(0, 1).contiguous(), lambda x: x.transpose(0, 1)
    if view == "strided_vocab":  # x[..., ::2]
        base = (_randn(g, *final.shape[:-1], 2 * final.shape[-1]) * 50).to(final.dtype)
        base[..., ::2] = final
        return base, lambda x: x[..., ::2]
    if view == "weight_t":  # a [V, H] weight stored as [H, V]
        return final.t().contiguous(), lambda x: x.t()
    raise AssertionError(view)


def _labels(g, leading, vocab, mode, ignore_index, allowed=None):
    """Labels in [0, vocab) (among `allowed` positions if given); `mode` says which rows are ignored."""
    if mode is None:
        return None
    if allowed is None:
        allowed = torch.arange(vocab)
    labels = allowed[torch.randint(0, len(allowed), leading, generator=g)]
    if mode == "some_ignored":
        labels[torch.rand(leading, generator=g) < 0.4] = ignore_index
    elif mode == "all_ignored":
        labels.fill_(ignore_index)
    return labels.to(DEVICE)


def _reduction_options(case, labels, n_rows):
    reduction = case["reduction"]
    if not reduction.startswith("num_items"):
        return dict(reduction=reduction)
    valid = n_rows if labels is None else int((labels != case["ignore_index"]).sum())
    n = max(1, valid + case["seed"] % 5)  # a global count: at least this batch's
    return dict(reduction="batchmean",
                num_items_in_batch=torch.tensor(float(n)) if reduction == "num_items_tensor" else n)


def _upstream(case, g, leading):
    if case["reduction"] == "none":
        return _randn(g, *leading)
    return torch.tensor(case["upstream"], dtype=F64)


def _masks(g, rows, vocab, count):
    """Per row, `count` random vocabulary positions, for about half of the rows (and the first)."""
    mask = torch.zeros(rows, vocab, dtype=torch.bool)
    for r in range(rows):
        if r == 0 or torch.rand((), generator=g) < 0.5:
            mask[r, torch.randperm(vocab, generator=g)[:count]] = True
    return mask


def kd_inputs(case):
    """Student and teacher logits (as (base, view fn)), labels, upstream gradient."""
    g = torch.Generator().manual_seed(case["seed"])
    leading, vocab = case["leading"], case["vocab"]
    rows = _numel(leading)
    t = _randn(g, rows, vocab) * 4
    s = None if case["near"] else _randn(g, rows, vocab) * 4
    for x, every in ((t, 3), (s, 5)):
        if x is None or case["peaked"] == "none" or (x is s and case["peaked"] != "both"):
            continue
        peaks = torch.randint(0, vocab, (rows,), generator=g)
        for r in range(0, rows, every):
            x[r, peaks[r]] = 30.0
    if case["near"]:  # a student close to its teacher, peaks included
        s = t + _randn(g, rows, vocab) * 0.3
    if case["offsets"]:
        t += _randn(g, rows, 1) * 8
        s += _randn(g, rows, 1) * 8
    if case["inf_mode"] != "none":
        mask = _masks(g, rows, vocab, case["inf_count"])
        for side, x in (("teacher", t), ("student", s)):
            if case["inf_mode"] in ("shared", f"{side}_only"):
                x[mask] = float("-inf")
    s = s.reshape(*leading, vocab).to(DTYPES[case["student_dtype"]])
    t = t.reshape(*leading, vocab).to(DTYPES[case["teacher_dtype"]])
    tensors = {"student_logits": _layout(s, case["view"], g), "teacher_logits": _layout(t, case["view"], g)}
    labels = _labels(g, leading, vocab, case["labels"], case["ignore_index"])
    return tensors, labels, _upstream(case, g, leading)


def fused_inputs(case):
    """Hidden states, weights and biases (as (base, view fn) or None), labels, upstream gradient.
    Logits have std ≈ 4; peaked rows align the teacher's hidden state with one weight row; padding rows of
    the larger weight (past the shared vocabulary) hold junk that must be ignored."""
    g = torch.Generator().manual_seed(case["seed"])
    leading, vocab, hs, ht = case["leading"], case["vocab"], case["hs"], case["ht"]
    rows = _numel(leading)
    vs, vt = vocab + case["pad"][0], vocab + case["pad"][1]
    x = {"student_hidden": _randn(g, rows, hs), "teacher_hidden": _randn(g, rows, ht),
         "student_weight": _randn(g, vs, hs) * 4 / hs ** 0.5, "teacher_weight": _randn(g, vt, ht) * 4 / ht ** 0.5}
    if case["peaked"]:
        for r in range(0, rows, 3):
            x["teacher_hidden"][r] = x["teacher_weight"][(r * 7) % vocab] * 3
    masked = _masks(g, 1, vocab, case["inf_count"])[0] if case["inf_mode"] != "none" else None
    for side, width in (("student", vs), ("teacher", vt)):
        if case["bias"] in (side, "both"):
            bias = _randn(g, width)
            bias[vocab:] = 1e4  # padding: would dominate every row if it were read
            if case["inf_mode"] in ("shared", f"{side}_only"):
                bias[:vocab][masked] = float("-inf")
            x[f"{side}_bias"] = bias
    allowed = None
    if "student_bias" in x:  # the hard label of a row is never a masked student entry
        allowed = torch.nonzero(x["student_bias"][:vocab] != float("-inf")).view(-1)
    labels = _labels(g, leading, vocab, case["labels"], case["ignore_index"], allowed)
    hsd, wsd, htd, wtd = (DTYPES[d] for d in case["dtypes"])
    cast = {"student_hidden": hsd, "student_weight": wsd, "student_bias": wsd, "teacher_hidden": htd,
            "teacher_weight": wtd, "teacher_bias": wtd}
    tensors = {}
    for name, value in x.items():
        value = value.to(cast[name])
        if name.endswith("hidden"):
            tensors[name] = _layout(value.reshape(*leading, -1), case["view"], g)
        elif name.endswith("weight") and case["weight_transposed"]:
            tensors[name] = _layout(value, "weight_t", g)
        else:
            tensors[name] = _layout(value, "contiguous", g)
    return tensors, labels, _upstream(case, g, leading)


# ---------------------------------------------------------------------------------------------------------
# Checks

def run(fn, tensors, grads_of, upstream, dtype=None, contiguous=False, **kwargs):
    """[loss, gradients of the tensors named in `grads_of`, in their order] of fn(**tensors, **kwargs).
    Each tensor is its view of a fresh copy of its base on DEVICE (the inputs are drawn on the host, so that a
    seed gives the same values everywhere), in `dtype` if given; a contiguous copy of the view if
    `contiguous`."""
    args, wrt = {}, []
    for name, entry in tensors.items():
        if entry is None:
            continue
        base, view = entry
        leaf = base.detach().to(DEVICE, dtype or base.dtype, copy=True).requires_grad_(name in grads_of)
        x = view(leaf)
        if contiguous:
            x = x.contiguous()
        args[name] = x
        if name in grads_of:
            wrt.append(x)
    loss = fn(**args, **kwargs)
    grads = torch.autograd.grad(loss, wrt, upstream.to(loss).expand_as(loss)) if wrt else ()
    return [loss, *grads]


def _names(outputs_of):
    return ["loss", *outputs_of]


def _tolerance(tensors):
    """SPEC "Accuracy": the tolerance of the least precise input dtype."""
    return max(TOLERANCE[base.dtype] for base, _ in (t for t in tensors.values() if t is not None))


#: SPEC "Accuracy" measures errors relative to the largest oracle magnitude of each output. Where that output
#: is tiny next to the quantities its float32 math adds and subtracts — one row of V = 2 whose gradient (1e-5)
#: is a difference of terms of the size of the row's loss (14), a divergence of ~0 at V = 1 — an error of an
#: ulp of those quantities reads as a large relative error, for kdops and the reference alike (which of the
#: two is luckier on a given input is a coin toss). So errors are taken relative to max(largest oracle
#: magnitude, FLOOR · the output's natural scale), the size the output would have if each row's gradient were
#: as large as the row's terms (`natural_scales`). Realistic batches have outputs above FLOOR of their
#: natural scale and get the plain SPEC rule; below it, the rule allows about an ulp of the natural scale
#: (1e-5 · FLOOR in float32). Failures of the literal rule in that regime are pinned by the
#: test_regression_tiny_* tests below.
FLOOR = 0.01


def check_against_oracle(fn, ref, tensors, grads_of, upstream, variants, natural, floor=FLOOR, **kwargs):
    """Each variant (keyword arguments of fn) against the float64 oracle: error ≤ same-dtype reference's
    error + tolerance, for the loss and every gradient (errors relative to max(largest oracle magnitude,
    floor · natural scale)); and the variants against each other, within twice the reference's error +
    tolerance (each may be off by the reference's own rounding: the torch backend is the reference's math)."""
    tol = _tolerance(tensors)
    oracle = run(ref, tensors, grads_of, upstream, F64, **kwargs)
    same_dtype = run(ref, tensors, grads_of, upstream, **kwargs)
    names = _names(grads_of)
    scales = [max(_largest(o), floor * n) for o, n in zip(oracle, natural)]
    bounds = [_error(r, o, scale) + tol for r, o, scale in zip(same_dtype, oracle, scales)]
    results = []
    for variant in variants:
        ours = run(fn, tensors, grads_of, upstream, **kwargs, **variant)
        assert len(ours) == len(oracle)
        for name, o, r, k, scale, bound in zip(names, oracle, same_dtype, ours, scales, bounds):
            assert k.dtype == r.dtype and k.shape == r.shape, f"{name} {variant}: {k.dtype} {tuple(k.shape)}, " \
                f"the reference gives {r.dtype} {tuple(r.shape)}"
            err = _error(k, o, scale)
            assert err <= bound, f"{name} {variant}: error {err:.3g} vs reference {bound - tol:.3g} + {tol:g}"
        results.append(ours)
    for name, o, scale, bound, *values in zip(names, oracle, scales, bounds, *results):
        for other in values[1:]:
            diff = _error(values[0], other.to(F64), scale, check_finite=False)
            assert diff <= 2 * bound - tol, \
                f"{name}: {variants[0]} and a second variant differ by {diff:.3g} > {2 * bound - tol:.3g}"
    return results, scales


def _largest(x):
    x = x.detach().to(F64)
    finite = torch.isfinite(x)
    return float(x[finite].abs().max()) if finite.any() else 0.0


def _error(value, oracle, scale, check_finite=True):
    """max |value − oracle| over the oracle's finite entries / scale; non-finite entries must match the
    oracle's (oracle.rel_error's check)."""
    if check_finite:
        rel_error(value, oracle)
    value, oracle = value.detach().to(F64), oracle.detach().to(F64)
    finite = torch.isfinite(oracle)
    if not finite.any():
        return 0.0
    return float((value[finite] - oracle[finite]).abs().max()) / max(scale, 1e-30)


def _reduce(rows, mask, reduction, num_items_in_batch=None):
    """SPEC "Reductions" of per-row values."""
    rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        return total / mask.sum().clamp_min(1)
    return total / torch.as_tensor(num_items_in_batch).to(total)


def _finite_absmax(x):
    return torch.where(torch.isfinite(x), x.abs(), 0.0).amax(-1)


def natural_scales(tensors, grads_of, upstream, leading, rows_of, **kwargs):
    """[loss, every gradient]: the natural scale of each output (see FLOOR). Per row, c = 1 + |ℓ| + (largest
    |s| + largest |t|) / min(T, 1), ℓ the oracle's row loss: the size of the terms the row's math adds and
    subtracts. The loss's scale is the reduction of c; a gradient's, the largest entry of the gradient of the
    reduction of c · (logsumexp(s / T) + logsumexp(t / T)) — c · (q, p) / T on the logits, carried through
    the inputs like the loss's own gradient. `rows_of(**float64 inputs)` gives (ℓ, s, t): [rows], [rows, V]
    twice."""
    temperature = kwargs["temperature"]
    labels, ignore_index = kwargs["labels"], kwargs["ignore_index"]
    reduction, num_items = kwargs["reduction"], kwargs.get("num_items_in_batch")
    state = {}

    def surrogate(**inputs):
        ell, s, t = rows_of(**inputs)
        mask = (torch.ones(ell.shape, dtype=torch.bool, device=ell.device) if labels is None
                else (labels != ignore_index).reshape(-1))
        c = (1 + ell.abs() + (_finite_absmax(s) + _finite_absmax(t)) * max(1.0, 1.0 / temperature)).detach()
        state["loss"] = _largest(_reduce(c, mask, reduction, num_items))
        rows = c * (torch.logsumexp(s / temperature, -1) + torch.logsumexp(t / temperature, -1))
        return _reduce(rows, mask, reduction, num_items).reshape(leading if reduction == "none" else ())

    grads = run(surrogate, tensors, grads_of, upstream, F64)[1:]
    return [state["loss"], *(_largest(g) for g in grads)]


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _small_logits_tiles(tiles):
    """Tiles of the kernels on logits for about tiles = (row blocks, vocabulary blocks), the last ones partial
    (sized from the launch's own rows and vocabulary, so that the interpreter's cost stays bounded)."""
    if tiles is None:
        return contextlib.nullcontext()
    row_blocks, vocab_blocks = tiles

    def config(n_rows, vocab, *args, **kwargs):
        return dict(BLOCK_R=_pow2_at_least(-(-n_rows // row_blocks)),
                    BLOCK_V=max(16, _pow2_at_least(-(-vocab // vocab_blocks))))

    return mock.patch.object(kdops.launchers.logits, "logits_config", config)


def _small_fused_tiles(tiles, width):
    """Small fused tiles — about tiles[0] vocabulary blocks, BLOCK_H = tiles[1], tiles[2] blocks per
    vocabulary split — one vocabulary tile per backward slice, and small tiles on logits (the chunked path)."""
    if tiles is None:
        return contextlib.nullcontext()
    vocab_blocks, block_h, blocks_per_split = tiles
    original = kdops.launchers.linear.fused_config

    def small(n_rows, vocab, *args, **kwargs):
        block_v = max(16, _pow2_at_least(-(-vocab // vocab_blocks)))
        return dict(original(n_rows, vocab, *args, **kwargs), BLOCK_N=16, BLOCK_V=block_v, BLOCK_H=block_h,
                    split_size=block_v * blocks_per_split)

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(kdops.launchers.linear, "fused_config", small))
    stack.enter_context(mock.patch.object(kdops.launchers.linear, "GRADIENT_BYTES", 1))
    stack.enter_context(_small_logits_tiles((3, vocab_blocks)))
    return stack


def check_all_ignored(case, results):
    """SPEC "Reductions": a batch where every token is ignored gives loss 0 and zero gradients, exactly."""
    if case["labels"] == "all_ignored":
        for ours in results:
            assert all(torch.count_nonzero(x) == 0 for x in ours), "an all-ignored batch is not exactly 0"


def check_kd_loss(case, floor=FLOOR):
    tensors, labels, upstream = kd_inputs(case)
    grads_of = ["student_logits"] + (["teacher_logits"] if case["teacher_grad"] else [])
    kwargs = dict(labels=labels, divergence=case["divergence"], temperature=case["temperature"],
                  ignore_index=case["ignore_index"], **_reduction_options(case, labels, _numel(case["leading"])))
    vocab = case["vocab"]

    def rows_of(student_logits, teacher_logits):
        ell = reference.kd_loss(student_logits.detach(), teacher_logits.detach(), divergence=case["divergence"],
                                temperature=case["temperature"], reduction="none")
        return ell.reshape(-1), student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)

    natural = natural_scales(tensors, grads_of, upstream, case["leading"], rows_of, **kwargs)
    other = "torch" if case["backend"] == "triton" else "triton"
    with _small_logits_tiles(case["tiles"]):
        results, scales = check_against_oracle(
            kdops.kd_loss, reference.kd_loss, tensors, grads_of, upstream,
            [dict(backend=case["backend"]), dict(backend=other)], natural, floor, **kwargs)
        check_all_ignored(case, results)
        if case["view"] != "contiguous":  # the view reads like its contiguous copy
            copy = run(kdops.kd_loss, tensors, grads_of, upstream, contiguous=True, backend=case["backend"],
                       **kwargs)
            for name, a, b, scale in zip(_names(grads_of), results[0], copy, scales):
                diff = _error(a, b.to(F64), scale, check_finite=False)
                assert diff <= _tolerance(tensors), f"{name}: the view differs from its contiguous copy by {diff:.3g}"


def check_fused_linear(case, floor=FLOOR):
    tensors, labels, upstream = fused_inputs(case)
    tensors = {name: tensors.get(name) for name in FUSED_TENSORS}
    grads_of = [name for name in FUSED_TENSORS if tensors[name] is not None
                and (name.startswith("student") or case["teacher_grad"])]
    kwargs = dict(labels=labels, divergence=case["divergence"], temperature=case["temperature"],
                  ignore_index=case["ignore_index"], soft_weight=case["soft_weight"],
                  hard_weight=case["hard_weight"], **_reduction_options(case, labels, _numel(case["leading"])))
    vocab = case["vocab"]

    def rows_of(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
                teacher_bias=None):
        s = kdops.torch_math.linear_logits(student_hidden, student_weight, student_bias, vocab, F64)
        t = kdops.torch_math.linear_logits(teacher_hidden, teacher_weight, teacher_bias, vocab, F64)
        ell = kdops.torch_math.linear_kd_rows(s.detach().reshape(-1, vocab), t.detach().reshape(-1, vocab),
                                              None if labels is None else labels.reshape(-1), kdops.as_divergence(
                                           case["divergence"]), case["temperature"], case["soft_weight"],
                                       case["hard_weight"], case["ignore_index"])
        return ell, s.reshape(-1, vocab), t.reshape(-1, vocab)

    natural = natural_scales(tensors, grads_of, upstream, case["leading"], rows_of, **kwargs)
    memory_budget = None if case["chunk_rows"] is None else case["chunk_rows"] * vocab * 16
    variants = [dict(impl=impl, backend=backend, memory_budget=memory_budget) for impl, backend in case["impls"]]
    with _small_fused_tiles(case["tiles"], max(case["hs"], case["ht"])):
        results, _ = check_against_oracle(kdops.fused_linear_kd_loss, reference.fused_linear_kd_loss, tensors,
                                          grads_of, upstream, variants, natural, floor, **kwargs)
    check_all_ignored(case, results)


# ---------------------------------------------------------------------------------------------------------
# The properties

# An example of kd_loss costs about a quarter of one of fused_linear_kd_loss: three times as many, in every
# profile.
@settings(max_examples=3 * settings().max_examples)
@given(kd_cases())
def test_kd_loss_properties(case):
    check_kd_loss(case)


@given(fused_cases())
def test_fused_linear_kd_loss_properties(case):
    check_fused_linear(case)


# ---------------------------------------------------------------------------------------------------------
# Regression tests: failing examples found by hypothesis runs, pinned with their concrete inputs.

@pytest.mark.parametrize("student_dtype", ["fp32", "bf16"])
def test_regression_torch_backend_loss_dtype_of_f64_teacher(student_dtype):
    """kd_loss(backend="torch") with a float64 teacher and a narrower student: the math is float64 (the
    reference's compute dtype of both inputs), so the loss is float64, as with backend="triton" and the
    reference — and its value is not rounded to float32. Found by test_kd_loss_properties: the torch backend
    stored the per-row losses in promote_types(student.dtype, float32) (kdops/_autograd.py, ChunkedRowsFunction)."""
    case = dict(seed=0, leading=(3, 7), vocab=301, view="contiguous", student_dtype=student_dtype,
                teacher_dtype="fp64", divergence="forward_kl", temperature=1.0, labels=None, ignore_index=-100,
                reduction="batchmean", upstream=1.0, inf_mode="none", inf_count=0, peaked="teacher", near=False,
                offsets=False, backend="triton", tiles=None, teacher_grad=False)
    tensors, _, _ = kd_inputs(case)
    student, teacher = (base for base, _ in tensors.values())
    for reduction in ("batchmean", "none"):
        want = reference.kd_loss(student, teacher, reduction=reduction)
        assert kdops.kd_loss(student, teacher, backend="triton", reduction=reduction).dtype == want.dtype == F64
        got = kdops.kd_loss(student, teacher, backend="torch", reduction=reduction)
        assert got.dtype == want.dtype and rel_error(got, want) <= TOLERANCE[F64]


@pytest.mark.parametrize("bf16_side", ["student", "teacher"])
def test_regression_bf16_grad_beside_fp64(bf16_side):
    """kd_loss(backend="triton") with one input bfloat16 and the other float64: every gradient within the
    SPEC bound. Found by test_kd_loss_properties: under Triton's interpreter the bfloat16 gradient came back
    all zeros (the kernels accumulate in float64 and stored with .to(bfloat16), which Triton 3.9's
    interpreter computes wrongly: ~1e-40, a float32 bit pattern read as bfloat16)."""
    dtypes = ("bf16", "fp64") if bf16_side == "student" else ("fp64", "bf16")
    check_kd_loss(dict(seed=1, leading=(3, 7), vocab=301, view="contiguous", student_dtype=dtypes[0],
                       teacher_dtype=dtypes[1], divergence="forward_kl", temperature=1.0, labels=None,
                       ignore_index=-100, reduction="sum", upstream=1.0, inf_mode="none", inf_count=0,
                       peaked="teacher", near=False, offsets=False, backend="triton", tiles=None, teacher_grad=True))


@pytest.mark.parametrize("divergence", [kdops.GeneralizedJSD(beta=0.345), kdops.SkewForwardKL(alpha=0.1),
                                        kdops.SkewReverseKL(alpha=0.1)], ids=repr)
def test_regression_f64_divergence_parameters(divergence):
    """kd_loss(backend="triton") on float64 logits with a divergence parameter that float32 does not
    represent: loss and gradients within TOLERANCE[float64] of the oracle. Found by test_kd_loss_properties
    (2e-9 to 6e-9 relative while the kernels took β / α as a float32 argument, and the log-mixture cast the
    interpreter's Python float through float32; the strategies rounded parameters to float32 for float64 inputs).
    The kernels now declare their float arguments float64 (`kernels/divergences.py`, FLOAT; the compile gate's
    test_float_arguments_reach_the_kernels_unrounded checks every launch)."""
    check_kd_loss(dict(seed=3, leading=(4, 5), vocab=301, view="contiguous", student_dtype="fp64",
                       teacher_dtype="fp64", divergence=divergence, temperature=1.5, labels=None,
                       ignore_index=-100, reduction="sum", upstream=1.0, inf_mode="none", inf_count=0,
                       peaked="teacher", near=False, offsets=False, backend="triton", tiles=None, teacher_grad=True))


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_regression_f64_divergence_parameters_fused_linear(impl):
    """fused_linear_kd_loss(backend="triton") in float64 with skew_reverse_kl's default α = 0.1: loss and
    gradients within TOLERANCE[float64] of the oracle (loss 3e-10 relative while α reached the kernels in
    float32). Found by test_fused_linear_kd_loss_properties."""
    check_fused_linear(dict(seed=806775, leading=(6, 1), view="contiguous", vocab=208, hs=61, ht=25, pad=(3, 0),
                            weight_transposed=False, dtypes=("fp64",) * 4, bias="teacher", inf_mode="teacher_only",
                            inf_count=1, divergence="skew_reverse_kl", temperature=2.0, soft_weight=0.5,
                            hard_weight=1.0, labels="none_ignored", ignore_index=-1, reduction="num_items_tensor",
                            upstream=0.3, peaked=False, impls=((impl, "triton"),), chunk_rows=5, tiles=None,
                            teacher_grad=True))


@pytest.mark.parametrize("divergence", [kdops.SkewReverseKL(alpha=0.0), kdops.SkewForwardKL(alpha=0.0)], ids=repr)
def test_regression_skew_alpha_0_underflow_nan_gradient(divergence):
    """A skew KL with α = 0 is KL(P ‖ Q); with a teacher peaked at 30 and T = 0.25, Q's probability of an
    entry is e^-157 (0 in float32) while P's is not: loss and gradients stay finite and exact. Found by
    test_kd_loss_properties (SkewReverseKL(alpha=0.0), V = 2, 16 rows: NaN student-gradient rows: the
    Triton gradient multiplied α = 0 by p²/M, which overflowed; kernels/divergences.py now skips that term
    at α = 0)."""
    forward = isinstance(divergence, kdops.SkewForwardKL)
    check_kd_loss(dict(seed=0, leading=(4, 4), vocab=2, view="contiguous", student_dtype="fp32",
                       teacher_dtype="fp32", divergence=divergence, temperature=0.25, labels="none_ignored",
                       ignore_index=-100, reduction="none", upstream=2.5, inf_mode="none", inf_count=0,
                       peaked="teacher", near=False, offsets=False, backend="torch", tiles=None,
                       teacher_grad=True) | ({"peaked": "both"} if forward else {}))


TINY_GRADIENT_CASES = {
    # forward_kl on one row of V = 2, student and teacher peaked (+30) at different entries, T = 2: the
    # teacher's gradient (1.6e-5) is a difference of terms of the size of the row's loss (13.8).
    "kd_loss-forward_kl": (check_kd_loss, dict(
        seed=1, leading=(), vocab=2, view="contiguous", student_dtype="fp32", teacher_dtype="fp32",
        divergence="forward_kl", temperature=2.0, labels=None, ignore_index=-100, reduction="batchmean",
        upstream=1.0, inf_mode="none", inf_count=0, peaked="both", near=False, offsets=False, backend="torch",
        tiles=None, teacher_grad=True)),
    # one token, V = 2, Hs = Ht = 1: the hidden state's gradient (8e-6) is a near-cancelling sum.
    **{f"fused_linear-{divergence}": (check_fused_linear, dict(
        seed=0, leading=(), view="contiguous", vocab=2, hs=1, ht=1, pad=(0, 0), weight_transposed=False,
        dtypes=("fp32",) * 4, bias="none", inf_mode="none", inf_count=0, divergence=divergence, temperature=1.0,
        soft_weight=1.0, hard_weight=0.0, labels=None, ignore_index=-100, reduction="batchmean", upstream=1.0,
        peaked=False, impls=(("fused", "triton"), ("chunked", "triton")), chunk_rows=None, tiles=None,
        teacher_grad=False)) for divergence in ("generalized_jsd", "reverse_kl")},
}


@pytest.mark.parametrize("case", list(TINY_GRADIENT_CASES))
def test_regression_tiny_gradients(case):
    """Outputs tiny next to their terms, from hypothesis runs: kdops within the SPEC rule with errors relative
    to FLOOR of the natural scale (about an ulp of the row's terms). Under the literal rule (floor 0) these
    failed on some kernel versions and passed on others (kdops' error 2-8x the reference's, both a few ulps
    of the row's loss): the reason for FLOOR."""
    check, params = TINY_GRADIENT_CASES[case]
    check(params)
