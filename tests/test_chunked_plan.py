"""impl="chunked"'s plan (chunked.plan): chunks of float32 logits, groups of kept 16-bit G, and the
float32 weight-gradient accumulators only where several groups need them — under a memory budget, with the
real floor of MIN_CHUNK_ROWS-row chunks (tests/conftest.py lowers it to 1 for every other test); and the
gradients of plans with several groups of several chunks against the float64 oracle."""

import pytest
import torch
from kdops.paths import chunked

from test_fused_linear import N, assert_matches_oracle, make_inputs

GiB = 2**30
HEADLINE = (8192, 128256, 4096, 4096)  # tokens, V, Hs, Ht
GEMMA = (8192, 256000, 2304, 2304)


@pytest.fixture
def real_floor(monkeypatch):
    monkeypatch.setattr(chunked, "MIN_CHUNK_ROWS", 256)


def _plan(shape, budget, dtype=torch.bfloat16, teacher_grads=False, engine="triton"):
    n, v, hs, ht = shape
    sides = (chunked.SideNeeds(dtype, hs, True, True), chunked.SideNeeds(dtype, ht, teacher_grads, teacher_grads))
    plan = chunked.plan(n, v, engine, torch.float32, sides, budget)
    return plan, plan.extra_bytes(v, engine, torch.float32, sides)


def _well_formed(plan, n):
    assert 1 <= plan.chunk <= plan.group <= n
    assert plan.group == n or plan.group % plan.chunk == 0
    assert plan.accumulate == (plan.group < n)


@pytest.mark.usefixtures("real_floor")
def test_default_budget_keeps_every_rows_gradient_at_the_headline():
    """8192 × 128256, bf16, frozen teacher: G of every row in bf16 (1.96 GiB) and 2064-row chunks of float32
    logits in 4 GiB; no float32 dW accumulator (one product, rounded once)."""
    plan, extra = _plan(HEADLINE, None)
    assert plan == chunked.Plan(2064, 8192, False) and extra <= 4 * GiB
    _well_formed(plan, 8192)


@pytest.mark.usefixtures("real_floor")
def test_larger_budgets_take_fewer_chunks_and_groups():
    chunks = []
    for gib in (3, 4, 8, 16):
        plan, extra = _plan(GEMMA, gib * GiB)
        _well_formed(plan, GEMMA[0])
        assert extra <= gib * GiB
        chunks.append((-plan.group, -plan.chunk))
    assert chunks == sorted(chunks, reverse=True) and chunks[0] != chunks[-1]
    # Gemma's 256000 × 2304 at 4 GiB: every row's G (3.9 GiB) does not fit beside a chunk: several groups
    plan, _ = _plan(GEMMA, 4 * GiB)
    assert plan.accumulate and plan.chunk >= 256


@pytest.mark.usefixtures("real_floor")
def test_a_budget_below_the_smallest_plan_is_exceeded_by_it():
    """Chunks never thinner than MIN_CHUNK_ROWS: 1 GiB at the headline gets one group of 256-row chunks
    (2.3 GiB); at Gemma's width, several 256-row groups with the accumulator (20 % less than one group)."""
    plan, extra = _plan(HEADLINE, GiB)
    assert plan == chunked.Plan(256, 8192, False) and 2 * GiB < extra < 2.5 * GiB
    plan, extra = _plan(GEMMA, GiB)
    assert plan == chunked.Plan(256, 256, True) and extra < 3 * GiB
    assert _plan(HEADLINE, 1)[0] == _plan(HEADLINE, GiB)[0]


@pytest.mark.usefixtures("real_floor")
def test_float32_weights_need_no_accumulator():
    """A float32 weight's gradient is its own accumulator: several groups cost no [V, H] buffer."""
    plan, extra = _plan(HEADLINE, 4 * GiB, torch.float32)
    _well_formed(plan, 8192)
    assert plan.accumulate and extra <= 4 * GiB
    assert chunked.accumulator_bytes(128256, torch.float32, [chunked.SideNeeds(torch.float32, 4096, True, True)]) == 0


@pytest.mark.usefixtures("real_floor")
def test_teacher_gradients_and_the_torch_engine_fit_the_budget():
    for teacher_grads, engine in ((True, "triton"), (False, "torch"), (True, "torch")):
        plan, extra = _plan(HEADLINE, 8 * GiB, teacher_grads=teacher_grads, engine=engine)
        _well_formed(plan, 8192)
        assert extra <= 8 * GiB


def test_no_gradient_needs_no_store():
    plan = chunked.plan(1000, 5000, "triton", torch.float32, (), 40 * 5000 * 8)
    assert plan == chunked.Plan(32, 1000, False)
    assert plan.extra_bytes(5000, "triton", torch.float32, ()) == 32 * 5000 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_several_groups_of_several_chunks_match_the_oracle(dtype, backend):
    """A budget that holds neither every row's G nor every row's logits: every gradient (teacher's too,
    biases, hard labels) against the float64 oracle."""
    x = make_inputs(dtype, seed=21)
    v, hs, ht = 1000, x["student_hidden"].shape[-1], x["teacher_hidden"].shape[-1]
    sides = [chunked.SideNeeds(dtype, w, True, True) for w in (hs, ht)]
    # the smallest budget (past the accumulators) whose plan has several groups of several chunks
    budget = next(b for b in range(chunked.accumulator_bytes(v, torch.float32, sides), 10**8, 2000)
                  if (lambda p: p.chunk < p.group < N and p.accumulate)(
                      chunked.plan(N, v, backend, torch.float32, sides, b)))
    assert_matches_oracle(x, divergence="generalized_jsd", hard_weight=0.3, temperature=1.7, impl="chunked",
                          backend=backend, memory_budget=budget)
