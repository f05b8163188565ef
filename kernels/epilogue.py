"""The logits GEMM's epilogues: CuTe DSL, through quack-kernels' `gemm_epilogue` (the optional extra
`pip install "kdops[quack]"`; sm_90a and sm_100a). The GEMM computes one model's logits acc = h·Wᵀ of a chunk
of rows, summed in float32, and its epilogue keeps, beside the float32 logits it stores, what the kernels on
logits would otherwise read them once more for: each row's maximum and sum of exponentials, per N tile j of
the GEMM's tile width, with v = acc · inv_temp (the logits at temperature T, one rounded product):

    D[r, n]    = acc[r, n]
    top[r, j]  = max_{n ∈ j} v[r, n]                      exact: a max rounds nothing
    sums[r, j] = Σ_{n ∈ j} e^(v[r, n] − top[r, j])        in [1, tile width]

and, for the hard-label cross-entropy at T ≠ 1, the same pair (top_ce, sums_ce) of acc itself. The host merges
the tiles (`kdops.launchers.epilogue.statistics`): M = max_j top_j, S = Σ_j sums_j · e^(top_j − M), log-sum
ls = log S. Both are relative to the row's own maximum, so the log-normalizer's error is that of S (a few
float32 ulps of a number in [1, V]), not that of a log-sum-exp of the logits' size (quack's ready `lse_epi`
stores log(sum) + max per tile, each rounded at the logits' magnitude: 2e-6 at 30).

Columns past the vocabulary's end in the last tile are masked to −inf by the sinks (quack's `check_oob`).
This module imports quack; nothing else in kdops does, except through `kdops.launchers.epilogue`.
"""

import cutlass.cute as cute
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.ops import ColVecReduce, OnlineLSEReduce


class SumExpReduce(OnlineLSEReduce):
    """Per (row, N tile): Σ e^(v − max v), the sum of quack's coupled online (max, sum) fold, stored without its
    log and without adding the max back (the max comes exact from a max reduce of the same values)."""

    def host_finalize(self, partials):
        return partials  # the tiles are merged by kdops, with their maxima

    @cute.jit
    def _finalize(self, vals):
        return vals[1]


@gemm_epilogue(reduces={"top": ColVecReduce("top", combine="max")}, outs={"sums": SumExpReduce("sums")})
def logits_statistics(acc, inv_temp):
    """D = acc; per N tile the max of v = acc · inv_temp and Σ e^(v − max)."""
    v = acc * inv_temp
    return {"D": acc, "top": v, "sums": v}


@gemm_epilogue(
    reduces={"top": ColVecReduce("top", combine="max"), "top_ce": ColVecReduce("top_ce", combine="max")},
    outs={"sums": SumExpReduce("sums"), "sums_ce": SumExpReduce("sums_ce")},
)
def logits_statistics_ce(acc, inv_temp):
    """`logits_statistics`, and the same pair of acc itself (at T = 1, for the hard-label cross-entropy)."""
    v = acc * inv_temp
    return {"D": acc, "top": v, "sums": v, "top_ce": acc, "sums_ce": acc}


#: The sinks' names, per epilogue: (max, sum) at T, then at T = 1 where present.
SINKS = {logits_statistics: ("top", "sums"), logits_statistics_ce: ("top", "sums", "top_ce", "sums_ce")}
