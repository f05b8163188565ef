"""kdops.integrations.verl against verl 0.9.1's own functions, on the same inputs: values, diagnostics and
gradients, on kdops' two backends.

verl's modules cannot be imported without Ray (`verl/__init__.py` imports it, and its loss modules import
verl), so `pytest.importorskip` would skip everything where only verl's wheel is installed (CI installs
`verl==0.9.1` with --no-deps). The functions under test need nothing but torch: each is defined here from
verl's installed source file (`_verl_functions`), exactly as verl wrote it, with verl's sequence-parallel
world size set to 1 (no Ulysses group, as in a run without sequence parallelism).
"""

import ast
import importlib.util
import math
import pathlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from kdops.integrations import verl as kverl
from oracle import rel_error

VERL = importlib.util.find_spec("verl")  # finds the package without running its __init__
if VERL is None:
    pytest.skip("verl is not installed (CI installs verl==0.9.1 with --no-deps)", allow_module_level=True)

TOL = 2e-5


def _verl_functions(relative, names, **scope):
    """verl's own functions `names`, defined from its installed `relative` source file in a namespace of torch,
    F and `scope` (what they reference besides torch)."""
    path = pathlib.Path(VERL.submodule_search_locations[0], relative)
    tree = ast.parse(path.read_text(), str(path))
    nodes = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert sorted(node.name for node in nodes) == sorted(names), f"{path} no longer defines {names}"
    namespace = {"torch": torch, "F": F, **scope}
    exec(compile(ast.Module(nodes, type_ignores=[]), str(path), "exec"), namespace)
    return [namespace[name] for name in names]


verl_kl_penalty, = _verl_functions("trainer/ppo/core_algos.py", ["kl_penalty", "kl_penalty_forward"])[:1]
verl_topk, = _verl_functions(
    "trainer/distillation/fsdp/losses.py", ["compute_forward_kl_topk", "kl_divergence", "_chunked_topk_log_probs"],
    get_ulysses_sequence_parallel_world_size=lambda: 1, slice_input_tensor=None, DistillationConfig=object,
    DistillationLossConfig=object)[:1]


def _config(clamp, chunked=False):
    loss = types.SimpleNamespace(log_prob_min_clamp=clamp, use_chunked_topk=chunked, chunked_topk_chunk_size=4)
    return types.SimpleNamespace(distillation_loss=loss)


def _topk_inputs(dtype, vocab=101, k=7, lengths=(4, 7), seed=0):
    """Student logits [1, tokens, V] (randn·4) and the teacher's top-k of a real softmax as verl passes them
    (nested [B, jagged T, k]). Teacher rows 0, 3, 6, … are peaked (their lower top-k log-probs are below −10:
    the clamp takes them); student row 0 peaks off the teacher's ids (every id's log q < −10: none has a
    gradient with the clamp), row 4 on the teacher's most likely id; row 2 masks a tenth of the vocabulary
    (−inf) away from the teacher's ids; row 5's top-k equals the teacher's (full overlap)."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    teacher = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 4
    teacher[::3, 3] = 30.0
    lp, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    student = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 4
    off = [i for i in range(vocab) if i not in ids[0].tolist()][0]
    student[0, off] = 30.0
    student[4, ids[4, 0]] = 30.0
    away = torch.tensor([i for i in range(vocab) if i not in ids[2].tolist()][: vocab // 10])
    student[2, away] = -math.inf
    student[5, ids[5]] = 40.0 + torch.arange(k, dtype=torch.float64)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    nested = [torch.nested.nested_tensor_from_jagged(x, offsets) for x in (lp.float(), ids)]
    return student.to(dtype).unsqueeze(0).requires_grad_(), *nested


def _compare_topk(ours, theirs, student):
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        if key == "overlap_count":
            assert torch.equal(ours[key], theirs[key])
        else:
            assert rel_error(ours[key], theirs[key]) < TOL, key
    upstream = torch.randn(theirs["distillation_losses"].shape, generator=torch.Generator().manual_seed(1))
    grads = [torch.autograd.grad(out["distillation_losses"], student, upstream)[0] for out in (ours, theirs)]
    assert rel_error(*grads) < TOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("clamp", [-10.0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_kl_topk_matches_verl(dtype, clamp, backend):
    student, lp, ids = _topk_inputs(dtype)
    config = _config(clamp)
    ours = kverl.compute_forward_kl_topk(student, lp, ids, config, "thd", backend=backend)
    _compare_topk(ours, verl_topk(student, lp, ids, config, "thd"), student)
    if clamp is not None:  # the clamp is taken: on teacher entries, on a token's every id, on some of a token's ids
        log_q = student.detach().double().log_softmax(-1).gather(-1, ids.values().unsqueeze(0))
        clamped = log_q < clamp
        assert (lp.values() < clamp).any() and clamped.all(-1).any() and (clamped.any(-1) & ~clamped.all(-1)).any()


def test_forward_kl_topk_matches_verl_chunked_path():
    """verl's opt-in chunked log-probabilities (use_chunked_topk) give the same numbers."""
    student, lp, ids = _topk_inputs(torch.float32, vocab=37, k=5, lengths=(2, 3, 4), seed=3)
    config = _config(-10.0, chunked=True)
    _compare_topk(kverl.compute_forward_kl_topk(student, lp, ids, config, backend="torch"),
                  verl_topk(student, lp, ids, config, "bshd"), student)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_kl_topk_bfloat16(backend):
    """bfloat16 logits: verl's dtypes; kdops' float32 math equals verl's on the same logits in float32 (verl's own
    bfloat16 run rounds its log-softmax to bfloat16), gradients in bfloat16."""
    student, lp, ids = _topk_inputs(torch.bfloat16, seed=8)
    config = _config(-10.0)
    ours = kverl.compute_forward_kl_topk(student, lp, ids, config, backend=backend)
    theirs_dtypes = verl_topk(student, lp, ids, config, "thd")
    wide = student.detach().float().requires_grad_()
    theirs = verl_topk(wide, lp, ids, config, "thd")
    for key in theirs:
        assert ours[key].dtype == theirs_dtypes[key].dtype, key
        assert rel_error(ours[key], theirs[key]) < (1e-2 if key == "student_mass" else TOL), key
    upstream = torch.randn(theirs["distillation_losses"].shape, generator=torch.Generator().manual_seed(1))
    grad = torch.autograd.grad(ours["distillation_losses"], student, upstream)[0]
    assert grad.dtype == torch.bfloat16
    assert rel_error(grad, torch.autograd.grad(theirs["distillation_losses"], wide, upstream)[0]) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_kl_topk_tail_bucket(backend):
    """tail="bucket": the top-k KL plus one outcome for the rest of each side's mass, against float64, with
    the student's tail log-mass summed over its own tokens (exact where the student puts ~e⁻³⁰ there); the
    diagnostics stay verl's."""
    student, lp, ids = _topk_inputs(torch.float32)
    config = _config(-10.0)
    ours = kverl.compute_forward_kl_topk(student, lp, ids, config, tail="bucket", backend=backend)
    theirs = verl_topk(student, lp, ids, config, "thd")
    for key in ("student_mass", "teacher_mass", "overlap_token_advantage"):
        assert rel_error(ours[key], theirs[key]) < TOL
    s, flat_lp, flat_ids = student.double(), lp.values().double().unsqueeze(0), ids.values().unsqueeze(0)
    lse = s.logsumexp(-1)
    log_q = s.gather(-1, flat_ids) - lse.unsqueeze(-1)
    log_q_tail = s.scatter(-1, flat_ids, -math.inf).logsumexp(-1) - lse
    p = flat_lp.exp()
    p_tail = 1 - p.sum(-1)
    oracle = (p * (flat_lp - log_q)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    assert rel_error(ours["distillation_losses"], oracle) < TOL
    assert (ours["distillation_losses"] >= 0).all()
    upstream = torch.randn(oracle.shape, generator=torch.Generator().manual_seed(2))
    grads = [torch.autograd.grad(v, student, upstream)[0] for v in (ours["distillation_losses"], oracle)]
    assert rel_error(*grads) < TOL


def test_forward_kl_topk_plain_tensors():
    """Plain [B, T, k] teacher tensors are taken as they are (the same numbers as nested ones)."""
    student, lp, ids = _topk_inputs(torch.float32, vocab=37, k=4, lengths=(6,), seed=4)
    config = _config(-10.0)
    nested = kverl.compute_forward_kl_topk(student, lp, ids, config, backend="torch")
    plain = kverl.compute_forward_kl_topk(student, lp.values().unsqueeze(0), ids.values().unsqueeze(0), config,
                                          backend="torch")
    for key in nested:
        assert torch.equal(nested[key], plain[key])


ESTIMATORS = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "abs+", "k2+", "low_var_kl+", "k3+"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty_matches_verl(dtype):
    """Every estimator name, on the log-probabilities of tokens sampled from the student, teacher entries far
    above and below (k3's clamps at ±20 and 10 taken), gradients to both sides."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(3, 40, 101, generator=g) * 4
    teacher = torch.randn(3, 40, 101, generator=g) * 4
    teacher[:, ::4, 7] = 30.0
    sampled = torch.multinomial(student.softmax(-1).view(-1, 101), 1, generator=g).view(3, 40, 1)
    logprob = student.log_softmax(-1).gather(-1, sampled).squeeze(-1).to(dtype)
    ref = teacher.log_softmax(-1).gather(-1, sampled).squeeze(-1).to(dtype)
    ref[0, :5] = logprob[0, :5] - 25.0
    ref[1, :5] = logprob[1, :5] + 25.0
    ref[2, :5] = logprob[2, :5]
    upstream = torch.randn(ref.shape, generator=g, dtype=dtype)
    for name in ESTIMATORS:
        inputs = [logprob.clone().requires_grad_(), ref.clone().requires_grad_()]
        ours = kverl.kl_penalty(*inputs, name)
        theirs = verl_kl_penalty(*inputs, name)
        assert ours.dtype == theirs.dtype and rel_error(ours, theirs) < TOL, name
        for a, b in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(theirs, inputs, upstream)):
            assert rel_error(a, b) < TOL, name


def test_errors():
    x = torch.randn(2, 3)
    with pytest.raises(NotImplementedError, match="kl_penalty: 'full' needs every token's log-probability"):
        kverl.kl_penalty(x, x, "full")
    with pytest.raises(NotImplementedError, match="kl_penalty: expected 'kl'"):
        kverl.kl_penalty_forward(x, x, "k4")
    student, lp, ids = _topk_inputs(torch.float32, vocab=37, k=4, lengths=(6,), seed=6)
    with pytest.raises(ValueError, match="tail: expected None"):
        kverl.compute_forward_kl_topk(student, lp, ids, _config(None), tail="renormalize")
    with pytest.raises(ValueError, match="teacher_topk_ids, teacher_topk_log_probs: expected the tokens"):
        kverl.compute_forward_kl_topk(student[:, :5], lp, ids, _config(None))


def test_patch_replaces_verl_function(monkeypatch):
    """patch() sets the attribute that verl's compute_topk_loss reads at each call; unpatch() restores it."""
    module = types.ModuleType(kverl._FSDP_LOSSES)
    module.compute_forward_kl_topk = verl_topk
    monkeypatch.setitem(sys.modules, kverl._FSDP_LOSSES, module)
    student, lp, ids = _topk_inputs(torch.float32, vocab=37, k=4, lengths=(2, 4), seed=7)
    config = _config(-10.0)
    kverl.patch(backend="torch")
    try:
        assert module.compute_forward_kl_topk is not verl_topk
        got = module.compute_forward_kl_topk(student, lp, ids, config, "thd")["distillation_losses"]
        assert torch.equal(got, kverl.compute_forward_kl_topk(student, lp, ids, config)["distillation_losses"])
        kverl.patch(tail="bucket", backend="torch")  # again: new keywords, verl's function still remembered
        assert module.compute_forward_kl_topk.keywords["tail"] == "bucket"
    finally:
        kverl.unpatch()
    assert module.compute_forward_kl_topk is verl_topk
    kverl.unpatch()  # nothing to undo
