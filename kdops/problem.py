"""The problem description: one call of a kdops loss, validated once, as the paths read it.

`describe_kd_loss`, `describe_fused_linear`, `describe_topk` and `describe_fused_linear_topk` check a public
function's arguments (each error names the argument: docs/api.md, "Errors"), resolve what the call asks for — the
engine (the Triton kernels or the torch math), this rank's vocabulary shard, autocast's casts — and return a
`Problem`: the tensors, the per-row mask, and the `Options`. The paths (`kdops.paths`) take a Problem and return its
loss; which one runs is `Problem.path`.

Modes are properties of the description that the paths read, not branches of the public functions:

* `mode`: "eager"; "compiled" (inside torch.compile: a path with a custom op calls it, the torch engine is traced);
  or "graph_break" (inside torch.compile, for what runs eagerly only — several teachers, a vocabulary shard: the
  path runs outside the graph);
* `shards`: this rank's vocabulary shard, agreed by the whole group (`kdops.parallel.resolve`), or None;
* `autocast`: inside torch.autocast the lm_head inputs were cast as autocast casts F.linear's operands, and the path
  runs with autocast off (float32 logits and statistics, as without autocast).
"""

from __future__ import annotations

import ast
import contextlib
import re
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from . import divergences as _divergences
from . import parallel
from ._reduction import reduce_rows, row_mask, row_weights
from ._validation import (
    TOPK_IMPLS,
    as_teachers,
    check_choice,
    check_fused_inputs,
    check_head,
    check_label_range,
    check_logits_pair,
    check_loss_options,
    check_loss_weights,
    check_memory_budget,
    check_mix,
    check_same_device,
    check_softcap,
    check_tail,
    check_temperature,
    check_tensor,
    check_topk_teacher,
    linear_teachers,
    resolve_backend,
)
from .divergences import Divergence, as_divergence
from .ensemble import TeacherMix


class LossParts(NamedTuple):
    """The parts of a loss, per row: detached float32 (float64 for float64 inputs) tensors of the labels' (leading)
    shape, 0 on ignored rows, what `return_parts=True` returns beside the loss.

    soft             D(teacher ‖ student at T) of the row, before any weight (`soft_weight`, `weights`)
    hard             CE(student at T = 1, label), or None without labels
    student_entropy  H(softmax(s / T)) = −Σ q log q
    teacher_entropy  H(P) of the target at T: the teacher's softmax (a mix's target with several teachers; the
                     k (+1)-outcome distribution of a sparse teacher, as its `tail` builds it)
    """

    soft: torch.Tensor
    hard: torch.Tensor | None
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor


@dataclass(frozen=True)
class Head:
    """One model's lm_head inputs: hidden states [..., H], weight [V, H], bias [V] or None."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def tensors(self) -> tuple:
        return self.hidden, self.weight, self.bias


@dataclass(frozen=True)
class Options:
    """The options of one loss, validated. `engine`: "triton" (the kernels) or "torch" (the torch math); `vocab`:
    the vocabulary the path computes over (the shared one of two lm_heads, this rank's shard under vocabulary
    parallelism); `impl`: the requested implementation, which the path resolves ("auto")."""

    divergence: Divergence
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "batchmean"
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    softcaps: tuple = (None, None)
    engine: str = "torch"
    impl: str = "auto"
    memory_budget: int | None = None
    tail: str | None = None
    vocab: int = 0

    def to_text(self) -> str:
        """The options as one string (a custom op's argument under torch.compile), written out so that Dynamo can
        trace it; `from_text` reads it back."""
        items = [f"{name!r}: {(divergence_repr(value) if name == 'divergence' else value)!r}"
                 for name, value in self.items()]
        return "{" + ", ".join(items) + "}"

    def items(self) -> list[tuple]:
        """(name, value) of every option, in their order."""
        return [(name, getattr(self, name)) for name in self.__dataclass_fields__]

    @classmethod
    def from_text(cls, text: str) -> Options:
        values = ast.literal_eval(text)
        values["divergence"] = divergence_from_repr(values["divergence"])
        values["softcaps"] = tuple(values["softcaps"])
        return cls(**values)


_REPR = re.compile(r"^(\w+)\((.*)\)$")


def divergence_repr(divergence: Divergence) -> str:
    """repr(divergence), written out so that Dynamo can trace it (a dataclass's own repr it cannot)."""
    params = ", ".join(f"{name}={float(getattr(divergence, name))!r}" for name in type(divergence).__dataclass_fields__)
    return f"{type(divergence).__name__}({params})"


def divergence_from_repr(text: str) -> Divergence:
    """The inverse of repr() of a kdops divergence."""
    name, args = _REPR.match(text).groups()
    kwargs = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, value = part.split("=", 1)
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    cls = getattr(_divergences, name)
    if not (isinstance(cls, type) and issubclass(cls, Divergence)):
        raise ValueError(f"not a kdops divergence: {text!r}")
    return cls(**kwargs)


@dataclass(frozen=True)
class Problem:
    """One loss call, validated: what a path reads.

    `path`: "logits", "mixed_logits", "linear", "mixed_linear", "topk" or "linear_topk" (`kdops.paths.PATHS`).
    `student`: its logits [..., V] or its `Head`. `teachers`: the teachers' logits or Heads (several with `mix`).
    `topk`: a sparse teacher's (ids, log-probabilities) [..., k]. `mask`: [rows] bool, the rows whose label is not
    ignore_index (all without labels). `leading`: the shape of the rows. `weights`: [rows] per-row loss weights
    (constants) or None. `parts`: whether the call returns its `kdops.LossParts` too."""

    path: str
    student: torch.Tensor | Head
    teachers: tuple
    labels: torch.Tensor | None
    mask: torch.Tensor
    leading: torch.Size
    options: Options
    num_items_in_batch: object = None
    mix: TeacherMix | None = None
    topk: tuple | None = None
    shards: parallel.VocabShards | None = None
    mode: str = "eager"
    autocast: bool = False
    device: torch.device = field(default=None)
    weights: torch.Tensor | None = None
    parts: bool = False

    def weighted(self, rows: torch.Tensor) -> torch.Tensor:
        """w_r · ℓ_r of per-row losses [rows] (0 where masked), or the rows themselves without `weights`."""
        if self.weights is None:
            return rows
        return rows * torch.where(self.mask, self.weights.to(rows.dtype), 0.0)

    def row_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """w' [rows] with Σ_r w'_r ℓ_r equal to the scalar reduction of the weighted rows (`reduce`): the reduction's
        own row weights (`kdops._reduction.row_weights`) times `weights`."""
        scale = row_weights(self.mask, self.options.reduction, self.num_items_in_batch, dtype)
        return self.weighted(scale)

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        """The loss of per-row losses [rows] (0 where masked), weighted by `weights`, by the options' reduction:
        "none" w_r·ℓ_r, "sum" Σ w_r·ℓ_r, "batchmean" Σ w_r·ℓ_r / (valid rows or num_items_in_batch)."""
        return reduce_rows(self.weighted(rows).view(self.leading), self.mask.view(self.leading),
                           self.options.reduction, self.num_items_in_batch)

    def result(self, rows: torch.Tensor, parts: torch.Tensor | None = None):
        """The call's return value: the reduced loss of per-row losses [rows] (`reduce`), and with `parts` asked
        for, (loss, `LossParts`) of the rows' parts [rows, 4] (soft, hard, student entropy, teacher entropy)."""
        loss = self.reduce(rows)
        return (loss, self.parts_of(parts)) if self.parts else loss

    def parts_of(self, parts: torch.Tensor) -> LossParts:
        """The `LossParts` of the rows' parts [rows, 4] (soft, hard, student entropy, teacher entropy): 0 on
        ignored rows, in the rows' shape, hard None without labels."""
        parts = torch.where(self.mask[:, None], parts.detach(), 0.0)
        soft, hard, student_entropy, teacher_entropy = (parts[:, i].view(self.leading) for i in range(4))
        return LossParts(soft, None if self.labels is None else hard, student_entropy, teacher_entropy)

    def tensors(self) -> tuple:
        """(hidden, weight, bias) of the student, then of each teacher: what the autograd Functions take."""
        return tuple(x for head in (self.student, *self.teachers) for x in head.tensors())

    def autocast_off(self):
        """autocast disabled for the path where the inputs were cast as autocast would (`autocast`)."""
        return torch.autocast(self.device.type, enabled=False) if self.autocast else contextlib.nullcontext()


def _mode(eager_only: bool) -> str:
    """"eager" outside torch.compile; inside it, "compiled", or "graph_break" for what runs eagerly only."""
    if not torch.compiler.is_compiling():
        return "eager"
    return "graph_break" if eager_only else "compiled"


def _shards(vocab_parallel, divergence: Divergence, rows: int, device, width=None, weight_rows=None, **options):
    """The group's agreed layout under `vocab_parallel` (`kdops.parallel.resolve`); `options` are what every rank
    must agree on."""
    return parallel.resolve(vocab_parallel, width=width, weight_rows=weight_rows, rows=rows, device=device,
                            options=parallel.options_of(divergence, **options))


def _rows_of(weights):
    """Per-row loss weights [rows] as constants (detached), or None."""
    return None if weights is None else weights.detach().reshape(-1)


def _parts(return_parts, **unsupported) -> bool:
    """return_parts as a bool; `unsupported`: what this call asks for that reports no parts (name → bool)."""
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts: expected a bool, got {type(return_parts).__name__}")
    asked = [name for name, present in unsupported.items() if present]
    if return_parts and asked:
        raise ValueError(f"return_parts with {asked[0]}: a sparse teacher's parts are read from one pass over the "
                         "student's whole vocabulary on one rank, which this call does not make; call without "
                         "return_parts there")
    return return_parts


def _no_mix_under_vocab_parallel(mix, vocab_parallel) -> None:
    if mix is not None and vocab_parallel is not None:
        raise ValueError("vocab_parallel with teacher_mix: several teachers are not supported under vocabulary "
                         "parallelism (an Ensemble needs each teacher's normalizer over the group)")


# --- kd_loss ------------------------------------------------------------------------------------------------------

def check_kd_loss(student_logits, teacher_logits, labels, divergence, temperature, ignore_index, reduction,
                  num_items_in_batch, teacher_mix, weights=None):
    """kd_loss's argument checks (shared with `kdops.reference.kd_loss`): (divergence, the teachers as a list,
    the mix or None, the leading shape, the temperature as a float)."""
    divergence = as_divergence(divergence)
    teachers = as_teachers("teacher_logits", teacher_logits)
    mix = check_mix(teacher_mix, len(teachers), "teacher_logits")
    for i, teacher in enumerate(teachers):
        check_logits_pair(student_logits, teacher, "teacher_logits" if mix is None else f"teacher_logits[{i}]")
    leading = student_logits.shape[:-1]
    temperature = check_loss_options(labels, leading, student_logits.device, temperature, ignore_index, reduction,
                                     num_items_in_batch, weights)
    return divergence, teachers, mix, leading, temperature


def describe_kd_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl", temperature=1.0,
                     ignore_index=-100, reduction="batchmean", num_items_in_batch=None, backend="auto",
                     vocab_parallel=None, teacher_mix=None, weights=None, return_parts=False) -> Problem:
    """The Problem of `kdops.kd_loss` (same arguments)."""
    divergence, teachers, mix, leading, temperature = check_kd_loss(
        student_logits, teacher_logits, labels, divergence, temperature, ignore_index, reduction, num_items_in_batch,
        teacher_mix, weights)
    device = student_logits.device
    engine = resolve_backend(backend, device)
    mask = row_mask(labels, ignore_index, leading, device).reshape(-1)
    _no_mix_under_vocab_parallel(mix, vocab_parallel)
    shards = None if vocab_parallel is None else _shards(
        vocab_parallel, divergence, mask.numel(), device, width=student_logits.shape[-1], temperature=temperature,
        reduction=reduction, backend=engine, grads=(student_logits.requires_grad, teachers[0].requires_grad))
    options = Options(divergence, temperature, ignore_index, reduction, engine=engine,
                      vocab=student_logits.shape[-1])
    return Problem("logits" if mix is None else "mixed_logits", student_logits, tuple(teachers), labels, mask,
                   leading, options, num_items_in_batch, mix=mix, shards=shards,
                   mode=_mode(mix is not None or shards is not None or return_parts is True), device=device,
                   weights=_rows_of(weights),
                   parts=_parts(return_parts))


# --- fused_linear_kd_loss ---------------------------------------------------------------------------------------

def check_fused_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                       teacher_bias, divergence, temperature, ignore_index, reduction, num_items_in_batch, hard_weight,
                       soft_weight, impl, memory_budget, student_softcap, teacher_softcap, teacher_mix, weights=None):
    """fused_linear_kd_loss's argument checks (shared with `kdops.reference.fused_linear_kd_loss`): (divergence,
    the teachers' hidden states, weights and biases — lists with a mix —, the mix or None, the shared vocabulary,
    the leading shape, the temperature, the softcaps)."""
    divergence = as_divergence(divergence)
    teacher_hidden, teacher_weight, teacher_bias, mix = linear_teachers(teacher_hidden, teacher_weight, teacher_bias,
                                                                        teacher_mix)
    vocab = check_fused_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                               teacher_bias, hard_weight, soft_weight, impl)
    leading = student_hidden.shape[:-1]
    temperature = check_loss_options(labels, leading, student_hidden.device, temperature, ignore_index, reduction,
                                     num_items_in_batch, weights)
    check_memory_budget(memory_budget)
    softcaps = (check_softcap("student_softcap", student_softcap), check_softcap("teacher_softcap", teacher_softcap))
    return divergence, (teacher_hidden, teacher_weight, teacher_bias), mix, vocab, leading, temperature, softcaps


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of an active torch.autocast on `device_type`, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError):  # a device type without autocast
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _autocast_cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What autocast does to a lower-precision op's operand: float tensors other than float64 cast to dtype."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype in (dtype, torch.float64):
        return tensor
    return tensor.to(dtype)


def _heads(student: Head, teachers: list[Head], autocast: torch.dtype | None):
    """The heads as autocast would cast F.linear's operands (differentiably: float32 master weights get their
    gradients through the casts), or as they are outside autocast."""
    if autocast is None:
        return student, teachers
    cast = [Head(*(_autocast_cast(t, autocast) for t in head.tensors())) for head in (student, *teachers)]
    return cast[0], cast[1:]


def describe_fused_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                          divergence="forward_kl", temperature=1.0, ignore_index=-100, reduction="batchmean",
                          num_items_in_batch=None, student_bias=None, teacher_bias=None, hard_weight=0.0,
                          soft_weight=1.0, impl="auto", backend="auto", memory_budget=None, vocab_parallel=None,
                          student_softcap=None, teacher_softcap=None, teacher_mix=None, weights=None,
                          return_parts=False) -> Problem:
    """The Problem of `kdops.fused_linear_kd_loss` (same arguments)."""
    divergence, teacher, mix, vocab, leading, temperature, softcaps = check_fused_linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        divergence, temperature, ignore_index, reduction, num_items_in_batch, hard_weight, soft_weight, impl,
        memory_budget, student_softcap, teacher_softcap, teacher_mix, weights)
    device = student_hidden.device
    engine = resolve_backend(backend, device)
    hard_weight, soft_weight = float(hard_weight), float(soft_weight)
    mask = row_mask(labels, ignore_index, leading, device).reshape(-1)
    teachers = [Head(*t) for t in zip(*teacher)] if mix is not None else [Head(*teacher)]
    autocast = _autocast_dtype(device.type)
    student, teachers = _heads(Head(student_hidden, student_weight, student_bias), teachers, autocast)
    if mix is not None:
        _no_mix_under_vocab_parallel(mix, vocab_parallel)
        if impl in ("fused", "sliced", "epilogue"):
            raise ValueError(f"impl={impl!r} with teacher_mix: the {impl} path takes one teacher; several teachers "
                             "run the chunked path (impl='chunked' or 'auto')")
    options = Options(divergence, temperature, ignore_index, reduction, soft_weight, hard_weight, softcaps, engine,
                      impl, memory_budget, vocab=vocab)
    shards = None if vocab_parallel is None else _shards(
        vocab_parallel, divergence, mask.numel(), device,
        weight_rows=(student.weight.shape[0], teachers[0].weight.shape[0]),
        **{k: v for k, v in options.items() if k not in ("divergence", "tail", "vocab")},
        grads=tuple(t is not None and t.requires_grad for head in (student, *teachers) for t in head.tensors()))
    if hard_weight > 0:
        check_label_range(labels, ignore_index, vocab if shards is None else shards.vocab)
    if shards is not None:
        options = replace(options, vocab=shards.width)
    return Problem("linear" if mix is None else "mixed_linear", student, tuple(teachers), labels, mask, leading,
                   options, num_items_in_batch, mix=mix, shards=shards,
                   mode=_mode(mix is not None or shards is not None or return_parts is True),
                   autocast=autocast is not None, device=device, weights=_rows_of(weights),
                   parts=_parts(return_parts))


# --- sparse teachers ----------------------------------------------------------------------------------------------

def check_topk(student_logits, teacher_ids, teacher_logprobs, labels, divergence, temperature, tail, ignore_index,
               reduction, num_items_in_batch, weights=None):
    """topk_kd_loss's argument checks but the teacher's values (shared with `kdops.reference.topk_kd_loss`):
    (divergence, leading shape, temperature)."""
    divergence = as_divergence(divergence)
    check_tensor("student_logits", student_logits)
    if student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits: the vocabulary (last dimension) is empty, got shape "
                         f"{tuple(student_logits.shape)}")
    leading = student_logits.shape[:-1]
    temperature = check_loss_options(labels, leading, student_logits.device, temperature, ignore_index, reduction,
                                     num_items_in_batch, weights)
    check_tail(tail, divergence.canonical(), divergence.name)
    return divergence, leading, temperature


def describe_topk(student_logits, teacher_ids, teacher_logprobs, labels=None, *, divergence="forward_kl",
                  temperature=1.0, tail="bucket", ignore_index=-100, reduction="batchmean", num_items_in_batch=None,
                  backend="auto", vocab_parallel=None, weights=None, return_parts=False) -> Problem:
    """The Problem of `kdops.topk_kd_loss` (same arguments)."""
    divergence, leading, temperature = check_topk(student_logits, teacher_ids, teacher_logprobs, labels, divergence,
                                                  temperature, tail, ignore_index, reduction, num_items_in_batch,
                                                  weights)
    device, vocab = student_logits.device, student_logits.shape[-1]
    engine = resolve_backend(backend, device)
    shards = None if vocab_parallel is None else _shards(
        vocab_parallel, divergence, leading.numel(), device, width=vocab, k=tuple(teacher_ids.shape)[-1:],
        temperature=temperature, tail=tail, backend=engine, reduction=reduction)
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, vocab if shards is None else shards.vocab, tail,
                       device)
    mask = row_mask(labels, ignore_index, leading, device).reshape(-1)
    options = Options(divergence, temperature, ignore_index, reduction, engine=engine, tail=tail, vocab=vocab)
    return Problem("topk", student_logits, (), labels, mask, leading, options, num_items_in_batch,
                   topk=(teacher_ids, teacher_logprobs), shards=shards,
                   mode=_mode(shards is not None or return_parts is True), device=device,
                   weights=_rows_of(weights), parts=_parts(return_parts, vocab_parallel=shards is not None))


def check_fused_linear_topk(student_hidden, student_weight, labels, student_bias, divergence, temperature, tail,
                            ignore_index, reduction, num_items_in_batch, hard_weight, soft_weight, impl, memory_budget,
                            student_softcap, weights=None):
    """fused_linear_topk_kd_loss's argument checks but the teacher's (shared with the reference): (divergence,
    leading shape, temperature, the student's softcap)."""
    divergence = as_divergence(divergence)
    check_head("student_", student_hidden, student_weight, student_bias)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias)
    check_loss_weights(labels, hard_weight, soft_weight)
    check_choice("impl", impl, TOPK_IMPLS)
    check_memory_budget(memory_budget)
    leading = student_hidden.shape[:-1]
    temperature = check_loss_options(labels, leading, student_hidden.device, temperature, ignore_index, reduction,
                                     num_items_in_batch, weights)
    check_tail(tail, divergence.canonical(), divergence.name)
    return divergence, leading, temperature, check_softcap("student_softcap", student_softcap)


def describe_fused_linear_topk(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None, *,
                               divergence="forward_kl", temperature=1.0, tail="bucket", ignore_index=-100,
                               reduction="batchmean", num_items_in_batch=None, student_bias=None, hard_weight=0.0,
                               soft_weight=1.0, impl="auto", backend="auto", memory_budget=None, vocab_parallel=None,
                               student_softcap=None, weights=None, return_parts=False) -> Problem:
    """The Problem of `kdops.fused_linear_topk_kd_loss` (same arguments)."""
    divergence, leading, temperature, cap = check_fused_linear_topk(
        student_hidden, student_weight, labels, student_bias, divergence, temperature, tail, ignore_index, reduction,
        num_items_in_batch, hard_weight, soft_weight, impl, memory_budget, student_softcap, weights)
    device, vocab = student_hidden.device, student_weight.shape[0]
    hard_weight, soft_weight = float(hard_weight), float(soft_weight)
    shards = None if vocab_parallel is None else _shards(
        vocab_parallel, divergence, leading.numel(), device, weight_rows=(vocab,), k=tuple(teacher_ids.shape)[-1:],
        temperature=temperature, tail=tail, impl=impl, backend=backend, reduction=reduction, hard=hard_weight,
        soft=soft_weight, softcap=cap,
        grads=tuple(t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)))
    total = vocab if shards is None else shards.vocab
    check_topk_teacher(teacher_ids, teacher_logprobs, leading, total, tail, device)
    if hard_weight > 0:
        check_label_range(labels, ignore_index, total)
    if impl == "gathered" and not (tail == "renormalize" and hard_weight == 0):
        raise ValueError("impl='gathered': only tail='renormalize' without the hard-label term reads just the k "
                         f"gathered weight rows; got tail={tail!r}, hard_weight={hard_weight:g}; use impl='chunked' "
                         "or 'auto'")
    engine = resolve_backend(backend, device)
    mask = row_mask(labels, ignore_index, leading, device).reshape(-1)
    options = Options(divergence, temperature, ignore_index, reduction, soft_weight, hard_weight, (cap, None), engine,
                      impl, memory_budget, tail, vocab if shards is None else shards.width)
    return Problem("linear_topk", Head(student_hidden, student_weight, student_bias), (), labels, mask, leading,
                   options, num_items_in_batch, topk=(teacher_ids, teacher_logprobs), shards=shards,
                   mode=_mode(shards is not None or return_parts is True), device=device, weights=_rows_of(weights),
                   parts=_parts(return_parts, vocab_parallel=shards is not None,
                                **{"impl='gathered'": impl == "gathered"}))


def check_topk_logprobs(hidden, weight, k, temperature, bias, memory_budget) -> float:
    """topk_logprobs's argument checks (shared with the reference); returns the temperature as a float."""
    check_head("", hidden, weight, bias)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    temperature = check_temperature(temperature)
    check_memory_budget(memory_budget)
    vocab = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k: expected an int in [1, {vocab}] (the vocabulary of the weight), got {k!r}")
    return temperature
