"""The dispatch over paths: `predict(path, shape, gpu, divergence, dtype, ...)` counts the path's kernels
(its module's builder: (kernels, extra bytes, detail, notes)), adds autocast's casts where asked, and returns a
`Prediction` with its floor (`bench.floor.floor_work`); `predict_all` does every path of PATHS."""

from __future__ import annotations

import torch

import kdops
import kdops.paths.chunked
from kdops import targets
from kdops.divergences import Divergence

from ..cases import FUSED, FUSED_TOPK, KD_LOSS, TOPK, Case
from ..floor import floor_work
from .chunked import chunked_path
from .epilogue import epilogue_path
from .fused import fused_path
from .kernels import Ctx, Kernel, to_phases
from .logits import MIX_PASSES, kd_loss_triton
from .logprobs import token_logprobs_path
from .paths import AUTOCAST_PATHS, DEFAULT_K, KD_PATHS, LOGPROBS_PATHS, MIX_PATHS, PARTS_PATHS, PATHS, TOPK_PATHS
from .peers import jsd_beta, liger_chunked, trl_chunked
from .prediction import Prediction, Shape
from .reference import kd_loss_reference, reference_path
from .sliced import sliced_path
from .topk import kd_loss_topk, topk_chunked, topk_gathered
from .torch_backend import fused_torch, kd_loss_torch

#: Each path's builder: ctx → (kernels, extra bytes, what the extra bytes are, notes).
_BUILDERS = {"kd_loss-triton": kd_loss_triton, "kd_loss-torch": kd_loss_torch, "kd_loss-reference": kd_loss_reference,
             "fused": fused_path, "chunked": chunked_path, "epilogue": epilogue_path, "sliced": sliced_path,
             "fused-torch": fused_torch,
             "reference": reference_path, "liger-chunked": liger_chunked, "trl-chunked": trl_chunked,
             "kd_loss-topk": kd_loss_topk, "topk-chunked": topk_chunked, "topk-gathered": topk_gathered,
             "token-logprobs": token_logprobs_path}


def applies(path: str, divergence) -> bool:
    """Whether `path` computes `divergence` (Liger and TRL: the generalized JSD family only)."""
    if path in ("liger-chunked", "trl-chunked"):
        return jsd_beta(kdops.as_divergence(divergence)) is not None
    return path in _BUILDERS


def floor_seconds(path: str, shape: Shape, gpu: targets.GPU, dtype: torch.dtype) -> float:
    """`bench.floor.floor_work` of the path's function, at the dtype's matmul rate or the HBM rate."""
    # (token-logprobs: the student's lm_head alone, as the sparse teacher's fused paths)
    function = {"kd_loss-topk": TOPK, "topk-chunked": FUSED_TOPK, "topk-gathered": FUSED_TOPK,
                "token-logprobs": FUSED_TOPK}.get(
        path, KD_LOSS if path in KD_PATHS else FUSED)
    dtype_name = str(dtype).removeprefix("torch.")
    work = floor_work(Case(function, "forward_kl", shape.tokens, shape.vocab, shape.hidden_student,
                           0 if function == FUSED_TOPK else shape.hidden_teacher, dtype_name))
    return work.total / (gpu.matmul_flops(dtype) if work.unit == "flop" else gpu.hbm_bytes_per_s)


def _autocast_casts(ctx: Ctx) -> tuple[list[Kernel], int]:
    """kdops under torch.autocast with float32 master weights (`kdops.api`): both weights cast to the
    autocast dtype before the loss, and the student's weight gradient cast back to float32 by autograd
    (the hidden states come from autocast's own layers in its dtype). Returns (kernels, extra bytes)."""
    v, hs, ht, b = ctx.shape.vocab, ctx.shape.hidden_student, ctx.shape.hidden_teacher, ctx.b
    kernels = [Kernel("fwd: autocast: weights cast from float32", launches=2,
                      items=[("W_s, W_t read (float32)", v * (hs + ht) * 4 / 2),
                             ("cast copies written", v * (hs + ht) * b / 2)]),
               Kernel("bwd: autocast: dW cast to float32",
                      items=[("dW read", v * hs * b), ("dW written (float32)", v * hs * 4)])]
    return kernels, v * (hs + ht) * b + v * hs * b


def _check_options(path: str, divergence: Divergence, softcaps: int, teachers: int, mix: str | None) -> None:
    """ValueError where `path` does not compute `divergence`, has fewer sides to softcap than `softcaps`, or
    takes no such `teachers` and `mix`."""
    if not applies(path, divergence):
        raise ValueError(f"{path} has no {divergence.name}")
    most = 0 if path in KD_PATHS or path == "kd_loss-topk" else 1 if path in TOPK_PATHS + LOGPROBS_PATHS else 2
    if not (isinstance(softcaps, int) and 0 <= softcaps <= most):
        raise ValueError(f"softcaps: {path} has at most {most} softcapped side(s), got {softcaps!r}")
    if mix is not None and mix not in MIX_PASSES:
        raise ValueError(f"mix: expected one of {', '.join(MIX_PASSES)}, got {mix!r}")
    if (teachers != 1 or mix) and (path not in MIX_PATHS or not mix or teachers < 1):
        raise ValueError(f"teachers={teachers}, mix={mix!r}: several teachers are modelled on {', '.join(MIX_PATHS)} "
                         "with a mix")


def predict(path: str, shape: Shape, gpu: targets.GPU | str = targets.H100, divergence="forward_kl",
            dtype: torch.dtype = torch.bfloat16, tf32: bool = False, budget: int | None = None,
            autocast: bool = False, k: int = DEFAULT_K, softcaps: int = 0, teachers: int = 1,
            mix: str | None = None, parts: bool = False) -> Prediction:
    """The predicted phases, time, ratio to the floor and extra memory of `path` at `shape` on `gpu`; with
    `tf32`, float32 matmuls at the TF32 rate instead of exact ("ieee") float32 products; `budget`, the
    chunked paths' memory_budget (default kdops.paths.chunked.MEMORY_BUDGET); `autocast`, kdops' paths under
    torch.autocast of `dtype` with float32 master weights (the casts added); `k`, the sparse teacher's top-k
    (TOPK_PATHS: the student's side only, the floor is its matmuls or its logits' bytes); `softcaps`, how many
    sides' logits are softcapped (fused-API paths: 0, 1 or 2; top-k paths from hidden states: the student's, 0
    or 1). TAID is a `divergence` (`kdops.TAID(t)`). `teachers` > 1 with `mix` ("ensemble" or "logit_sum"):
    several teachers mixed into one target (`kdops.ensemble`), on MIX_PATHS. `parts`: the call asks for
    return_parts (PARTS_PATHS: the kernels on logits' first pass streams them, `rates.parts_kernel_flops`)."""
    if path not in _BUILDERS:
        raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS + TOPK_PATHS + LOGPROBS_PATHS)}")
    gpu = targets.by_name(gpu) if isinstance(gpu, str) else gpu
    divergence = kdops.as_divergence(divergence)
    _check_options(path, divergence, softcaps, teachers, mix)
    if parts and path not in PARTS_PATHS:
        raise ValueError(f"parts: modelled on the paths of the kernels on logits ({', '.join(PARTS_PATHS)}), "
                         f"not {path}")
    ctx = Ctx(shape, gpu, divergence, dtype, tf32, budget, k, softcaps, teachers, mix or "", parts)
    kernels, extra, detail, notes = _BUILDERS[path](ctx)
    if autocast:
        if path not in AUTOCAST_PATHS or dtype.itemsize != 2:
            raise ValueError(f"autocast: kdops' fused-API paths ({', '.join(AUTOCAST_PATHS)}) in a 16-bit dtype")
        casts, cast_bytes = _autocast_casts(ctx)
        kernels, extra = kernels + casts, extra + cast_bytes
        detail += " + the autocast copies of both weights (and of dW before its float32 cast)"
    return Prediction(path, shape, gpu.name, divergence.name, str(dtype).removeprefix("torch."), tf32,
                      to_phases(kernels, gpu, tf32), floor_seconds(path, shape, gpu, dtype), float(extra), detail,
                      tuple(notes))


def predict_all(shape: Shape, gpu: targets.GPU | str = targets.H100, divergence="forward_kl",
                dtype: torch.dtype = torch.bfloat16, tf32: bool = False, parts: bool = False) -> dict[str, Prediction]:
    """`predict` of every path that computes `divergence` (with `parts`, of PARTS_PATHS)."""
    return {path: predict(path, shape, gpu, divergence, dtype, tf32, parts=parts) for path in PATHS
            if applies(path, divergence) and (path in PARTS_PATHS or not parts)}

