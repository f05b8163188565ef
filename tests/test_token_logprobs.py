"""kdops.token_logprobs: log p(token) and each row's entropy from hidden states and an lm_head, against a float64
oracle on the whole logits — values and the gradients of hidden, weight and bias with both outputs in the loss
(random upstream weights), on both backends, in chunks far smaller than the batch."""

from __future__ import annotations

import pytest
import torch

import kdops
import kdops.launchers.token_logprobs
import kdops.paths.token_logprobs
from kdops import reference
from oracle import TOLERANCE, rel_error
from spawn import spawn

from conftest import DEVICE

TENSORS = ("hidden", "weight", "bias")


def oracle(hidden, weight, bias, token_ids, temperature=1.0, softcap=None, ignore_index=-100):
    """Plain float64 torch on the whole logits: (log p(token), entropy), 0 on ignored rows."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    counted = token_ids != ignore_index
    picked = log_p.gather(-1, torch.where(counted, token_ids, 0)[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * torch.where(log_p > -torch.inf, log_p, 0.0)).sum(-1)
    return torch.where(counted, picked, 0.0), torch.where(counted, entropy, 0.0)


def inputs(shape, width, vocab, dtype=torch.float32, *, scale=1.0, bias=True, peaked=False, seed=0):
    """Hidden states [*shape, width] and an lm_head whose logits spread like a model's (randn·4 times `scale`);
    with `peaked`, some rows' hidden state is a weight row times 3 (one logit far above the rest). Ids: random,
    the peaked rows' own token, every fifth one ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64) * (4 * scale * width ** -0.5)
    ids = torch.randint(0, vocab, shape, generator=g)
    if peaked:
        flat_h, flat_ids = hidden.view(-1, width), ids.view(-1)
        for r in range(0, flat_h.shape[0], 3):
            flat_h[r] = weight[flat_ids[r]] * 3 / scale
    ids.view(-1)[2::5] = -100
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    cast = [None if t is None else t.to(DEVICE, dtype) for t in (hidden, weight, b)]
    upstream = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    return dict(zip(TENSORS, cast)), ids.to(DEVICE), upstream.to(DEVICE)


def run(fn, tensors, ids, upstream, **options):
    """(log p, entropy, d hidden, d weight, d bias) of Σ u₁·log p + u₂·H."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    logp, entropy = fn(leaves["hidden"], leaves["weight"], ids, bias=leaves["bias"], return_entropy=True, **options)
    loss = (logp.double() * upstream[0]).sum() + (entropy.double() * upstream[1]).sum()
    wanted = [v for v in leaves.values() if v is not None]
    grads = torch.autograd.grad(loss, wanted)
    return [logp.detach(), entropy.detach(), *grads]


def check(tensors, ids, upstream, backend, budget=None, **options):
    """kdops within the same-dtype reference's error (+ TOLERANCE) of the float64 oracle, on every output."""
    dtype = tensors["hidden"].dtype
    if budget is not None:  # several chunks
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        weight = tensors["weight"]
        chunk = kdops.paths.token_logprobs.logprobs_chunk_rows(weight.shape[0], backend, acc, weight.dtype, budget)
        assert 1 < ids.numel() / chunk, (chunk, ids.numel())
    wide = {k: None if v is None else v.double() for k, v in tensors.items()}
    expected = run(lambda h, w, t, bias, return_entropy, **o: oracle(h, w, bias, t, **o), wide, ids, upstream,
                   **options)
    same = run(reference.token_logprobs, tensors, ids, upstream, **options)
    got = run(kdops.token_logprobs, tensors, ids, upstream, backend=backend, memory_budget=budget, **options)
    names = ["logprobs", "entropy", *(k for k, v in tensors.items() if v is not None)]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, g, o, r in zip(names, got, expected, same):
        assert g.shape == o.shape, name
        assert g.dtype == (out_dtype if name in ("logprobs", "entropy") else dtype), name
        err, ref_err = rel_error(g, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"{name}: error {err:.3g} vs the reference's {ref_err:.3g}"
    assert torch.all(got[1] >= 0) and torch.all(got[0] <= 0) and got[0].is_contiguous() and got[1].is_contiguous()
    ignored = ids == -100
    assert torch.all(got[0][ignored] == 0) and torch.all(got[1][ignored] == 0)
    return got


BACKENDS = ["torch", "triton"]

# (leading shape, H, V, options, inputs' options): odd vocabularies, several chunks of a budget a few rows wide
CASES = {
    "plain": ((2, 7), 16, 101, dict(), dict(bias=False)),
    "temperature-softcap-bias": ((13,), 12, 37, dict(temperature=0.7, softcap=5.0), dict()),
    "realistic-peaked": ((3, 5), 24, 257, dict(temperature=1.3), dict(scale=3.0, peaked=True)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_oracle(case, backend):
    shape, width, vocab, options, made = CASES[case]
    tensors, ids, upstream = inputs(shape, width, vocab, **made)
    check(tensors, ids, upstream, backend, budget=3 * vocab * 4, **options)  # a few rows per chunk


def test_block_boundaries(monkeypatch):
    """Tiny blocks: many row blocks and vocabulary tiles (a partial last one of each), the running max growing from
    tile to tile (the entropy's sum re-expressed each time)."""
    monkeypatch.setattr(kdops.launchers.token_logprobs, "logits_config", lambda *a, **k: dict(BLOCK_R=4, BLOCK_V=32))
    tensors, ids, upstream = inputs((11,), 8, 101, scale=2.0, peaked=True, seed=5)
    tensors["weight"] = tensors["weight"] + torch.linspace(0, 1, 101, device=DEVICE)[:, None]  # growing maxima
    check(tensors, ids, upstream, "triton", budget=101 * 4 * 7, softcap=30.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_one_and_several_chunks(backend):
    """16-bit inputs: the weight gradient rounded once from one chunk, or summed in float32 over several."""
    tensors, ids, upstream = inputs((9,), 32, 67, torch.bfloat16, peaked=True)
    for budget in (None, 2 * 67 * 6):
        check(tensors, ids, upstream, backend, budget=budget, softcap=20.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_and_strided_hidden(backend):
    """float64 in, float64 out (to float64's precision); hidden states as a strided view (hidden[:, :-1])."""
    tensors, ids, upstream = inputs((3, 6), 8, 41, torch.float64, peaked=True)
    tensors["hidden"] = torch.cat([tensors["hidden"], tensors["hidden"][:, :1]], dim=1)[:, :-1]
    assert not tensors["hidden"].is_contiguous()
    check(tensors, ids, upstream, backend, budget=2 * 41 * 8, temperature=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_alone_and_partial_gradients(backend):
    """Without the entropy (its upstream gradient is 0), a frozen weight: only the hidden states' gradient, equal
    to the oracle's; every row ignored gives zeros and zero gradients."""
    tensors, ids, _ = inputs((10,), 16, 53)
    hidden = tensors["hidden"].clone().requires_grad_(True)
    logp = kdops.token_logprobs(hidden, tensors["weight"], ids, bias=tensors["bias"], backend=backend,
                                memory_budget=53 * 32)
    (grad,) = torch.autograd.grad(logp.sum(), hidden)
    wide = hidden.detach().double().requires_grad_(True)
    expected = oracle(wide, tensors["weight"], tensors["bias"], ids)[0]
    (expected_grad,) = torch.autograd.grad(expected.sum(), wide)
    assert rel_error(logp, expected) < 1e-5 and rel_error(grad, expected_grad) < 1e-5
    none = torch.full_like(ids, -100)
    hidden = tensors["hidden"].clone().requires_grad_(True)
    logp, entropy = kdops.token_logprobs(hidden, tensors["weight"], none, backend=backend, return_entropy=True)
    (grad,) = torch.autograd.grad((logp + entropy).sum(), hidden)
    assert torch.all(logp == 0) and torch.all(entropy == 0) and torch.all(grad == 0)


def test_inside_torch_compile():
    """The torch backend traced (its chunks checkpointed), the Triton one outside the graph: the same values
    and gradients as eagerly."""
    tensors, ids, upstream = inputs((2, 5), 16, 37)
    for backend in BACKENDS:
        def step(hidden, weight, token_ids, bias, return_entropy):
            logp, entropy = kdops.token_logprobs(hidden, weight, token_ids, bias=bias, softcap=8.0, backend=backend,
                                                 memory_budget=37 * 64 * 5, return_entropy=return_entropy)
            return logp * 2.0, entropy
        eager = run(step, tensors, ids, upstream)
        compiled = run(torch.compile(step, backend="aot_eager"), tensors, ids, upstream)
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e)


ERRORS = [
    (dict(token_ids=torch.zeros(4, dtype=torch.int64)), ValueError, r"token_ids: expected shape \(2, 3\)"),
    (dict(token_ids=torch.zeros(2, 3)), TypeError, "token_ids: expected an integer dtype"),
    (dict(token_ids=[[0, 1, 2], [0, 1, 2]]), TypeError, "token_ids: expected an integer torch.Tensor"),
    (dict(token_ids=torch.tensor([[0, 1, 2], [0, 11, -100]])), ValueError,
     r"token_ids: expected values in \[0, 11\) \(the vocabulary of the weight\) or ignore_index=-100"),
    (dict(token_ids=torch.tensor([[0, 1, 2], [-1, 1, 2]])), ValueError, r"got values in \[-1, 2\]"),
    (dict(weight=torch.randn(11, 5)), ValueError, "hidden and weight: expected the hidden width"),
    (dict(weight=torch.randn(0, 4)), ValueError, "weight: the vocabulary"),
    (dict(bias=torch.randn(10)), ValueError, r"bias: expected shape \(11,\)"),
    (dict(temperature=0.0), ValueError, "temperature: expected a positive finite number"),
    (dict(softcap=-1.0), ValueError, "softcap: expected None or a positive finite number"),
    (dict(memory_budget=0), ValueError, "memory_budget: expected a positive number of bytes"),
    (dict(memory_budget=1.5), TypeError, "memory_budget: expected a positive int"),
    (dict(return_entropy=1), TypeError, "return_entropy: expected a bool"),
    (dict(ignore_index=None), TypeError, "ignore_index: expected an int"),
    (dict(backend="cuda"), ValueError, "backend: expected one of"),
    (dict(vocab_parallel=(0, 11)), TypeError, "vocab_parallel: expected a kdops.VocabParallel"),
]


@pytest.mark.parametrize("change, error, match", ERRORS, ids=[m[:30] for *_, m in ERRORS])
def test_errors_name_the_argument(change, error, match):
    args = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(11, 4),
                token_ids=torch.tensor([[0, 1, 2], [3, 10, -100]]))
    args.update(change)
    with pytest.raises(error, match=match):
        kdops.token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("token_ids"), **args)
    if "vocab_parallel" not in change and "backend" not in change:
        args = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(11, 4),
                    token_ids=torch.tensor([[0, 1, 2], [3, 10, -100]]))
        args.update(change)
        with pytest.raises(error, match=match):  # the reference checks the same
            reference.token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("token_ids"), **args)


# ------------------------------------------------------------------------------------------------------
# Vocabulary parallelism: two ranks, uneven shards, padding rows past one of them.
# ------------------------------------------------------------------------------------------------------

VP_SHARDS = [(0, 38), (38, 97)]


def vocab_parallel_body(rank, world):
    start, stop = VP_SHARDS[rank]
    tensors, ids, upstream = inputs((13,), 24, 97, peaked=True, seed=3)
    wide = {k: v.double() for k, v in tensors.items()}
    expected = run(lambda h, w, t, bias, return_entropy, **o: oracle(h, w, bias, t, **o), wide, ids, upstream,
                   temperature=1.7, softcap=9.0)
    same = run(reference.token_logprobs, tensors, ids, upstream, temperature=1.7, softcap=9.0)
    padding = 3 if rank == 0 else 0
    local = dict(tensors)
    for name in ("weight", "bias"):
        rows = tensors[name][start:stop]
        local[name] = torch.cat([rows, torch.randn(padding, *rows.shape[1:]) * 50]) if padding else rows
    for backend in BACKENDS:
        got = run(kdops.token_logprobs, local, ids, upstream, backend=backend, memory_budget=4 * 97 * 32,
                  temperature=1.7, softcap=9.0, vocab_parallel=kdops.VocabParallel(start, stop))
        for i, name in enumerate(("logprobs", "entropy", *TENSORS)):
            g, o, r = got[i], expected[i], same[i]
            if name in ("weight", "bias"):
                assert torch.count_nonzero(g[stop - start:]) == 0, f"{name}: padding rows got a gradient"
                g, o, r = g[: stop - start], o[start:stop], r[start:stop]
            err, ref_err = rel_error(g, o), rel_error(r, o)
            assert err <= ref_err + TOLERANCE[torch.float32], f"{backend} {name}: error {err:.3g} vs {ref_err:.3g}"


def test_vocab_parallel_matches_single_process_oracle():
    spawn(vocab_parallel_body, 2)


def test_compile_gate_and_cost_model_count_the_kernels():
    """`python -m bench.compile` records a token_logprobs call (both kernels) in its quick grid, and the cost model
    predicts the path with the chunks the code plans."""
    from bench import compile as gate
    from bench import model

    assert {c.transform for c in gate.calls(True) if c.function == "token_logprobs"} == {"", "softcap"}
    shape = model.Shape.parse(model.paths.HEADLINE)
    prediction = model.predict("token-logprobs", shape, "h100", dtype=torch.bfloat16, softcaps=1)
    chunk = kdops.paths.token_logprobs.logprobs_chunk_rows(shape.vocab, "triton", torch.float32, torch.bfloat16)
    assert prediction.extra_detail.startswith(f"{-(-shape.tokens // chunk)} chunks of {chunk} rows")
    assert prediction.total_s > prediction.floor_s and prediction.forward_s < prediction.backward_s
