"""`kdops.launchers.scale.scale_unless_one` (kernels/scale.py): the upstream gradient applied in place to gradients the
forward finished, read by the kernel, never by the host."""

import pytest
import torch
import kdops.launchers.scale

from conftest import DEVICE


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _values(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 4
    x[::97] = 0.0
    x[1::97] = -0.0
    x[2::193] = float("inf")
    x[3::389] = float("nan")
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2047,
                               2 * kdops.launchers.scale.SCALE_BLOCK * 4 + 7])  # the last: several blocks per program
def test_scales_with_one_rounding(dtype, n):
    """x · s: the product in float32 (float64 for float64 x), rounded once to x's dtype (to nearest on a GPU; the
    interpreter rounds float32 to bfloat16 toward zero); infinities, zeros and NaNs as the product gives them;
    past n nothing is touched."""
    x = _values(n + 5, dtype, seed=n)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(-0.37, dtype=acc, device=DEVICE)
    product = x[:n].to(acc) * s
    roundings = [product.to(dtype)]
    if dtype == torch.bfloat16:  # toward zero: the float32's low 16 bits dropped
        roundings.append((product.view(torch.int32) & -65536).view(torch.float32).to(dtype))
    y = x.clone()
    kdops.launchers.scale.scale_unless_one(y[:n], s)
    once = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    for rounded in roundings:
        once |= (y[:n] == rounded) | (torch.isnan(y[:n]) & torch.isnan(rounded))
    assert bool(once.all()), f"{int((~once).sum())} of {n} elements are not x · s rounded once"
    assert torch.equal(_bits(y[n:]), _bits(x[n:]))


def test_an_upstream_of_one_leaves_every_bit():
    """s == 1 (loss.backward()): the tensor keeps every bit, NaN payloads and signed zeros included (on a GPU,
    where a multiply by 1 returns the canonical NaN, this shows the kernel skipped the tensor)."""
    x = _values(5000, torch.float32, seed=3)
    x.view(torch.int32)[7] = 0x7FC00123  # a NaN with a payload
    y = x.clone()
    kdops.launchers.scale.scale_unless_one(y, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(_bits(y), _bits(x))


def test_the_scale_is_read_as_its_own_dtype():
    """A float64 upstream on float64 gradients is not rounded to float32 first."""
    x = _values(300, torch.float64, seed=4)
    s = torch.tensor(1 + 2.0**-40, dtype=torch.float64, device=DEVICE)
    y = x.clone()
    kdops.launchers.scale.scale_unless_one(y, s)
    finite = torch.isfinite(x) & (x != 0)
    assert torch.equal(y[finite], x[finite] * s) and not torch.equal(y[finite], x[finite])


def test_a_strided_tensor_is_refused():
    """The kernel walks memory in order: a view with gaps would have its gaps scaled and its tail left out."""
    x = _values(64, torch.float32, seed=5).view(8, 8)[:, :4]
    with pytest.raises(AssertionError, match="contiguous"):
        kdops.launchers.scale.scale_unless_one(x, torch.tensor(2.0, device=DEVICE))
