"""The memory target of kd_loss (8192 tokens × 128256 vocabulary, bfloat16, forward + backward, frozen
teacher): peak memory beyond the inputs, per implementation, written to bench/results/MEMORY.md.

    python -m bench.memory_target [--rows 8192] [--vocab 128256] [--triton-rows 64]

On CUDA every figure is torch.cuda.max_memory_allocated of a real run. Without a GPU:
* kdops backend="torch" runs for real on the CPU, counted by bench/memory.AllocationTracker;
* the reference is counted on "meta" tensors (the same operators and allocations, nothing allocated:
  its float32 temporaries would not fit in this machine's memory);
* kdops backend="triton" runs through Triton's interpreter, which is too slow for 8192 rows; it runs at
  --triton-rows rows of the full vocabulary, and its extra memory per row is reported (it allocates
  per-row buffers only, independent of V — tests/test_memory.py asserts that).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import torch

MIB = 2**20


def _size(nbytes: int) -> str:
    return f"{nbytes / MIB:,.2f} MiB" if nbytes >= MIB else f"{nbytes / 1024:,.2f} KiB"


def _inputs(rows, vocab, device):
    student = (torch.randn(rows, vocab, device=device, dtype=torch.bfloat16) * 4).requires_grad_()
    teacher = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16) * 4
    return student, teacher


def measure(fn, rows, vocab, device, divergence):
    """(extra bytes beyond inputs and the student gradient, gradient bytes, seconds)."""
    from bench.memory import AllocationTracker

    student, teacher = _inputs(rows, vocab, device)
    grad_bytes = student.numel() * student.element_size()
    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(student, teacher, divergence=divergence).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with AllocationTracker(count_meta=device == "meta") as tracker:
            fn(student, teacher, divergence=divergence).backward()
        peak = tracker.peak
    return peak - grad_bytes, grad_bytes, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--triton-rows", type=int, default=64)
    parser.add_argument("--output", default=str(pathlib.Path(__file__).parent / "results" / "MEMORY.md"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import kdops

    rows, vocab = args.rows, args.vocab
    runs = [  # (label, function, device, rows)
        ("reference (plain PyTorch)", kdops.reference.kd_loss, "cuda" if cuda else "meta", rows),
        ("kdops backend=\"torch\"", lambda s, t, **k: kdops.kd_loss(s, t, backend="torch", **k),
         "cuda" if cuda else "cpu", rows),
        ("kdops backend=\"triton\"", lambda s, t, **k: kdops.kd_loss(s, t, backend="triton", **k),
         "cuda" if cuda else "cpu", rows if cuda else args.triton_rows),
    ]
    device_name = torch.cuda.get_device_name() if cuda else "CPU (no GPU): see how each figure was taken"
    lines = [
        f"# kd_loss memory: {rows} tokens × {vocab} vocabulary, bfloat16, forward + backward",
        "",
        f"Made by `python -m bench.memory_target --rows {rows} --vocab {vocab}` on {device_name}; torch "
        f"{torch.__version__}. Teacher frozen, student logits require grad. Inputs: "
        f"{2 * rows * vocab * 2 / MIB:,.0f} MiB; the student gradient: {rows * vocab * 2 / MIB:,.0f} MiB. "
        "\"Extra\" is peak allocated memory beyond the inputs and that gradient.",
        "",
        "| divergence | implementation | measured on | rows run | extra memory | extra per row | × one float32 [rows, V] |",
        "|---|---|---|---|---|---|---|",
    ]
    for divergence in ("forward_kl", "generalized_jsd"):
        for label, fn, device, run_rows in runs:
            extra, _, seconds = measure(fn, run_rows, vocab, device, divergence)
            how = {"meta": "meta tensors (allocations counted, not made)", "cpu": "CPU, allocations counted",
                   "cuda": "CUDA max_memory_allocated"}[device]
            fp32_matrix = run_rows * vocab * 4
            lines.append(f"| {divergence} | {label} | {how} | {run_rows} | {_size(extra)} | "
                         f"{extra / run_rows:,.0f} B | {extra / fp32_matrix:.3f} |")
            print(lines[-1], f"({seconds:.1f} s)", flush=True)
    lines += [
        "",
        "The Triton backend keeps only per-row statistics: its extra memory does not grow with the vocabulary, "
        "so the per-row figure holds at 8192 rows (8192 × that many bytes). The torch backend's extra memory is "
        "its chunk budget (`kdops.paths.torch_engine.BUDGET_BYTES`, 256 MiB), whatever the batch. The reference "
        "needs several float32 [rows, V] temporaries (the last column).",
    ]
    pathlib.Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
