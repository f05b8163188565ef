"""The one-call GPU campaign: what to measure on a GPU, in one command, within a time budget.

    python -m bench.campaign [--minutes 9] [--output DIR] [--steps NAME ...] [--dry-run]

Steps, in this order, each in a process of its own (an exception, a crash or a timeout in one is recorded
in the report and the campaign goes on):

1. smoke        `python -m pytest -m gpu_smoke -q -x`: the kernel tests listed in tests/conftest.py
                (GPU_SMOKE), on CUDA.
2. fused_check  `bench.fused_check`: fused_linear_kd_loss at a real size against the float32 reference,
                per divergence (again at half the tokens if the reference runs out of memory).
3. memory       `bench.memory_target`: the peak-memory table of kd_loss at 8192 × 128256, bfloat16.
4. headline     `bench.sweep.run_sweep` at 8192 tokens × Hs 4096 × Ht 4096 × V 128256, bfloat16, for
                forward_kl and generalized_jsd: kdops fused and chunked against the floor, the eager and the
                compiled reference, Liger-Kernel's chunked JSD and TRL's chunked loss (forward, backward,
                total, extra memory).
5. profile      `torch.profiler`, per kernel, over one forward + backward of kdops' fused and chunked impls
                at the headline shape, next to the cost model's per-phase prediction (`bench.model`).
6. tune         a handful of block-size choices of `kdops.launchers.linear.fused_config` and
                `kdops.launchers.logits.logits_config`, timed forward + backward at a medium shape; the fastest is
                recorded.

Opt-in (`--steps tune_headline`): the fused tiles of `kdops.launchers.linear.fused_config` at the headline shape itself,
for both divergences, kdops' choice against its neighbours; (`--steps tune_kinds`) the same for the other kinds
and the hard-label term.

Time: the budget (--minutes) counts from the start of the command. Before each step, its estimate is
compared with the time left less RESERVE_S (kept for the report): a step that does not fit is skipped, and
the report says so. A step that runs is killed at the earlier of the budget's end and TIMEOUT_FACTOR × its
estimate + TIMEOUT_SLACK_S (so that one slow step leaves time to the next). Steps made of several items
(cases, configurations) skip the items that no longer fit.

Output, in --output (default bench/results/<device>/<kdops version>/, `bench.report.record_dir`: the records of
one GPU and one kdops version; <device> is the GPU's name as a slug):
* README.md: a line per campaign that wrote there — its exact command line, date, commit and device;
* campaign-<device>.jsonl: every measurement, each with the command line, the git commit, the device and
  the torch / triton / liger-kernel / trl versions;
* campaign-<device>.md: the report, each step's results or why it was skipped;
* <device>.jsonl: the headline's records as `python -m bench` writes them; charts-<device>/: their charts
  (`bench.plot`, when matplotlib is installed); fused-check-<device>.jsonl; MEMORY-<device>.md.

--dry-run works on any machine: it prints the plan (each step, what it runs, its estimate, whether it fits)
and the cost model's predicted times for the headline cases, writes nothing unless --output is given (then
campaign-plan.md), and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from .metadata import campaign_metadata
from .plan import DEFAULT_MINUTES, DEFAULT_STEPS, STEPS, simulate, plan_lines, steps_in_order
from .predictions import model_gpu, prediction_lines
from .report import add_to_readme, render_report, report_name
from .runner import REPO, Budget, Context, execute_in_child, run_body, run_steps

# bench.report.RESULTS_DIR, not imported from there: bench.report imports kdops, a second or more that every step's
# process (this module) would spend of its time.
RESULTS_DIR = REPO / "bench" / "results"

FAILED = ("failed", "error", "timeout")  # the statuses that make the campaign exit 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"the whole campaign's time budget (default {DEFAULT_MINUTES:g})")
    parser.add_argument("--output", help="results folder (default: bench/results/<device>/<kdops version>)")
    parser.add_argument("--steps", nargs="+", metavar="NAME",
                        help="only these steps, in the campaign's order: " + ", ".join(DEFAULT_STEPS))
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the cost model's predictions; write nothing unless --output")
    for hidden in ("--child", "--meta", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    return parser


def _device() -> str:
    """Where the steps run: CUDA, or the CPU (`--allow-cpu`, the tests)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def child_main(args) -> int:
    """`--child NAME`: one step's body in this process, its result kept up to date in `--result`."""
    meta = json.loads(Path(args.meta).read_text())
    ctx = Context(args.child, args.output, meta, args.seconds or 600.0, result_path=args.result, device=_device())
    return 1 if run_body(ctx, STEPS[args.child].body).status == "error" else 0


def dry_run(steps, seconds: float, output: str | None) -> int:
    """Print the plan of `seconds` and the cost model's predictions; write them to campaign-plan.md in `output`."""
    results, budget = simulate(steps, seconds)
    lines = ["# kdops GPU campaign: dry run", "", *plan_lines(steps, results, budget), "",
             *prediction_lines(model_gpu())]
    print("\n".join(lines))
    if output:
        path = Path(output) / "campaign-plan.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return 0


def run_campaign(steps, budget: Budget, output: str | None, argv: list[str]) -> int:
    """The steps within `budget`, each in its own process; the report, the records and README.md in `output`
    (default: `record_dir` of this GPU); 1 where a step failed, raised or ran out of time."""
    from bench.report import record_dir

    device = _device()
    meta = campaign_metadata(device, argv)
    output = Path(output).resolve() if output else record_dir(meta["device"], RESULTS_DIR)
    output.mkdir(parents=True, exist_ok=True)
    add_to_readme(output, meta)
    print(f"# kdops GPU campaign on {meta['device']}: {', '.join(s.name for s in steps)} in {budget.seconds:.0f} s; "
          f"commit {str(meta['commit'])[:10]}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdops-campaign-") as tmp:
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta))
        results = run_steps(steps, budget, execute_in_child(output, meta_path, Path(tmp)))
    report = output / report_name(meta, ".md")
    report.write_text(render_report(meta, steps, results, budget))
    print(f"# wrote {report} and {output / report_name(meta, '.jsonl')} "
          f"({budget.elapsed():.0f} s of {budget.seconds:.0f} s)")
    return 1 if any(r.status in FAILED for r in results) else 0


def main(argv=None, started: float | None = None) -> int:
    """The command line; the budget counts from `started` (time.monotonic()) where given, else from now."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    names = args.steps or DEFAULT_STEPS
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(DEFAULT_STEPS)}")
    steps = steps_in_order(names)
    seconds = 60.0 * args.minutes
    if args.dry_run:
        return dry_run(steps, seconds, args.output)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("python -m bench.campaign needs a CUDA device; `--dry-run` prints its plan anywhere", file=sys.stderr)
        return 2
    return run_campaign(steps, Budget(seconds, start=started), args.output, argv)
