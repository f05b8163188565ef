"""Instructions per element of the kernels on logits' vocabulary loops, read from their SASS (no GPU needed).

    python -m bench.loops [--divergence D ...] [--check]

The kernels on logits are compute-bound on an H100/H200 (bench/model.py, LOGITS_KERNEL_FLOPS): their time
follows the instructions each thread issues per element of its tile. This compiles the kernels that
`fused_linear_kd_loss(impl="chunked")` launches (bf16, sm_90, through `bench.compile`'s recording), at the
headline shape's launch configuration (`kdops.launchers.logits.logits_config` for 8192 × 128256 on an H100), finds each
vocabulary loop in the SASS (a backward branch), takes the shortest path through it (`hot_loops`: a tile that
neither grows nor holds its row's max, kernels/divergences.py "Lanes" — all tiles but a row's first few) and
divides its instructions by the elements a thread holds per tile
(BLOCK_R · BLOCK_V / (32 · num_warps)). The cost model scales its measured figures by these counts
(`bench.model.LOGITS_KERNEL_SASS`); `--check` fails where they are no longer the code's (a test runs it).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

from . import compile as gate

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")
#: Opcode families shown beside the totals.
SHOWN = ("MUFU", "FFMA", "FADD", "FMUL", "FSEL", "FSETP", "SHFL", "BAR")


def hot_loops(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each loop of a kernel's SASS (a backward branch to its head) along the
    shortest path through its body: the blocks that branches inside it may skip (the lanes' re-expression when
    a max grows, the counts of a tile that holds a max) are what a tile rarely runs, and leaving every one of
    them out is the shortest path."""
    code = [(int(address, 16), bool(guard), opcode, rest) for address, guard, opcode, rest in _LINE.findall(sass)]
    step = code[1][0] - code[0][0]
    loops = []
    for address, _, opcode, rest in code:
        target = _TARGET.search(rest)
        if not (opcode.startswith("BRA") and target and int(target.group(1), 16) < address):
            continue
        head = int(target.group(1), 16)
        body = {at: (guarded, op, tail) for at, guarded, op, tail in code if head <= at <= address}
        # shortest path from the head to the back edge: every edge in the body goes forward
        best = {head: (0, collections.Counter())}
        for at in sorted(body):
            if at not in best:
                continue
            guarded, op, tail = body[at]
            cost, ops = best[at]
            cost, ops = cost + 1, ops + collections.Counter([op.split(".")[0]])
            if at == address:
                loops.append((cost, ops))
                break
            jump = _TARGET.search(tail) if op.startswith("BRA") else None
            successors = [int(jump.group(1), 16)] if jump and at < int(jump.group(1), 16) <= address else []
            if not (op.startswith("BRA") and not guarded):
                successors.append(at + step)
            for nxt in successors:
                if nxt not in best or best[nxt][0] > cost:
                    best[nxt] = (cost, ops)
    return loops


HEADLINE_ROWS, HEADLINE_VOCAB = 8192, 128256


def headline_config(forward: bool = False) -> dict:
    """The block sizes of the forward kernel on logits (`forward`) or of the gradient's at the headline shape."""
    import kdops.launchers.logits
    from kdops import targets

    config = kdops.launchers.logits.logits_config(HEADLINE_ROWS, HEADLINE_VOCAB, targets.H100, forward=forward)
    return {key: value for key, value in config.items() if key in ("BLOCK_R", "BLOCK_V", "num_warps")}


def count(divergence: str, parts: bool = False,
          one_read: bool = False) -> dict[str, list[tuple[float, collections.Counter]]]:
    """Per kernel on logits of the chunked bf16 call: (instructions per element, opcode counts) of each loop; with
    `parts`, of kd_loss's call with return_parts=True instead (its forward kernel's PARTS specialization, which
    streams the entropies and the hard-label sums beside the first pass); with `one_read`, of the chunked call's
    gradient kernel as impl="epilogue" launches it (LOSS, at the forward's blocks: `logits_backward(loss=...)`)."""
    out = {}
    # the recorded calls at a vocabulary that, like the headline's (128256 = 16 · 8016), is a multiple of 16:
    # Triton specializes the sizes and strides on it (aligned rows: vectorized loads)
    vocab, gate.VOCAB = gate.VOCAB, HEADLINE_VOCAB - 16 * (HEADLINE_VOCAB // 16 - 65)
    try:
        specs = gate.record("sm_90", True, ["bf16"], [divergence])
    finally:
        gate.VOCAB = vocab
    for spec in specs:
        call = spec.call
        wanted = (call.function == "kd_loss" and call.parts) if parts else (
            call.function == "chunked" and not call.hard)
        if not spec.name.startswith("kd_logits") or not wanted or call.transform or call.vocab_parallel \
                or spec.name in out:
            continue
        if one_read and spec.name != "kd_logits_backward_kernel":
            continue
        config = headline_config(forward=one_read or spec.name == "kd_logits_forward_kernel")
        per_thread = config["BLOCK_R"] * config["BLOCK_V"] / (32 * config["num_warps"])
        spec.kwargs.update(config, **(dict(LOSS=True, maxnreg=255) if one_read else {}))
        loops = hot_loops(gate.sass(gate.compile_spec(spec).asm["cubin"]))
        out[spec.name] = [(n / per_thread, ops) for n, ops in loops]
    return out


#: The divergence whose kernels stand for each kind of bench.model.LOGITS_KERNEL_SASS.
MODEL_KINDS = {"kl": "forward_kl", "jsd": "generalized_jsd"}


def model_counts(kind: str) -> tuple[float, float]:
    """(forward passes summed, gradient) instructions per element of a kind of LOGITS_KERNEL_SASS, from the code."""
    loops = count(MODEL_KINDS[kind])
    return (sum(n for n, _ in loops["kd_logits_forward_kernel"]),
            sum(n for n, _ in loops["kd_logits_backward_kernel"]))


def parts_counts(kind: str) -> float:
    """Instructions per element that return_parts adds to the forward passes of a kind (bench.model.PARTS_SASS):
    the PARTS specialization's forward loops less the plain one's."""
    loops = count(MODEL_KINDS[kind], parts=True)
    return sum(n for n, _ in loops["kd_logits_forward_kernel"]) - model_counts(kind)[0]


def one_read_counts(kind: str = "kl") -> float:
    """Instructions per element of the one-read kernel's loop (bench.model.rates.ONE_READ_SASS)."""
    return sum(n for n, _ in count(MODEL_KINDS[kind], one_read=True)["kd_logits_backward_kernel"])


def check(tolerance: float = 0.5) -> list[str]:
    """Where the cost model's counts (bench.model.LOGITS_KERNEL_SASS, "now"; bench.model.PARTS_SASS) differ from the
    code's."""
    from .model import LOGITS_KERNEL_SASS
    from .model.rates import ONE_READ_SASS, PARTS_SASS

    out = []
    for kind, (_, recorded) in LOGITS_KERNEL_SASS.items():
        counted = model_counts(kind)
        if any(abs(a - b) > tolerance for a, b in zip(counted, recorded)):
            out.append(f"{kind}: the code has {counted[0]:.1f} / {counted[1]:.1f} instructions per element "
                       f"(forward passes / gradient), bench.model.LOGITS_KERNEL_SASS says "
                       f"{recorded[0]} / {recorded[1]}")
    for kind, recorded in PARTS_SASS.items():
        counted = parts_counts(kind)
        if abs(counted - recorded) > tolerance:
            out.append(f"{kind}: return_parts adds {counted:.1f} instructions per element to the forward passes, "
                       f"bench.model.PARTS_SASS says {recorded}")
    for kind, recorded in ONE_READ_SASS.items():
        counted = one_read_counts(kind)
        if abs(counted - recorded) > tolerance:
            out.append(f"{kind}: the one-read kernel has {counted:.1f} instructions per element, "
                       f"bench.model.rates.ONE_READ_SASS says {recorded}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--divergence", nargs="+", choices=gate.DIVERGENCES, default=["forward_kl", "generalized_jsd"])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 where the cost model's counts (bench.model.LOGITS_KERNEL_SASS) are not the code's")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    if args.check:
        stale = check()
        print("\n".join(stale) if stale else "bench.model.LOGITS_KERNEL_SASS matches the code")
        return 1 if stale else 0
    print(f"sm_90, bf16, forward {headline_config(forward=True)}, gradient {headline_config()}: instructions per "
          "element of each vocabulary loop")
    for divergence in args.divergence:
        for kernel, loops in count(divergence).items():
            for i, (per_element, ops) in enumerate(loops):
                shown = " ".join(f"{op} {ops[op] * per_element / sum(ops.values()):.1f}" for op in SHOWN)
                print(f"{divergence:<16} {kernel:<26} loop {i + 1}: {per_element:6.1f}   ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
