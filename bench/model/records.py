"""The bench's records: which path each bench competitor runs (`COMPETITOR_PATHS`; "kdops" on the fused API:
`auto_path`, impl="auto" resolved) and the `predicted_*` fields stored beside each GPU measurement
(`record_fields`, bench/report.py), so that the first GPU run calibrates the model."""

from __future__ import annotations

import torch

import kdops
from kdops import targets

from ..cases import FUSED, KD_LOSS, Case
from .chunked import chunked_plan, chunked_sides
from .kernels import Ctx
from .dispatch import applies, predict
from .prediction import RECORD_FIELDS, Shape

#: Which path each bench competitor runs, per function ("kdops" on the fused API: impl="auto", resolved).
COMPETITOR_PATHS = {
    (KD_LOSS, "kdops"): "kd_loss-triton", (KD_LOSS, "kdops-torch"): "kd_loss-torch",
    (KD_LOSS, "reference"): "kd_loss-reference",
    (FUSED, "kdops-fused"): "fused", (FUSED, "kdops-chunked"): "chunked", (FUSED, "kdops-sliced"): "sliced",
    (FUSED, "kdops-torch"): "fused-torch",
    (FUSED, "reference"): "reference", (FUSED, "liger-chunked-jsd"): "liger-chunked",
    (FUSED, "trl-chunked-jsd"): "trl-chunked",
}


def auto_path(shape: Shape, dtype: torch.dtype, budget: int | None = None) -> str:
    """The path impl="auto" (backend "triton") takes, by the rule of `kdops.paths.linear.prepare`: chunked,
    unless a given `budget` is below its smallest plan (then sliced)."""
    from kdops._validation import resolve_impl

    ctx = Ctx(shape, targets.H100, kdops.as_divergence("forward_kl"), dtype, False, budget)
    fits = budget is None or chunked_plan(ctx).extra_bytes(shape.vocab, "triton", ctx.acc_dtype,
                                                           chunked_sides(ctx)) <= budget
    return resolve_impl("auto", "triton", fits)


def competitor_path(case: Case, competitor: str) -> str | None:
    """The path `competitor` runs for `case`, or None where the model has none."""
    if case.function == FUSED and competitor == "kdops":
        return auto_path(Shape(case.tokens, case.hidden_student, case.hidden_teacher, case.vocab), case.torch_dtype)
    return COMPETITOR_PATHS.get((case.function, competitor))


def record_fields(case: Case, competitor: str, gpu: targets.GPU | None) -> dict:
    """The `predicted_*` fields of a bench record (None where there is no GPU or no modelled path)."""
    fields = dict.fromkeys(RECORD_FIELDS)
    path = None if gpu is None else competitor_path(case, competitor)
    if path is None or not applies(path, case.divergence):
        return fields
    shape = Shape(case.tokens, case.hidden_student or 1, case.hidden_teacher or 1, case.vocab)
    return predict(path, shape, gpu, case.divergence, case.torch_dtype).as_record()
