"""The first pass's log-sums on peaked rows: exact to float32 rounding of the log-sum itself.

A real teacher's row has one probability near 1. Its log-sum ls = log Σ e^(v − max) is then small, and a sum
that rounds its small terms against the 1 of the max (an absolute error of ulp(1) per addition) gives ls a
relative error of thousands of ulps, which the α-β and TVD gradients turn into cancellations (test_kd_loss
failed on such rows before the kernels kept the sums as excesses, kernels/divergences.py). Checked on every
path that sums: one kernel's tiles (logits), vocabulary splits merged (fused), ranks under vocab_parallel,
for both distributions, the α-β power sums and the hard-label cross-entropy.
"""

import pytest
import torch

import kdops
import kdops.divergences
import kdops.launchers.linear
import kdops.launchers.logits

from kdops.divergences import as_divergence
from spawn import spawn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

EPS = torch.finfo(torch.float32).eps
# Relative error allowed: a few roundings of each term's exp (ex2.approx and the rounding of its argument on
# a GPU), of the sum and of log1p; sums rounded against the max's 1 were off by 16 to 150.
ULPS = 12
TEMPERATURE = 2.5


def peaked_logits(vocab: int, seed: int) -> torch.Tensor:
    """Rows a trained model gives: a logit far above the rest early, or late in the vocabulary (the running
    max grows in the last tile, rescaling the old sum), two tied at the top in different tiles, several near
    the top, and a row without a peak."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, vocab, generator=g) * 4
    x[0, 17] = 30.0
    x[1, vocab - 5] = 28.0
    x[2, [3, vocab // 2]] = 26.0
    x[3, torch.randperm(vocab, generator=g)[:5]] = 24.0 + torch.rand(5, generator=g)
    x[4, 1] = 22.0
    return x


def shifted(logits32: torch.Tensor) -> torch.Tensor:
    """v − max(v) rounded to float32 as the kernels round it (an error of |v − max|·ε/2 that every float32
    log-softmax makes, and not the sums' doing), in float64."""
    return (logits32 - logits32.amax(-1, keepdim=True)).double()


def log_sum64(logits32: torch.Tensor) -> torch.Tensor:
    """log Σ e^(v − max) of float32 logits, in float64."""
    return shifted(logits32).exp().sum(-1).log()


def power_sum64(logits32: torch.Tensor, power: float) -> torch.Tensor:
    """Σ softmax(v)^power of float32 logits, in float64."""
    return (power * (shifted(logits32) - log_sum64(logits32)[:, None])).exp().sum(-1)


def assert_close_in_ulps(value, exact, what):
    err = ((value.double() - exact).abs() / exact.abs()).max().item()
    assert err <= ULPS * EPS, f"{what}: relative error {err / EPS:.1f} ulps"


def assert_sums_exact(stats, student, teacher, divergence):
    """The log-sums (teacher, student, cross-entropy) of forward-KL / α-β statistics (P = teacher, Q =
    student) and, for α-β, its power sums, within ULPS of float64. The kernels scale by 1/T in float32: so
    does the oracle, so that only the sums are compared."""
    stats, student, teacher = stats.cpu(), student.cpu(), teacher.cpu()
    scaled_s, scaled_t = student * (1.0 / TEMPERATURE), teacher * (1.0 / TEMPERATURE)
    assert_close_in_ulps(stats[:, 1], log_sum64(scaled_t), "log-sum of the teacher")
    assert_close_in_ulps(stats[:, 3], log_sum64(scaled_s), "log-sum of the student")
    assert_close_in_ulps(stats[:, 10], log_sum64(student), "log-sum of the cross-entropy")
    if divergence == "alpha_beta":
        c = as_divergence(divergence).canonical()
        assert_close_in_ulps(stats[:, 6], power_sum64(scaled_t, c.c1 + c.c2), "Σ p^(α+β)")
        assert_close_in_ulps(stats[:, 7], power_sum64(scaled_s, c.c1 + c.c2), "Σ q^(α+β)")
    else:  # r = ls_y − ls_x from Σ (e^dy − e^dx), whose terms have both signs: within ULPS of the larger
        # log-sum (test_near_identical.py checks it on rows where it is far below both)
        exact_r = log_sum64(scaled_s) - log_sum64(scaled_t)
        scale = torch.maximum(log_sum64(scaled_s).abs(), log_sum64(scaled_t).abs())
        err = ((stats[:, 4].double() - exact_r).abs() / scale).max().item()
        assert err <= ULPS * EPS, f"ls_y − ls_x: error {err / EPS:.1f} ulps of the larger log-sum"


def _stats(path, student, teacher, labels, divergence, hard):
    canon = as_divergence(divergence).canonical()
    inv_temp = 1.0 / TEMPERATURE
    if path == "logits":
        return kdops.launchers.logits.logits_forward(student, teacher, labels, canon, inv_temp, 1.0, hard)[1]
    # One-hot hidden states: the fused kernel's logits are exactly the rows of the weight's columns.
    rows, vocab = student.shape
    hidden = torch.eye(rows, device=DEVICE)  # as wide as the weight ([V, rows]): no read past its end
    problem = kdops.launchers.linear.FusedProblem(hidden, student.T.contiguous(), None, hidden, teacher.T.contiguous(),
                                                  None, labels,
                                                  canon, inv_temp, vocab, 1.0, hard)
    return kdops.launchers.linear.fused_forward(problem)[1]


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("divergence", ["forward_kl", "alpha_beta"])
def test_log_sums_of_peaked_rows(path, vocab, divergence):
    student = peaked_logits(vocab, seed=vocab).to(DEVICE)
    teacher = peaked_logits(vocab, seed=vocab + 1).flip(0).to(DEVICE)
    labels = torch.arange(6, device=DEVICE) * 7
    assert_sums_exact(_stats(path, student, teacher, labels, divergence, hard=0.5), student, teacher, divergence)


def test_masked_row_keeps_its_log_sum():
    """-inf entries add nothing, and a row's -inf tiles before its first finite logit leave it empty."""
    vocab = 3000
    student = peaked_logits(vocab, seed=5)
    student[:, :2048] = float("-inf")
    student[0, 2100] = 30.0
    teacher = peaked_logits(vocab, seed=6)
    stats = kdops.launchers.logits.logits_forward(student.to(DEVICE), teacher.to(DEVICE), None,
                                                  as_divergence("forward_kl").canonical(),
                                                  1.0)[1].cpu()
    assert_close_in_ulps(stats[:, 3], log_sum64(student), "log-sum of the student")


@pytest.mark.parametrize("divergence", ["forward_kl", "alpha_beta"])
def test_log_sums_kept_in_lanes(divergence, monkeypatch):
    """The kernels on logits keep their sums per lane of a tile and the counts of the terms at the max apart
    (kernels/divergences.py, "Lanes"): ties at the max in one lane of two tiles and in two lanes of one tile,
    a max that grows in a late tile after others, and rows of one block whose maxima grow in different tiles
    (BLOCK_R = 4, BLOCK_V = 64: 16 tiles, the last partial)."""
    monkeypatch.setattr(kdops.launchers.logits, "logits_config", lambda *args, **kwargs: dict(BLOCK_R=4, BLOCK_V=64))
    vocab = 1000
    student = peaked_logits(vocab, seed=11)
    teacher = peaked_logits(vocab, seed=12).flip(0)
    student[5, [7, 7 + 64, 7 + 640]] = 27.0  # one lane, three tiles
    teacher[5, [130, 131]] = 25.0  # two lanes of one tile
    teacher[0, 990] = 31.0  # the last, partial tile
    student[1, [64 * k for k in range(15)]] = torch.arange(15.0) + 10.0  # the max grows in every tile
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    labels = torch.tensor([0, 999, 640, 65, 7, 300], device=DEVICE)  # in the first, last and middle tiles
    assert_sums_exact(_stats("logits", student, teacher, labels, divergence, hard=0.5), student, teacher, divergence)
    # the hard-label term: its label's logit is gathered in the one tile that holds it
    canon = as_divergence(divergence).canonical()
    with_ce = kdops.launchers.logits.logits_forward(student, teacher, labels, canon, 1.0 / TEMPERATURE, 1.0, 0.5)[0]
    without = kdops.launchers.logits.logits_forward(student, teacher, labels, canon, 1.0 / TEMPERATURE, 1.0, 0.0)[0]
    ce = torch.nn.functional.cross_entropy(student.double().cpu(), labels.cpu(), reduction="none")
    torch.testing.assert_close((with_ce - without).double().cpu() / 0.5, ce, rtol=1e-5, atol=1e-5)


SHARDS = [(2000, 4099), (0, 1500), (1500, 2000)]  # rank → [start, stop), not in vocabulary order


def vocab_parallel_body(rank, world):
    from kdops import parallel

    start, stop = SHARDS[rank]
    vocab = SHARDS[0][1]
    student = peaked_logits(vocab, seed=1)
    teacher = peaked_logits(vocab, seed=2).flip(0)
    labels = torch.arange(6) * 700
    canon = as_divergence("alpha_beta").canonical()
    shards = parallel.resolve(kdops.VocabParallel(start, stop), width=stop - start, rows=6, device=student.device,
                              options=())
    stats = kdops.launchers.logits.logits_forward(student[:, start:stop], teacher[:, start:stop], labels, canon,
                                                  1.0 / TEMPERATURE,
                                                  1.0, 0.5, shards=shards)[1]
    assert_sums_exact(stats, student, teacher, "alpha_beta")


def test_log_sums_over_vocabulary_shards():
    """Across ranks, a rank adds its excess where it holds the max and its plain sum elsewhere, and the flags
    "holds the max" complete the sum (kernels/partials.py): the peak on one rank, on another, and tied across
    two."""
    spawn(vocab_parallel_body, len(SHARDS))
