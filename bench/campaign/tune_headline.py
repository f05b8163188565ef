"""The opt-in tile steps at the headline shape (`--steps tune_headline`, `--steps tune_kinds`): the fused tiles of
`kdops.launchers.linear.fused_config`, kdops' choice against its neighbours, for the headline's divergences and for the
kinds and terms the headline does not run."""

from __future__ import annotations

from .headline import DIVERGENCES, HEADLINE_HIDDEN, HEADLINE_TOKENS, HEADLINE_VOCAB, headline_case
from .runner import Context, Step
from .tuning import patched_fused_config, tune

HEADLINE_TUNE_REPS = 3
# The fused tiles again at the headline shape (`--steps tune_headline`, not a default step): both divergences,
# kdops' own choice (0.3.5: 128 × 128 in both kernels on Hopper,
# bench/results/nvidia-h100-80gb-hbm3/0.3.5-wide-tiles) against its neighbours: a fourth stage (the first H100
# campaign measured 49.3 → 44.6 ms for the forward at 128 × 128, before TMA), 16 warps (four warpgroups: half the
# accumulator registers a thread, fewer spills), pointer loads, and the 0.3.4 tiles.
TUNE_HEADLINE_TRIAL_S = 10.0  # what a trial must find left to start
HEADLINE_TRIAL_ESTIMATE_S = 4.0  # what one takes: the H100 ran 12 in 31 s (0.3.4/) and 22 in 71 s (0.3.5-wide-tiles/)
_WIDEST_16_BIT = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
HEADLINE_FUSED_TRIALS = (
    {},
    dict(tma=False),
    dict(forward=dict(_WIDEST_16_BIT, num_stages=4)),
    dict(backward=dict(_WIDEST_16_BIT, num_stages=4)),
    dict(forward=dict(_WIDEST_16_BIT, num_warps=16)),
    dict(backward=dict(_WIDEST_16_BIT, num_warps=16)),
    dict(forward=dict(_WIDEST_16_BIT, BLOCK_V=64)),
)
# The fused tiles of the other specializations at the headline shape (`--steps tune_kinds`, not a default step):
# the kinds and terms the headline does not run, each against the widths `tile_width` does not give it (what
# decided 0.3.5's tiles: bench/results/nvidia-h100-80gb-hbm3/0.3.5-wide-tiles).
_WIDEST_TILES = _WIDEST_16_BIT
_WIDE_TILES = dict(_WIDEST_TILES, BLOCK_V=64)
_NARROW_TILES = dict(_WIDE_TILES, BLOCK_N=64)
_EVERY_WIDTH = ({}, dict(forward=_NARROW_TILES), dict(forward=_WIDE_TILES), dict(forward=_WIDEST_TILES),
                dict(backward=_NARROW_TILES), dict(backward=_WIDE_TILES), dict(backward=_WIDEST_TILES))
KINDS_FUSED_TRIALS = (
    ("skew_reverse_kl", {}, ({}, dict(forward=_WIDE_TILES), dict(backward=_WIDE_TILES))),
    ("tvd", {}, ({}, dict(forward=_WIDE_TILES))),
    ("alpha_beta", {}, ({}, dict(forward=_WIDE_TILES), dict(backward=_WIDE_TILES))),
    ("forward_kl", dict(hard_weight=0.5), _EVERY_WIDTH),
    ("generalized_jsd", dict(hard_weight=0.5), _EVERY_WIDTH),
)
HEADLINE_SHAPE_TEXT = (f"fused {HEADLINE_TOKENS} × V {HEADLINE_VOCAB} × Hs {HEADLINE_HIDDEN} × Ht "
                       f"{HEADLINE_HIDDEN}, bf16")


def tune_fused_at_headline(ctx: Context, cases) -> None:
    """`tune` of kdops.launchers.linear.fused_config at the headline shape, bf16, for each (divergence, loss options,
    trials) of `cases`."""
    import kdops
    import kdops.launchers.linear

    for divergence, options, trials in cases:
        target = " ".join(["fused", *(f"{k}={v}" for k, v in options.items())])
        tune(ctx, target, kdops.launchers.linear, "fused_config", patched_fused_config, trials,
             headline_case(divergence),
             lambda *a, divergence=divergence, options=options: kdops.fused_linear_kd_loss(
                 *a, divergence=divergence, impl="fused", backend="triton", **options),
             TUNE_HEADLINE_TRIAL_S, reps=HEADLINE_TUNE_REPS)
        ctx.flush()


def run_tune_headline(ctx: Context) -> None:
    """HEADLINE_FUSED_TRIALS for each of the headline's divergences."""
    tune_fused_at_headline(ctx, [(divergence, {}, HEADLINE_FUSED_TRIALS) for divergence in DIVERGENCES])


def run_tune_kinds(ctx: Context) -> None:
    """KINDS_FUSED_TRIALS: the other kinds, and the hard-label term."""
    tune_fused_at_headline(ctx, KINDS_FUSED_TRIALS)


TUNE_HEADLINE = Step(
    "tune_headline", "the fused tiles at the headline shape, both divergences (not a default step)",
    len(DIVERGENCES) * len(HEADLINE_FUSED_TRIALS) * HEADLINE_TRIAL_ESTIMATE_S,
    (f"kdops.launchers.linear.fused_config: {len(HEADLINE_FUSED_TRIALS)} configurations (the default first) at "
     f"{HEADLINE_SHAPE_TEXT}, {' and '.join(DIVERGENCES)}; forward + backward, {HEADLINE_TUNE_REPS} reps",),
    run_tune_headline)
TUNE_KINDS = Step(
    "tune_kinds", "the fused tiles of the other kinds and the hard-label term at the headline shape "
    "(not a default step)", sum(len(trials) for _, _, trials in KINDS_FUSED_TRIALS) * HEADLINE_TRIAL_ESTIMATE_S,
    (f"kdops.launchers.linear.fused_config at {HEADLINE_SHAPE_TEXT}: "
     + "; ".join(f"{d} {o or ''} {len(t)} configurations" for d, o, t in KINDS_FUSED_TRIALS)
     + f"; forward + backward, {HEADLINE_TUNE_REPS} reps",),
    run_tune_kinds)
