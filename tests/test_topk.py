"""kdops.topk_kd_loss against a float64 oracle written here, independently of kdops: explicit probability
vectors over the k (+1) outcomes of each tail mode, row by row, and the divergences' formulas in
probability space."""

from __future__ import annotations

import math

import pytest
import torch

import kdops
import kdops.paths.topk
import kdops.paths.topk_linear
from kdops import reference
from oracle import TOLERANCE, assert_within_reference, make_logits, rel_error

from conftest import DEVICE

DIVERGENCES = {
    "forward_kl": kdops.ForwardKL(), "reverse_kl": kdops.ReverseKL(), "generalized_jsd": kdops.GeneralizedJSD(0.3),
    "skew_forward_kl": kdops.SkewForwardKL(0.2), "skew_reverse_kl": kdops.SkewReverseKL(0.2), "tvd": kdops.TVD(),
    "alpha_beta": kdops.AlphaBeta(0.4, 0.8),
}
ZERO_INVALID = ("reverse_kl",)
CASES = [(tail, name) for tail in ("bucket", "renormalize", "zero") for name in DIVERGENCES
         if not (tail == "zero" and name in ZERO_INVALID)]


# --- the oracle ----------------------------------------------------------------------------------------------

def _kl(a, b):
    """Σ a log(a / b) over a > 0 (∞ where b = 0 < a)."""
    live = a > 0
    return torch.where(live, a * (torch.log(torch.where(live, a, 1.0)) - torch.log(torch.where(live, b, 1.0))),
                       0.0).sum()


def divergence_of(d: kdops.Divergence, p, q):
    """D(teacher p ‖ student q) of explicit probability vectors, by the catalog's formulas."""
    d = kdops.as_divergence(d)
    if isinstance(d, kdops.ForwardKL):
        return _kl(p, q)
    if isinstance(d, kdops.ReverseKL):
        return _kl(q, p)
    if isinstance(d, kdops.GeneralizedJSD):
        m = d.beta * p + (1 - d.beta) * q
        return d.beta * _kl(p, m) + (1 - d.beta) * _kl(q, m)
    if isinstance(d, kdops.SkewForwardKL):
        return _kl(p, d.alpha * p + (1 - d.alpha) * q)
    if isinstance(d, kdops.SkewReverseKL):
        return _kl(q, d.alpha * q + (1 - d.alpha) * p)
    if isinstance(d, kdops.TVD):
        return 0.5 * (p - q).abs().sum()
    a, b = d.alpha, d.beta
    return -(p ** a * q ** b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum() / (a * b)


def oracle_rows(student, ids, logprobs, d, temperature, tail):
    """Per-row losses in float64: q = softmax(s / T) over V, p = exp(logprobs); absent entries (−inf) left
    out; the tail a plain sum of q over the vocabulary entries that are none of the row's ids."""
    q_all = torch.softmax(student.double() / temperature, dim=-1).reshape(-1, student.shape[-1])
    ids = ids.reshape(-1, ids.shape[-1])
    logprobs = logprobs.double().reshape(-1, ids.shape[-1])
    rows = []
    for r in range(q_all.shape[0]):
        present = logprobs[r] > -math.inf
        row_ids = ids[r][present]
        p = logprobs[r][present].exp()
        q = q_all[r][row_ids]
        outside = torch.ones(student.shape[-1], dtype=torch.bool)
        outside[row_ids] = False
        q_tail = q_all[r][outside].sum()
        if tail == "renormalize":
            p, q = p / p.sum(), q / q.sum()
        elif tail == "zero":
            p = torch.cat([p / p.sum(), p.new_zeros(1)])
            q = torch.cat([q, q_tail[None]])
        elif bool(outside.any()):  # bucket, with a non-empty complement
            p = torch.cat([p, (1 - p.sum()).clamp_min(0)[None]])
            q = torch.cat([q, q_tail[None]])
        rows.append(divergence_of(d, p, q))
    return torch.stack(rows).view(student.shape[:-1])


def oracle_loss(student, ids, logprobs, labels=None, *, divergence, temperature=1.0, tail="bucket",
                reduction="batchmean",
                ignore_index=-100, **_):
    rows = oracle_rows(student, ids, logprobs, divergence, temperature, tail)
    mask = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (mask.sum().clamp_min(1) if reduction == "batchmean" else 1)


# --- inputs --------------------------------------------------------------------------------------------------

def sparse_teacher(student, k, *, seed=0, pad_rows=(1,)):
    """Top-k ids and log-probabilities of a realistic teacher (randn·4, peaked rows, −inf logits where the
    student's are −inf) for `student` [..., V], in random order; rows in `pad_rows` have their last k // 2
    entries absent (−inf)."""
    g = torch.Generator().manual_seed(seed)
    *leading, vocab = student.shape
    logits = make_logits((*leading, vocab), peaked_every=3, masked_every=0, generator=g)
    logits = logits.masked_fill(student.cpu() == -math.inf, -math.inf)
    logprobs, ids = torch.log_softmax(logits.double(), -1).topk(k, dim=-1)
    perm = torch.argsort(torch.rand(*leading, k, generator=g), dim=-1)
    logprobs, ids = logprobs.gather(-1, perm), ids.gather(-1, perm)
    flat = logprobs.view(-1, k)
    for r in pad_rows:
        if r < flat.shape[0] and k > 1:
            flat[r, k - k // 2:] = -math.inf
    return ids, logprobs.float()


def run(fn, student, ids, logprobs, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, ids, logprobs, **kwargs)
    (grad,) = torch.autograd.grad(loss, [student], torch.ones_like(loss))
    return loss, grad


def assert_matches(student, ids, logprobs, **kwargs):
    """kdops' error vs the float64 oracle ≤ the same-dtype reference's + TOLERANCE, loss and gradient."""
    oracle = run(oracle_loss, student.double(), ids, logprobs, **kwargs)
    same_dtype = run(reference.topk_kd_loss, student, ids, logprobs, **kwargs)
    ours = run(kdops.topk_kd_loss, student, ids, logprobs, **kwargs)
    assert_within_reference(("loss", "grad"), oracle, same_dtype, ours, student.dtype)
    return ours


# --- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("tail,name", CASES)
def test_every_tail_and_divergence(tail, name, backend):
    vocab, k = 301, 7
    student = make_logits((3, 4, vocab), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ids, logprobs = sparse_teacher(student, k, seed=2)
    labels = torch.tensor([[0, -100, 3, 4]] * 3)
    assert_matches(student, ids.to(DEVICE), logprobs.to(DEVICE), labels=labels.to(DEVICE),
                   divergence=DIVERGENCES[name], temperature=2.0, tail=tail, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 211])
@pytest.mark.parametrize("tail,name", [("bucket", "forward_kl"), ("renormalize", "generalized_jsd"),
                                       ("zero", "tvd"), ("bucket", "alpha_beta")])
def test_k_dtypes_and_temperature_one(tail, name, k, dtype, backend):
    """k = 1, 7 and V (211: the whole vocabulary, in several tiles of the kernel's window of ids). With k = 1 the
    pair is two outcomes, one holding nearly all of the student's mass: the top-k side must not pass on the
    dense gradient's rounding along the shift (`kdops.paths.topk.shift_free`), nor TVD's kernels cancel
    (`kernels/divergences.py`: sums by sign class)."""
    vocab = 211
    # No −inf logits here: with k = V they would be exactly the ids the teacher lacks, the student's complement
    # would be empty and the teacher's tail its log-probabilities' rounding (test_every_tail has −inf logits).
    student = make_logits((9, vocab), masked_every=0,
                          generator=torch.Generator().manual_seed(k)).to(DEVICE, dtype)
    ids, logprobs = sparse_teacher(student, k, seed=k + 1, pad_rows=(1, 4))
    assert_matches(student, ids.to(DEVICE), logprobs.to(DEVICE), divergence=DIVERGENCES[name], temperature=1.0,
                   tail=tail, reduction="sum", backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_bucket_with_the_whole_vocabulary_is_the_dense_loss(name, backend):
    """k = V, "bucket": both tails are empty and the loss is kd_loss with the teacher's logits."""
    vocab = 157
    g = torch.Generator().manual_seed(5)
    student = make_logits((6, vocab), generator=g, masked_every=0).to(DEVICE)
    teacher = make_logits((6, vocab), generator=g, masked_every=0).to(DEVICE)
    logprobs, ids = torch.log_softmax(teacher / 2.0, -1).topk(vocab, dim=-1)
    dense = run(lambda s, *_: kdops.kd_loss(s, teacher, divergence=DIVERGENCES[name], temperature=2.0,
                                            backend=backend), student, ids, logprobs)
    sparse = run(kdops.topk_kd_loss, student, ids, logprobs, divergence=DIVERGENCES[name], temperature=2.0,
                 backend=backend)
    for a, b in zip(sparse, dense):
        assert rel_error(a, b) <= 5e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_small_student_tail_is_exact_to_its_size(backend):
    """The ids hold all but ~1e-9 of the student's mass: q_tail from the complement keeps its relative
    precision, where 1 − Σ q_ids would be pure rounding error (~1e-7 absolute)."""
    from kdops.paths.topk import StudentTopKFunction, TopKTeacher

    vocab, k = 300, 5
    student = torch.randn(4, vocab) - 14.0
    ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(4)])
    student.scatter_(-1, ids, 12.0 + torch.randn(4, k))
    logprobs = torch.full((4, k), math.log(1.0 / (k + 1)))
    teacher = TopKTeacher(ids, logprobs, vocab, "bucket", torch.float32)
    columns, lse_rest = StudentTopKFunction.apply(student.to(DEVICE), teacher, 1.0, backend)
    x = student.double()
    member = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, ids, True)
    exact = torch.logsumexp(x.masked_fill(member, -math.inf), -1)
    q_tail = torch.exp(lse_rest.double() - torch.logsumexp(x, -1))
    assert float(q_tail.max()) < 1e-8
    assert torch.allclose(lse_rest.double().cpu(), exact, rtol=0, atol=2e-6)  # log q_tail to ~1e-6 relative


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_teacher_mass_of_one_and_ignored_rows(backend):
    """A teacher whose k ids hold all its mass (empty tail: the bucket's teacher outcome is 0), and a batch
    with every row ignored (loss 0, gradient exact zeros even for a degenerate row)."""
    vocab, k = 131, 6
    g = torch.Generator().manual_seed(7)
    student = make_logits((5, vocab), generator=g).to(DEVICE)
    teacher = torch.full((5, vocab), -math.inf)
    support = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(5)])
    teacher.scatter_(-1, support, torch.randn(5, k, generator=g) * 3)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    assert_matches(student, ids.to(DEVICE), logprobs.to(DEVICE), divergence=kdops.ForwardKL(), tail="bucket",
                   backend=backend)
    labels = torch.full((5,), -100, device=DEVICE)
    student[0] = -math.inf
    loss, grad = run(kdops.topk_kd_loss, student, ids.to(DEVICE), logprobs.to(DEVICE), labels=labels,
                     backend=backend)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_many_ids_per_tile_and_padding_everywhere():
    """More ids in one vocabulary tile than the kernel's window holds (consecutive ids), and rows whose
    entries are all absent but one."""
    vocab, k = 600, 40
    student = make_logits((5, vocab), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ids = torch.arange(100, 100 + k).repeat(5, 1)
    logprobs = torch.log_softmax(torch.randn(5, k) * 2, -1) - 0.1
    logprobs[2, 1:] = -math.inf
    for tail in ("bucket", "zero"):
        assert_matches(student, ids.to(DEVICE), logprobs.to(DEVICE), divergence=kdops.GeneralizedJSD(0.5),
                       temperature=1.5, tail=tail, backend="triton")


def test_module_and_reductions():
    vocab, k = 97, 5
    student = make_logits((2, 3, vocab), generator=torch.Generator().manual_seed(11))
    ids, logprobs = sparse_teacher(student, k, seed=12)
    loss = kdops.TopKKDLoss(divergence="tvd", tail="zero", reduction="none")(student, ids, logprobs)
    assert loss.shape == (2, 3)
    total = kdops.topk_kd_loss(student, ids, logprobs, divergence="tvd", tail="zero", reduction="sum")
    assert torch.allclose(loss.sum(), total)
    per_item = kdops.topk_kd_loss(student, ids, logprobs, divergence="tvd", tail="zero", num_items_in_batch=4)
    assert torch.allclose(per_item, total / 4)


def _inputs():
    student = torch.randn(2, 3, 50)
    ids = torch.stack([torch.randperm(50)[:4] for _ in range(6)]).view(2, 3, 4)
    logprobs = torch.log(torch.full((2, 3, 4), 0.2))
    return student, ids, logprobs


@pytest.mark.parametrize("change,error,match", [
    (lambda s, i, p: (s, i[..., :3], p), ValueError, "same shape"),
    (lambda s, i, p: (s, i[:1], p[:1]), ValueError, "leading dimensions"),
    (lambda s, i, p: (s, i.float(), p), TypeError, "teacher_ids: expected"),
    (lambda s, i, p: (s, i, p.to(torch.int64)), TypeError, "teacher_logprobs"),
    (lambda s, i, p: (s, i.index_fill(-1, torch.tensor([0]), 50), p), ValueError, r"ids in \[0, 50\)"),
    (lambda s, i, p: (s, i.index_fill(-1, torch.tensor([0]), -1), p), ValueError, r"ids in \[0, 50\)"),
    (lambda s, i, p: (s, i.index_copy(-1, torch.tensor([1]), i[..., :1]), p), ValueError, "twice"),
    (lambda s, i, p: (s, i, p.index_fill(-1, torch.tensor([0]), 0.1)), ValueError, "log-probabilities"),
    (lambda s, i, p: (s, i, p.index_fill(-1, torch.tensor([0]), float("nan"))), ValueError, "log-probabilities"),
    (lambda s, i, p: (s, i, p + 0.3), ValueError, "sum to at most 1"),
    (lambda s, i, p: (s, i[..., :0], p[..., :0]), ValueError, "k"),
])
def test_errors_name_the_argument(change, error, match):
    student, ids, logprobs = change(*_inputs())
    for fn in (kdops.topk_kd_loss, reference.topk_kd_loss):
        with pytest.raises(error, match=match):
            fn(student, ids, logprobs)


def test_absent_entries_may_hold_any_id_and_options_are_checked():
    student, ids, logprobs = _inputs()
    ids[..., 0] = -1  # absent entries: their ids are never read
    logprobs[..., 0] = -math.inf
    kdops.topk_kd_loss(student, ids, logprobs)
    kdops.topk_kd_loss(student, ids, logprobs + 0.2, tail="renormalize")  # Σp > 1 is fine when renormalized
    with pytest.raises(ValueError, match="tail: expected one of"):
        kdops.topk_kd_loss(student, ids, logprobs, tail="drop")
    for divergence in ("reverse_kl", kdops.GeneralizedJSD(1.0), kdops.SkewReverseKL(0.0)):
        with pytest.raises(ValueError, match="tail='zero'.*log\\(q / 0\\)"):
            kdops.topk_kd_loss(student, ids, logprobs, divergence=divergence, tail="zero")
    with pytest.raises(ValueError, match="labels"):
        kdops.topk_kd_loss(student, ids, logprobs, labels=torch.zeros(2, dtype=torch.long))


# --- from hidden states --------------------------------------------------------------------------------------

def oracle_linear(hs, ws, bs, ids, logprobs, labels, *, divergence, temperature=1.0, tail="bucket",
                  hard_weight=0.0, soft_weight=1.0, **_):
    logits = hs.double() @ ws.double().T + (0 if bs is None else bs.double())
    rows = soft_weight * oracle_rows(logits, ids, logprobs, divergence, temperature, tail)
    mask = labels != -100
    if hard_weight > 0:
        safe = torch.where(mask, labels, 0)
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, safe[..., None])[..., 0]
        rows = rows + hard_weight * ce
    return torch.where(mask, rows, 0.0).sum() / mask.sum()


def run_linear(fn, tensors, ids, logprobs, labels, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves[:2], ids, logprobs, labels, student_bias=leaves[2], **kwargs) if fn is not oracle_linear \
        else fn(*leaves, ids, logprobs, labels, **kwargs)
    return [loss, *torch.autograd.grad(loss, leaves)]


def linear_inputs(dtype, *, rows=(3, 7), vocab=263, width=24, k=9, seed=0):
    """Student hidden states, weight, bias (logits with the spread of randn·4), a sparse teacher, labels."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*rows, width, generator=g)
    ws = torch.randn(vocab, width, generator=g) * (4.0 / width ** 0.5)  # logits with the spread of randn·4
    bs = torch.randn(vocab, generator=g)
    ids, logprobs = sparse_teacher(hs @ ws.T + bs, k, seed=seed + 1)
    labels = torch.randint(0, vocab, rows, generator=g)
    labels.view(-1)[::4] = -100
    return [x.to(DEVICE, dtype) for x in (hs, ws, bs)], ids.to(DEVICE), logprobs.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail,name,hard,impl", [
    ("bucket", "forward_kl", 0.5, "auto"), ("renormalize", "generalized_jsd", 0.0, "auto"),
    ("renormalize", "generalized_jsd", 0.0, "chunked"), ("renormalize", "reverse_kl", 0.3, "auto"),
    ("zero", "skew_reverse_kl", 0.0, "auto")])
def test_fused_linear_matches_oracle(tail, name, hard, impl, dtype, backend):
    """Hidden states, weight and bias gradients against the float64 oracle; a small budget gives many chunks in
    several groups (bf16: float32 weight-gradient accumulators); renormalize without the hard term under
    "auto" multiplies only the gathered weight rows (in three chunks)."""
    tensors, ids, logprobs, labels = linear_inputs(dtype)
    memory_budget = 3 * 263 * 4 * 8  # a few rows' logits and G per chunk
    kwargs = dict(divergence=DIVERGENCES[name], temperature=2.0, tail=tail, hard_weight=hard, soft_weight=0.7)
    oracle = run_linear(oracle_linear, [t.double() for t in tensors], ids, logprobs, labels, **kwargs)
    same = run_linear(reference.fused_linear_topk_kd_loss, tensors, ids, logprobs, labels, **kwargs)
    ours = run_linear(kdops.fused_linear_topk_kd_loss, tensors, ids, logprobs, labels, impl=impl, backend=backend,
                      memory_budget=memory_budget, **kwargs)
    for what, o, r, k in zip(("loss", "hidden", "weight", "bias"), oracle, same, ours):
        assert k.dtype == r.dtype, what
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"{what}: error {err:.3g} vs reference {ref_err:.3g}"


def test_fused_linear_paths_and_errors(monkeypatch):
    """"auto" takes the gathered path exactly where it applies (renormalize, no hard term), and it never
    multiplies more than the gathered rows; impl="gathered" elsewhere, and "fused", raise."""

    tensors, ids, logprobs, labels = linear_inputs(torch.float32)
    seen = []
    for cls in (kdops.paths.topk_linear.TopKGatheredProblem, kdops.paths.topk_linear.TopKChunkedProblem):
        monkeypatch.setattr(cls, "run", lambda self, *a, _run=cls.run: seen.append(type(self).__name__) or _run(self,
                                                                                                                *a))
    kdops.fused_linear_topk_kd_loss(*tensors[:2], ids, logprobs, labels, tail="renormalize")
    kdops.fused_linear_topk_kd_loss(*tensors[:2], ids, logprobs, labels, tail="renormalize", hard_weight=0.1)
    kdops.fused_linear_topk_kd_loss(*tensors[:2], ids, logprobs, labels, tail="bucket")
    assert seen == ["TopKGatheredProblem", "TopKChunkedProblem", "TopKChunkedProblem"]
    with pytest.raises(ValueError, match="impl='gathered'"):
        kdops.fused_linear_topk_kd_loss(*tensors[:2], ids, logprobs, labels, impl="gathered")
    with pytest.raises(ValueError, match="impl: expected one of"):
        kdops.fused_linear_topk_kd_loss(*tensors[:2], ids, logprobs, labels, impl="fused")
    with pytest.raises(ValueError, match="student_hidden and student_weight"):
        kdops.fused_linear_topk_kd_loss(tensors[0][..., :5], tensors[1], ids, logprobs, labels)
    with pytest.raises(ValueError, match="hard_weight"):
        kdops.fused_linear_topk_kd_loss(*tensors[:2], ids, logprobs, hard_weight=0.5)
    with pytest.raises(ValueError, match=r"ids in \[0, 263\)"):
        kdops.fused_linear_topk_kd_loss(*tensors[:2], ids + 300, logprobs, labels)
    module = kdops.FusedLinearTopKKDLoss(tail="zero", reduction="none")
    assert module(*tensors[:2], ids, logprobs, labels).shape == labels.shape


# --- the teacher's side ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,temperature,budget", [(1, 1.0, None), (9, 2.0, 1), (263, 0.5, 5000)])
def test_topk_logprobs_match_torch_topk(k, temperature, budget, dtype):
    """Ids exactly those of torch.topk on the float64 log-softmax (inputs without ties), log-probabilities
    within float32 rounding, in chunks of one or a few rows."""
    g = torch.Generator().manual_seed(k)
    hidden = torch.randn(3, 5, 24, generator=g).to(dtype)
    weight = (torch.randn(263, 24, generator=g) * 0.8).to(dtype)
    bias = torch.randn(263, generator=g).to(dtype)
    ids, logprobs = kdops.topk_logprobs(hidden.to(DEVICE), weight.to(DEVICE), k, temperature=temperature,
                                        bias=bias.to(DEVICE), memory_budget=budget)
    exact = torch.log_softmax((hidden.double() @ weight.double().T + bias.double()) / temperature, -1)
    expected = exact.topk(k, dim=-1)
    assert ids.shape == (3, 5, k) and ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(ids.cpu(), expected.indices)
    assert torch.allclose(logprobs.double().cpu(), expected.values, rtol=0, atol=2e-5)


def test_topk_logprobs_break_ties_by_the_smaller_id():
    """Duplicated weight rows give exactly equal logits: the cut takes the smaller ids, and equal entries come
    out in id order."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 8, generator=g)
    weight = torch.randn(40, 8, generator=g)
    top = int(torch.argmax(hidden[0] @ weight.T))
    for row in (31, 7, 22):
        weight[row] = weight[top]  # four ids share row 0's largest logit
    ids, logprobs = kdops.topk_logprobs(hidden, weight, 2)
    assert ids[0].tolist() == sorted([top, 31, 7, 22])[:2]
    ref_ids, ref_logprobs = reference.topk_logprobs(hidden, weight, 2)
    assert torch.equal(ids, ref_ids) and torch.allclose(logprobs, ref_logprobs)
    assert logprobs[0, 0] == logprobs[0, 1]
    ids, _ = kdops.topk_logprobs(hidden, weight, 6)
    assert ids[0, :4].tolist() == sorted([top, 31, 7, 22])


def test_topk_logprobs_feed_topk_kd_loss_and_check_their_arguments():
    """k = V from topk_logprobs with tail="bucket" is the dense loss against the teacher's own logits."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(57, 16, generator=g)
    student = torch.randn(6, 57, generator=g) * 3
    ids, logprobs = kdops.topk_logprobs(hidden, weight, 57, temperature=2.0)
    sparse = kdops.topk_kd_loss(student, ids, logprobs, temperature=2.0, divergence="generalized_jsd")
    dense = kdops.kd_loss(student, hidden @ weight.T, temperature=2.0, divergence="generalized_jsd")
    assert torch.allclose(sparse, dense, rtol=1e-5)
    for bad, match in ((0, "k: expected"), (58, "k: expected"), (2.0, "k: expected")):
        with pytest.raises(ValueError, match=match):
            kdops.topk_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match="hidden and weight: expected the hidden width"):
        kdops.topk_logprobs(hidden[:, :3], weight, 2)
    with pytest.raises(ValueError, match="temperature"):
        kdops.topk_logprobs(hidden, weight, 2, temperature=0.0)


@pytest.mark.parametrize("tail,name", CASES)
def test_fused_linear_every_tail_and_divergence(tail, name):
    """From hidden states, every tail × valid divergence (the chunked path, five chunks, the hard term)."""
    tensors, ids, logprobs, labels = linear_inputs(torch.float32, seed=3)
    kwargs = dict(divergence=DIVERGENCES[name], temperature=1.5, tail=tail, hard_weight=0.2)
    oracle = run_linear(oracle_linear, [t.double() for t in tensors], ids, logprobs, labels, **kwargs)
    same = run_linear(reference.fused_linear_topk_kd_loss, tensors, ids, logprobs, labels, **kwargs)
    ours = run_linear(kdops.fused_linear_topk_kd_loss, tensors, ids, logprobs, labels, impl="chunked",
                      backend="triton", memory_budget=33_000, **kwargs)  # chunks of 5 rows, one group
    for what, o, r, k in zip(("loss", "hidden", "weight", "bias"), oracle, same, ours):
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[torch.float32], f"{what}: error {err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.parametrize("impl", ["chunked", "gathered"])
def test_fused_linear_all_ignored_batch(impl):
    """Every label ignored: loss 0 and exact-zero gradients, on both paths."""
    tensors, ids, logprobs, labels = linear_inputs(torch.float32)
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = kdops.fused_linear_topk_kd_loss(leaves[0], leaves[1], ids, logprobs, torch.full_like(labels, -100),
                                           student_bias=leaves[2], tail="renormalize", impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(x.grad) == 0 for x in leaves)
