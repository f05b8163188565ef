"""Inputs with a realistic spread and the float64-oracle comparison rule of SPEC "Accuracy"."""

from __future__ import annotations

import torch

# Added to the reference's own error (SPEC "Accuracy"): relative to the largest oracle magnitude.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def make_logits(shape, dtype=torch.float32, *, device="cpu", peaked_every=5, masked_every=7, generator=None,
                mask_positions=None):
    """randn·4 logits; every `peaked_every`-th row has one logit at +30; every `masked_every`-th row has
    -inf entries (at `mask_positions` if given, so that teacher and student can share them)."""
    x = torch.randn(shape, generator=generator) * 4
    flat = x.view(-1, shape[-1])
    rows, vocab = flat.shape
    if peaked_every:
        peaks = torch.randint(0, vocab, (rows,), generator=generator)
        for r in range(0, rows, peaked_every):
            flat[r, peaks[r]] = 30.0
    if masked_every:
        if mask_positions is None:
            mask_positions = masked_vocab(vocab, generator)
        for r in range(1, rows, masked_every):
            flat[r, mask_positions] = float("-inf")
    return x.to(device=device, dtype=dtype)


def masked_vocab(vocab: int, generator=None) -> torch.Tensor:
    """About a tenth of the vocabulary, never all of it."""
    return torch.randperm(vocab, generator=generator)[: max(1, vocab // 10)]


def logit_pair(shape, dtype=torch.float32, device="cpu", seed=0):
    """Student and teacher logits that mask the same vocabulary entries with -inf."""
    g = torch.Generator().manual_seed(seed)
    positions = masked_vocab(shape[-1], g)
    s = make_logits(shape, dtype, device=device, generator=g, mask_positions=positions)
    t = make_logits(shape, dtype, device=device, generator=g, mask_positions=positions, peaked_every=3)
    return s, t


def rel_error(value: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |value − oracle| / max |oracle| over finite oracle entries; inf/nan must match exactly."""
    value = value.detach().to(torch.float64).cpu()
    oracle = oracle.detach().to(torch.float64).cpu()
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(value), finite), "non-finite entries differ from the oracle's"
    assert torch.equal(value[~finite].nan_to_num(), oracle[~finite].nan_to_num())
    if not finite.any():
        return 0.0
    scale = oracle[finite].abs().max().clamp_min(1e-30)
    return float((value[finite] - oracle[finite]).abs().max() / scale)


def run_loss(fn, student, teacher, *, upstream=None, **kwargs):
    """Loss and gradients (student, teacher where it requires grad) of fn(student, teacher, **kwargs)."""
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(kwargs.pop("teacher_grad", True))
    loss = fn(student, teacher, **kwargs)
    weight = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    inputs = [x for x in (student, teacher) if x.requires_grad]
    grads = torch.autograd.grad(loss, inputs, weight)
    return [loss, *grads]


def assert_matches_oracle(fn, reference, student, teacher, **kwargs):
    """kdops' error vs the float64 oracle ≤ the same-dtype reference's error + TOLERANCE[dtype], for the
    loss and every gradient."""
    dtype = student.dtype
    oracle = run_loss(reference, student.double(), teacher.double(), **dict(kwargs))
    same_dtype = run_loss(reference, student, teacher, **dict(kwargs))
    ours = run_loss(fn, student, teacher, **dict(kwargs))
    assert_within_reference(("loss", "grad_student", "grad_teacher"), oracle, same_dtype, ours, dtype)
    return ours


def assert_within_reference(names, oracle, same_dtype, ours, dtype):
    """Each of `ours` (kdops' outputs) has the reference's dtype and shape and an error against the float64 `oracle`
    no larger than the same-dtype reference's (`same_dtype`) + TOLERANCE[dtype] (SPEC "Accuracy")."""
    for name, o, r, k in zip(names, oracle, same_dtype, ours):
        assert k.dtype == r.dtype, f"{name}: dtype {k.dtype}, reference gives {r.dtype}"
        assert k.shape == r.shape, name
        err, ref_err = rel_error(k, o), rel_error(r, o)
        assert err <= ref_err + TOLERANCE[dtype], f"{name}: error {err:.3g} vs reference {ref_err:.3g}"
