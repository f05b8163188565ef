"""Command line of the benchmarks.

    python -m bench [--quick | --full | --topk] [--function F ...] [--divergence D ...] [--impl NAME ...]
                    [--shape TOKENSxVOCAB ...] [--reps N] [--warmup N] [--no-save] [--output DIR]
    python -m bench plot [--input PATH ...] [--output DIR]

The preset defaults to --full where CUDA is available and --quick elsewhere. --impl takes competitor names
or shell patterns ('liger-*'); the floor always runs, since every ratio is taken to it.

A run appends its JSON lines to <output>/<device slug>/<kdops version>/<device slug>.jsonl
(`bench.report.record_dir`; <output> is bench/results by default). `plot` reads every record under its
inputs (files, or folders searched recursively; by default bench/results) and writes the charts and
SUMMARY.md into --output (bench/results by default).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys

import torch

import kdops

from .cases import DEFAULT_DIVERGENCES, FUNCTIONS, PRESETS, select
from .competitors import COMPETITORS, FLOOR
from .report import RESULTS_DIR, device_name, record_dir


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Throughput and memory of kdops "
                                     "against its reference, Liger-Kernel and the floor. `python -m bench plot` "
                                     "draws the charts.")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="small shapes, float32 (default without CUDA)")
    preset.add_argument("--topk", dest="preset", action="store_const", const="topk",
                        help="the sparse-teacher losses alone at k = 1, 32, 128 (a CPU-sized shape)")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="N 1024..16384, real vocabularies and widths, bfloat16 (default with CUDA)")
    parser.add_argument("--function", nargs="+", choices=FUNCTIONS, help="only these functions")
    parser.add_argument("--divergence", nargs="+", help="divergences to run (default: forward_kl generalized_jsd)")
    parser.add_argument("--impl", nargs="+", metavar="NAME",
                        help="competitors (names or patterns): " + ", ".join(c.name for c in COMPETITORS))
    parser.add_argument("--shape", nargs="+", metavar="TOKENSxVOCAB", help="only these shapes, e.g. 512x32000")
    parser.add_argument("--reps", type=int, help="timed repetitions (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs (default: the preset's)")
    parser.add_argument("--no-save", action="store_true", help="do not append to the results JSON lines")
    parser.add_argument("--output", default=str(RESULTS_DIR),
                        help="results folder; the records go to OUTPUT/<device slug>/<kdops version>/ "
                             "(default: bench/results)")
    return parser


def _plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench plot",
                                     description="PNG charts and SUMMARY.md from the results JSON lines.")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="JSON-lines files or folders searched recursively (default: bench/results)")
    parser.add_argument("--output", default=str(RESULTS_DIR), help="folder for the charts and SUMMARY.md")
    return parser


def pick_competitors(patterns, parser: argparse.ArgumentParser):
    if not patterns:
        return COMPETITORS
    names = [c.name for c in COMPETITORS]
    unknown = [p for p in patterns if not fnmatch.filter(names, p)]
    if unknown:
        parser.error(f"--impl: {', '.join(unknown)} match no competitor; known: {', '.join(names)}")
    return tuple(c for c in COMPETITORS if c.name == FLOOR or any(fnmatch.fnmatch(c.name, p) for p in patterns))


def plot_main(argv) -> int:
    args = _plot_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("python -m bench plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    from .plot import plot

    for path in plot(args.input, args.output):
        print(path)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    parser = _run_parser()
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset or ("full" if device == "cuda" else "quick")]
    try:
        divergences = args.divergence or DEFAULT_DIVERGENCES
        for name in divergences:
            kdops.as_divergence(name)
        cases = select(preset.cases(divergences), functions=args.function, shapes=args.shape)
    except ValueError as error:
        parser.error(str(error))
    if not cases:
        parser.error(f"no case of the {preset.name} preset matches the filters")
    from .sweep import run_sweep

    run_sweep(cases, device=device, preset=preset.name, competitors=pick_competitors(args.impl, parser),
              reps=preset.reps if args.reps is None else args.reps,
              warmup=preset.warmup if args.warmup is None else args.warmup,
              results_dir=None if args.no_save else record_dir(device_name(device), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
