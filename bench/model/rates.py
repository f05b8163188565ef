"""The model's calibrations: the rates and per-element costs measured on GPUs (bench/results/...) and the
kernels' SASS instruction counts that scale them, turned into flop-equivalents per element of each kernel.
The GPUs' own achievable rates are `kdops.targets`'."""

from __future__ import annotations

from kdops import targets
import kdops.launchers.logits
from kdops.divergences import Divergence

#: Elementwise flops per (row, vocabulary) element per pass of a PyTorch-level kernel over both models'
#: values (the compiled reference's and the peers' fused elementwise kernels): exponentials, online sums.
ELEMENTWISE_FLOPS = 64
#: The kernels on logits' flop-equivalents per (row, vocabulary) element of both models' values, per pass of the
#: forward and for the gradient: each kernel's profiled time × the H100's fp32 rate (kdops.targets) ÷ the
#: elements, in the chunked path's 2048-row float32 chunks at 8192 × 128256. First calibrated on the first H100
#: campaign (bench/results/nvidia-h100-campaign, code fcf6a3d): forward KL 3.87 ms per pass and 4.81 ms for its
#: gradient, generalized JSD 5.10 ms per pass and 4.18 ms (197 / 245 and 260 / 213). Now on the 0.3.4 campaign
#: (nvidia-h100-campaign/0.3.4 and 0.3.5-wide-tiles, the same kernels on logits; means of the two profiles):
#: forward KL 3.48 ms per pass (1024 columns, 4 warps) and 4.79 ms, generalized JSD 4.04 ms per pass and 3.66 ms
#: (its shared ratios and MUFU approximations: −21 % and −12 %, where their SASS counts fell 28 % and 41 %: these
#: kernels move both float32 logits at about 2.1–2.4 TB/s, near what bandwidth they reach, not at their SASS
#: counts' compute bound). On bf16 logits (kd_loss) they take less (the first campaign's tune: 1.81 + 1.12 ms
#: for forward KL at 4096 × 128256). Kinds not measured take the larger figures.
LOGITS_KERNEL_FLOPS = {"kl": (177, 244), "jsd": (206, 187)}
#: The fused kernels' elementwise work per element (their tiles reduce per tile, row by row), calibrated on the
#: H200 campaign (bench/results/nvidia-h200-after, 64 × 64 tiles): forward KL 272 / 172, generalized JSD 305 per
#: pass / 322.
FUSED_TILE_FLOPS = {"kl": (272, 172), "jsd": (305, 322)}
#: The fused kernels as the H100 ran them (bench/results/nvidia-h100-campaign: the profile at 64 × 64 tiles and
#: tune-headline at 128 × 64 and 128 × 128, forward KL and generalized JSD at 8192 × 128256 × 4096, bf16): their
#: matmuls (at the cuBLAS rate), elementwise work (FUSED_TILE_FLOPS), tile loads and the forward's per-tile
#: reductions take turns rather than overlap. The tile loads come from L2 at an effective 16 TB/s (the gradient
#: kernels: 15.1, 16.6, 16.8 TB/s at the three tilings); the forward's per-tile reductions cost, over the whole GPU,
#: 0.226 µs a tile of 64 rows (forward KL 57.9 ms, generalized JSD 58.6 ms per pass beyond the rest at 64 × 64)
#: and about 0.09 µs one of 128 (0.095 at 128 × 64, 0.086 at 128 × 128). Other GPUs: scaled by their tensor-core
#: rate against the H100's.
FUSED_L2_BYTES_PER_S = 16e12
FUSED_FORWARD_TILE_S = {64: 0.226e-6, 128: 0.09e-6}
H100_MATMUL_RATE = targets.H100.matmul_flops_16bit
#: The kernels on logits' SASS instructions per element of their vocabulary loops (`python -m bench.loops`: sm_90,
#: bf16, the headline's launch configuration and alignment; a kind's forward passes summed, then its gradient):
#: for the code the campaign measured (LOGITS_KERNEL_FLOPS) and for the code now. The model scales the measured
#: figures by now / then, so that a change to these kernels moves the prediction before a GPU measures it;
#: `python -m bench.loops --check` (a test) fails where "now" is no longer the code's. History: the H200
#: campaign measured 93.8 / 46.2 (KL) and 255.4 / 148.9 (JSD) instructions; the sums kept in lanes, flushed
#: exponentials and series-only logarithms (kernels/divergences.py) brought them to 47.6 / 39.1 and
#: 181.4 / 97.2, which the first H100 campaign measured; JSD's shared ratios and MUFU approximations
#: (`jsd_terms`, `log_approx`, `div_approx`) to 130.9 / 56.9, which the 0.3.4 campaign measured (a scaling
#: by counts would have predicted twice the gain the GPU gave: see LOGITS_KERNEL_FLOPS).
LOGITS_KERNEL_SASS = {"kl": ((47.1, 39.1), (47.1, 39.1)), "jsd": ((130.9, 56.9), (130.9, 56.9))}


#: The tile transforms (`kernels/transforms.py`): instructions they add per element to a forward pass and to the
#: gradient, from the sm_90 SASS of the kernels on logits (bf16, BLOCK_V = 2048, 8 warps; forward KL, and
#: generalized JSD where it differs): a softcapped side (its tanh: one exponential, one division, the
#: small-argument series; in the gradient also its slope) and TAID's mixed target. Not measured on a GPU yet:
#: turned into flop-equivalents at FLOPS_PER_INSTRUCTION, like the sparse teacher's kernels.
SOFTCAP_INSTRUCTIONS = (30, 39)
TAID_INSTRUCTIONS = (5, 6)


#: The sparse teacher's kernels (`kernels/topk.py`): instructions per element of their vocabulary loops in the
#: sm_90 SASS (`bench.compile`'s cubins at BLOCK_V = 2048, 8 warps, one id per window): (the loop with its
#: first window, each further window) for the complement's log-sum-exp and for the gradient. Not measured on a
#: GPU yet: turned into flop-equivalents at the forward-KL statistics kernel's measured ratio, 272
#: flop-equivalents for its 94 instructions per element.
TOPK_LOOP_INSTRUCTIONS = ((38.4, 4.6), (32.5, 7.4))
FLOPS_PER_INSTRUCTION = 272 / 94

#: kdops.token_logprobs' kernels (`kernels/token_logprobs.py`): instructions per element of their vocabulary loops
#: in the sm_90 SASS (`bench.compile`'s cubins at the headline's launch configurations: the statistics kernel
#: 1024 columns and 4 warps, the gradient's 2048 and 8; `bench.loops.hot_loops`), (statistics, gradient), without
#: and with the softcap. Not measured on a GPU yet: flop-equivalents at FLOPS_PER_INSTRUCTION, like the top-k ones.
TOKEN_LOGPROBS_INSTRUCTIONS = {False: (17.6, 25.0), True: (48.8, 63.8)}

#: The least time a launch takes (the host's launch overhead of an eager op or a Triton kernel).
LAUNCH_S = 5e-6


def logits_kernel_flops(divergence: Divergence, softcaps: int = 0, lanes: bool = True) -> tuple[float, float]:
    """(per forward pass, gradient) flop-equivalents per element of the kernels on `divergence`'s kind, with
    `softcaps` softcapped sides (0, 1 or 2) and TAID's mixed target where `divergence` is TAID. `lanes`: the
    kernels on logits (LOGITS_KERNEL_FLOPS scaled by LOGITS_KERNEL_SASS); otherwise the fused kernels, whose
    tiles still reduce per tile (FUSED_TILE_FLOPS)."""
    kind = {0: "kl", 1: "jsd"}.get(int(kdops.launchers.logits.kind_of(divergence.canonical())[0]))
    measured = LOGITS_KERNEL_FLOPS if lanes else FUSED_TILE_FLOPS
    per_pass, per_gradient = measured.get(kind, tuple(max(figures) for figures in zip(*measured.values())))
    if lanes:
        (then_pass, then_gradient), (now_pass, now_gradient) = LOGITS_KERNEL_SASS.get(kind, LOGITS_KERNEL_SASS["jsd"])
        per_pass, per_gradient = per_pass * now_pass / then_pass, per_gradient * now_gradient / then_gradient
    extra = [softcaps * n for n in SOFTCAP_INSTRUCTIONS]
    if divergence.canonical().teacher_share != 1.0:
        extra = [e + n for e, n in zip(extra, TAID_INSTRUCTIONS)]
    return per_pass + FLOPS_PER_INSTRUCTION * extra[0], per_gradient + FLOPS_PER_INSTRUCTION * extra[1]


#: Instructions per element that return_parts adds to the forward passes of the kernels on logits (their PARTS
#: specialization, kd_loss with labels: the entropy sums beside the first pass's exponentials, one multiply-add per
#: element and side, and the hard-label log-sum-exp at T = 1 with the label's logit), from the sm_90 SASS at the
#: headline's blocks (`python -m bench.loops`: `parts_counts`, checked against the code by `--check`). Not measured
#: on a GPU yet: turned into flop-equivalents at the measured flops per instruction of the kernels' own passes.
PARTS_SASS = {"kl": 20.9, "jsd": 22.0}


def parts_kernel_flops(divergence: Divergence) -> float:
    """Flop-equivalents per element that return_parts adds to the first forward pass of the kernels on logits:
    PARTS_SASS at the flops per instruction LOGITS_KERNEL_FLOPS measured for the kind's passes."""
    kind = {0: "kl", 1: "jsd"}.get(int(kdops.launchers.logits.kind_of(divergence.canonical())[0]), "jsd")
    measured_pass, _ = LOGITS_KERNEL_FLOPS[kind]
    (then_pass, _), _ = LOGITS_KERNEL_SASS[kind]
    return PARTS_SASS[kind] * measured_pass / then_pass


#: Instructions per element of the one-read kernel (`kd_logits_backward_kernel` with LOSS: forward KL's loss from the
#: gradient's own log-probabilities, impl="epilogue"), from the sm_90 SASS at the forward's headline blocks (`python -m
#: bench.loops`: `one_read_counts`, checked by `--check`), against 47.1 + 39.1 for the first pass and the gradient.
#: Not measured on a GPU yet.
ONE_READ_SASS = {"kl": 62.4}


def one_read_kernel_flops(divergence: Divergence) -> float:
    """Flop-equivalents per element of the one-read kernel: what the gradient kernel, which moves the same bytes,
    measured (LOGITS_KERNEL_FLOPS), or ONE_READ_SASS at the flops per instruction of the forward's first pass,
    whichever is more. (At the headline both measured kernels ran at 65–70 % of the H100's HBM bandwidth and
    issued on 28 % (gradient) and 46 % (forward) of the cycles: more instructions than the gradient's, at the
    forward's rate, still fit in its time.)"""
    measured_pass, measured_gradient = LOGITS_KERNEL_FLOPS["kl"]
    (then_pass, _), _ = LOGITS_KERNEL_SASS["kl"]
    return max(measured_gradient, ONE_READ_SASS["kl"] * measured_pass / then_pass)


def topk_kernel_flops(k: int, vocab: int, config: dict, softcap: bool = False) -> tuple[float, float]:
    """(complement, gradient) flop-equivalents per element: the loop, plus one more window per id a tile holds
    on average (k·BLOCK_V / V), plus the student's softcap (SOFTCAP_INSTRUCTIONS) where it has one."""
    windows = k * config["BLOCK_V"] / vocab / config["BLOCK_C"]
    return tuple(FLOPS_PER_INSTRUCTION * (loop + windows * window + (cap if softcap else 0))
                 for (loop, window), cap in zip(TOPK_LOOP_INSTRUCTIONS, SOFTCAP_INSTRUCTIONS))


def token_logprobs_kernel_flops(softcap: bool = False) -> tuple[float, float]:
    """(statistics, gradient) flop-equivalents per element of kdops.token_logprobs' kernels."""
    return tuple(FLOPS_PER_INSTRUCTION * n for n in TOKEN_LOGPROBS_INSTRUCTIONS[bool(softcap)])
