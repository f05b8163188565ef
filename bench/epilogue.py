"""Compile the epilogue path's CuTe DSL GEMMs (`kdops/kernels/epilogue.py`) for a GPU this machine need not have:

    python -m bench.epilogue --arch sm_90 [--rows 8192 --vocab 128256 --hidden 4096 --dtype bf16] [--json]

builds each epilogue's quack plan for `--arch` (sm_90 → sm_90a, sm_100 → sm_100a) at one chunk's shape without
launching it, and reads its cubin with the `cuobjdump` of Triton's wheel (`bench.compile.analyse_cubin`): the GEMM
tile quack's default config picks, the sinks' per-tile buffers, registers, local memory (a spill) and tensor-core
instructions. quack takes the architecture from QUACK_ARCH and CUTE_DSL_ARCH, which the DSL reads at import: one
architecture per process (the tests run this module in a subprocess per architecture).

Off a GPU, one driver query has no answer: the number of clusters a persistent GEMM may keep resident, which the
plan only stores; it is given the SM count of the architecture's flagship (`SMS`) divided by the cluster size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

#: SMs of each architecture's flagship (H100 SXM, B200), for the persistent scheduler's cluster count.
SMS = {"sm_90": 132, "sm_100": 148}

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

#: The local memory (bytes) each epilogue's GEMM may use, per architecture: what quack's default configs compiled
#: to (`python -m bench.epilogue`, 2026-12-07). The separate max reduce beside the sums costs registers: the sums
#: alone compile without a spill on sm_100 (167 registers), with it to 255 and 40 B; quack's own `lse_epi` spills
#: 40 B on sm_90. Whether these cost time is a GPU's to say; a change that spills more fails the tests.
SPILL_LIMITS = {"sm_90": {"logits_statistics": 8, "logits_statistics_ce": 128},
                "sm_100": {"logits_statistics": 40, "logits_statistics_ce": 104}}


def compile_epilogues(arch: str, rows: int, vocab: int, hidden: int, dtype: str = "bf16") -> list[dict]:
    """One report per epilogue of `kdops.kernels.epilogue`: its name, the GEMM tile, its sinks {name: [shape, dtype]}
    and `analyse_cubin`'s counts of its cubin for `arch`. Sets the architecture's variables: call it once per
    process, before anything imports cutlass."""
    with tempfile.TemporaryDirectory(prefix="kdops-epilogue-") as dump:
        os.environ.update(QUACK_ARCH=arch, CUTE_DSL_ARCH=arch + "a", CUTE_DSL_DUMP_DIR=dump,
                          CUTE_DSL_KEEP="cubin")  # the compiled object keeps its cubin (a copy lands in `dump`)
        os.environ.setdefault("QUACK_CACHE_ENABLED", "0")  # every run compiles
        import torch
        import quack.gemm_runtime.host as host

        from bench.compile import analyse_cubin
        from kdops.kernels import epilogue

        host.get_max_active_clusters = lambda cluster_size: SMS[arch] // cluster_size
        dt = getattr(torch, DTYPES[dtype])
        h = torch.empty((rows, hidden), dtype=dt)
        weight = torch.empty((vocab, hidden), dtype=dt)
        out = torch.empty((rows, vocab), dtype=torch.float32)
        return [_report(mod, arch, h, weight, out, analyse_cubin) for mod in epilogue.SINKS]


def _report(mod, arch: str, h, weight, out, analyse_cubin) -> dict:
    """`compile_epilogues`' report of one epilogue."""
    plan = mod.plan(h, weight.t(), out={"D": out}, inv_temp=1.0)
    compiled = plan.gemm_plan.compiled_fn
    cubin = compiled.artifacts.CUBIN
    if not cubin:
        raise RuntimeError(f"{mod.fn.__name__}: the DSL kept no cubin (CUTE_DSL_KEEP)")
    counts = analyse_cubin(cubin, arch)
    return dict(
        epilogue=mod.fn.__name__, arch=arch + "a", tile_m=plan.config.tile_m, tile_n=plan.config.tile_n,
        cluster=[plan.config.cluster_m, plan.config.cluster_n], pingpong=plan.config.pingpong,
        sinks={name: [list(buf.shape), str(buf.dtype)] for name, buf in sorted(plan.scratch.items())},
        registers=counts["registers"], spill_bytes=counts["local_bytes"],
        tensor_core_instructions=counts["tensor_core_instructions"], cubin_bytes=len(cubin))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(SMS), default="sm_90")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--json", action="store_true", help="one JSON line of the reports")
    args = parser.parse_args(argv)
    reports = compile_epilogues(args.arch, args.rows, args.vocab, args.hidden, args.dtype)
    if args.json:
        print(json.dumps(reports))
        return 0
    for r in reports:
        sinks = ", ".join(f"{name} {shape}" for name, (shape, _) in r["sinks"].items())
        print(f"{r['arch']} {r['epilogue']:<22} tile {r['tile_m']}×{r['tile_n']} cluster {r['cluster']} "
              f"regs {r['registers']} spill {r['spill_bytes']} B  TC instr. {r['tensor_core_instructions']}  "
              f"sinks: {sinks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
