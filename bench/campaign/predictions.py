"""The cost model's view of the headline (`bench.model`): which GPU it predicts for, its prediction of a path at
the headline shape, and the dry run's table of the headline competitors it knows. The model is another module's
work: where it fails, these degrade to a line saying why."""

from __future__ import annotations

import torch

from .headline import DIVERGENCES, HEADLINE_COMPETITORS, headline_case
from .markdown import error_text, table_lines

MiB = 2**20
PREDICTION_HEADER = ["competitor", "divergence", "forward ms", "backward ms", "total ms", "floor ms", "× floor",
                     "extra MiB"]


def model_gpu(device: str = "cuda"):
    """The GPU the cost model predicts for: this one, or an H100 where there is none."""
    from kdops import targets

    live = targets.of_device(torch.device(device)) if torch.cuda.is_available() else None
    return live or targets.H100


def predict_headline(impl: str, divergence: str, gpu):
    """bench.model's prediction of a path ("fused", "chunked", ...) at the headline shape; ImportError where
    bench.model is unavailable."""
    from bench.model import Shape, predict

    case = headline_case(divergence)
    return predict(impl, Shape(case.tokens, case.hidden_student, case.hidden_teacher, case.vocab), gpu=gpu,
                   divergence=divergence, dtype=torch.bfloat16)


def modelled_competitors() -> list[tuple[str, str]]:
    """(competitor, the cost model's path) of the headline competitors the model knows: kdops' impls, then
    the others the model has a path for (`bench.model.COMPETITOR_PATHS`)."""
    import bench.model as model
    from bench.cases import FUSED

    paths = dict(getattr(model, "COMPETITOR_PATHS", {}))
    known = [(name, paths[(FUSED, name)]) for name in HEADLINE_COMPETITORS if (FUSED, name) in paths]
    kdops = [(name, path) for name, path in (("kdops-fused", "fused"), ("kdops-chunked", "chunked"),
                                             ("kdops-sliced", "sliced"))]
    return kdops + [(name, path) for name, path in known if name not in dict(kdops)]


def prediction_cells(path: str, divergence: str, gpu) -> list:
    """A competitor's predicted forward, backward, total and floor ms, ratio to the floor and extra MiB, or why
    there are none."""
    try:
        p = predict_headline(path, divergence, gpu)
        return [p.forward_s * 1e3, p.backward_s * 1e3, p.total_s * 1e3, p.floor_s * 1e3, p.ratio_to_floor,
                p.extra_bytes / MiB]
    except Exception as error:  # noqa: BLE001
        return [f"unavailable: {error_text(error)}"] + [None] * 5


def prediction_lines(gpu) -> list[str]:
    """A markdown table of the predicted headline times, or why there is none."""
    try:
        competitors = modelled_competitors()
    except Exception as error:  # noqa: BLE001 - written concurrently; degrade, never fail
        return [f"cost model unavailable ({error_text(error)})"]
    case = headline_case(DIVERGENCES[0])
    rows = [[name, divergence, *prediction_cells(path, divergence, gpu)]
            for divergence in DIVERGENCES for name, path in competitors]
    return [f"Cost model (`bench.model`) for {getattr(gpu, 'name', gpu)}, {case.tokens} tokens × Hs "
            f"{case.hidden_student} × Ht {case.hidden_teacher} × V {case.vocab}, bf16 (the headline cases):", "",
            *table_lines(PREDICTION_HEADER, rows)]
