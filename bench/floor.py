"""The floor: the work no implementation of the loss can avoid, timed as bare torch ops in the same run.

N tokens, V vocabulary, b bytes per element of the input dtype, Hs / Ht the student / teacher widths.

`kd_loss` is memory-bound; its floor is bytes moved:
    forward   2·N·V·b   read both logits              timed as s.sum(-1), t.sum(-1)
    backward    N·V·b   write the student gradient    timed as g.fill_(1)
    total     3·N·V·b   one fused pass                timed as torch.sub(s, t, out=g)

`topk_kd_loss` (a sparse teacher) reads the student's logits and writes their gradient: N·V·b each way.
`fused_linear_topk_kd_loss`'s floor is the student's matmuls: 2·N·V·Hs forward, 4·N·V·Hs backward (the
teacher's side is its (ids, log-probabilities), read, not computed).

`fused_linear_kd_loss` is compute-bound; its floor is the matmul flops below (frozen teacher):
    forward   2·N·V·(Hs + Ht)   h_s·W_sᵀ and h_t·W_tᵀ
    backward  4·N·V·Hs          dH = G·W_s and dW = Gᵀ·h_s
    total     2·N·V·(3·Hs + Ht)
timed as torch.matmul calls in the input dtype with outputs in it too (16-bit on a GPU), every buffer (the logits,
the logit gradient G, dH, dW) allocated once, outside the timing, in two variants:
    "full"      one call per matmul over all N tokens: logits [N, V], dH [N, Hs] and dW [V, Hs] from a [N, V] G
    "chunked"   token chunks of at most CHUNK_BYTES of logits, dW accumulated by addmm_ chunk after chunk
Both are timed in turn when the floor is built (`fastest`) and each phase takes the faster one, so the floor is
the four matmuls at their fastest on the device; the floor's `Phases.detail` (and its record's `floor_variant`)
says which ("full", "chunked", or "full/chunked" for forward/backward when they differ). Where the full
variant's buffers do not fit (out of memory while allocating them), and where one chunk holds every token (the
variants are the same), it is the only one. Before kdops 0.4.0 the floor was the chunked variant alone: on an H100 it read 3–5 % above kdops'
own full-N matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cases import FUSED, LINEAR, TOPK, Case
from .measure import Inputs, Phases, free_memory, is_oom, time_steps

CHUNK_BYTES = 512 * 2**20
CALIBRATION_REPS = 3  # timed turns of each variant when the floor is built, after one warm-up


@dataclass(frozen=True)
class FloorWork:
    """Work per phase, in `unit` ("byte" or "flop")."""

    forward: int
    backward: int
    unit: str

    @property
    def total(self) -> int:
        return self.forward + self.backward


def floor_work(case: Case) -> FloorWork:
    n, v = case.tokens, case.vocab
    if case.function in LINEAR:
        return FloorWork(2 * n * v * (case.hidden_student + case.hidden_teacher), 4 * n * v * case.hidden_student,
                         "flop")
    itemsize = torch.empty((), dtype=case.torch_dtype).element_size()
    return FloorWork((1 if case.function == TOPK else 2) * n * v * itemsize, n * v * itemsize, "byte")


def chunk_rows(vocab: int, itemsize: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's [rows, V] logits fit in `budget_bytes`."""
    return max(1, budget_bytes // (vocab * itemsize))


def _bandwidth_floor(inputs: Inputs) -> Phases:
    student, teacher = (x.detach() for x in inputs.args[:2])
    grad = torch.empty_like(student)
    return Phases(forward=lambda: (student.sum(-1), teacher.sum(-1)),
                  backward=lambda _: grad.fill_(1.0),
                  total=lambda: torch.sub(student, teacher, out=grad))


def _sparse_bandwidth_floor(inputs: Inputs) -> Phases:
    student = inputs.args[0].detach()
    grad = torch.empty_like(student)
    return Phases(forward=lambda: student.sum(-1), backward=lambda _: grad.fill_(1.0),
                  total=lambda: torch.neg(student, out=grad))


def _matmul_phases(case: Case, inputs: Inputs, rows: int) -> Phases:
    """The four matmuls over token chunks of `rows` (one chunk of every token: the full variant), into buffers
    allocated here, before any timing."""
    hs, ws = (x.detach() for x in inputs.args[:2])
    ht, wt = (x.detach() for x in inputs.args[2:4]) if case.function == FUSED else (None, None)
    logits_s = hs.new_empty(rows, case.vocab)
    logits_t = None if ht is None else hs.new_empty(rows, case.vocab)  # a sparse teacher's logits are never computed
    grad_logits = torch.randn_like(logits_s)
    grad_hidden, grad_weight = torch.empty_like(hs), torch.empty_like(ws)
    chunks = [(start, min(start + rows, case.tokens)) for start in range(0, case.tokens, rows)]

    def forward():
        for start, end in chunks:
            torch.matmul(hs[start:end], ws.T, out=logits_s[: end - start])
            if ht is not None:
                torch.matmul(ht[start:end], wt.T, out=logits_t[: end - start])

    def backward(_):
        for start, end in chunks:
            g = grad_logits[: end - start]
            torch.matmul(g, ws, out=grad_hidden[start:end])
            if start == 0:
                torch.matmul(g.T, hs[start:end], out=grad_weight)
            else:
                grad_weight.addmm_(g.T, hs[start:end])

    return Phases(forward, backward)


def matmul_variants(case: Case, inputs: Inputs) -> dict[str, Phases]:
    """The floor's variants of a case from hidden states: "chunked" (CHUNK_BYTES of logits per chunk) and
    "full" (one chunk of every token), or the full one alone where a chunk holds every token (they are the same),
    or the chunked one alone where the full one's buffers run out of memory."""
    rows = chunk_rows(case.vocab, inputs.args[0].element_size(), CHUNK_BYTES)
    if rows >= case.tokens:
        return {"full": _matmul_phases(case, inputs, case.tokens)}
    variants = {"chunked": _matmul_phases(case, inputs, rows)}
    try:
        variants["full"] = _matmul_phases(case, inputs, case.tokens)
    except Exception as error:  # noqa: BLE001 - out of memory: the chunked variant alone; anything else raises
        if not is_oom(error):
            raise
    if "full" not in variants:
        free_memory(inputs.args[0].device)  # after the except block: its traceback no longer holds the buffers
    return variants


def fastest(variants: dict[str, Phases], device, reps: int = CALIBRATION_REPS) -> tuple[str, str]:
    """(forward, backward): the name of the variant with the smallest median time of each phase, the variants
    taking turns for one warm-up and `reps` repetitions (`bench.measure.time_steps`, as the bench times); a lone
    variant untimed."""
    if len(variants) == 1:
        (name,) = variants
        return name, name
    samples = {name: [] for name in variants}
    for rep in range(1 + reps):
        for name, phases in variants.items():
            times = time_steps([phases.forward, phases.backward], device)
            if rep:  # the first turn warms up (cuBLAS' heuristics, the allocator)
                samples[name].append(times)
    medians = {name: np.median(np.asarray(times), axis=0) for name, times in samples.items()}
    return tuple(min(medians, key=lambda name: medians[name][phase]) for phase in range(2))


def _matmul_floor(case: Case, inputs: Inputs) -> Phases:
    """The faster variant of each phase (`fastest`), named in its `detail` ("full", "chunked", or
    "<forward>/<backward>" where they differ); the other variant's buffers are freed with it."""
    variants = matmul_variants(case, inputs)
    forward, backward = fastest(variants, inputs.args[0].device)
    return Phases(variants[forward].forward, variants[backward].backward,
                  detail=forward if forward == backward else f"{forward}/{backward}")


def build_floor(case: Case, inputs: Inputs) -> Phases:
    """The floor's phases for `case`: the bytes moved on logits, the matmuls from hidden states."""
    if case.function in LINEAR:
        return _matmul_floor(case, inputs)
    return _sparse_bandwidth_floor(inputs) if case.function == TOPK else _bandwidth_floor(inputs)
