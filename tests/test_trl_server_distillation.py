"""TRL 1.16's sparse-teacher losses (trl.experimental.server_distillation, trl.experimental.iw_opd) on kdops' top-k
loss: each drop-in of kdops.compat.trl against TRL's own method on the same tensors (a trainer object holding only
the attributes the method reads; no server, no model), values and gradients with respect to the student's logits,
float64 and float32, both backends; and the kdops trainer subclasses' loss methods against TRL's."""

from __future__ import annotations

import collections
import inspect
import math
import types
import warnings

import pytest
import torch

from kdops.compat import trl as kdops_trl
from oracle import rel_error

pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL's notice that trl.experimental may change
    server_distillation = pytest.importorskip("trl.experimental.server_distillation")
    iw_opd = pytest.importorskip("trl.experimental.iw_opd")

B, T, V = 3, 6, 101
TEMP = 1.5
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}  # on top of TRL's own error in that dtype


def trl_trainer(cls, **attrs):
    """A TRL trainer object with only the attributes its loss methods read."""
    trainer = object.__new__(cls)
    defaults = dict(temperature=TEMP, reverse_kl_top_1_mode="sampled", iw_opd_gamma=0.5, iw_opd_epsilon=1e-8,
                    model=types.SimpleNamespace(training=True),
                    _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
    trainer.__dict__.update({**defaults, **attrs})
    return trainer


def server_batch(k, seed=0):
    """Float64 student logits [B, T, V] (randn·4, one row leaning to the teacher's top token) and the teacher
    server's answer at TEMP (randn·4 logits, every other row peaked, p_top ≈ 0.99): its top-k, its log-probability
    of each completion token, with TRL's placeholders (−inf, id 0) at the padding; labels with a prompt position
    and padding at -100; one completion token equal to the teacher's top-1 and one row listing fewer entries."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 4
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 4
    peaks = torch.randint(0, V, (B, T), generator=g)
    teacher.scatter_add_(-1, peaks.unsqueeze(-1), (torch.arange(B * T) % 2 * 12.0).view(B, T, 1).double())
    teacher_lp = torch.log_softmax(teacher / TEMP, -1)
    logprobs, ids = teacher_lp.topk(k, dim=-1)
    student[1, 2, ids[1, 2, 0]] += 5.0
    completion = torch.randint(0, V, (B, T), generator=g)
    completion[0, 3] = ids[0, 3, 0]  # sampled = the teacher's top-1: listed once
    actual = teacher_lp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    labels = completion.clone()
    labels[0, 0] = -100  # prompt
    labels[2, -2:] = -100  # padding: the server sends nothing there
    logprobs[2, -2:], ids[2, -2:], actual[2, -2:] = -math.inf, 0, -math.inf
    if k > 1:
        logprobs[1, 4, 1:] = -math.inf  # a row with fewer entries
    # both sides' listed mass stays below TRL's tail floor 1 − e^(−1e-7), where the two tails agree
    q = torch.softmax(student / TEMP, -1).gather(-1, ids).sum(-1)
    assert logprobs.exp().sum(-1).max() < 1 - 1e-5 and q.max() < 1 - 1e-5
    return dict(student=student, topk_token_ids=ids, topk_logprobs=logprobs, actual_logprobs=actual,
                completion=completion, labels=labels)


def cast(batch, dtype):
    return {name: x.to(dtype) if x.is_floating_point() else x for name, x in batch.items()}


def result(batch):
    return {key: batch[key] for key in ("topk_token_ids", "topk_logprobs", "actual_logprobs")}


def loss_and_grad(fn, batch, log_probs=True):
    """fn(batch, student input) and its gradient with respect to the student's logits; the input is TRL's
    log_softmax(logits / T), or the logits themselves."""
    logits = batch["student"].clone().requires_grad_(True)
    loss = fn(batch, torch.log_softmax(logits / TEMP, -1) if log_probs else logits)
    return [loss, *torch.autograd.grad(loss, logits)]


def assert_like_trl(ours, theirs, batch, dtype, **ours_kwargs):
    """kdops' loss and gradient in `dtype` against TRL's in float64 (on the same rounded inputs): its error at most
    TRL's own in `dtype` + TOLERANCE."""
    rounded = cast(cast(batch, dtype), torch.float64)
    oracle = loss_and_grad(theirs, rounded)
    same_dtype = loss_and_grad(theirs, cast(batch, dtype))
    got = loss_and_grad(ours, cast(batch, dtype), **ours_kwargs)
    for name, o, r, k in zip(("loss", "grad"), oracle, same_dtype, got):
        assert k.dtype == dtype and k.shape == r.shape, name
        err, trl_err = rel_error(k, o), rel_error(r, o)
        assert err <= trl_err + TOLERANCE[dtype], f"{name}: error {err:.3g}, TRL's {trl_err:.3g}"
    return got


DTYPES = [torch.float64, torch.float32]
# Each test's grid crosses its options with two (dtype, backend) pairs (the other two in the next test), so that
# every dtype meets every backend over the file at a fraction of the full product's time under the interpreter.
PAIRS = [(torch.float64, "torch"), (torch.float32, "triton")]
CROSSED = [(torch.float64, "triton"), (torch.float32, "torch")]
PAIR_IDS = ["f64-torch", "f32-triton"]
CROSSED_IDS = ["f64-triton", "f32-torch"]
# The server losses are the same code in both TRL trainers: each dtype's cases call one of them
TRL_TRAINERS = {torch.float64: server_distillation.ServerDistillationTrainer, torch.float32: iw_opd.IWOPDTrainer}


@pytest.mark.parametrize("dtype, backend", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "no_tail"])
@pytest.mark.parametrize("k", [1, 4])
def test_server_forward_kl_equals_trls(k, add_tail, dtype, backend):
    """β = 0 from the server's top-k: loss_add_tail=True is tail="bucket", False is tail="renormalize" (0 for
    k = 1); a counted row the teacher did not score adds 0 and counts, as in TRL."""
    batch = server_batch(k, seed=k)
    batch["topk_logprobs"][1, 5] = -math.inf  # the teacher's window ended before this completion's
    trainer = trl_trainer(TRL_TRAINERS[dtype], beta=0.0, loss_top_k=k, loss_add_tail=add_tail)
    theirs = lambda b, s: trainer._compute_server_forward_kl_loss(result(b), s, b["labels"])  # noqa: E731
    ours = lambda b, s: kdops_trl.server_forward_kl_loss(result(b), s, b["labels"], add_tail,  # noqa: E731
                                                         backend=backend)
    assert_like_trl(ours, theirs, batch, dtype)
    if dtype == torch.float64:  # from the raw logits at the temperature: the same loss, no log-probabilities
        raw = lambda b, s: kdops_trl.server_forward_kl_loss(result(b), s, b["labels"], add_tail,  # noqa: E731
                                                            temperature=TEMP, backend=backend)
        assert_like_trl(raw, theirs, batch, dtype, log_probs=False)


@pytest.mark.parametrize("dtype, backend", CROSSED, ids=CROSSED_IDS)
@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "no_tail"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_server_sparse_top_1_equals_trls(beta, add_tail, dtype, backend):
    """β > 0 from the server: the teacher's top-1 and the sampled token (once where they are the same; β = 1 the
    sampled token alone), TRL's generalized JSD with the tail bucket or renormalized."""
    batch = server_batch(1, seed=int(10 * beta))
    trainer = trl_trainer(TRL_TRAINERS[dtype], beta=beta, loss_top_k=1, loss_add_tail=add_tail)
    theirs = lambda b, s: trainer._compute_server_sparse_top_1_divergence_loss(  # noqa: E731
        result(b), s, b["completion"], b["labels"])
    ours = lambda b, s: kdops_trl.server_sparse_top_1_divergence_loss(  # noqa: E731
        result(b), s, b["completion"], b["labels"], beta=beta, loss_add_tail=add_tail, backend=backend)
    loss, _ = assert_like_trl(ours, theirs, batch, dtype)
    assert (loss > 0) == (add_tail or beta < 1)  # a one-token support renormalized is 0


@pytest.mark.parametrize("rollout, num_items, dtype, backend", [
    (False, None, torch.float64, "torch"), (False, None, torch.float32, "triton"),
    (True, torch.tensor(11), torch.float64, "triton"), (True, torch.tensor(11), torch.float32, "torch"),
], ids=["own-f64-torch", "own-f32-triton", "rollout-f64-triton", "rollout-f32-torch"])
def test_iw_opd_equals_trls(rollout, num_items, dtype, backend):
    """IW-OPD: −Σ A_t log q(x_t) with the prefix-weighted advantages of the rollout's (or the student's own,
    detached) log-probabilities; with a rollout the advantages are kdops' per-row weights."""
    batch = server_batch(1, seed=7)
    batch["actual_logprobs"] = batch["actual_logprobs"].masked_fill(batch["labels"] == -100, -math.inf)
    rollout_lp = torch.log_softmax(batch["student"] / TEMP + 0.3 * torch.randn(B, T, V, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(1)), -1)
    batch["rollout"] = rollout_lp.gather(-1, batch["completion"].unsqueeze(-1)).squeeze(-1)
    trainer = trl_trainer(iw_opd.IWOPDTrainer, beta=0.0, loss_top_k=1, loss_add_tail=True)

    def args(b):
        return b["completion"], b["labels"], b["actual_logprobs"], b["rollout"] if rollout else None, num_items

    theirs = lambda b, s: trainer._compute_iw_opd_loss(s, *args(b))  # noqa: E731
    ours = lambda b, s: kdops_trl.iw_opd_loss(s, *args(b), temperature=TEMP, backend=backend)  # noqa: E731
    # TRL's method takes the logits: its input here is log_softmax(s / T), which the temperature divides again
    assert_like_trl(ours, theirs, batch, dtype)


@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "no_tail"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_local_topk_generalized_jsd_equals_trls(beta, k, add_tail):
    """IWOPDTrainer.generalized_jsd_loss with a local teacher's logits: the teacher's top-k (β = 0), the
    student's (β = 1), or both without repeats (0 < β < 1), with each of TRL's reductions."""
    batch = server_batch(1, seed=3)
    g = torch.Generator().manual_seed(5)
    batch["teacher"] = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 4
    batch["teacher"][0, 1, 9] += 12.0  # peaked
    batch["teacher"][1, 1] = batch["student"][1, 1] * 0.8  # the two top-k overlap
    trl_loss = iw_opd.IWOPDTrainer.generalized_jsd_loss
    others = [dict(reduction="sum"), dict(reduction="mean"), dict(num_items_in_batch=torch.tensor(9)),
              dict(labels=None)]
    case = 4 * int(2 * beta) + 2 * (k == 4) + add_tail  # 0..11: each case adds one of the other reductions
    for dtype, extra in ((DTYPES[case % 2], dict()), (DTYPES[case // 2 % 2], others[case % 4])):
        kwargs = dict(beta=beta, temperature=TEMP, top_k=k, add_tail=add_tail, **extra)
        labels = kwargs.pop("labels", "given")

        def call(fn, b, s, **more):
            return fn(s, b["teacher"], b["labels"] if labels == "given" else None, **kwargs, **more)

        theirs = lambda b, s: call(trl_loss, b, s)  # noqa: E731
        ours = lambda b, s: call(kdops_trl.topk_generalized_jsd_loss, b, s, backend="torch")  # noqa: E731
        # both take logits; the helper's input log_softmax(s / T) is logits too (the same for both)
        assert_like_trl(ours, theirs, batch, dtype)
    if not add_tail:
        return
    # top_k = 0 (or ≥ V): the whole vocabulary, kdops.compat.trl.generalized_jsd_loss
    full = dict(beta=beta, temperature=TEMP, top_k=0 if k == 1 else V)
    assert_like_trl(lambda b, s: kdops_trl.topk_generalized_jsd_loss(s, b["teacher"], b["labels"], **full),
                    lambda b, s: trl_loss(s, b["teacher"], b["labels"], **full), batch, torch.float32)


@pytest.mark.parametrize("beta, mode, backend", [(0.5, "sampled", "triton"), (0.5, "argmax", "torch"),
                                                  (1.0, "argmax", "triton"), (1.0, "sampled", "torch")])
def test_local_sparse_top_1_equals_trls(beta, mode, backend):
    """IWOPDTrainer's local top-1 loss (β > 0, loss_top_k = 1) from the student's and teacher's logits."""
    batch = server_batch(1, seed=11)
    batch["teacher"] = batch["student"] * 0.7 + torch.randn(B, T, V, dtype=torch.float64,
                                                            generator=torch.Generator().manual_seed(2)) * 2
    for add_tail, num_items in ((True, None), (False, torch.tensor(13))):
        trainer = trl_trainer(iw_opd.IWOPDTrainer, beta=beta, loss_top_k=1, loss_add_tail=add_tail,
                              reverse_kl_top_1_mode=mode)
        theirs = lambda b, s: trainer._compute_local_sparse_top_1_divergence_loss(  # noqa: E731
            s, b["teacher"], b["completion"], b["labels"], num_items)
        ours = lambda b, s: kdops_trl.local_sparse_top_1_divergence_loss(  # noqa: E731
            s, b["teacher"], b["completion"], b["labels"], num_items, beta=beta, temperature=TEMP,
            loss_add_tail=add_tail, reverse_kl_top_1_mode=mode, backend=backend)
        assert_like_trl(ours, theirs, batch, torch.float64 if add_tail else torch.float32)


def test_trainer_subclasses_compute_trls_losses_with_kdops(monkeypatch):
    """kdops.integrations.trl's ServerDistillationTrainer / IWOPDTrainer are TRL's classes whose loss methods give
    TRL's values (and IW-OPD's logged metrics), through kdops."""
    from kdops.integrations import trl as integration

    calls = []
    original = kdops_trl.topk_kd_loss
    monkeypatch.setattr(kdops_trl, "topk_kd_loss", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    batch = server_batch(1, seed=2)
    batch["teacher"] = batch["student"] * 0.5 + torch.randn(B, T, V, dtype=torch.float64,
                                                            generator=torch.Generator().manual_seed(3)) * 3
    log_probs = torch.log_softmax(batch["student"] / TEMP, -1)
    for name in ("ServerDistillationTrainer", "IWOPDTrainer"):
        base = getattr(server_distillation if name.startswith("Server") else iw_opd, name)
        cls = getattr(integration, name)
        assert issubclass(cls, base) and cls.__name__ == name
        mixins = [k for k in cls.__mro__[1:] if k.__module__ == integration.__name__]
        overridden = {m for k in mixins for m in vars(k) if m.startswith(("_compute", "generalized"))}
        assert len(overridden) == (2 if name.startswith("Server") else 5)
        for method in overridden:  # TRL calls them by keyword: the same names, in its order
            theirs, ours = inspect.signature(getattr(base, method)), inspect.signature(getattr(cls, method))
            assert list(ours.parameters)[:len(theirs.parameters)] == list(theirs.parameters), method
        for beta, add_tail in ((0.0, True), (0.5, False), (1.0, True)):
            attrs = dict(beta=beta, loss_top_k=1, loss_add_tail=add_tail)
            ours, theirs = trl_trainer(cls, **attrs), trl_trainer(base, **attrs)
            if beta == 0:
                args = (result(batch), log_probs, batch["labels"])
                method = "_compute_server_forward_kl_loss"
            else:
                args = (result(batch), log_probs, batch["completion"], batch["labels"])
                method = "_compute_server_sparse_top_1_divergence_loss"
            before = len(calls)
            assert rel_error(getattr(ours, method)(*args), getattr(theirs, method)(*args)) < 1e-12
            assert len(calls) == before + 1
            if name == "IWOPDTrainer":
                for method, args in (
                    ("_compute_local_sparse_top_1_divergence_loss",
                     (batch["student"], batch["teacher"], batch["completion"], batch["labels"])),
                    ("generalized_jsd_loss", (batch["student"], batch["teacher"], batch["labels"], beta, TEMP,
                                              "batchmean", 3, add_tail)),
                    ("_compute_iw_opd_loss", (batch["student"], batch["completion"], batch["labels"],
                                              batch["actual_logprobs"].masked_fill(batch["labels"] == -100, 0.0))),
                ):
                    before = len(calls)
                    assert rel_error(getattr(ours, method)(*args), getattr(theirs, method)(*args)) < 1e-12, method
                    assert len(calls) == before + 1, method
    mine, trls = ours._metrics["train"], theirs._metrics["train"]
    assert sorted(mine) == sorted(trls) and len(mine) == 5
    for key in trls:
        assert torch.allclose(torch.tensor(mine[key]), torch.tensor(trls[key]), rtol=1e-12), key


def test_exact_tail_where_trl_floors_it():
    """Where a side's listed mass passes 1 − e^(−1e-7), TRL's tail is floored at ≈ 1e-7; kdops' is exact: a teacher
    certain of its token (log-probability 0) gives KL = −log q(id) exactly."""
    student = torch.randn(2, 1, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 4
    ids = torch.tensor([[[3]], [[50]]])
    teacher = dict(topk_token_ids=ids, topk_logprobs=torch.zeros(2, 1, 1, dtype=torch.float64))
    labels = torch.zeros(2, 1, dtype=torch.long)
    log_probs = torch.log_softmax(student, -1)
    loss = kdops_trl.server_forward_kl_loss(teacher, log_probs, labels)
    exact = -log_probs.gather(-1, ids).mean()
    assert rel_error(loss, exact) < 1e-14
    trainer = trl_trainer(server_distillation.ServerDistillationTrainer, beta=0.0, loss_add_tail=True)
    theirs = trainer._compute_server_forward_kl_loss(teacher, log_probs, labels)
    assert 1e-8 < abs(float(theirs - exact)) < 1e-5  # its floored teacher tail adds ≈ 1e-7·(log 1e-7 − log q_tail)


def test_errors_name_the_argument():
    batch = server_batch(1, seed=1)
    log_probs = torch.log_softmax(batch["student"] / TEMP, -1)
    missing = result(batch)
    missing["actual_logprobs"] = missing["actual_logprobs"].clone()
    missing["actual_logprobs"][0, 2] = -math.inf
    with pytest.raises(ValueError, match=r"teacher_result\['actual_logprobs'\]: .* missing \(not finite\) at 1/15"):
        kdops_trl.server_sparse_top_1_divergence_loss(missing, log_probs, batch["completion"], batch["labels"],
                                                      beta=0.5)
    missing = result(batch)
    missing["topk_logprobs"] = missing["topk_logprobs"].clone()
    missing["topk_logprobs"][1, 1] = math.nan
    with pytest.raises(ValueError, match=r"teacher_result\['topk_logprobs'\]: the teacher's top-1"):
        kdops_trl.server_sparse_top_1_divergence_loss(missing, log_probs, batch["completion"], batch["labels"],
                                                      beta=0.5)
    # β = 1 reads no top-1: TRL checks only the sampled tokens' log-probabilities there, and so does kdops
    kdops_trl.server_sparse_top_1_divergence_loss(missing, log_probs, batch["completion"], batch["labels"], beta=1.0)
    actual = batch["actual_logprobs"].clone()
    actual[1, 0] = -math.inf
    with pytest.raises(ValueError, match="teacher_actual_logprobs: the teacher's log-probability of the sampled"):
        kdops_trl.iw_opd_loss(batch["student"], batch["completion"], batch["labels"], actual)
    with pytest.raises(ValueError, match="reduction: with 0 < top_k < V the loss has no per-entry terms"):
        kdops_trl.topk_generalized_jsd_loss(batch["student"], batch["student"], top_k=2, reduction="none")
    with pytest.raises(ValueError, match="reverse_kl_top_1_mode: expected one of 'sampled', 'argmax'"):
        kdops_trl.local_sparse_top_1_divergence_loss(batch["student"], batch["student"], batch["completion"],
                                                     batch["labels"], beta=0.5, reverse_kl_top_1_mode="top")
