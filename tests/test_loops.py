"""`python -m bench.loops`: the instructions per element of the kernels on logits' vocabulary loops, read from
their SASS — the counts the cost model scales its measured figures by (bench.model.LOGITS_KERNEL_SASS)."""

import os
import subprocess
import sys
from pathlib import Path

from bench import loops

ROOT = Path(__file__).resolve().parent.parent


def sass(*lines: str) -> str:
    """cuobjdump-style SASS, one instruction per 16 bytes from 0x0000."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {line} ;  /* 0x0 */" for i, line in enumerate(lines))


def test_hot_loop_takes_the_shortest_path():
    """A loop with a rarely taken block (skipped by a guarded branch) and an if/else whose branches differ in
    length: the count is the path that skips the block and takes the shorter branch."""
    code = sass(
        "MOV R0, R1",            # 0x00 before the loop
        "FADD R2, R2, R3",       # 0x10 loop head
        "@!P0 BRA 0x50",         # 0x20 skip the rare block
        "MUFU.EX2 R4, R4",       # 0x30 rare
        "FMUL R4, R4, R4",       # 0x40 rare
        "@P1 BRA 0x90",          # 0x50 if/else: the else is at 0x90
        "FFMA R5, R5, R5, R5",   # 0x60 then (3 instructions with its jump)
        "FFMA R5, R5, R5, R5",   # 0x70
        "BRA 0xa0",              # 0x80
        "FADD R5, R5, R5",       # 0x90 else (1 instruction)
        "@!P2 BRA 0x10",         # 0xa0 back edge
        "EXIT",                  # 0xb0
    )
    ((n, ops),) = loops.hot_loops(code)
    assert n == 5  # head, the guarded branch, the if's branch, the else, the back edge
    assert ops["FADD"] == 2 and ops["BRA"] == 3 and "MUFU" not in ops and "FFMA" not in ops


def test_a_loop_without_branches_counts_its_body():
    ((n, ops),) = loops.hot_loops(sass("MOV R0, R1", "FADD R2, R2, R3", "FMUL R2, R2, R3", "@P0 BRA 0x10", "EXIT"))
    assert n == 3 and ops == {"FADD": 1, "FMUL": 1, "BRA": 1}


def test_the_cost_model_counts_are_the_code_s():
    """bench.model.LOGITS_KERNEL_SASS ("now") is what the kernels compile to: a kernel change that moves the count
    must update the model (its predictions scale with it). In a subprocess: the test process interprets kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.loops", "--check"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
