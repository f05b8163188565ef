"""Several teachers for one student: how their logits make one target (`teacher_mix=` of the losses).

    Ensemble(weights)   the probability mixture   p = Σ_i w_i softmax(z_i / T)       (w_i ≥ 0, Σ w_i = 1)
    LogitSum(weights)   logit arithmetic          p = softmax(Σ_i w_i z_i / T)        (any real w_i)

e.g. ``LogitSum((1 + λ, −λ))`` of a fine-tuned teacher and its base model is "the fine-tuned teacher plus λ
times its shift from the base". Both become *target logits* y with p = softmax(y / T) — y = Σ w_i z_i, or
y = T·log Σ_i w_i softmax(z_i / T) for the mixture (each teacher's log-normalizer first: one more pass over its
logits) — which the divergence's math then takes as it takes one teacher's logits (softcaps apply to each
teacher's logits before the mix, TAID interpolates toward the mixed target). The mix is computed here once, in
PyTorch, on row chunks of logits (never on more than a chunk's rows at a time, `kdops.api` and
`kdops._chunked`), and its gradient to each teacher by autograd through it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from . import _chunked, _torch_backend
from .reference import compute_dtype, divergence_rows
from .reference import softcap as reference_softcap


def _weights(owner: str, weights) -> tuple[float, ...]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{owner}: weights must be a sequence of numbers, one per teacher, got {weights!r}")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{owner}: weights must be finite numbers, got {tuple(weights)!r}")
        out.append(float(w))
    if not out:
        raise ValueError(f"{owner}: weights must name at least one teacher, got ()")
    return tuple(out)


class TeacherMix:
    """Base class of the ways several teachers' logits make one target."""

    weights: tuple[float, ...]

    def target_logits(self, teachers, temperature: float) -> torch.Tensor:  # pragma: no cover - subclasses
        raise NotImplementedError


@dataclass(frozen=True)
class Ensemble(TeacherMix):
    """The probability mixture p = Σ_i w_i softmax(z_i / T); weights ≥ 0 summing to 1 (a zero weight drops
    its teacher)."""

    weights: tuple[float, ...]

    def __init__(self, weights):
        weights = _weights("Ensemble", weights)
        if any(w < 0 for w in weights):
            raise ValueError(f"Ensemble: weights must be ≥ 0 (a probability mixture), got {weights!r}")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"Ensemble: weights must sum to 1 (a probability mixture), got {weights!r} "
                             f"(sum {sum(weights):.9g})")
        object.__setattr__(self, "weights", weights)

    def target_logits(self, teachers, temperature: float) -> torch.Tensor:
        """y = T·log Σ_i w_i softmax(z_i / T) of the teachers' logits [rows, V] (float32 or float64), so that
        softmax(y / T) is the mixture; −inf where every teacher with weight has probability 0."""
        parts = [torch.log_softmax(z / temperature, dim=-1) + math.log(w)
                 for z, w in zip(teachers, self.weights) if w > 0]
        return (parts[0] if len(parts) == 1 else _logsumexp_of(parts)) * temperature


def _logsumexp_of(parts) -> torch.Tensor:
    """log Σ_i e^(a_i) of same-shape tensors, −inf where every a_i is −inf — with a zero gradient there too
    (torch.logsumexp's is 0/0 = NaN at such entries: a token every teacher masks)."""
    stacked = torch.stack(parts)
    top = stacked.detach().amax(0)
    absent = top == -math.inf
    top = torch.where(absent, 0.0, top)
    total = torch.exp(stacked - top).sum(0)
    return torch.where(absent, -math.inf, torch.log(torch.where(absent, 1.0, total)) + top)


@dataclass(frozen=True)
class LogitSum(TeacherMix):
    """Logit arithmetic: p = softmax(Σ_i w_i z_i / T), any finite real weights."""

    weights: tuple[float, ...]

    def __init__(self, weights):
        object.__setattr__(self, "weights", _weights("LogitSum", weights))

    def target_logits(self, teachers, temperature: float) -> torch.Tensor:
        """y = Σ_i w_i z_i of the teachers' logits [rows, V] (a zero weight drops its teacher). A token that a
        teacher of nonzero weight masks (−inf) stays masked: −inf, where a negative weight would make it +inf."""
        live = [(z, w) for z, w in zip(teachers, self.weights) if w != 0]
        if not live:
            return torch.zeros_like(teachers[0])
        masked, total = None, None
        for z, w in live:
            absent = z == -math.inf
            term = w * torch.where(absent, 0.0, z)
            masked = absent if masked is None else masked | absent
            total = term if total is None else total + term
        return torch.where(masked, -math.inf, total)


def as_teachers(name: str, teachers) -> list:
    """A tensor (one teacher) or a sequence of tensors, as a list (elements may be None only for biases)."""
    if teachers is None or isinstance(teachers, torch.Tensor):
        return [teachers]
    if isinstance(teachers, (list, tuple)):
        if not teachers:
            raise ValueError(f"{name}: expected a tensor or a non-empty sequence of tensors, got an empty sequence")
        return list(teachers)
    raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(teachers).__name__}")


def check_mix_type(mix) -> TeacherMix | None:
    """None, or a mix (whose weights `check_mix` checks against the teachers of a call)."""
    if mix is not None and not isinstance(mix, TeacherMix):
        raise TypeError(f"teacher_mix: expected kdops.Ensemble or kdops.LogitSum, got {type(mix).__name__}")
    return mix


def check_mix(mix, count: int, name: str) -> TeacherMix | None:
    """`teacher_mix` for `count` teachers given as `name`: None for one teacher, else a TeacherMix with one
    weight per teacher."""
    if check_mix_type(mix) is None:
        if count != 1:
            raise ValueError(f"{name}: {count} teachers need teacher_mix=kdops.Ensemble(weights) or "
                             "kdops.LogitSum(weights) to say how they make one target")
        return None
    if len(mix.weights) != count:
        raise ValueError(f"teacher_mix: {len(mix.weights)} weights for {count} teachers ({name}); give one weight "
                         "per teacher")
    return mix


def linear_teachers(teacher_hidden, teacher_weight, teacher_bias, teacher_mix):
    """The teachers' tensors as given (one teacher, no mix), or as three lists of one entry per teacher (a bias
    list of Nones when none is given) and the validated mix."""
    several = isinstance(teacher_hidden, (list, tuple)) or isinstance(teacher_weight, (list, tuple))
    if not several and teacher_mix is None:
        return teacher_hidden, teacher_weight, teacher_bias, None
    hidden, weight = as_teachers("teacher_hidden", teacher_hidden), as_teachers("teacher_weight", teacher_weight)
    bias = [None] * len(hidden) if teacher_bias is None else as_teachers("teacher_bias", teacher_bias)
    if len(weight) != len(hidden):
        raise ValueError(f"teacher_hidden has {len(hidden)} tensors and teacher_weight {len(weight)}: give one "
                         "of each per teacher")
    if len(bias) != len(hidden):
        raise ValueError(f"teacher_bias has {len(bias)} entries for {len(hidden)} teachers: give one per teacher "
                         "(None for a teacher without a bias), or None")
    return hidden, weight, bias, check_mix(teacher_mix, len(hidden), "teacher_hidden")


# --- the paths ---------------------------------------------------------------------------------------------------

#: float32 [chunk, V] temporaries per teacher of the mix on a chunk (z / T, its log-softmax and weighted copy, the
#: stack and its exponentials; measured: 12.3 rows with 2 teachers, 17.3 with 3, of the 13 and 18 counted).
MIX_TEMPORARIES = 4


def mixed_chunk_rows(vocab: int, teachers: int, backend: str) -> int:
    """Rows per chunk of `kd_loss` with several teachers: the torch backend's budget
    (`kdops._torch_backend.BUDGET_BYTES`) over the mix's temporaries, the target and its gradient, and the
    reference math's temporaries (backend "torch"; the kernels' are the target, the two gradients they write and
    their masked copy, and the chunk's share of the rest: 16.3 rows measured with three teachers, of the 17
    counted)."""
    loss_rows = _torch_backend.TEMPORARIES_PER_ELEMENT if backend == "torch" else 5
    per_row = vocab * 4 * (loss_rows + MIX_TEMPORARIES * teachers)
    return max(1, _torch_backend.BUDGET_BYTES // per_row)


@torch.compiler.disable
def mixed_kd_rows(student, teachers, mask, mix: TeacherMix, divergence, temperature: float, backend: str):
    """`kd_loss`'s per-row losses [rows] against the mixed target of several teachers' [..., V] logits: row chunk
    by row chunk, the chunk's target logits (`TeacherMix.target_logits`, float32) and the loss of the pair by
    `backend` (the kernels, or the reference math); recomputed chunk by chunk in the backward
    (`_torch_backend.ChunkedRowsFunction`). Eager: torch.compile breaks the graph here."""
    from .api import kd_loss_rows_eager

    vocab = student.shape[-1]
    dtype = compute_dtype(student, *teachers)

    def rows(s, m, *ts):
        target = mix.target_logits([t.to(dtype) for t in ts], temperature)
        if backend == "triton":
            return kd_loss_rows_eager(s, target, m, divergence, temperature, backend)
        return torch.where(m, divergence_rows(divergence, s, target, temperature), 0.0)

    flat = [t.reshape(-1, vocab) for t in teachers]
    return _torch_backend.ChunkedRowsFunction.apply(rows, mixed_chunk_rows(vocab, len(teachers), backend), mask,
                                                    student.reshape(-1, vocab), mask, *flat)


class MixedChunkedProblem(_chunked.ChunkedProblem):
    """`fused_linear_kd_loss` with several teachers, in token chunks (`kdops._chunked`, one side per model): per
    chunk the student's and every teacher's float32 logits, each teacher's softcapped, the mixed target's logits
    from them, the loss of (student, target) by the engine — the kernels write the student's G, and the
    target's where a teacher needs a gradient — and the teachers' G by autograd through the mix. The plan
    counts every model's logits, the target, its G and the mix's temporaries (`logit_rows`)."""

    def __init__(self, hs, ws, bs, teachers, labels, divergence, temperature: float, vocab: int, soft: float,
                 hard: float, ignore_index: int, engine: str, budget: int | None, softcaps, mix: TeacherMix):
        self.acc_dtype = compute_dtype(hs, ws, *[t for h, w, _ in teachers for t in (h, w)])
        self.student = _chunked._Side(hs, ws, bs, vocab, self.acc_dtype)
        self.sides = (self.student, *[_chunked._Side(h, w, b, vocab, self.acc_dtype) for h, w, b in teachers])
        # The kernels see (student, target): the student's cap is theirs; each teacher's is applied before the mix.
        self.softcaps, self.teacher_cap, self.mix = (softcaps[0], None), softcaps[1], mix
        self.logit_rows = len(self.sides) + 2 + MIX_TEMPORARIES * len(teachers)
        self._options(hs, labels, divergence, temperature, vocab, soft, hard, ignore_index, engine, budget, None)

    def _chunk(self, logits, labels, scale, outs, r0: int, r1: int):
        zs, *zts = logits
        need = [out is not None for out in outs[1:]]
        leaves = [z.detach().requires_grad_(n) for z, n in zip(zts, need)]
        with torch.set_grad_enabled(any(need)):
            target = self.mix.target_logits([reference_softcap(z, self.teacher_cap) for z in leaves],
                                            self.temperature)
        # The target's G: the kernels write it into a float32 buffer; the torch engine returns its own (the
        # argument only says that it is wanted)
        g_target = None if not any(need) else torch.empty_like(target) if self.engine == "triton" else target
        loss, g_s, g_y = self._loss_and_logit_grads(zs, target.detach(), labels, scale, outs[0], g_target)
        if not any(need):
            return loss, (g_s, *[None] * len(zts))
        grads = iter(torch.autograd.grad(target, [x for x in leaves if x.requires_grad], g_y, allow_unused=True,
                                         materialize_grads=True))
        return loss, (g_s, *[next(grads) if n else None for n in need])
