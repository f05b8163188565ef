"""bench/results/MODEL.md (`markdown`): how to read the model, the GPU's rates and the assumptions, the headline
tables, a table per shape, the phases of every path, float32 with and without TF32, autocast, sparse teachers,
softcaps and TAID, several teachers."""

from __future__ import annotations

import torch

import kdops
import kdops.paths.torch_engine
from kdops import targets

from .paths import AUTOCAST_PATHS, DEFAULT_DIVERGENCES, DESCRIPTIONS, KD_PATHS, MIX_PATHS, PATHS, TOPK_PATHS
from .dispatch import applies, floor_seconds, predict, predict_all
from .prediction import Prediction, Shape
from .rates import ELEMENTWISE_FLOPS, FUSED_FORWARD_TILE_S, FUSED_TILE_FLOPS, LAUNCH_S, LOGITS_KERNEL_FLOPS
from .units import GB, ms_text, size_text

_HOW_TO_READ = (
    "**How to read it.** Each path's forward and backward are split into the kernels they launch; each kernel "
    "gets a roofline, max(matmul flops / matmul rate + elementwise flops / CUDA-core rate, HBM bytes / "
    "bandwidth, {launch} µs per launch), and the path's time is their sum. \"× floor\" divides by the floor of "
    "the path's function (`bench/floor.py`): for `fused_linear_kd_loss` the matmuls 2·N·V·(3·Hs + Ht) at the "
    "input dtype's matmul rate (frozen teacher); for the `kd_loss-*` paths, which start from existing logits, "
    "one read of both logits and one write of the gradient, 3·N·V·b bytes at the HBM rate. \"L2 reuse\" is "
    "the same model with each operand of a fused Triton kernel read from HBM once per launch (and its float32 "
    "scratch kept in L2) instead of once per tile; the two bracket what a GPU should measure. \"extra\" is "
    "the memory beyond the inputs and the gradients the loss must return.")

_ASSUMPTIONS = (
    "The fused Triton kernels as the H100 measured them: matmuls at the cuBLAS rate, elementwise work, tile "
    "loads from L2 at an effective 16 TB/s and (forward) per-tile reductions ({tile}) one after the other; HBM "
    "reads each operand once per launch. cuBLAS matmuls read each operand once, at cuBLAS's achievable rate.",
    "A launch with fewer programs than SMs gets that share of the matmul and CUDA-core rates (not of the "
    "bandwidth); wave quantization is ignored.",
    "Elementwise work inside kdops' kernels on logits, calibrated on the H100 campaign "
    "(bench/results/nvidia-h100-campaign: profiled kernel time × the fp32 rate ÷ elements): {kernels} "
    "flop-equivalents per (row, vocabulary) element of both models' values, per forward pass / for the "
    "gradient (other kinds: the larger), at the CUDA-core rate, scaled by their SASS instruction counts "
    "since (`python -m bench.loops`); the fused kernels' from the H200 campaign ({fused}); PyTorch's and the "
    "peers' elementwise kernels {ew} per element and pass.",
    "The torch paths (`kd_loss-torch`, `kd_loss-reference`, `fused-torch`, `reference`) are estimates: their "
    "code runs once on the CPU at a small probe shape under a dispatch mode that records every aten operator; "
    "each operator reads its inputs and writes its outputs once (no fusion), and the probe's dimensions are "
    "mapped to the real ones. Their memory is the probe's peak of live tensors at the real sizes (it "
    "reproduces bench/results/MEMORY.md: 6.75 and 12.25 float32 [N, V] matrices for the kd_loss reference).",
    "`liger-chunked` (liger-kernel 0.8.5 `LigerFusedLinearJSDLoss`, read from its source: 1024-token chunks, "
    "logits in the input dtype, the JSD and its gradient by `torch.func.grad_and_value` under torch.compile, "
    "gradients computed in the forward) assumes inductor reads both logits twice in the forward and twice "
    "(JSD: three times) for the gradient, with no float32 [chunk, V] intermediates.",
    "`trl-chunked` follows trl 1.16.0's `ChunkedDivergenceFunction` (kernels/chunked_divergence.py): tiles "
    "of 4096 tokens × 32768 vocabulary rows projected into float32 buffers, a second projection pass for "
    "the JSD, the projections recomputed in the backward, float32 dH and dW accumulators.",
    "Frozen teacher, no hard-label term, temperature 1, every row counted, batchmean: the bench's setting.",
)


def _md_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _floor_label(p: Prediction) -> str:
    return "logits floor" if p.path in KD_PATHS + ("kd_loss-topk",) else "matmul floor"


def _headline_table(preds: dict, paths, divergences) -> list[str]:
    header = ["path"]
    for d in divergences:
        header += [f"{d} ms", "× floor", "L2 reuse ms"]
    header.append("extra memory (" + " / ".join(divergences) + ")")
    rows = []
    for path in paths:
        if not any(path in preds[d] for d in divergences):
            continue
        row = [f"`{path}`"]
        for d in divergences:
            p = preds[d].get(path)
            row += ["—"] * 3 if p is None else [ms_text(p.total_s), f"{p.ratio_to_floor:.2f}", ms_text(p.total_l2_s)]
        row.append(" / ".join(size_text(preds[d][path].extra_bytes) if path in preds[d] else "—" for d in divergences))
        rows.append(row)
    return _md_rows(header, rows)


def _phase_table(p: Prediction) -> list[str]:
    rows = [[ph.name, f"{ph.flops / 1e12:,.2f}", f"{ph.bytes / GB:,.2f}", ms_text(ph.seconds), ms_text(ph.seconds_l2),
             ph.detail] for ph in p.phases]
    return _md_rows(["phase", "matmul TFLOP", "HBM GB", "ms", "L2 reuse ms", "what the bytes are"], rows)


def _introduction(gpu: targets.GPU) -> list[str]:
    """The title, where the report comes from, how to read it, the GPU's rates and the assumptions."""
    lines = [
        "# The paper cost model: predicted time and memory per path", "",
        "Generated by `python -m bench.model --markdown bench/results/MODEL.md` (`bench/model/`) from the "
        "launch configurations in the code; do not edit by hand (`tests/test_model.py` checks that it is "
        "current). Every GPU bench record stores the prediction for its case beside the measurement "
        "(`predicted_*` fields), so the first GPU run calibrates the model.", "",
        _HOW_TO_READ.format(launch=f"{LAUNCH_S * 1e6:.0f}"), "",
        f"**GPU: {gpu.name.upper()}** ({gpu.sm_count} SMs), achievable rates from `kdops.targets`: dense "
        f"16-bit matmul {gpu.matmul_flops_16bit / 1e12:,.0f} TFLOP/s, TF32 {gpu.matmul_flops_tf32 / 1e12:,.0f}, "
        f"float32 on the CUDA cores {gpu.fp32_flops / 1e12:,.1f}, HBM {gpu.hbm_bytes_per_s / 1e12:,.2f} TB/s.", "",
        "**Assumptions.**", "",
    ]
    kernels, fused = (", ".join(f"{kind.upper()} {a} / {b}" for kind, (a, b) in table.items())
                      for table in (LOGITS_KERNEL_FLOPS, FUSED_TILE_FLOPS))
    tile = ", ".join(f"{t * 1e6:.3f} µs a tile of {rows} rows" for rows, t in FUSED_FORWARD_TILE_S.items())
    return lines + [f"* {a.format(ew=ELEMENTWISE_FLOPS, kernels=kernels, fused=fused, tile=tile)}"
                    for a in _ASSUMPTIONS]


def _headline_section(title: str, first: Shape, gpu: targets.GPU, divergences, dtype: torch.dtype,
                      preds: dict) -> list[str]:
    """The headline (the first shape): the fused API's paths and kd_loss's against their floors, what each
    path is, and where the time goes."""
    fused_floor = floor_seconds("fused", first, gpu, dtype)
    logits_floor = floor_seconds("kd_loss-triton", first, gpu, dtype)
    lines = ["", f"## Headline: {first.tokens} tokens × {first.vocab} vocabulary, Hs = {first.hidden_student}, "
             f"Ht = {first.hidden_teacher} ({title}), {str(dtype).removeprefix('torch.')}, {gpu.name.upper()}", "",
             f"`fused_linear_kd_loss` and its competitors; floor {ms_text(fused_floor)} ms "
             f"({2 * first.tokens * first.vocab * (3 * first.hidden_student + first.hidden_teacher) / 1e12:,.1f} "
             f"TFLOP of matmuls):", ""]
    lines += _headline_table(preds, [p for p in PATHS if p not in KD_PATHS], divergences)
    lines += ["", f"`kd_loss` on the same N × V logits (no matmuls); floor {ms_text(logits_floor)} ms (3·N·V·b "
              "bytes):", ""]
    lines += _headline_table(preds, KD_PATHS, divergences)
    lines += ["", "The paths:", ""]
    lines += [f"* `{path}`: {DESCRIPTIONS[path]}." for path in PATHS]
    lines += ["", f"Where the time goes ({divergences[0]}; the phases are tabulated below):", ""]
    for path, p in preds[divergences[0]].items():
        if path in KD_PATHS:
            continue
        top = sorted(p.phases, key=lambda ph: -ph.seconds)[:3]
        lines.append(f"* `{path}`: {p.flops / 1e12:,.1f} TFLOP of matmuls, {p.hbm_bytes / GB:,.0f} GB of HBM traffic; "
                     "largest phases " + ", ".join(f"{ph.name} ({ms_text(ph.seconds)} ms)" for ph in top)
                     + ". " + "; ".join(p.notes) + ".")
    return lines


def _shape_sections(shapes: list[tuple[str, Shape]], gpu: targets.GPU, divergences, dtype: torch.dtype) -> list[str]:
    """A table of every path per shape and divergence."""
    lines = []
    for label, shape in shapes:
        lines += ["", f"## {label}: {shape} ({str(dtype).removeprefix('torch.')}, {gpu.name.upper()})"]
        for d in divergences:
            rows = [[f"`{path}`", ms_text(p.forward_s), ms_text(p.backward_s), ms_text(p.total_s),
                     f"{p.ratio_to_floor:.2f} ({_floor_label(p)})", ms_text(p.total_l2_s), f"{p.hbm_bytes / GB:,.1f}",
                     f"{p.flops / 1e12:,.1f}", size_text(p.extra_bytes)]
                    for path, p in predict_all(shape, gpu, d, dtype).items()]
            lines += ["", f"**{d}**", ""]
            lines += _md_rows(["path", "fwd ms", "bwd ms", "total ms", "× floor", "L2 reuse ms", "HBM GB",
                               "matmul TFLOP", "extra"], rows)
    return lines


def _phases_section(first: Shape, gpu: targets.GPU, divergences, dtype: torch.dtype, preds: dict) -> list[str]:
    """The phases of every path at the first divergence; at the others, of the paths whose kernels differ."""
    lines = ["", f"## Phases at {first} ({str(dtype).removeprefix('torch.')}, {gpu.name.upper()})", "",
             f"Every path at {divergences[0]}; at the other divergences, the paths whose kernels differ."]
    for d in divergences:
        for path, p in preds[d].items():
            if d != divergences[0]:
                base = preds[divergences[0]].get(path)
                if base is not None and [ph.name for ph in base.phases] == [ph.name for ph in p.phases]:
                    continue
            lines += ["", f"**`{path}`, {d}**: {ms_text(p.total_s)} ms, {p.ratio_to_floor:.2f} × floor; extra memory "
                      f"{size_text(p.extra_bytes)}: {p.extra_detail}. " + "; ".join(p.notes) + ".", ""]
            lines += _phase_table(p)
    return lines


def _tf32_section(first: Shape, gpu: targets.GPU, divergences) -> list[str]:
    """float32 inputs on the paths from hidden states: exact products against TF32."""
    lines = ["", f"## float32 inputs at {first}: exact products or TF32 ({gpu.name.upper()})", "",
             "The fused kernels multiply float32 operands exactly (`input_precision=\"ieee\"`, on the CUDA cores), "
             "and so do cuBLAS and the reference unless `torch.backends.cuda.matmul.allow_tf32` is set; the floor "
             "is the exact float32 matmuls. What TF32 would buy:", ""]
    rows = []
    for d in divergences:
        for path in ("fused", "chunked", "sliced", "fused-torch", "reference", "trl-chunked"):
            if not applies(path, d):
                continue
            ieee = predict(path, first, gpu, d, torch.float32)
            fast = predict(path, first, gpu, d, torch.float32, tf32=True)
            rows.append([f"`{path}`", d, ms_text(ieee.total_s), f"{ieee.ratio_to_floor:.2f}", ms_text(fast.total_s),
                         f"{fast.ratio_to_floor:.2f}", f"{ieee.total_s / fast.total_s:.1f}×"])
    return lines + _md_rows(["path", "divergence", "ieee ms", "× floor", "TF32 ms", "× floor", "TF32 speed-up"], rows)


def _autocast_section(first: Shape, gpu: targets.GPU, divergences) -> list[str]:
    """kdops' paths under bf16 autocast with float32 master weights, beside float32 without autocast."""
    lines = ["", f"## Mixed precision at {first}: float32 master weights ({gpu.name.upper()})", "",
             "Under `torch.autocast(dtype=bfloat16)` (the HF Trainer's `bf16=True`) the hidden states are bf16 "
             "and the lm_head weights float32: kdops casts every operand to bf16 as autocast's `F.linear` does "
             "(tensor cores; the weights' gradients come back in float32 through the casts), where without "
             "autocast float32 operands are multiplied exactly in float32:", ""]
    rows = []
    for d in divergences:
        for path in AUTOCAST_PATHS:
            if not applies(path, d):
                continue
            mixed = predict(path, first, gpu, d, torch.bfloat16, autocast=True)
            exact = predict(path, first, gpu, d, torch.float32)
            rows.append([f"`{path}`", d, ms_text(mixed.total_s), f"{mixed.ratio_to_floor:.2f}",
                         size_text(mixed.extra_bytes), ms_text(exact.total_s), size_text(exact.extra_bytes)])
    return lines + _md_rows(["path", "divergence", "autocast bf16 ms", "× bf16 floor", "extra", "float32 ms",
                             "extra"], rows)


def _topk_section(shape: Shape, gpu: targets.GPU, divergence: str, dtype: torch.dtype) -> list[str]:
    """MODEL.md's sparse-teacher table: the TOPK_PATHS at k = 1, 32, 128 beside the dense chunked path."""
    lines = ["", f"## Sparse teachers (top-k) at {shape} ({divergence}, {str(dtype).removeprefix('torch.')}, "
             f"{gpu.name.upper()})", "",
             "The student's side only: the teacher is its (ids, log-probabilities). Floors: the student's matmuls "
             "(2·N·V·Hs forward, 4·N·V·Hs backward) from hidden states, the student's logits read and written on "
             "logits. The top-k kernels are not measured yet (`TOPK_LOOP_INSTRUCTIONS`, from their SASS).", ""]
    rows = []
    for path in TOPK_PATHS:
        for k in (1, 32, 128):
            p = predict(path, shape, gpu, divergence, dtype, k=k)
            rows.append([f"`{path}`", str(k), ms_text(p.total_s), f"{p.ratio_to_floor:.2f} ({_floor_label(p)})",
                         f"{p.hbm_bytes / GB:,.1f}", f"{p.flops / 1e12:,.2f}", size_text(p.extra_bytes)])
    lines += _md_rows(["path", "k", "total ms", "× floor", "HBM GB", "matmul TFLOP", "extra"], rows)
    lines += ["", "The paths:", ""] + [f"* `{path}`: {DESCRIPTIONS[path]}." for path in TOPK_PATHS]
    return lines


def _transforms_section(shape: Shape, gpu: targets.GPU, dtype: torch.dtype) -> list[str]:
    """MODEL.md's table of the tile transforms: softcapped logits (both sides) and TAID's target, beside the
    plain loss, on the paths that compute them."""
    lines = ["", f"## Softcaps and TAID at {shape} ({str(dtype).removeprefix('torch.')}, {gpu.name.upper()})", "",
             "Tile transforms inside the kernels' passes (`kernels/transforms.py`): no bytes move that the plain "
             "loss does not move; each softcapped side adds its tanh to every element of every pass and its slope "
             "to the gradient, TAID its mixed target (`SOFTCAP_INSTRUCTIONS`, `TAID_INSTRUCTIONS`, from the sm_90 "
             "SASS; not measured on a GPU yet). The torch paths run the reference's `torch.tanh` and its autograd "
             "(counted by the probe).", ""]
    variants = [("forward_kl", 0), ("forward_kl", 2), (kdops.TAID(0.5), 0), (kdops.TAID(0.5), 2),
                ("generalized_jsd", 0), ("generalized_jsd", 2)]
    rows = []
    for path in ("chunked", "fused", "fused-torch", "reference", "kd_loss-triton"):
        for divergence, caps in variants:
            if path == "kd_loss-triton" and caps:
                continue
            p = predict(path, shape, gpu, divergence, dtype, softcaps=caps)
            plain = predict(path, shape, gpu, "forward_kl" if isinstance(divergence, kdops.TAID) else divergence,
                            dtype)
            name = divergence if isinstance(divergence, str) else f"TAID(t={divergence.t})"
            rows.append([f"`{path}`", name, str(caps), ms_text(p.total_s), f"{p.ratio_to_floor:.2f}",
                         f"{p.total_s / plain.total_s:.2f}"])
    lines += _md_rows(["path", "divergence", "softcapped sides", "total ms", "× floor", "× plain"], rows)
    return lines


def _mix_section(shape: Shape, gpu: targets.GPU, dtype: torch.dtype) -> list[str]:
    """MODEL.md's table of several teachers (`teacher_mix`) on the paths that take them."""
    lines = ["", f"## Several teachers at {shape} (forward_kl, {str(dtype).removeprefix('torch.')}, "
             f"{gpu.name.upper()})", "",
             "Every teacher's logits (a matmul per teacher and chunk on `chunked`), their mix into one float32 target "
             "in PyTorch (`MIX_PASSES`: bandwidth-bound passes over the chunk, an estimate), then the loss of "
             "(student, target) by the kernels. `kd_loss` goes in row chunks of "
             "`kdops.paths.torch_engine.BUDGET_BYTES` and recomputes each chunk's mix and forward in the backward. "
             "Each teacher's Ht is the shape's.", ""]
    rows = []
    for path in MIX_PATHS:
        plain = predict(path, shape, gpu, "forward_kl", dtype)
        rows.append([f"`{path}`", "1", "—", ms_text(plain.total_s), f"{plain.ratio_to_floor:.2f}", "1.00",
                     size_text(plain.extra_bytes)])
        for count, mix in ((2, "ensemble"), (3, "ensemble"), (2, "logit_sum")):
            p = predict(path, shape, gpu, "forward_kl", dtype, teachers=count, mix=mix)
            rows.append([f"`{path}`", str(count), mix, ms_text(p.total_s), f"{p.ratio_to_floor:.2f}",
                         f"{p.total_s / plain.total_s:.2f}", size_text(p.extra_bytes)])
    lines += _md_rows(["path", "teachers", "mix", "total ms", "× one-teacher floor", "× one teacher", "extra"], rows)
    return lines


def markdown(shapes: list[tuple[str, Shape]], gpu: targets.GPU, divergences=DEFAULT_DIVERGENCES,
             dtype: torch.dtype = torch.bfloat16) -> str:
    """The MODEL.md report: how to read it, rates and assumptions, the headline (the first shape), a table per
    shape, the phases at the first shape, float32 inputs with exact products and with TF32, autocast, sparse
    teachers, softcaps and TAID, several teachers."""
    title, first = shapes[0]
    preds = {d: predict_all(first, gpu, d, dtype) for d in divergences}
    lines = _introduction(gpu)
    lines += _headline_section(title, first, gpu, divergences, dtype, preds)
    lines += _shape_sections(shapes, gpu, divergences, dtype)
    lines += _phases_section(first, gpu, divergences, dtype, preds)
    lines += _tf32_section(first, gpu, divergences)
    lines += _autocast_section(first, gpu, divergences)
    lines += _topk_section(first, gpu, divergences[0], dtype)
    lines += _transforms_section(first, gpu, dtype)
    lines += _mix_section(first, gpu, dtype)
    lines.append("")
    return "\n".join(lines)
