"""The paper cost model: predicted time, HBM traffic and extra memory of every path, before any GPU runs.

The command line (`python -m bench.model`, `main`): a plain-text table per shape and divergence
(`format_table`), every prediction with its phases as JSON (--json), or the MODEL.md report (--markdown)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kdops
from kdops import targets

from .markdown import markdown
from .paths import AUTOCAST_PATHS, DEFAULT_DIVERGENCES, HEADLINE, PATHS, STANDARD_SHAPES
from .dispatch import applies, floor_seconds, predict, predict_all
from .prediction import Prediction, Shape
from .units import GB, ms_text, size_text

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def format_table(predictions: dict[str, Prediction]) -> str:
    """A plain-text table of predictions (one shape, divergence, dtype)."""
    rows = [("path", "fwd ms", "bwd ms", "total ms", "×floor", "L2 ms", "HBM GB", "extra")]
    for path, p in predictions.items():
        rows.append((path, ms_text(p.forward_s), ms_text(p.backward_s), ms_text(p.total_s), f"{p.ratio_to_floor:.2f}",
                     ms_text(p.total_l2_s), f"{p.hbm_bytes / GB:,.1f}", size_text(p.extra_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=Shape.parse, metavar="TOKENSxHSxHTxVOCAB",
                        help=f"repeatable; default {HEADLINE} (with --markdown: the headline, Qwen2.5 and Gemma "
                             "widths)")
    parser.add_argument("--gpu", default="h100", choices=sorted(targets.GPUS))
    parser.add_argument("--divergence", action="append", nargs="+", metavar="D",
                        help=f"default {' '.join(DEFAULT_DIVERGENCES)}")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--tf32", action="store_true", help="float32 matmuls at the TF32 rate")
    parser.add_argument("--autocast", action="store_true",
                        help="kdops' paths under torch.autocast of --dtype with float32 master weights")
    parser.add_argument("--parts", action="store_true",
                        help="calls with return_parts=True (the paths of the kernels on logits)")
    parser.add_argument("--path", action="append", choices=PATHS, help="only these paths (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON document: every prediction with its phases")
    parser.add_argument("--markdown", metavar="PATH", help="write the MODEL.md report to PATH")
    return parser


def _predictions(args: argparse.Namespace, shape: Shape, divergence: str, gpu: targets.GPU,
                 dtype: torch.dtype) -> dict[str, Prediction]:
    """The predictions the options ask for: every path (--autocast: kdops' fused-API paths under autocast),
    or those of --path."""
    if args.autocast:
        predictions = {path: predict(path, shape, gpu, divergence, dtype, autocast=True) for path in AUTOCAST_PATHS
                       if applies(path, divergence)}
    else:
        predictions = predict_all(shape, gpu, divergence, dtype, args.tf32, args.parts)
    if args.path:
        predictions = {k: v for k, v in predictions.items() if k in args.path}
    return predictions


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    gpu, dtype = targets.by_name(args.gpu), DTYPES[args.dtype]
    divergences = [d for group in args.divergence for d in group] if args.divergence else list(DEFAULT_DIVERGENCES)
    try:
        divergences = [kdops.as_divergence(d).name for d in divergences]
    except ValueError as error:
        parser.error(str(error))
    if args.markdown:
        shapes = ([(str(s), s) for s in args.shape] if args.shape
                  else [(label, Shape.parse(text)) for label, text in STANDARD_SHAPES])
        Path(args.markdown).write_text(markdown(shapes, gpu, tuple(divergences), dtype))
        print(f"wrote {args.markdown}")
        return 0
    results = []
    for shape in args.shape or [Shape.parse(HEADLINE)]:
        for d in divergences:
            predictions = _predictions(args, shape, d, gpu, dtype)
            if args.json:
                results += [p.as_json() for p in predictions.values()]
                continue
            mode = " tf32" if args.tf32 else " autocast (float32 master weights)" if args.autocast else ""
            print(f"# {shape} {d} {args.dtype}{mode} on {gpu.name}: floor "
                  f"{ms_text(floor_seconds('fused', shape, gpu, dtype))} ms (matmuls), "
                  f"{ms_text(floor_seconds('kd_loss-triton', shape, gpu, dtype))} ms (logits, kd_loss-*)")
            print(format_table(predictions))
            print()
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    return 0
