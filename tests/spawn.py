"""Run a test body in several processes joined by a gloo process group (CPU, `torch.multiprocessing`).

The workers are fresh interpreters, CPU-only and with TRITON_INTERPRET=1 on any machine; each speeds up Triton's
interpreter, poisons kernel outputs and lowers the chunked plan's floor like conftest does, seeds torch, and uses one
thread (the machine has two cores for all of them). An exception in any worker fails the test with that worker's
traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

import kdops.launchers.common
import kdops.paths.chunked
from triton_interpreter import cache_language_patches


def _entry(rank: int, world_size: int, store_path: str, errors, body, args) -> None:
    import torch.distributed as dist

    cache_language_patches()  # as tests/conftest.py: triton.language patched once per kernel launch
    kdops.launchers.common.POISON_OUTPUTS = True
    kdops.paths.chunked.MIN_CHUNK_ROWS = 1  # as tests/conftest.py: small budgets give many chunks at small shapes
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        body(rank, world_size, *args)
        dist.barrier()  # no rank tears the group down while another still talks to it
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()
    # A worker that passed leaves without the interpreter's teardown: the C++ destructors that run there found a
    # thread still joinable once in CI ("terminate called without an active exception", SIGABRT, after FSDP2 on
    # gloo) and failed a test that had passed. Nothing is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(body, world_size: int, *args) -> None:
    """body(rank, world_size, *args) in `world_size` processes; `body` must be a module-level function."""
    # Set in the parent: a worker imports body's module (and so triton, through torch) before _entry runs.
    # The workers are CPU processes on a gloo group whatever the machine: on a GPU machine they get no GPU
    # (the bodies' CPU tensors then meet DEVICE = "cpu" in their modules) and the interpreter, as in CI.
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    os.environ["TRITON_INTERPRET"] = "1"
    if torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        context = mp.get_context("spawn")
        errors = context.SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.start_processes(_entry, args=(world_size, os.path.join(tmp, "store"), errors, body, args),
                                   nprocs=world_size, start_method="spawn")
            except Exception as failure:
                reports = []
                while not errors.empty():
                    rank, text = errors.get()
                    reports.append(f"--- rank {rank} ---\n{text}")
                raise AssertionError("\n".join(reports) or str(failure)) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
