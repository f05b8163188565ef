"""fused_linear_kd_loss under data parallelism, 2 CPU processes joined by gloo (tests/spawn.py).

DDP: each rank computes the loss on its half of a global batch with the student's lm_head weight read
outside the model's forward; DDP's gradient hooks average the gradients, which must equal the float64
oracle's gradients of one process on the full batch. Also: the loss inside the forward with
find_unused_parameters=True, unequal halves through num_items_in_batch, and two ways to lose the average
(no_sync, bypassing DDP's forward) that the comparison detects.

FSDP2 (fully_shard): the sharded lm_head weight read outside a forward is a DTensor, which kdops
refuses with a TypeError; the working recipe computes the loss inside the forward of the FSDP unit that
owns the lm_head (DistillHead), with a frozen teacher that is itself sharded and gathered by
full_tensor(). Each rank's gradient shard must equal its slice of the full-batch oracle gradient.

The bodies are module-level functions (pickled by name into the workers); each spawn runs every case of
its world size, since a spawn costs seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kdops
from kdops import reference
from oracle import TOLERANCE, rel_error
from spawn import spawn

WORLD_SIZE = 2
B, L = 4, 4                   # global batch [B, L]: 16 tokens, 8 per rank
D_IN, H, HT = 10, 20, 22      # student input width, student and teacher hidden widths
V, VT = 75, 78                # student and teacher vocabularies (teacher rows past V are padding)
GRAD_TOL = TOLERANCE[torch.float32]   # float32 results vs the float64 oracle, relative to the largest entry

# (name, options): each impl/backend, several divergences, the hard-label term in some.
CASES = [
    ("fused/forward_kl/hard", dict(impl="fused", backend="triton", divergence="forward_kl", hard_weight=0.3,
                                   soft_weight=0.7, temperature=2.0)),
    ("chunked/generalized_jsd", dict(impl="chunked", backend="triton", divergence="generalized_jsd")),
    ("torch/reverse_kl/hard", dict(impl="chunked", backend="torch", divergence="reverse_kl", hard_weight=0.3)),
]


def make_batch(seed: int = 0) -> dict:
    """Student inputs and a frozen teacher's hidden states, weight and bias for the global batch; logits
    with std ≈ 4, peaked teacher rows, every fourth label ignored (two per rank's half, so the halves'
    batchmean losses average to the full batch's)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    batch = dict(x=randn(B, L, D_IN), teacher_hidden=randn(B, L, HT),
                 teacher_weight=randn(VT, HT, scale=4 * HT ** -0.5), teacher_bias=randn(VT),
                 trunk_weight=randn(H, D_IN, scale=D_IN ** -0.5), trunk_bias=randn(H),
                 lm_head_weight=randn(V, H, scale=4 * H ** -0.5))
    flat = batch["teacher_hidden"].view(-1, HT)
    for r in range(0, flat.shape[0], 5):
        flat[r] = batch["teacher_weight"][(r * 7) % V] * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels.view(-1)[::4] = -100
    batch["labels"] = labels
    return batch


def local_half(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return tensor.chunk(world_size)[rank]


class Student(nn.Module):
    """A trunk producing hidden states and an untied lm_head; forward returns the hidden states."""

    def __init__(self, batch: dict):
        super().__init__()
        self.trunk = nn.Linear(D_IN, H)
        self.lm_head = nn.Linear(H, V, bias=False)
        with torch.no_grad():
            self.trunk.weight.copy_(batch["trunk_weight"])
            self.trunk.bias.copy_(batch["trunk_bias"])
            self.lm_head.weight.copy_(batch["lm_head_weight"])

    def forward(self, x):
        return torch.tanh(self.trunk(x)) * 2


class DistillHead(nn.Module):
    """The module owning the lm_head computes the loss in its forward. As an FSDP2 unit, the weight is
    gathered there (a plain tensor) and its gradient reduce-scattered after the backward; under DDP the
    lm_head is then used inside the forward, as find_unused_parameters=True requires."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden, teacher_hidden, teacher_weight, labels, **options):
        return kdops.fused_linear_kd_loss(hidden, self.lm_head.weight, teacher_hidden, teacher_weight, labels,
                                          **options)


class DistillStudent(nn.Module):
    def __init__(self, student: Student):
        super().__init__()
        self.trunk = student.trunk
        self.head = DistillHead(student.lm_head)

    def forward(self, x, teacher_hidden, teacher_weight, labels, **options):
        return self.head(torch.tanh(self.trunk(x)) * 2, teacher_hidden, teacher_weight, labels, **options)


# Parameter names of Student / DistillStudent -> the oracle's (Student's).
ORACLE_NAMES = {"trunk.weight": "trunk.weight", "trunk.bias": "trunk.bias", "lm_head.weight": "lm_head.weight",
                "head.lm_head.weight": "lm_head.weight"}


def reference_grads(model: Student, batch: dict, rows=slice(None), dtype=torch.float64, **options):
    """Loss and gradients of every student parameter (by name) by the reference in `dtype`, on batch
    rows `rows`, in one process."""
    model = copy.deepcopy(model).to(dtype)
    model.zero_grad(set_to_none=True)
    hidden = model(batch["x"][rows].to(dtype))
    loss = reference.fused_linear_kd_loss(hidden, model.lm_head.weight, batch["teacher_hidden"][rows].to(dtype),
                                          batch["teacher_weight"].to(dtype), batch["labels"][rows],
                                          teacher_bias=batch["teacher_bias"].to(dtype), **options)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def oracle_grads(model: Student, batch: dict, rows=slice(None), dtype=torch.float32, **options):
    """The float64 oracle's loss and gradients, and per gradient the tolerance of a result computed in
    `dtype`: the same-dtype reference's own error plus TOLERANCE[dtype] (the project's rule, oracle.py)."""
    loss, grads = reference_grads(model, batch, rows, **options)
    _, same_dtype = reference_grads(model, batch, rows, dtype, **options)
    return loss, grads, {name: rel_error(same_dtype[name], grad) + TOLERANCE[dtype] for name, grad in grads.items()}


def assert_grads(model: nn.Module, expected: dict, tolerance: dict, case: str) -> None:
    for name, param in model.named_parameters():
        name = ORACLE_NAMES[name]
        assert param.grad is not None, f"{case}: {name} has no gradient"
        err = rel_error(param.grad, expected[name])
        assert err <= tolerance[name], f"{case}: {name} gradient error {err:.3g} vs the oracle's"


def assert_halves_differ(model: Student, batch: dict, rank: int, world_size: int, full: dict, **options) -> None:
    """Sensitivity: one rank's half-batch gradient is far from the full batch's, so a gradient that was
    not averaged across ranks (or summed instead) fails the comparisons."""
    rows = local_half(torch.arange(B), rank, world_size)
    _, half, _ = oracle_grads(model, batch, rows, **options)
    for name, grad in half.items():
        assert rel_error(grad, full[name]) > 1e-2, f"{name}: half and full batch gradients agree"


# ----------------------------------------------------------------------------------------------- DDP


def ddp_body(rank: int, world_size: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    batch = make_batch()
    plain = Student(batch)          # for the oracle: a copy of a DDP-wrapped module would carry DDP's hooks
    model = Student(batch)
    ddp = DistributedDataParallel(model)
    half = {k: local_half(v, rank, world_size) for k, v in batch.items() if k in ("x", "teacher_hidden", "labels")}
    teacher_weight, teacher_bias = batch["teacher_weight"], batch["teacher_bias"]   # frozen, not DDP

    for case, options in CASES:
        full_loss, full, tolerance = oracle_grads(plain, batch, **options)
        ddp.zero_grad(set_to_none=True)
        hidden = ddp(half["x"])
        loss = kdops.fused_linear_kd_loss(hidden, ddp.module.lm_head.weight, half["teacher_hidden"], teacher_weight,
                                          half["labels"], teacher_bias=teacher_bias, reduction="batchmean", **options)
        loss.backward()
        assert_grads(model, full, tolerance, case)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert rel_error(mean_loss / world_size, full_loss) <= GRAD_TOL, f"{case}: loss"

    # Without DDP's all-reduce (no_sync), each rank holds its half-batch gradient: it matches the
    # half-batch oracle and fails the full-batch comparison, which is what a missing average would give.
    case, options = CASES[2]
    _, full, tolerance = oracle_grads(plain, batch, **options)
    rows = local_half(torch.arange(B), rank, world_size)
    _, half_oracle, half_tolerance = oracle_grads(plain, batch, rows, **options)
    ddp.zero_grad(set_to_none=True)
    with ddp.no_sync():
        kdops.fused_linear_kd_loss(ddp(half["x"]), ddp.module.lm_head.weight, half["teacher_hidden"], teacher_weight,
                                   half["labels"], teacher_bias=teacher_bias, **options).backward()
    assert_grads(model, half_oracle, half_tolerance, "no_sync")
    with pytest.raises(AssertionError, match="gradient error"):
        assert_grads(model, full, tolerance, "no_sync")

    # Pitfall: hidden states from the wrapped module itself (ddp.module(x)) bypass DDP's forward, which
    # arms its gradient hooks: the backward then averages nothing.
    ddp.zero_grad(set_to_none=True)
    kdops.fused_linear_kd_loss(ddp.module(half["x"]), ddp.module.lm_head.weight, half["teacher_hidden"],
                               teacher_weight, half["labels"], teacher_bias=teacher_bias, **options).backward()
    assert_grads(model, half_oracle, half_tolerance, "bypassed DDP forward")

    # find_unused_parameters=True marks the lm_head unused when it is read outside the forward (DDP then
    # raises "Expected to mark a variable ready only once"); with the loss inside the forward it works.
    in_forward = DistributedDataParallel(DistillStudent(Student(batch)), find_unused_parameters=True)
    for case, options in (CASES[0], CASES[2]):
        _, full, tolerance = oracle_grads(plain, batch, **options)
        in_forward.zero_grad(set_to_none=True)
        in_forward(half["x"], half["teacher_hidden"], teacher_weight, half["labels"], teacher_bias=teacher_bias,
                   **options).backward()
        assert_grads(in_forward.module, full, tolerance, f"loss in forward/{case}")

    # Halves with different numbers of ignored tokens: normalize by the global token count
    # (num_items_in_batch, all-reduced) and undo DDP's average by scaling the loss by the world size.
    labels = batch["labels"].clone()
    labels[0, 1:3] = -100                                  # rank 0's half only
    batch = dict(batch, labels=labels)
    half_labels = local_half(labels, rank, world_size)
    num_items = (half_labels != -100).sum().double()
    dist.all_reduce(num_items)
    assert num_items == (labels != -100).sum()
    for case, options in CASES[1:]:
        _, full, tolerance = oracle_grads(plain, batch, **options)
        ddp.zero_grad(set_to_none=True)
        loss = kdops.fused_linear_kd_loss(ddp(half["x"]), ddp.module.lm_head.weight, half["teacher_hidden"],
                                          teacher_weight, half_labels, teacher_bias=teacher_bias,
                                          num_items_in_batch=num_items, **options)
        (loss * world_size).backward()
        assert_grads(model, full, tolerance, f"{case}/num_items_in_batch")


def test_ddp_gradients_match_full_batch():
    """fused, chunked and torch paths, forward_kl / generalized_jsd / reverse_kl, hard labels, under
    DDP on 2 ranks: the averaged gradients equal one process's full-batch gradients (float64 oracle);
    unequal halves via num_items_in_batch; no_sync shows a missing average is detected."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    spawn(ddp_body, WORLD_SIZE)


# --------------------------------------------------------------------------------------------- FSDP2


def fsdp_body(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    batch = make_batch(seed=1)
    plain = Student(batch)
    half = {k: local_half(v, rank, world_size) for k, v in batch.items() if k in ("x", "teacher_hidden", "labels")}

    # The frozen teacher's lm_head, sharded like the student's.
    teacher = nn.Linear(HT, VT)
    with torch.no_grad():
        teacher.weight.copy_(batch["teacher_weight"])
        teacher.bias.copy_(batch["teacher_bias"])
    teacher.requires_grad_(False)
    fully_shard(teacher, mesh=mesh)

    student = DistillStudent(copy.deepcopy(plain))
    fully_shard(student.head, mesh=mesh)
    fully_shard(student, mesh=mesh)
    # A second layout: only the root unit, which then owns the lm_head.
    root_only = DistillStudent(copy.deepcopy(plain))
    fully_shard(root_only, mesh=mesh)
    # Mixed precision: bf16 compute (parameters gathered in bf16, float inputs cast), float32 reduction.
    mixed = DistillStudent(copy.deepcopy(plain))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(mixed.head, mesh=mesh, mp_policy=policy)
    fully_shard(mixed, mesh=mesh, mp_policy=policy)

    # 1. A sharded weight read outside the owning unit's forward is a DTensor: a TypeError naming it.
    sharded_weight, sharded_teacher = student.head.lm_head.weight, teacher.weight
    assert isinstance(sharded_weight, DTensor) and isinstance(sharded_teacher, DTensor)
    hidden = torch.randn(B // world_size, L, H)
    for impl, backend in (("fused", "triton"), ("chunked", "triton"), ("chunked", "torch"), ("auto", "auto")):
        for weights in ((sharded_weight, batch["teacher_weight"]), (plain.lm_head.weight, sharded_teacher)):
            with pytest.raises(TypeError, match="DTensor"):
                kdops.fused_linear_kd_loss(hidden, weights[0], half["teacher_hidden"], weights[1], half["labels"],
                                           impl=impl, backend=backend)

    # 2. The frozen teacher gathered by full_tensor() (a plain tensor, no autograd history).
    with torch.no_grad():
        teacher_weight, teacher_bias = teacher.weight.full_tensor(), teacher.bias.full_tensor()
    assert type(teacher_weight) is torch.Tensor and not teacher_weight.requires_grad
    assert torch.equal(teacher_weight, batch["teacher_weight"]) and torch.equal(teacher_bias, batch["teacher_bias"])

    # 3. The loss inside the forward of the unit owning the lm_head. FSDP2 reduce-scatters with an
    # average over the ranks (like DDP), so each rank's shard equals its rows of the full-batch gradient.
    cases = [(f"nested/{case}", student, torch.float32, options) for case, options in CASES]
    cases.append(("mixed_bf16/fused/forward_kl", mixed, torch.bfloat16,
                  dict(impl="fused", backend="triton", divergence="forward_kl", hard_weight=0.5)))
    cases.append(("root_only/torch/generalized_jsd", root_only, torch.float32,
                  dict(impl="chunked", backend="torch", divergence="generalized_jsd", hard_weight=0.3)))
    for case, model, dtype, options in cases:
        full_loss, full, tolerance = oracle_grads(plain, batch, dtype=dtype, **options)
        model.zero_grad(set_to_none=True)
        loss = model(half["x"], half["teacher_hidden"], teacher_weight, half["labels"], teacher_bias=teacher_bias,
                     reduction="batchmean", **options)
        loss.backward()
        assert isinstance(model.head.lm_head.weight, DTensor)  # resharded after the backward
        for name, param in model.named_parameters():
            expected, tol = full[ORACLE_NAMES[name]], tolerance[ORACLE_NAMES[name]]
            assert isinstance(param.grad, DTensor), f"{case}: {name} gradient is not sharded"
            assert param.grad.dtype == torch.float32
            local = param.grad.to_local()
            assert local.shape == param.to_local().shape
            err = rel_error(local, expected.chunk(world_size)[rank])
            assert err <= tol, f"{case}: {name} local shard gradient error {err:.3g}"
            err = rel_error(param.grad.full_tensor(), expected)
            assert err <= tol, f"{case}: {name} gathered gradient error {err:.3g}"
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert rel_error(mean_loss / world_size, full_loss) <= 2 * TOLERANCE[dtype], f"{case}: loss"
    assert_halves_differ(plain, batch, rank, world_size, full, **cases[-1][3])


def test_fsdp2_sharded_weight_and_distill_head():
    """FSDP2 on 2 ranks: a DTensor weight is a TypeError naming DTensor (every impl); the loss inside
    the forward of the lm_head's FSDP unit (nested and root-only layouts), teacher sharded and gathered
    by full_tensor(), gives per-rank gradient shards equal to the full-batch float64 oracle's."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # fully_shard is public from torch 2.6; FSDP2 reduce-scatters float32 gradients with ReduceOp.AVG,
    # which gloo implements from torch 2.8 (pytorch/pytorch#149781).
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 8):
        pytest.skip("FSDP2 on CPU needs gloo's ReduceOp.AVG (torch >= 2.8)")
    spawn(fsdp_body, WORLD_SIZE)
