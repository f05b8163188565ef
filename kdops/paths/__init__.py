"""The paths: each takes a `kdops.problem.Problem` and returns its loss. Which one runs is the Problem's `path`:

    "logits"        kd_loss on logits that exist                                  paths/logits.py
    "mixed_logits"  kd_loss against several teachers' mixed target                paths/mixed.py
    "linear"        fused_linear_kd_loss: chunked, sliced or fused                 paths/linear.py
    "mixed_linear"  fused_linear_kd_loss against several teachers                 paths/mixed.py
    "topk"          topk_kd_loss, a sparse teacher against the student's logits   paths/topk.py
    "linear_topk"   fused_linear_topk_kd_loss, from the student's lm_head         paths/topk_linear.py

A Problem in "graph_break" mode (inside torch.compile, for what runs eagerly only) runs its path outside the graph;
one whose inputs autocast cast runs it with autocast off.
"""

from __future__ import annotations

import torch

from ..problem import Problem
from . import linear, logits, mixed, topk, topk_linear

PATHS = {
    "logits": logits.loss,
    "mixed_logits": mixed.logits_loss,
    "linear": linear.loss,
    "mixed_linear": mixed.linear_loss,
    "topk": topk.loss,
    "linear_topk": topk_linear.loss,
}

# The same paths as torch.compile's graph breaks: Dynamo runs them eagerly (collectives, several teachers' chunks).
_OUTSIDE_THE_GRAPH = {name: torch.compiler.disable(path) for name, path in PATHS.items()}


def loss(problem: Problem) -> torch.Tensor:
    """The loss of `problem` by its path."""
    path = (_OUTSIDE_THE_GRAPH if problem.mode == "graph_break" else PATHS)[problem.path]
    with problem.autocast_off():
        return path(problem)
