"""The paper cost model: predicted time, HBM traffic and extra memory of every path, before any GPU runs.

    python -m bench.model [--shape TOKENSxHSxHTxVOCAB ...] [--gpu h100|h200|a100] [--divergence D ...]
                          [--dtype bf16|fp16|fp32] [--tf32] [--json] [--markdown PATH]

For each path (`PATHS`) and each kernel it launches, the model counts the matmul flops, the elementwise
flops and the HBM bytes (named: weights re-read per chunk or per row block, logits buffers written and read
per pass, gradient scratch read-modify-writes, ...), and takes a roofline per kernel:

    seconds(kernel) = max(LAUNCH_S,  mm_flops / (matmul rate · f) + elementwise flops / (fp32 rate · f),
                          bytes / HBM bandwidth)

summed over the kernels. f = min(1, programs / SMs) is the share of the GPU a launch with fewer programs
than SMs can use (it limits the compute rates, not the bandwidth). The rates are `kdops.targets`' achievable
ones. Launch configurations come from the code itself — `kdops.launchers.linear.fused_config`,
`kdops.launchers.linear.slice_columns` (G buffers under `GRADIENT_BYTES`), `kdops.launchers.logits.logits_config`,
`kdops.paths.chunked.plan`, `kdops.paths.torch_engine.chunk_rows` — so the model follows the code when they change.

Assumptions (see MODEL.md for the numbers they give):
* The fused Triton kernels as the H100 measured them (FUSED_L2_BYTES_PER_S, FUSED_FORWARD_TILE_S): their
  matmuls, elementwise work, tile loads from L2 and the forward's per-tile reductions one after the other,
  each operand read from HBM once per launch. (Until the H100 campaign the model took every tile load from
  HBM, an upper bound 1.3–2.1 × the measured times.) Elsewhere `total_l2_s` is the variant where the float32
  scratch stays in L2. cuBLAS matmuls read each operand once (their rate is cuBLAS's achievable one).
* Elementwise work of kdops' Triton kernels: LOGITS_KERNEL_FLOPS per (row, vocabulary) element of both
  models' values, per forward pass and for the gradient, calibrated on the H100 campaign and scaled by the
  kernels' SASS counts since (LOGITS_KERNEL_SASS), FUSED_TILE_FLOPS for the fused kernels (the H200's), at
  the CUDA-core fp32 rate; PyTorch's and the peers' elementwise kernels ELEMENTWISE_FLOPS per element and
  pass.
* The torch paths (kd_loss backend="torch", fused_linear_kd_loss backend="torch", the references) are counted
  by running their code on the CPU at a small probe shape under a dispatch mode that records every aten
  operator: each reads its inputs once and writes its outputs once (no fusion), elementwise operators are
  bandwidth-bound, matmuls are rooflined; the probe's dimensions are mapped to the real ones. An estimate.
* Liger's and TRL's losses are modelled from their sources (liger-kernel 0.8.5, trl 1.16.0); see
  `bench/model/peers.py` for what was read and what was assumed.
* The floor is `bench.floor.floor_work`: 2·N·V·(3·Hs + Ht) matmul flops at the input dtype's matmul rate
  (frozen teacher) for the fused API, 3·N·V·b bytes at the HBM rate for `kd_loss`.

The modules, one per path, each importing only those listed before it: `units`, `paths` (names, descriptions,
default cases), `rates` (calibrations, SASS counts), `prediction` (`Shape`, `Phase`, `Prediction`), `kernels`
(the roofline, `Ctx`); `logits` (kd_loss-triton and the kernels on logits), `probes` (the torch paths op by
op), `chunked`, `slice_backward` (fused and sliced share it), `fused`, `sliced`, `torch_backend`
(kd_loss-torch, fused-torch), `reference` (kd_loss-reference, reference), `peers` (liger-chunked,
trl-chunked), `topk`, `logprobs` (token-logprobs); `dispatch` (`predict` over the paths), `records` (the bench's
fields), `markdown` (MODEL.md), `cli` (`python -m bench.model`).

As a library: `predict(path, shape, gpu, divergence, dtype)` → `Prediction`; `predict_all(...)`;
`record_fields(case, competitor, gpu)` gives the `predicted_*` fields the bench stores beside each GPU
measurement (bench/report.py), so the first GPU run calibrates the model.
"""

from .chunked import chunked_plan
from .cli import main
from .dispatch import predict, predict_all
from .paths import PATHS
from .prediction import RECORD_FIELDS, Prediction, Shape
from .rates import LOGITS_KERNEL_SASS, TOPK_LOOP_INSTRUCTIONS
from .records import COMPETITOR_PATHS, auto_path, record_fields

__all__ = ["COMPETITOR_PATHS", "LOGITS_KERNEL_SASS", "PATHS", "RECORD_FIELDS", "TOPK_LOOP_INSTRUCTIONS", "Prediction",
           "Shape", "auto_path", "chunked_plan", "main", "predict", "predict_all", "record_fields"]
