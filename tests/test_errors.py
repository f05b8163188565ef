"""Bad input raises a ValueError / TypeError that names the argument, before any kernel runs (SPEC "Errors",
and the parameter-validation bullet of "Divergences"); valid edge cases do not raise."""

import math
import os
import sys

import pytest
import torch

import kdops
import kdops._autograd
import kdops.launchers.common
from kdops import reference

FUNCTIONS = {"kdops": kdops.kd_loss, "reference": reference.kd_loss}

# Where backend="triton" can run here: CPU tensors under the interpreter (set by conftest when there is no
# GPU, before triton is imported), else CUDA tensors; None when it cannot run at all.
if os.environ.get("TRITON_INTERPRET") == "1":
    TRITON_DEVICE = "cpu"
elif torch.cuda.is_available():
    TRITON_DEVICE = "cuda"
else:
    TRITON_DEVICE = None
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")


class _Lazy:
    """A case's tensor, built when the test runs rather than at collection."""

    def __init__(self, make):
        self.make = make


def _logits(*shape, device="cpu"):
    return _Lazy(lambda: torch.randn(*shape, device=device) * 4)


def _default_labels(rows=4, device="cpu", dtype=torch.long):
    labels = torch.arange(rows, device=device, dtype=dtype) % 7
    if rows > 1:
        labels[1] = -100
    return labels


def _call(fn, overrides=None, **extra):
    """fn(student [4, 7], teacher [4, 7], labels [4], **kwargs), with `overrides` replacing any of them."""
    args = dict(student_logits=torch.randn(4, 7) * 4, teacher_logits=torch.randn(4, 7) * 4,
                labels=_default_labels())
    args.update(extra)
    args.update({k: v.make() if isinstance(v, _Lazy) else v for k, v in (overrides or {}).items()})
    return fn(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels"), **args)


# (overrides of the default call, exception, regex the message must match: it names the argument).
ERROR_CASES = [
    # mismatched shapes
    pytest.param(dict(teacher_logits=_logits(3, 7)), ValueError,
                 r"student_logits and teacher_logits.*\(4, 7\).*\(3, 7\)", id="teacher-rows"),
    pytest.param(dict(teacher_logits=_logits(4, 8)), ValueError,
                 r"student_logits and teacher_logits.*\(4, 7\).*\(4, 8\)", id="teacher-vocab"),
    pytest.param(dict(teacher_logits=_logits(1, 4, 7)), ValueError,
                 r"student_logits and teacher_logits.*\(4, 7\).*\(1, 4, 7\)", id="teacher-extra-dim"),
    pytest.param(dict(student_logits=_logits(4, 0), teacher_logits=_logits(4, 0)), ValueError,
                 r"student_logits.*empty", id="empty-vocab"),
    pytest.param(dict(student_logits=_Lazy(lambda: torch.tensor(1.0))), ValueError,
                 r"student_logits.*dimension", id="student-0d"),
    # labels
    pytest.param(dict(labels=_Lazy(lambda: torch.zeros(5, dtype=torch.long))), ValueError,
                 r"labels.*\(4,\).*\(5,\)", id="labels-length"),
    pytest.param(dict(labels=_Lazy(lambda: torch.zeros(4, 1, dtype=torch.long))), ValueError,
                 r"labels.*\(4,\).*\(4, 1\)", id="labels-2d"),
    pytest.param(dict(labels=_Lazy(lambda: torch.zeros(4))), TypeError, r"labels.*float32", id="labels-float"),
    pytest.param(dict(labels=_Lazy(lambda: torch.zeros(4, dtype=torch.bool))), TypeError, r"labels.*bool",
                 id="labels-bool"),
    pytest.param(dict(labels=[0, 1, 2, 3]), TypeError, r"labels.*list", id="labels-list"),
    # devices
    pytest.param(dict(teacher_logits=_logits(4, 7, device="meta")), ValueError, r"teacher_logits on meta",
                 id="teacher-on-meta"),
    pytest.param(dict(student_logits=_logits(4, 7, device="meta")), ValueError, r"student_logits on meta",
                 id="student-on-meta"),
    pytest.param(dict(labels=_Lazy(lambda: _default_labels(device="meta"))), ValueError, r"labels.*meta",
                 id="labels-on-meta"),
    # dtypes / types of the logits
    pytest.param(dict(student_logits=_Lazy(lambda: torch.randint(0, 9, (4, 7)))), TypeError,
                 r"student_logits.*floating.*int64", id="student-int"),
    pytest.param(dict(teacher_logits=_Lazy(lambda: torch.randint(0, 9, (4, 7), dtype=torch.int32))), TypeError,
                 r"teacher_logits.*floating.*int32", id="teacher-int"),
    pytest.param(dict(student_logits=[[0.0] * 7] * 4), TypeError, r"student_logits.*Tensor.*list",
                 id="student-list"),
    pytest.param(dict(teacher_logits=None), TypeError, r"teacher_logits.*Tensor.*NoneType", id="teacher-none"),
    # temperature
    *[pytest.param(dict(temperature=value), ValueError, r"temperature.*positive", id=f"temperature={value}")
      for value in (0, 0.0, -1.0, math.nan, math.inf, -math.inf)],
    *[pytest.param(dict(temperature=value), TypeError, r"temperature", id=f"temperature={value!r}")
      for value in ("2.0", None, True)],
    # options
    *[pytest.param(dict(reduction=value), ValueError, r"reduction.*batchmean.*" + repr(value), id=f"reduction={value}")
      for value in ("mean", "Sum", None)],
    *[pytest.param(dict(backend=value), ValueError, r"backend.*triton.*" + repr(value), id=f"backend={value}")
      for value in ("cuda", "Torch", None)],
    *[pytest.param(dict(num_items_in_batch=value), ValueError, r"num_items_in_batch.*positive",
                   id=f"num_items_in_batch={value}") for value in (0, -3, -0.5, math.nan, math.inf)],
    *[pytest.param(dict(num_items_in_batch=_Lazy(lambda v=value: torch.tensor(v))), ValueError,
                   r"num_items_in_batch.*positive", id=f"num_items_in_batch=tensor({value})")
      for value in (0, -2.0)],
    pytest.param(dict(num_items_in_batch="4"), TypeError, r"num_items_in_batch", id="num_items_in_batch-str"),
    pytest.param(dict(num_items_in_batch=_Lazy(lambda: torch.tensor([2.0, 3.0]))), ValueError,
                 r"num_items_in_batch.*one-element", id="num_items_in_batch-2-elements"),
    *[pytest.param(dict(ignore_index=value), TypeError, r"ignore_index.*int", id=f"ignore_index={value!r}")
      for value in (-100.0, 1.5, "x", None)],
    # per-row weights
    pytest.param(dict(weights=_Lazy(lambda: torch.ones(5))), ValueError, r"weights.*\(4,\).*\(5,\)",
                 id="weights-length"),
    pytest.param(dict(weights=_Lazy(lambda: torch.ones(4, dtype=torch.long))), TypeError,
                 r"weights.*floating.*int64", id="weights-int"),
    pytest.param(dict(weights=[1.0] * 4), TypeError, r"weights.*Tensor.*list", id="weights-list"),
    pytest.param(dict(weights=_Lazy(lambda: torch.ones(4, device="meta"))), ValueError, r"weights.*meta",
                 id="weights-on-meta"),
    pytest.param(dict(divergence="kl"), ValueError, r"divergence.*'kl'.*forward_kl", id="divergence-unknown"),
    pytest.param(dict(divergence=3), ValueError, r"divergence.*3", id="divergence-int"),
]

def _cases_for_each_function():
    for name in FUNCTIONS:
        for case in ERROR_CASES:
            yield pytest.param(name, *case.values, id=f"{name}-{case.id}")


@pytest.mark.parametrize("function, overrides, error, match", list(_cases_for_each_function()))
def test_invalid_input_raises(function, overrides, error, match):
    with pytest.raises(error, match=match):
        _call(FUNCTIONS[function], overrides)


@pytest.fixture
def no_kernels(monkeypatch):
    """Any launch of a Triton kernel (every one goes through `kdops.launchers.common.launch`, wherever a module
    imported it) or of the chunked torch path fails the test."""

    def kernel_ran(*args, **kwargs):
        raise AssertionError("kernel ran")

    launch = kdops.launchers.common.launch
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("kdops.") and getattr(module, "launch", None) is launch:
            monkeypatch.setattr(module, "launch", kernel_ran)
    monkeypatch.setattr(kdops._autograd.ChunkedRowsFunction, "apply", kernel_ran)


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("overrides, error, match", ERROR_CASES)
def test_raises_before_any_kernel(no_kernels, backend, overrides, error, match):
    # A case that sets `backend` itself keeps it (overrides win over the extra keyword).
    with pytest.raises(error, match=match):
        _call(kdops.kd_loss, overrides, backend=backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_kernels_fixture_is_effective(no_kernels, backend):
    """A valid call does reach the patched launchers, so the test above proves something."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    s, t = torch.randn(4, 7, device=device), torch.randn(4, 7, device=device)
    with pytest.raises(AssertionError, match="kernel ran"):
        kdops.kd_loss(s, t, backend=backend)


@pytest.mark.parametrize("interpret", ["0", None], ids=["TRITON_INTERPRET=0", "TRITON_INTERPRET-unset"])
def test_triton_backend_unavailable(no_kernels, monkeypatch, interpret):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(ValueError, match=r"backend='triton'.*cpu.*TRITON_INTERPRET"):
        _call(kdops.kd_loss, backend="triton")


def test_auto_backend_without_interpreter_uses_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s, t = torch.randn(4, 7) * 4, torch.randn(4, 7) * 4
    torch.testing.assert_close(kdops.kd_loss(s, t, backend="auto"), reference.kd_loss(s, t))


# ----------------------------------------------------------------------------------------------------------
# Divergences: parameters validated on construction, unknown names listing the known ones.


def _divergence_param(cls, param, value, valid_range=None):
    return pytest.param(cls, param, value, valid_range, id=f"{cls.__name__}({param}={value!r})")


# (class, parameter, value, the range the message must state; None where the value is not a finite number)
@pytest.mark.parametrize("cls, param, value, valid_range", [
    _divergence_param(kdops.GeneralizedJSD, "beta", -0.1, "[0, 1]"),
    _divergence_param(kdops.GeneralizedJSD, "beta", 1.5, "[0, 1]"),
    _divergence_param(kdops.GeneralizedJSD, "beta", math.nan),
    _divergence_param(kdops.GeneralizedJSD, "beta", "x"),
    _divergence_param(kdops.SkewForwardKL, "alpha", 1.0, "[0, 1)"),
    _divergence_param(kdops.SkewForwardKL, "alpha", -0.01, "[0, 1)"),
    _divergence_param(kdops.SkewReverseKL, "alpha", 1.0, "[0, 1)"),
    _divergence_param(kdops.SkewReverseKL, "alpha", -0.01, "[0, 1)"),
    _divergence_param(kdops.AlphaBeta, "alpha", 0, "(0, inf)"),
    _divergence_param(kdops.AlphaBeta, "alpha", -0.5, "(0, inf)"),
    _divergence_param(kdops.AlphaBeta, "alpha", math.nan),
    _divergence_param(kdops.AlphaBeta, "alpha", math.inf),
    _divergence_param(kdops.AlphaBeta, "beta", -1, "(0, inf)"),
    _divergence_param(kdops.AlphaBeta, "beta", 0.0, "(0, inf)"),
])
def test_divergence_parameter_out_of_range(cls, param, value, valid_range):
    # \b keeps "alpha" from matching inside the class name "AlphaBeta" (and vice versa for "beta").
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {param}\b.*got") as info:
        cls(**{param: value})
    if valid_range is not None:
        assert valid_range in str(info.value)


@pytest.mark.parametrize("cls, param, value", [
    (kdops.GeneralizedJSD, "beta", 0), (kdops.GeneralizedJSD, "beta", 1), (kdops.GeneralizedJSD, "beta", 0.0),
    (kdops.GeneralizedJSD, "beta", 1.0), (kdops.SkewForwardKL, "alpha", 0), (kdops.SkewReverseKL, "alpha", 0.0),
    (kdops.SkewForwardKL, "alpha", 0.999), (kdops.AlphaBeta, "alpha", 1e-3), (kdops.AlphaBeta, "beta", 5.0),
], ids=lambda v: v.__name__ if isinstance(v, type) else repr(v))
def test_divergence_boundary_parameters_are_valid(cls, param, value):
    divergence = cls(**{param: value})
    assert getattr(divergence, param) == value


@pytest.mark.parametrize("function", FUNCTIONS)
def test_unknown_divergence_lists_known_names(function):
    with pytest.raises(ValueError, match="divergence") as info:
        _call(FUNCTIONS[function], dict(divergence="forward-kl"))
    message = str(info.value)
    assert "forward_kl" in message and "alpha_beta" in message
    assert all(name in message for name in kdops.DIVERGENCES)


def test_kdloss_module_rejects_unknown_divergence():
    with pytest.raises(ValueError, match=r"divergence.*'kl'.*forward_kl"):
        kdops.KDLoss(divergence="kl")


@pytest.mark.parametrize("options, match", [
    (dict(temperature=0.0), "temperature"), (dict(reduction="mean"), "reduction"),
    (dict(backend="cuda"), "backend"), (dict(ignore_index=1.5), "ignore_index"),
])
def test_kdloss_module_validates_on_construction(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kdops.KDLoss(**options)


# ----------------------------------------------------------------------------------------------------------
# Valid edge cases that must not raise.

VALID_BACKENDS = ["reference", "torch", pytest.param("triton", marks=needs_triton)]


def _loss(backend, *args, **kwargs):
    if backend == "reference":
        return reference.kd_loss(*args, **kwargs)
    return kdops.kd_loss(*args, backend=backend, **kwargs)


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", VALID_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_ignored_batch_is_zero(backend, reduction):
    device = _device(backend)
    s = (torch.randn(4, 7, device=device) * 4).requires_grad_()
    t = torch.randn(4, 7, device=device) * 4
    labels = torch.full((4,), -100, device=device)
    loss = _loss(backend, s, t, labels, reduction=reduction)
    assert torch.isfinite(loss).all()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert loss.shape == ((4,) if reduction == "none" else ())
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", VALID_BACKENDS)
@pytest.mark.parametrize("with_labels", [False, True], ids=["no-labels", "labels"])
def test_zero_rows(backend, with_labels):
    device = _device(backend)
    s, t = torch.randn(0, 7, device=device), torch.randn(0, 7, device=device)
    labels = torch.zeros(0, dtype=torch.long, device=device) if with_labels else None
    for reduction in ("batchmean", "sum"):
        loss = _loss(backend, s, t, labels, reduction=reduction)
        assert loss.shape == () and torch.isfinite(loss) and loss.item() == 0.0
    rows = _loss(backend, s, t, labels, reduction="none")
    assert rows.shape == (0,)


@pytest.mark.parametrize("backend", VALID_BACKENDS)
def test_int32_labels(backend):
    device = _device(backend)
    s, t = torch.randn(4, 7, device=device) * 4, torch.randn(4, 7, device=device) * 4
    labels = _default_labels(device=device)
    expected = _loss(backend, s, t, labels)
    got = _loss(backend, s, t, labels.to(torch.int32))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got.cpu(), reference.kd_loss(s.cpu(), t.cpu(), labels.cpu()))


@pytest.mark.parametrize("backend", VALID_BACKENDS)
@pytest.mark.parametrize("make_n", [
    pytest.param(lambda d: torch.tensor(5, device=d), id="0-d-int"),
    pytest.param(lambda d: torch.tensor(5.0, device=d), id="0-d-float"),
    pytest.param(lambda d: torch.tensor([5.0], device=d), id="shape-1-float"),
])
def test_num_items_in_batch_tensor(backend, make_n):
    device = _device(backend)
    s, t = torch.randn(4, 7, device=device) * 4, torch.randn(4, 7, device=device) * 4
    labels = _default_labels(device=device)
    got = _loss(backend, s, t, labels, num_items_in_batch=make_n(device))
    assert got.shape == ()
    torch.testing.assert_close(got, _loss(backend, s, t, labels, num_items_in_batch=5))
