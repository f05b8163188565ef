"""torch.compile support: the two losses as custom ops (torch.library), opaque to Dynamo, so that a
training step calling them compiles with fullgraph=True.

Under compilation the public functions validate as usual (data-dependent checks are skipped: they would
need the tensors' values) and, for backend="triton", call these ops for the per-row losses; the
reduction stays in the graph. backend="torch" is plain PyTorch and is traced instead (chunks under
activation checkpointing, `_torch_backend.checkpointed_rows`). An op's backward calls the kernels'
explicit backward after recomputing the per-row statistics (one more forward pass of the loss than in
eager mode, where they are saved). Divergences travel as their repr, e.g. "GeneralizedJSD(beta=0.3)".
"""

from __future__ import annotations

import ast
import re

import torch

from . import _launch
from . import divergences as _divergences
from .reference import compute_dtype

_REPR = re.compile(r"^(\w+)\((.*)\)$")


def divergence_repr(divergence: _divergences.Divergence) -> str:
    """repr(divergence), written out so that Dynamo can trace it (a dataclass's own repr it cannot)."""
    params = ", ".join(f"{name}={float(getattr(divergence, name))!r}" for name in type(divergence).__dataclass_fields__)
    return f"{type(divergence).__name__}({params})"


def divergence_from_repr(text: str) -> _divergences.Divergence:
    """The inverse of repr() of a kdops divergence."""
    name, args = _REPR.match(text).groups()
    kwargs = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, value = part.split("=", 1)
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    cls = getattr(_divergences, name)
    if not (isinstance(cls, type) and issubclass(cls, _divergences.Divergence)):
        raise ValueError(f"not a kdops divergence: {text!r}")
    return cls(**kwargs)


def _or_empty(grad, like):
    """Custom ops return tensors only: an absent gradient travels as an empty tensor."""
    return like.new_empty(0) if grad is None else grad


# --- kd_loss (backend="triton"; the torch backend is traced by Dynamo, see _torch_backend) ----------------

@torch.library.custom_op("kdops::kd_loss_rows", mutates_args=())
def kd_loss_rows(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, divergence: str,
                 temperature: float) -> torch.Tensor:
    canon = divergence_from_repr(divergence).canonical()
    loss, _ = _launch.logits_forward(student, teacher, None, canon, 1.0 / temperature)
    return torch.where(mask.reshape(-1), loss, 0.0)


@kd_loss_rows.register_fake
def _(student, teacher, mask, divergence, temperature):
    return student.new_empty((mask.numel(),), dtype=compute_dtype(student, teacher))


@torch.library.custom_op("kdops::kd_loss_rows_backward", mutates_args=())
def kd_loss_rows_backward(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                          mask: torch.Tensor, divergence: str, temperature: float, need_student: bool,
                          need_teacher: bool) -> list[torch.Tensor]:
    canon, inv_temp = divergence_from_repr(divergence).canonical(), 1.0 / temperature
    _, stats = _launch.logits_forward(student, teacher, None, canon, inv_temp)
    row_scale = torch.where(mask.reshape(-1), grad_rows, 0.0)
    g_s, g_t = _launch.logits_backward(student, teacher, None, stats, row_scale, canon, inv_temp, need_student,
                                       need_teacher)
    return [_or_empty(g_s, student), _or_empty(g_t, teacher)]


@kd_loss_rows_backward.register_fake
def _(grad_rows, student, teacher, mask, divergence, temperature, need_student, need_teacher):
    return [torch.empty(student.shape, dtype=student.dtype, device=student.device) if need_student
            else student.new_empty(0),
            torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) if need_teacher
            else teacher.new_empty(0)]


def _kd_setup(ctx, inputs, output):
    student, teacher, mask, *options = inputs
    ctx.save_for_backward(student, teacher, mask)
    ctx.options = options


def _kd_backward(ctx, grad_rows):
    student, teacher, mask = ctx.saved_tensors
    need = ctx.needs_input_grad[:2]
    g_s, g_t = kd_loss_rows_backward(grad_rows, student, teacher, mask, *ctx.options, need[0], need[1])
    return (g_s if need[0] else None), (g_t if need[1] else None), None, None, None


kd_loss_rows.register_autograd(_kd_backward, setup_context=_kd_setup)


# --- fused_linear_kd_loss (backend="triton": impl "fused" and "chunked") -----------------------------------

def _problem(hs, ws, bs, ht, wt, bt, labels, options: str):
    from .api import _fused_problem

    return _fused_problem(hs, ws, bs, ht, wt, bt, labels, **_options(options))


@torch.library.custom_op("kdops::fused_linear_kd_rows", mutates_args=())
def fused_linear_kd_rows(hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None, ht: torch.Tensor,
                         wt: torch.Tensor, bt: torch.Tensor | None, labels: torch.Tensor | None, mask: torch.Tensor,
                         options: str) -> torch.Tensor:
    rows, _ = _problem(hs, ws, bs, ht, wt, bt, labels, options).forward()
    return torch.where(mask, rows, 0.0)


@fused_linear_kd_rows.register_fake
def _(hs, ws, bs, ht, wt, bt, labels, mask, options):
    return hs.new_empty(mask.shape, dtype=compute_dtype(hs, ws, ht, wt))


@torch.library.custom_op("kdops::fused_linear_kd_rows_backward", mutates_args=())
def fused_linear_kd_rows_backward(grad_rows: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor,
                                  bs: torch.Tensor | None, ht: torch.Tensor, wt: torch.Tensor,
                                  bt: torch.Tensor | None, labels: torch.Tensor | None, mask: torch.Tensor,
                                  options: str, needs: list[bool]) -> list[torch.Tensor]:
    problem = _problem(hs, ws, bs, ht, wt, bt, labels, options)
    saved = problem.forward()[1] if not problem.eager else []  # the chunked pass needs no statistics
    grads = problem.backward(saved, torch.where(mask, grad_rows, 0.0), tuple(needs))
    return [hs.new_empty(0) if g is None else g.view(x.shape) for g, x in zip(grads, (hs, ws, bs, ht, wt, bt))]


@fused_linear_kd_rows_backward.register_fake
def _(grad_rows, hs, ws, bs, ht, wt, bt, labels, mask, options, needs):
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) if x is not None and need else hs.new_empty(0)
            for x, need in zip((hs, ws, bs, ht, wt, bt), needs)]


def _fused_setup(ctx, inputs, output):
    *tensors, options = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = options


def _fused_backward(ctx, grad_rows):
    tensors = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = fused_linear_kd_rows_backward(grad_rows, *tensors, ctx.options, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None)


fused_linear_kd_rows.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_options(options: dict) -> str:
    """The non-tensor options of the fused loss as one op argument: a dict literal, written out so that
    Dynamo can trace it."""
    items = [f"{key!r}: {(divergence_repr(value) if key == 'divergence' else value)!r}" for key, value in
             options.items()]
    return "{" + ", ".join(items) + "}"


def _options(text: str) -> dict:
    options = ast.literal_eval(text)
    options["divergence"] = divergence_from_repr(options["divergence"])
    return options
