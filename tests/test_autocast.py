"""fused_linear_kd_loss under torch.autocast (as the HF Trainer runs with bf16=True: hidden states in bf16, the
lm_head weight a float32 master copy): the matmuls run in the autocast dtype, as autocast runs F.linear —
every float operand but float64 cast, the float32 weights' gradients through the casts — and the loss
itself stays as without autocast (float32 logits and statistics). Without autocast, float32 stays exact."""

import pytest
import torch

import kdops
import kdops.launchers.common
from test_fused_linear import make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = [("chunked", "triton"), ("chunked", "torch"), ("fused", "triton"), ("sliced", "triton")]


def _leaves(x, dtypes):
    """Fresh leaves: hidden states and weights in the given dtypes, all requiring grad."""
    out = {}
    for k, v in x.items():
        if k == "labels":
            out[k] = v
        else:
            out[k] = v.detach().to(dtypes.get(k, v.dtype)).requires_grad_(True)
    return out


def _run(inputs, **options):
    loss = kdops.fused_linear_kd_loss(**inputs, **options)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in inputs.items() if k != "labels"}


@pytest.mark.parametrize("impl, backend", IMPLS, ids=["chunked", "torch", "fused", "sliced"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_runs_the_matmuls_in_its_dtype(impl, backend, autocast_dtype):
    """Under autocast, bf16 hidden states beside float32 master weights and biases give exactly what the
    same call gives on operands cast by hand; the weights' gradients come back in float32."""
    x = make_inputs(torch.float32, seed=31)
    options = dict(divergence="generalized_jsd", hard_weight=0.3, temperature=1.5, impl=impl, backend=backend)
    mixed = _leaves(x, {"student_hidden": autocast_dtype, "teacher_hidden": autocast_dtype})
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        loss, grads = _run(mixed, **options)
    by_hand = _leaves(x, {"student_hidden": autocast_dtype, "teacher_hidden": autocast_dtype})
    cast = {k: (v.to(autocast_dtype) if k != "labels" else v) for k, v in by_hand.items()}
    expected = kdops.fused_linear_kd_loss(**cast, **options)
    expected.backward()
    assert loss.dtype == torch.float32 and torch.equal(loss, expected.detach())
    for k, grad in grads.items():
        assert grad.dtype == mixed[k].dtype, k
        assert torch.equal(grad, by_hand[k].grad), k
    assert grads["student_weight"].dtype == torch.float32


def test_autocast_keeps_float32_logits_inside():
    """The torch backend's reference math under an active autocast would round its logits to bf16: kdops
    turns autocast off for the loss (float32 statistics), so the loss is the float32-logit loss of the cast
    operands, not autocast's own F.linear loss."""
    x = make_inputs(torch.float32, seed=32)
    options = dict(divergence="forward_kl", impl="chunked", backend="torch")
    inputs = _leaves(x, {})
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        inside = kdops.fused_linear_kd_loss(**inputs, **options)
        autocast_reference = kdops.reference.fused_linear_kd_loss(**inputs, divergence="forward_kl")
    cast = {k: (v.to(torch.bfloat16) if k != "labels" else v) for k, v in inputs.items()}
    float32_logits = kdops.reference.fused_linear_kd_loss(
        **{k: (v.float() if k != "labels" else v) for k, v in cast.items()}, divergence="forward_kl")
    assert torch.allclose(inside, float32_logits, rtol=1e-5)
    assert not torch.allclose(inside, autocast_reference, rtol=1e-5)  # autocast's bf16 logits differ


def test_float32_without_autocast_stays_float32():
    """float32 operands outside autocast are multiplied in float32: the loss matches the float64 oracle to
    float32 precision (a bf16 matmul would be off by ~1e-3)."""
    x = make_inputs(torch.float32, seed=33)
    loss = kdops.fused_linear_kd_loss(**x, impl="chunked", backend="triton")
    oracle = kdops.reference.fused_linear_kd_loss(**{k: (v.double() if k != "labels" else v) for k, v in x.items()})
    assert abs(loss.double() - oracle) / oracle.abs() < 1e-5


def test_float64_operands_are_left_alone_by_autocast():
    x = make_inputs(torch.float64, seed=34)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = kdops.fused_linear_kd_loss(**x, impl="chunked", backend="torch")
    assert loss.dtype == torch.float64
    assert torch.equal(loss, kdops.fused_linear_kd_loss(**x, impl="chunked", backend="torch"))


def test_autocast_launches_the_16bit_kernels_the_compile_gate_checks():
    """What `python -m bench.compile` records for an H100: under autocast, float32 master weights beside
    bf16 hidden states reach the fused kernels as bf16 matmul operands (DOT_S = DOT_T = bf16, the tensor-core
    specializations of the gate's bf16 calls), not as float32 ones on the CUDA cores."""
    from kdops import targets

    x = make_inputs(torch.float32, seed=35)
    inputs = _leaves(x, {"student_hidden": torch.bfloat16, "teacher_hidden": torch.bfloat16})
    dots = set()

    def recorder(kernel, grid, args, kwargs):
        if "DOT_S" in kwargs:
            dots.add((kernel.__name__, str(kwargs["DOT_S"]), str(kwargs["DOT_T"])))

    with targets.assume("h100"), kdops.launchers.common.recording(recorder), torch.autocast(DEVICE,
                                                                                            dtype=torch.bfloat16):
        kdops.fused_linear_kd_loss(**inputs, impl="fused", backend="triton", reduction="none").sum().backward()
    assert dots and all(d[1:] == ("bf16", "bf16") for d in dots), dots
