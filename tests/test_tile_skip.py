"""bench/tile_skip.py: the measurement behind the decision not to skip small gradient tiles (CPU, small shapes)."""

import pytest
import torch

from bench.tile_skip import logit_gradient, skip_errors, tile_max


def test_tile_max_covers_partial_tiles():
    """max |x| per tile, edge tiles included, against a loop over the tiles (odd shapes: 37 × 101, 8 × 16)."""
    x = torch.randn(37, 101, dtype=torch.float64) * 4
    peaks = tile_max(x, 8, 16)
    assert peaks.shape == (5, 7)
    for i in range(5):
        for j in range(7):
            assert peaks[i, j] == x[8 * i: 8 * i + 8, 16 * j: 16 * j + 16].abs().max()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_gradient_of_forward_kl(temperature):
    """The reference's gradient of each row's forward KL is (softmax(s / T) − softmax(t / T)) / T."""
    s, t = torch.randn(6, 53) * 4, torch.randn(6, 53) * 4
    t[0, 5] = 30.0  # a peaked row
    grad = logit_gradient(s, t, "forward_kl", temperature)
    expected = (torch.softmax(s.double() / temperature, -1) - torch.softmax(t.double() / temperature, -1)) / temperature
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_skip_errors_drop_exactly_the_small_tiles():
    """Two tiles of G scaled below ε: those two (of 5 × 4) are skipped, and the errors are the norms of their
    products exactly; an ε below every |G| skips nothing and leaves no error."""
    n, v, h = 37, 61, 7
    grad = torch.randn(n, v, dtype=torch.float64).sign() * (0.5 + torch.rand(n, v, dtype=torch.float64))
    grad[8:16, 16:32] *= 1e-9
    grad[32:, 48:] *= 1e-9  # an edge tile: 5 rows × 13 columns
    weight, hidden = torch.randn(v, h, dtype=torch.float64), torch.randn(n, h, dtype=torch.float64)
    small = torch.zeros_like(grad)
    small[8:16, 16:32], small[32:, 48:] = grad[8:16, 16:32], grad[32:, 48:]
    (result, none) = skip_errors(grad, weight, hidden, tiles=((8, 16),), thresholds=(1e-6, 1e-12))
    assert (result.block_rows, result.block_cols, result.threshold) == (8, 16, 1e-6)
    assert result.skipped == pytest.approx(2 / 20)
    dh, dw = grad @ weight, grad.T @ hidden
    assert result.dh_error == pytest.approx(float((small @ weight).norm() / dh.norm()), rel=1e-4)
    assert result.dw_error == pytest.approx(float((small.T @ hidden).norm() / dw.norm()), rel=1e-4)
    rows = (small @ weight).norm(dim=-1) / dh.norm(dim=-1)
    assert result.worst_row == pytest.approx(float(rows.max()), rel=1e-4)
    assert 0 < result.dh_error < 1e-8
    assert none.skipped == 0 and none.dh_error == none.dw_error == none.worst_row == 0
