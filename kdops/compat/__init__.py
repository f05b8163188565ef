"""Drop-ins for the distillation losses trainers already use, computed through kdops: same signatures,
same numbers (within the accuracy of docs/math.md), without their full-vocabulary float32 temporaries.

One module per origin: `kdops.compat.trl` (GKDTrainer.generalized_jsd_loss), `kdops.compat.torchtune`
(its KD losses), `kdops.compat.liger` (LigerFusedLinearJSDLoss); Hinton's KL pattern is here. None of
them imports the package it replaces. Losses are returned in float32 (the originals return the logits'
dtype), which is also what they compute in.
"""

from .hinton import hinton_kd_loss

__all__ = ["hinton_kd_loss"]
