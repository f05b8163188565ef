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
timed as torch.matmul calls in the input dtype, over token chunks of at most CHUNK_BYTES of logits
(output buffers and the logit gradient G are allocated once, outside the timing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import FUSED, LINEAR, TOPK, Case
from .measure import Inputs, Phases

CHUNK_BYTES = 512 * 2**20


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


def _matmul_floor(case: Case, inputs: Inputs) -> Phases:
    hs, ws = (x.detach() for x in inputs.args[:2])
    ht, wt = (x.detach() for x in inputs.args[2:4]) if case.function == FUSED else (None, None)
    rows = min(case.tokens, chunk_rows(case.vocab, hs.element_size()))
    logits_s, logits_t = (hs.new_empty(rows, case.vocab) for _ in range(2))
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


def build_floor(case: Case, inputs: Inputs) -> Phases:
    if case.function in LINEAR:
        return _matmul_floor(case, inputs)
    return _sparse_bandwidth_floor(inputs) if case.function == TOPK else _bandwidth_floor(inputs)
