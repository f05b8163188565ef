"""kdops: exact, memory-lean knowledge-distillation losses for LLMs (Triton kernels + PyTorch reference)."""

from . import reference
from .api import fused_linear_kd_loss, kd_loss
from .divergences import (
    DIVERGENCES,
    AlphaBeta,
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TAID,
    TVD,
    as_divergence,
)
from .modules import FusedLinearKDLoss, FusedLinearTopKKDLoss, KDLoss, TopKKDLoss
from .parallel import VocabParallel
from .taid import TAIDSchedule
from .topk import fused_linear_topk_kd_loss, topk_kd_loss, topk_logprobs

__version__ = "0.1.0"

__all__ = [
    "kd_loss", "fused_linear_kd_loss", "KDLoss", "FusedLinearKDLoss", "VocabParallel", "reference", "Divergence", "ForwardKL", "ReverseKL", "GeneralizedJSD",
    "SkewForwardKL", "SkewReverseKL", "TVD", "AlphaBeta", "DIVERGENCES", "as_divergence", "topk_kd_loss", "fused_linear_topk_kd_loss", "topk_logprobs",
    "TopKKDLoss", "FusedLinearTopKKDLoss", "TAID", "TAIDSchedule",
]
