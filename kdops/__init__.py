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
from .ensemble import Ensemble, LogitSum, TeacherMix
from .logprobs import token_logprobs
from .modules import FusedLinearKDLoss, FusedLinearTopKKDLoss, KDLoss, TopKKDLoss
from .parallel import VocabParallel
from .problem import LossParts
from .taid import TAIDSchedule
from .topk import fused_linear_topk_kd_loss, topk_kd_loss, topk_logprobs

__version__ = "0.7.1"

__all__ = [
    # losses and their modules
    "kd_loss", "fused_linear_kd_loss", "topk_kd_loss", "fused_linear_topk_kd_loss", "topk_logprobs",
    "KDLoss", "FusedLinearKDLoss", "TopKKDLoss", "FusedLinearTopKKDLoss",
    # divergences
    "Divergence", "ForwardKL", "ReverseKL", "GeneralizedJSD", "SkewForwardKL", "SkewReverseKL", "TVD", "AlphaBeta",
    "TAID", "DIVERGENCES", "as_divergence",
    # log-probabilities of given tokens
    "token_logprobs",
    # targets and schedules
    "TeacherMix", "Ensemble", "LogitSum", "TAIDSchedule",
    # the parts of a loss (return_parts=True)
    "LossParts",
    # distribution, reference
    "VocabParallel", "reference",
]
