"""The test run's Triton interpreter patches triton.language once per launch (tests/triton_interpreter.py): where
that stops working with a new Triton, the interpreted tests take twice as long and this says so."""

import os

import pytest
import torch
import triton
import triton.language as tl

import triton_interpreter

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter only")


@triton.jit
def _scaled_exp(x, scale):
    return tl.exp(x * scale)


@triton.jit
def _sum_of_exps_kernel(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    """out[0] = Σ e^(scale·x): a helper called once per tile, and triton.language's own tl.sum and tl.zeros."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.where(cols < n, _scaled_exp(tl.load(x_ptr + cols, mask=cols < n, other=0.0), scale), 0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def test_language_is_patched_once_per_launch(monkeypatch):
    from triton.runtime import interpreter

    assert triton_interpreter.cache_language_patches(), "this Triton's interpreter has a different structure"
    assert interpreter._patch_lang.kdops_cached
    calls = []
    original = interpreter._patch_lang

    def counted(fn):
        scope = original(fn)
        calls.append(type(scope).__name__)
        return scope

    monkeypatch.setattr(interpreter, "_patch_lang", counted)
    x = torch.randn(1000, dtype=torch.float32) * 4
    out = torch.full((1,), float("nan"))
    _sum_of_exps_kernel[(1,)](x, out, x.numel(), 0.5, BLOCK=64)
    assert float(out) == pytest.approx(float(torch.exp(x.double() * 0.5).sum()), rel=1e-5)
    made = [c for c in calls if c != "_Nothing"]
    assert len(calls) > 16 and len(made) <= 3, calls  # the launch's own, and at most tl.core's for tl.zeros/tl.sum
    assert triton.language.core.is_builtin(tl.exp), "the launch left triton.language patched"
