"""The paper cost model (bench/model/): floors, counts checkable by hand, configurations taken from the code,
the CLI, the bench records' predicted fields, and bench/results/MODEL.md being current."""

import json
import math
from pathlib import Path

import pytest
import torch

from bench import model, report
from bench.cases import FUSED, KD_LOSS, Case
from bench.model import PATHS, Shape, predict, predict_all
from bench.model.kernels import Ctx
from bench.model.peers import liger_chunks
import kdops
import kdops.launchers.common
import kdops.launchers.linear
import kdops.launchers.matmul
import kdops.paths.chunked
import kdops.paths.sliced
from kdops import targets

H100 = targets.H100
SMALL = Shape(tokens=1000, hidden_student=64, hidden_teacher=96, vocab=5000)
HEADLINE = Shape(tokens=8192, hidden_student=4096, hidden_teacher=4096, vocab=128256)
MODEL_MD = Path(__file__).resolve().parent.parent / "bench" / "results" / "MODEL.md"


def _item(prediction, phase_prefix: str, label: str) -> float:
    """Bytes named `label` summed over the phases whose name starts with `phase_prefix`."""
    return sum(b for p in prediction.phases if p.name.startswith(phase_prefix) for name, b in p.items if name == label)


def test_shape_parses_and_prints():
    shape = Shape.parse("8192x4096x4096x128256")
    assert shape == HEADLINE and str(shape) == "8192x4096x4096x128256"
    with pytest.raises(ValueError, match="TOKENSxHSxHTxVOCAB"):
        Shape.parse("8192x128256")


@pytest.mark.parametrize("gpu", [targets.H100, targets.A100])
def test_floor_is_the_matmul_flops_at_the_16bit_rate(gpu):
    n, hs, ht, v = HEADLINE.tokens, HEADLINE.hidden_student, HEADLINE.hidden_teacher, HEADLINE.vocab
    for path in ("fused", "chunked", "reference", "liger-chunked", "trl-chunked"):
        p = predict(path, HEADLINE, gpu, "forward_kl", torch.bfloat16)
        assert p.floor_s == pytest.approx(2 * n * v * (3 * hs + ht) / gpu.matmul_flops_16bit, rel=1e-12)
        assert p.ratio_to_floor == pytest.approx(p.total_s / p.floor_s)
        assert p.total_s == pytest.approx(p.forward_s + p.backward_s) and p.total_s > p.floor_s
    kd = predict("kd_loss-triton", HEADLINE, gpu, "forward_kl", torch.bfloat16)
    assert kd.floor_s == pytest.approx(3 * n * v * 2 / gpu.hbm_bytes_per_s)


def test_kd_loss_triton_reads_both_logits_per_pass_and_writes_the_gradient():
    n, v = SMALL.tokens, SMALL.vocab
    kl = predict("kd_loss-triton", SMALL, H100, "forward_kl", torch.bfloat16)
    jsd = predict("kd_loss-triton", SMALL, H100, "generalized_jsd", torch.bfloat16)
    assert _item(kl, "fwd", "both logits read") == 2 * n * v * 2
    assert _item(jsd, "fwd", "both logits read") == 2 * 2 * n * v * 2  # two passes
    assert _item(kl, "bwd", "both logits read") == 2 * n * v * 2
    assert _item(kl, "bwd", "student gradient written") == n * v * 2
    assert kl.extra_bytes == 53 * n  # 11 statistics + 2 losses in float32, and the mask


def _plan_budget(chunk: int, group: int, accumulate: bool) -> int:
    """A memory_budget whose plan at SMALL (bf16, student gradients) has `chunk`-row chunks in `group`-row
    groups: kdops.paths.chunked.plan's arithmetic run backwards."""
    v = SMALL.vocab
    logits_row, store_row = 2 * 4 * v, 2 * v
    if not accumulate:  # one group: every row's G, the chunk's logits and the off-CUDA dW slice
        return SMALL.tokens * store_row + chunk * logits_row + kdops.launchers.matmul.DW_SLICE_BYTES
    room = 2 * chunk * logits_row  # half for the chunk's logits, the other half for the group's G
    assert room - chunk * logits_row >= group * store_row
    return room + v * SMALL.hidden_student * 4  # + dW's float32 accumulator


@pytest.mark.parametrize("chunk, group, accumulate", [(256, 1000, False), (48, 192, True)])
def test_chunked_counts_follow_the_plan(monkeypatch, chunk, group, accumulate):
    n, hs, ht, v = SMALL.tokens, SMALL.hidden_student, SMALL.hidden_teacher, SMALL.vocab
    monkeypatch.setattr(kdops.paths.chunked, "MEMORY_BUDGET", _plan_budget(chunk, group, accumulate))
    plan = model.chunked_plan(Ctx(SMALL, H100, kdops.as_divergence("forward_kl"), torch.bfloat16, False))
    assert (plan.chunk, plan.accumulate) == (chunk, accumulate) and plan.group >= group
    chunks, groups = sum(math.ceil(min(plan.group, n - g) / chunk) for g in range(0, n, plan.group)), \
        math.ceil(n / plan.group)
    p = predict("chunked", SMALL, H100, "forward_kl", torch.bfloat16)
    assert _item(p, "fwd: logits matmuls", "W_s re-read per chunk") == chunks * v * hs * 2
    assert _item(p, "fwd: logits matmuls", "W_t re-read per chunk") == chunks * v * ht * 2
    assert _item(p, "fwd: dH matmul", "W_s re-read per group") == groups * v * hs * 2
    assert _item(p, "fwd: kernels on logits", "both logits buffers read") == 2 * n * v * 4
    assert _item(p, "fwd: kernel on logits (G", "G_s written (weight dtype)") == n * v * 2
    if accumulate:  # dW summed over the groups in a float32 accumulator, rounded to bf16 once at the end
        assert _item(p, "fwd: dW matmul", "dW (float32) read-modify-write per group") == groups * 2 * v * hs * 4
        assert _item(p, "fwd: cast dW to the weight dtype", "dW written") == v * hs * 2
    else:  # one group: dW is one product, rounded once
        assert _item(p, "fwd: dW matmul", "dW written") == v * hs * 2
        assert not any(ph.name.startswith("fwd: cast dW") for ph in p.phases)
    assert sum(ph.flops for ph in p.phases) == 2 * n * v * (3 * hs + ht)  # cuBLAS: exactly the floor's flops
    # batchmean under loss.backward(): the gradients are computed in the forward, the backward has no work.
    assert [ph.name for ph in p.phases if not ph.forward] == []


@pytest.mark.parametrize("budget", [None, 60_000])  # one group; 5-row chunks in 20-row groups
def test_chunked_model_matches_an_independent_count(budget):
    """The model's matmul flops, weight re-reads and kernel launches of impl="chunked" against what the code
    does at a small shape: every aten matmul it calls (2·m·n·k flops each; a weight operand counted as a
    re-read) and every Triton launch on logits (rows × vocabulary of each), recorded while it runs."""


    n, hs, ht, v = 200, 24, 40, 333
    shape = Shape(n, hs, ht, v)
    g = torch.Generator().manual_seed(0)
    ws, wt = torch.randn(v, hs, generator=g), torch.randn(v, ht, generator=g)
    x = dict(student_hidden=torch.randn(n, hs, generator=g).bfloat16().requires_grad_(),
             student_weight=ws.bfloat16().requires_grad_(), teacher_hidden=torch.randn(n, ht, generator=g).bfloat16(),
             teacher_weight=wt.bfloat16())
    weights = {x["student_weight"].data_ptr(): "W_s", x["teacher_weight"].data_ptr(): "W_t"}
    matmuls = {"flops": 0, "W_s": 0, "W_t": 0}

    launches = []

    def recorder(kernel, grid, args, kwargs):
        launches.append((kernel.__name__, args[0].shape[0]))

    # off CUDA the bf16 weights are upcast once, so the upcast copies are what the matmuls read: map them too
    real_to = torch.Tensor.to

    def to(tensor, *a, **k):
        out = real_to(tensor, *a, **k)
        if tensor.data_ptr() in weights and out.data_ptr() != tensor.data_ptr():
            weights[out.untyped_storage().data_ptr()] = weights[tensor.data_ptr()]
        return out

    with pytest.MonkeyPatch.context() as patch, kdops.launchers.common.recording(recorder), _count_matmuls(weights,
                                                                                                           matmuls):
        patch.setattr(torch.Tensor, "to", to)
        kdops.fused_linear_kd_loss(**x, impl="chunked", backend="triton", memory_budget=budget).backward()

    ctx = Ctx(shape, H100, kdops.as_divergence("forward_kl"), torch.bfloat16, False, budget)
    plan = model.chunked_plan(ctx)
    p = predict("chunked", shape, H100, "forward_kl", torch.bfloat16, budget=budget)
    assert matmuls["flops"] == sum(ph.flops for ph in p.phases)
    chunks, groups = math.ceil(n / plan.chunk), math.ceil(n / plan.group)
    assert _item(p, "fwd: logits matmuls", "W_s re-read per chunk") == chunks * v * hs * 2
    assert _item(p, "fwd: logits matmuls", "W_t re-read per chunk") == matmuls["W_t"] * v * ht * 2
    # the student's weight: one logits product per chunk and one dH product per group
    assert matmuls["W_s"] * v * hs * 2 == _item(p, "fwd: logits matmuls", "W_s re-read per chunk") + \
        _item(p, "fwd: dH matmul", "W_s re-read per group")
    forward_rows = sum(rows for name, rows in launches if name == "kd_logits_forward_kernel")
    grad_rows = sum(rows for name, rows in launches if name == "kd_logits_backward_kernel")
    assert forward_rows == grad_rows == n
    assert _item(p, "fwd: kernels on logits", "both logits buffers read") == forward_rows * 2 * v * 4
    assert sum(ph.launches for ph in p.phases if ph.name.startswith("fwd: kernels on logits")) == \
        len([1 for name, _ in launches if name == "kd_logits_forward_kernel"])
    assert (budget is None) == (groups == 1)


def _bf16_inputs(shape: Shape) -> dict:
    """bf16 inputs of `shape`: the student's hidden states and weight require grad, the teacher is frozen."""
    g = torch.Generator().manual_seed(0)
    n, hs, ht, v = shape.tokens, shape.hidden_student, shape.hidden_teacher, shape.vocab
    return dict(student_hidden=torch.randn(n, hs, generator=g).bfloat16().requires_grad_(),
                student_weight=torch.randn(v, hs, generator=g).bfloat16().requires_grad_(),
                teacher_hidden=torch.randn(n, ht, generator=g).bfloat16(),
                teacher_weight=torch.randn(v, ht, generator=g).bfloat16())


def _count_matmuls(weights: dict, matmuls: dict):
    """A dispatch mode adding 2·m·n·k flops per aten matmul to matmuls["flops"] (and one re-read to
    matmuls[name] for each operand whose storage `weights` names)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                a, b = args[:2] if func.overloadpacket is torch.ops.aten.mm else (args[1], args[2])
                matmuls["flops"] += 2 * a.shape[0] * a.shape[1] * b.shape[1]
                for operand in (a, b):
                    name = weights.get(operand.untyped_storage().data_ptr())
                    if name:
                        matmuls[name] += 1
            return out

    return Matmuls()


@pytest.mark.parametrize("budget", [None, 2**17])  # one backward slice; slices of 384 columns
def test_fused_model_matches_an_independent_count(budget, monkeypatch):
    """The model's flops and tile loads of impl="fused" against what the code launches at a small shape with
    the H100's configurations (`kdops.targets.assume`): every Triton launch recorded (its grid and tiles: each
    program of the forward walks its split's vocabulary tiles, each of the gradient kernel one tile, loading
    its hidden rows and weight columns of both models), and every aten matmul of the backward counted."""


    n, hs, ht, v = 300, 64, 96, 1000
    if budget:
        monkeypatch.setattr(kdops.launchers.linear, "GRADIENT_BYTES", budget)
    shape = Shape(n, hs, ht, v)
    x = _bf16_inputs(shape)
    matmuls = {"flops": 0}
    counted = {"tile_flops": 0, "h loads": 0, "w loads": 0, "launches": {}, "G written": 0}

    def recorder(kernel, grid, args, kwargs):
        name = kernel.__name__
        counted["launches"][name] = counted["launches"].get(name, 0) + 1
        if name not in ("fused_forward_kernel", "fused_gradient_kernel"):
            return
        bn, bv, bh = kwargs["BLOCK_N"], kwargs["BLOCK_V"], kwargs["BLOCK_H"]
        if name == "fused_forward_kernel":
            rows, vocab, split, splits = args[10], args[11], args[14], args[15]
            per_row_block = sum(math.ceil((min(vocab, lo + split) - lo) / bv) for lo in range(0, vocab, split))
            visits = math.ceil(rows / bn) * per_row_block
            assert grid == (splits, math.ceil(rows / bn))
        else:
            rows, start, end = args[11], args[12], args[13]
            visits = grid[0]
            assert visits == math.ceil(rows / bn) * math.ceil((end - start) / bv)
            counted["G written"] += rows * (end - start) * 2
        counted["tile_flops"] += visits * 2 * bn * bv * (math.ceil(hs / bh) + math.ceil(ht / bh)) * bh
        counted["h loads"] += visits * bn * (hs + ht) * 2
        counted["w loads"] += visits * bv * (hs + ht) * 2

    with targets.assume("h100"), kdops.launchers.common.recording(recorder), _count_matmuls({}, matmuls):
        kdops.fused_linear_kd_loss(**x, impl="fused", backend="triton").backward()

    p = predict("fused", shape, H100, "forward_kl", torch.bfloat16)
    assert sum(ph.flops for ph in p.phases) == counted["tile_flops"] + matmuls["flops"]
    assert matmuls["flops"] == 2 * (2 * n * v * hs)  # dW and dH, over all the slices
    assert _item(p, "fwd: fused forward", "h_s, h_t re-read per vocabulary tile") + \
        _item(p, "bwd: fused gradient", "h_s, h_t re-read per tile") == counted["h loads"]
    assert _item(p, "fwd: fused forward", "W_s, W_t re-read per row block") + \
        _item(p, "bwd: fused gradient", "W_s, W_t re-read per tile") == counted["w loads"]
    assert _item(p, "bwd: fused gradient", "G written") == counted["G written"] == n * v * 2
    slices = counted["launches"]["fused_gradient_kernel"]
    assert slices == sum(ph.launches for ph in p.phases if ph.name.startswith("bwd: fused gradient"))
    assert (slices == 1) == (budget is None)


@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
@pytest.mark.parametrize("budget", [None, 200_000])  # one slice of every row; slices of 128 columns
def test_sliced_model_matches_an_independent_count(budget, divergence, monkeypatch):
    """The model's matmul flops and kernels on logits of impl="sliced" against what the code does at a small
    shape: every aten matmul (2·m·n·k flops each), and every Triton launch on logits (its rows × the columns
    of its slice), recorded while it runs; the forward in row chunks (FORWARD_ROWS), two passes for JSD."""


    monkeypatch.setattr(kdops.paths.sliced, "FORWARD_ROWS", 128)
    n, hs, ht, v = 300, 24, 40, 1000
    shape = Shape(n, hs, ht, v)
    x = _bf16_inputs(shape)
    matmuls = {"flops": 0}
    launches = []

    def recorder(kernel, grid, args, kwargs):
        if kernel.__name__.startswith("kd_logits"):
            launches.append((kernel.__name__, args[0].shape[0] * args[0].shape[1]))

    with kdops.launchers.common.recording(recorder), _count_matmuls({}, matmuls):
        kdops.fused_linear_kd_loss(**x, divergence=divergence, impl="sliced", backend="triton",
                                   memory_budget=budget).backward()

    p = predict("sliced", shape, H100, divergence, torch.bfloat16, budget=budget)
    assert matmuls["flops"] == sum(ph.flops for ph in p.phases)
    per_element = 2 * 4  # both float32 logits read per element
    forward = sum(cells for name, cells in launches if name == "kd_logits_forward_kernel")
    backward = sum(cells for name, cells in launches if name == "kd_logits_backward_kernel")
    passes = 2 if divergence == "generalized_jsd" else 1
    assert forward == passes * n * v and backward == n * v
    assert _item(p, "fwd: kernels on logits", "both logits buffers read") == forward * per_element
    assert _item(p, "bwd: kernel on logits", "both logits buffers read") == backward * per_element
    assert sum(ph.launches for ph in p.phases if ph.name.startswith("fwd: kernels on logits")) == \
        len([1 for name, _ in launches if name == "kd_logits_forward_kernel"])
    assert sum(ph.launches for ph in p.phases if ph.name.startswith("bwd: kernel on logits")) == \
        len([1 for name, _ in launches if name == "kd_logits_backward_kernel"])


def test_torch_paths_memory_matches_the_measured_figures():
    # bench/results/MEMORY.md (8192 × 128256 bf16): the reference needs 6.75 / 12.25 float32 [N, V] matrices,
    # the torch backend 113.55 / 199.66 MiB.
    shape = Shape(8192, 1, 1, 128256)
    for divergence, matrices, torch_mib in (("forward_kl", 6.75, 113.55), ("generalized_jsd", 12.25, 199.66)):
        reference = predict("kd_loss-reference", shape, H100, divergence, torch.bfloat16)
        assert reference.extra_bytes == pytest.approx(matrices * 8192 * 128256 * 4, rel=1e-3)
        chunked = predict("kd_loss-torch", shape, H100, divergence, torch.bfloat16)
        assert chunked.extra_bytes / 2**20 == pytest.approx(torch_mib, abs=0.01)


def test_tf32_speeds_up_float32_matmuls_only():
    ieee = predict("chunked", HEADLINE, H100, "forward_kl", torch.float32)
    tf32 = predict("chunked", HEADLINE, H100, "forward_kl", torch.float32, tf32=True)
    assert tf32.total_s < ieee.total_s / 2
    assert ieee.floor_s == tf32.floor_s == pytest.approx(2 * 8192 * 128256 * 16384 / H100.fp32_flops)
    bf16 = predict("chunked", HEADLINE, H100, "forward_kl", torch.bfloat16)
    assert predict("chunked", HEADLINE, H100, "forward_kl", torch.bfloat16, tf32=True).total_s == bf16.total_s


@pytest.mark.parametrize("path", ["kd_loss-triton", "chunked", "sliced"])
def test_parts_add_work_to_the_first_pass_and_no_reads(path):
    """return_parts: the first forward pass of the kernels on logits does PARTS_SASS more instructions per element;
    the bytes grow only by the parts written, a few floats a row (no pass of their own); paths without them raise."""
    for divergence in ("forward_kl", "generalized_jsd"):
        plain = predict(path, HEADLINE, H100, divergence, torch.bfloat16)
        parts = predict(path, HEADLINE, H100, divergence, torch.bfloat16, parts=True)
        assert 0 < parts.hbm_bytes - plain.hbm_bytes < 1e-3 * plain.hbm_bytes
        assert plain.total_s < parts.total_s < 1.25 * plain.total_s
    with pytest.raises(ValueError, match="parts"):
        predict("fused", HEADLINE, H100, parts=True)


def test_predict_all_and_records():
    preds = predict_all(SMALL, "h100", "forward_kl", torch.bfloat16)
    assert tuple(preds) == PATHS
    assert "liger-chunked" not in predict_all(SMALL, H100, "tvd", torch.bfloat16)
    record = preds["fused"].as_record()
    assert tuple(record) == model.RECORD_FIELDS == report.PREDICTED_FIELDS
    assert json.loads(json.dumps(record)) == record
    assert record["predicted_total_ms"] == pytest.approx(record["predicted_forward_ms"]
                                                         + record["predicted_backward_ms"])
    with pytest.raises(ValueError, match="unknown path"):
        predict("nobody", SMALL)


def test_bench_records_carry_predictions_for_modelled_competitors():
    fused_case = Case(FUSED, "forward_kl", 8192, 128256, 4096, 4096, "bfloat16")
    kdops_fields = model.record_fields(fused_case, "kdops", H100)
    assert kdops_fields["predicted_path"] == "chunked"  # impl="auto": 160-row chunks fit
    assert model.record_fields(fused_case, "kdops-fused", H100)["predicted_path"] == "fused"
    assert model.record_fields(fused_case, "liger-chunked-jsd", H100)["predicted_path"] == "liger-chunked"
    assert model.record_fields(fused_case, "floor", H100) == dict.fromkeys(model.RECORD_FIELDS)
    assert model.record_fields(fused_case, "kdops", None) == dict.fromkeys(model.RECORD_FIELDS)
    kd_case = Case(KD_LOSS, "generalized_jsd", 512, 32000, dtype="bfloat16")
    assert model.record_fields(kd_case, "kdops", H100)["predicted_path"] == "kd_loss-triton"
    assert model.record_fields(Case(FUSED, "tvd", 64, 1000, 8, 8), "liger-chunked-jsd", H100)["predicted_path"] is None
    # Off CUDA the report leaves them None (tests/test_bench.py checks every record has the fields).
    records = report.case_records(kd_case, [report.Result("kdops", median_ms={}, iqr_ms={})], {"device_type": "cpu"})
    assert all(records[0][f] is None for f in report.PREDICTED_FIELDS)


def test_auto_path_follows_the_memory_budget():
    """chunked under the default budget (a target), and under a given one its smallest plan fits; fused
    under a given budget below it."""
    assert model.auto_path(HEADLINE, torch.bfloat16) == "chunked"
    assert model.auto_path(HEADLINE, torch.bfloat16, budget=4 * 2**30) == "chunked"
    assert model.auto_path(HEADLINE, torch.bfloat16, budget=2**30) == "sliced"


def test_liger_chunks_follow_torch_chunk():
    assert liger_chunks(8192) == [(1024, 8)]
    assert liger_chunks(1000) == [(1000, 1)]
    assert liger_chunks(2500) == [(1250, 2)]


def test_cli_json(capsys):
    assert model.main(["--json", "--shape", str(SMALL), "--divergence", "forward_kl", "generalized_jsd",
                       "--gpu", "a100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["path"], r["divergence"]) for r in out} >= {("fused", "forward_kl"), ("trl-chunked", "generalized_jsd")}
    assert all(r["gpu"] == "a100" and r["predicted_total_ms"] > 0 and r["phases"] for r in out)
    assert model.main(["--shape", str(SMALL), "--path", "chunked"]) == 0
    assert "chunked" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        model.main(["--divergence", "not_a_divergence"])


def test_model_md_is_current(tmp_path, monkeypatch):
    monkeypatch.setattr(kdops.paths.chunked, "MIN_CHUNK_ROWS", 256)  # the library's floor (tests/conftest.py lowers it)
    assert model.main(["--markdown", str(tmp_path / "MODEL.md")]) == 0
    generated = (tmp_path / "MODEL.md").read_text()
    assert "## Headline: 8192 tokens × 128256 vocabulary" in generated
    for path in PATHS:
        assert f"| `{path}` |" in generated
    assert MODEL_MD.read_text() == generated, "regenerate: python -m bench.model --markdown bench/results/MODEL.md"


def test_autocast_adds_the_weight_casts_to_the_16bit_path():
    """kdops under torch.autocast with float32 master weights: the bf16 path plus both weights cast from
    float32 and dW cast back, and their copies in memory; float32 without autocast stays on exact products."""
    v, hs, ht = HEADLINE.vocab, HEADLINE.hidden_student, HEADLINE.hidden_teacher
    plain = predict("chunked", HEADLINE, H100, "forward_kl", torch.bfloat16)
    mixed = predict("chunked", HEADLINE, H100, "forward_kl", torch.bfloat16, autocast=True)
    assert _item(mixed, "fwd: autocast", "W_s, W_t read (float32)") == v * (hs + ht) * 4
    assert _item(mixed, "bwd: autocast", "dW written (float32)") == v * hs * 4
    assert mixed.extra_bytes == plain.extra_bytes + v * (hs + ht) * 2 + v * hs * 2
    assert plain.total_s < mixed.total_s < 1.1 * plain.total_s
    exact = predict("chunked", HEADLINE, H100, "forward_kl", torch.float32)
    assert exact.total_s > 10 * mixed.total_s  # float32 on the CUDA cores
    with pytest.raises(ValueError, match="autocast"):
        predict("reference", HEADLINE, H100, "forward_kl", torch.bfloat16, autocast=True)


def test_topk_paths_follow_the_code():
    """The sparse-teacher paths: the chunked one plans like kdops (one side), its matmuls are the student's
    three; the gathered one never multiplies the vocabulary (its flops grow with k, not V); the kernels on
    logits read the student's logits twice and write the gradient once."""


    shape = model.Shape(4096, 2048, 2048, 65536)
    chunked = model.predict("topk-chunked", shape, "h100", "forward_kl", k=32)
    assert chunked.flops == pytest.approx(2 * 4096 * 65536 * 2048 * 3)
    sides = (kdops.paths.chunked.SideNeeds(torch.bfloat16, 2048, True, True),)
    plan = kdops.paths.chunked.plan(4096, 65536, "triton", torch.float32, sides)
    assert chunked.extra_bytes >= plan.extra_bytes(65536, "triton", torch.float32, sides)
    small, large = (model.predict("topk-gathered", shape, "h100", "forward_kl", k=k) for k in (8, 64))
    assert large.flops == pytest.approx(8 * small.flops) and large.flops < 2 * 4096 * 64 * 2048 * 3 * 1.01
    logits = model.predict("kd_loss-topk", shape, "h100", "forward_kl", dtype=torch.bfloat16, k=32)
    read_write = sum(b for p in logits.phases for b in [p.bytes])
    assert read_write >= 3 * 4096 * 65536 * 2 and logits.flops == 0
    with pytest.raises(ValueError, match="unknown path"):
        model.predict("topk-fused", shape)
