"""fused_linear_kd_loss's impl="epilogue" (experimental): the chunked path (`kdops.paths.chunked`) whose logits
GEMMs keep each row's maximum and sum of exponentials in their epilogue (`kdops.launchers.epilogue`), so that
the kernels on logits read each float32 logit once less: no statistics pass.

Per chunk: the two GEMMs write the float32 logits and their per-tile statistics; the statistics, merged, give
each row's log-normalizers at T (and the student's at T = 1, for the hard-label term), which replace the kernels'
first pass over the logits:

* forward KL (`launchers.logits.one_read`: with or without the hard-label term, the student's gradient only): one
  pass of `logits_backward(..., loss=...)` writes the chunk's losses and the student's logit gradient G — each
  float32 logit is read once;
* the generalized JSD (`launchers.logits.second_pass_only`): its second pass (`logits_forward(..., stats=...)`,
  through the chunked path's `_given_statistics`) and the gradient pass — two reads instead of three, either
  model's gradient.

Both need neither lm_head to have a bias and no tile transform to apply. Every other loss runs as the chunked path
does, cuBLAS's logits included; forward KL's teacher gradient and `return_parts` take the chunked passes on the
epilogue GEMM's logits.

The GEMM is quack-kernels' CuTe DSL on CUDA compute capability 9.x and 10.x with 16-bit operands of one dtype;
other operands take cuBLAS, as the chunked path does.
"""

from __future__ import annotations

import torch

from ..launchers.epilogue import gemm_for, statistics
from ..launchers.logits import logits_backward, one_read, second_pass_only
from .chunked import ChunkedProblem


class EpilogueProblem(ChunkedProblem):
    """The inputs of one fused-linear loss, prepared for chunked passes whose GEMMs keep row statistics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gemm = gemm_for(self.device)
        self.canon = self.divergence.canonical().with_softcaps(*self.softcaps)
        self.inv_temp = 1.0 / self.temperature
        #: whether the epilogue GEMM computes both sides' logits and its statistics replace the kernels' first pass
        #: (`one_read` or `second_pass_only`); else the chunked path runs as it is, cuBLAS's logits included: no
        #: statistics are kept that nothing reads
        self.given_statistics = (self.engine == "triton" and self.shards is None
                                 and (one_read(self.canon) or second_pass_only(self.canon))
                                 and self.canon.transform == 0
                                 and all(side.bias is None and self.gemm.accepts(side.hidden, side.weight)
                                         for side in self.sides))
        self._partials = None

    @property
    def hard_term(self) -> bool:
        return self.hard > 0 and self.labels is not None

    def _logits(self, r0: int, r1: int, buffers):
        if not self.given_statistics:
            return super()._logits(r0, r1, buffers)
        logits = tuple(buf[: r1 - r0] for buf in buffers)
        ce = self.hard_term and self.inv_temp != 1.0
        self._partials = [self.gemm(side.rows(r0, r1), side.weight, z, self.inv_temp, ce)
                          for side, z in zip(self.sides, logits)]
        return logits

    def _statistics(self):
        """The chunk's statistics from its GEMMs' tile sinks (`launchers.epilogue.statistics`)."""
        return statistics(*self._partials, self.canon.student_is_p, self.hard_term)

    def _given_statistics(self, parts):
        """The JSD's first pass (`second_pass_only`): the epilogue's statistics, but for `return_parts`, whose
        entropies the first pass streams."""
        if self.given_statistics and parts is None and second_pass_only(self.canon):
            return self._statistics()
        return None

    def _loss_and_logit_grads(self, zs, zt, labels, scale, out_s, out_t, parts=None):
        """Forward KL's one read (`one_read`: the student's gradient only, no `return_parts`); every other loss as
        the chunked path runs it, with `_given_statistics`."""
        if not (self.given_statistics and parts is None and one_read(self.canon, out_t is not None)):
            return super()._loss_and_logit_grads(zs, zt, labels, scale, out_s, out_t, parts)
        loss = torch.empty(zs.shape[0], dtype=self.acc_dtype, device=zs.device)
        scale = torch.zeros_like(loss) if scale is None else scale
        logits_backward(zs, zt, labels, self._statistics(), scale, self.canon, self.inv_temp, out_s is not None,
                        False, self.soft, self.hard, out_s=out_s, loss=loss)
        return loss, out_s, None
