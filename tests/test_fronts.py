"""Time–memory fronts (bench/fronts.py, bench/campaign/fronts.py): the points and their knobs, a tiny CPU run, a
missing peer, the summary on hand-made records, the chart, the dry run, the campaign step."""

import importlib.util
import io
import json
import sys
from types import SimpleNamespace

import pytest
import torch

import kdops
import kdops.paths.chunked
import kdops.reference
import kdops.targets
from bench import competitors, fronts
from bench.campaign import fronts as fronts_step
from bench.campaign.runner import Context
from bench.cases import FUSED, Case
from bench.measure import make_inputs

GiB = 2**30
HEADLINE = Case(FUSED, "forward_kl", 8192, 128256, 4096, 4096, "bfloat16")
TINY = Case(FUSED, "forward_kl", 24, 300, 16, 24)
TINY_JSD = Case(FUSED, "generalized_jsd", 24, 300, 16, 24)


def _by_competitor(found):
    out = {}
    for p in found:
        out.setdefault(p.competitor.name, []).append(p)
    return out


def test_points_are_the_specified_knob_values(monkeypatch):
    monkeypatch.setattr(kdops.paths.chunked, "MIN_CHUNK_ROWS", 256)  # kdops' own floor (tests/conftest.py thins it)
    found = fronts.points(HEADLINE, cuda=True)
    by = _by_competitor(found)
    budgets = [p.value for p in by["kdops-chunked"]]
    smallest = fronts.smallest_plan_bytes(HEADLINE, "triton")
    assert abs(smallest / GiB - 2.264) < 0.01  # the headline's smallest plan: 256-row chunks, every row's G
    assert budgets == [2 * GiB, smallest, 4 * GiB, 8 * GiB]
    assert "smallest plan" in by["kdops-chunked"][1].text and "default" in by["kdops-chunked"][2].text
    assert [p.value for p in by["kdops-epilogue"]] == [smallest, 4 * GiB]  # the budgets of its targets
    assert [p.model for p in by["kdops-epilogue"]] == [("epilogue", smallest, None), ("epilogue", 4 * GiB, None)]
    assert [p.knob for p in by["kdops-sliced"] + by["kdops-fused"]] == [None, None]
    assert [p.value for p in by["liger-chunked-jsd"]] == [512, 1024, 2048, 4096]
    assert {"nvidia-triton", "nvidia-cutedsl", "nvidia-cutile"} <= {p.value for p in by["liger-fused-linear-jsd"]}
    assert [p.value for p in by["trl-chunked-jsd"]] == [1024, 2048, 4096, 8192]
    assert [p.value for p in by["orda-kd"]] == [512, 1024, 2048, 4096, None]
    assert len({p.name for p in found}) == len(found)  # measure_in_turn tells the points apart by name
    cpu = _by_competitor(fronts.points(TINY, cuda=False))["kdops-chunked"]
    assert cpu[0].detail.startswith("torch:") and cpu[0].value == fronts.smallest_plan_bytes(TINY, "torch")
    chosen = fronts.points(TINY, False, only=["trl*"])
    assert chosen[0].competitor.name == "floor"  # every run times the floor, the ratios' denominator
    assert {p.competitor.name for p in chosen[1:]} == {"trl-chunked-jsd"}


def test_epilogue_points_run_where_the_epilogue_path_does(monkeypatch):
    """kdops-epilogue: skipped, with the path's own reason, off CUDA, on GPUs other than Hopper and Blackwell,
    without quack-kernels, and on float32 inputs; predicted by the cost model's epilogue path."""
    point = _by_competitor(fronts.points(HEADLINE, cuda=True))["kdops-epilogue"][0]
    assert point.competitor.applies(HEADLINE, "cpu") == (False, "needs CUDA")
    assert point.competitor.check(TINY, "cuda") == f"16-bit operands only, not {TINY.dtype}"
    if not torch.cuda.is_available():  # a dry run for a GPU, here
        assert "CUDA is not available here" in point.competitor.check(HEADLINE, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "compute capability 9.x and 10.x; this GPU is 8.x" in point.competitor.check(HEADLINE, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "quack" else found(name, *a))
    assert "pip install \"kdops[quack]\"" in point.competitor.check(HEADLINE, "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: SimpleNamespace() if name == "quack" else
                        found(name, *a))
    assert point.competitor.check(HEADLINE, "cuda") is None
    predicted = fronts.predicted(HEADLINE, point, kdops.targets.H100)["predicted_total_ms"]
    chunked = _by_competitor(fronts.points(HEADLINE, cuda=True))["kdops-chunked"]
    same_budget = next(p for p in chunked if p.value == point.value)
    assert 0 < predicted < fronts.predicted(HEADLINE, same_budget, kdops.targets.H100)["predicted_total_ms"]


def test_liger_chunk_size_goes_to_each_points_own_loss(monkeypatch):
    made = []

    class Loss:
        def __init__(self, **options):
            made.append(options)

    monkeypatch.setattr(competitors, "import_liger", lambda module: SimpleNamespace(LigerFusedLinearJSDLoss=Loss))
    inputs = make_inputs(TINY, "cpu")
    for point in _by_competitor(fronts.points(TINY, cuda=False))["liger-chunked-jsd"]:
        point.competitor.build(TINY, inputs)
    assert [m["chunk_size"] for m in made] == [512, 1024, 2048, 4096]
    assert all(m["weight_hard_loss"] == 0.0 and m["weight_soft_loss"] == 1.0 for m in made)


def test_trl_tile_holds_for_its_own_point_only(monkeypatch):
    """TOKEN_CHUNK_SIZE is a module constant: each TRL point sees its own in its forward and its backward, even
    interleaved with another point's, and the module's value is back after each call."""
    module = pytest.importorskip(competitors.TRL_KERNEL_MODULE)
    default, seen = module.TOKEN_CHUNK_SIZE, []

    def fake_loss(student_hidden, *args, temperature):
        seen.append(("fwd", module.TOKEN_CHUNK_SIZE))
        loss = student_hidden.sum() * 0.0
        loss.register_hook(lambda grad: seen.append(("bwd", module.TOKEN_CHUNK_SIZE)))
        return loss, None, None

    monkeypatch.setattr(competitors, "import_trl_loss", lambda: fake_loss)
    inputs = make_inputs(TINY, "cpu")
    small, large = (p.competitor.build(TINY, inputs) for p in fronts.trl_points(TINY) if p.value in (1024, 8192))
    losses = [small.forward(), large.forward()]
    assert module.TOKEN_CHUNK_SIZE == default
    large.backward(losses[1])
    small.backward(losses[0])
    assert seen == [("fwd", 1024), ("fwd", 8192), ("bwd", 8192), ("bwd", 1024)]
    assert module.TOKEN_CHUNK_SIZE == default
    with pytest.raises(RuntimeError), competitors.module_constant(competitors.TRL_KERNEL_MODULE,
                                                                  competitors.TRL_TOKEN_CHUNK, 7):
        raise RuntimeError("a failing point")
    assert module.TOKEN_CHUNK_SIZE == default
    dynamic = torch._dynamo.config.automatic_dynamic_shapes
    with competitors.static_compile():  # Liger's compiled points: a static graph each, for their call only
        assert not torch._dynamo.config.automatic_dynamic_shapes
    assert torch._dynamo.config.automatic_dynamic_shapes == dynamic


def test_oracle_in_row_chunks_is_the_whole_float64_reference():
    case = Case(FUSED, "generalized_jsd", 37, 300, 16, 24)
    inputs = make_inputs(case, "cpu")
    whole = kdops.reference.fused_linear_kd_loss(*(t.detach().double() if t.is_floating_point() else t
                                                   for t in inputs.args), divergence=case.divergence)
    assert fronts.float64_oracle(case, inputs, rows=8) == pytest.approx(float(whole), rel=1e-12)


def test_tiny_cpu_run_writes_well_formed_records(tmp_path, monkeypatch):
    monkeypatch.setattr(kdops.paths.chunked, "MIN_CHUNK_ROWS", 256)  # one chunk: kdops' own plans, and quicker
    out = io.StringIO()
    records = fronts.run_fronts([TINY, TINY_JSD], device="cpu", reps=1, warmup=0, output=tmp_path, out=out)
    device = records[0]["device"]
    from bench.report import slug

    lines = (tmp_path / f"fronts-{slug(device)}.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(records))
    for r in records:
        assert set(fronts.FRONT_FIELDS) <= set(r), set(fronts.FRONT_FIELDS) - set(r)
        assert r["status"] in {"ok", "skipped"}, r
        if r["status"] == "ok" and r["competitor"] != "floor":
            assert r["loss_error"] < 1e-5 and r["extra_bytes"] > 0 and r["total_ms"] > 0, r
    ran = {r["competitor"] for r in records if r["status"] == "ok"}
    assert {"floor", "kdops-chunked"} <= ran
    floors = fronts.floor_ms(records)
    assert len(floors) == 2 and all(ms > 0 for ms in floors.values())
    assert all(c["floor_ms"] in floors.values() for c in fronts.compare(records))
    assert {r["message"] for r in records if r["competitor"] in ("kdops-sliced", "orda-kd")} == {"needs CUDA"}
    text = (tmp_path / f"fronts-{slug(device)}.md").read_text()
    assert text.count("### fused") == 2 and fronts.SUMMARY_TITLE in text and fronts.SUMMARY_TITLE in out.getvalue()


def test_missing_peers_are_skipped_never_an_error(monkeypatch):
    for name in ("liger_kernel", "trl", "orda_kernel"):
        monkeypatch.setitem(sys.modules, name, None)  # import → ImportError
    meta = {"device": "cpu"}
    records = fronts.measure_case(TINY, "cpu", 1, 0, meta, only=["liger*", "trl*", "orda*"])
    reasons = {(r["competitor"], r["status"], r["message"]) for r in records if r["competitor"] != "floor"}
    assert reasons == {("liger-chunked-jsd", "skipped", "liger-kernel not installed"),
                       ("liger-fused-linear-jsd", "skipped", "needs CUDA"),
                       ("trl-chunked-jsd", "skipped", "trl not installed"),
                       ("orda-kd", "skipped", "needs CUDA")}
    orda = fronts.orda_points(TINY)[0].competitor
    assert orda.applies(TINY, "cuda") == (False, "orda-kernel not installed")
    liger = fronts.liger_points(TINY)[-1].competitor
    assert liger.applies(TINY, "cuda") == (False, "liger-kernel not installed")
    assert competitors.liger_jsd_impls() == tuple(competitors.LIGER_JSD_IMPLS)


def _record(competitor, point, ms, extra_gib, error, case="c", status="ok"):
    return {"device": "d", "case": case, "competitor": competitor, "point": point, "status": status,
            "total_ms": ms, "extra_bytes": int(extra_gib * GiB), "loss_error": error}


def test_summary_finds_the_best_peer_at_equal_memory_and_accuracy():
    records = [
        _record("kdops-chunked", "kdops-chunked memory_budget=4 GiB", 100.0, 4.0, 1e-7),
        _record("kdops-sliced", "kdops-sliced", 200.0, 0.2, 1e-7),
        _record("liger-chunked-jsd", "liger chunk_size=512", 150.0, 0.15, 1e-6),  # wins at low memory
        _record("liger-chunked-jsd", "liger chunk_size=4096", 80.0, 1.0, 0.05),  # fast, but inaccurate
        _record("trl-chunked-jsd", "trl 4096", 120.0, 3.0, 1e-6),  # kdops' chunked beats it
        _record("trl-chunked-jsd", "trl 8192", 50.0, 9.0, 1e-6),  # more memory than any kdops point
        _record("orda-kd", "orda 512", None, 0.1, None, status="skipped"),
        _record("kdops-chunked", "kdops elsewhere", 10.0, 1.0, 1e-7, case="other"),
    ]
    by = {c["kdops"]["point"]: c for c in fronts.compare(records)}
    high, low, other = by["kdops-chunked memory_budget=4 GiB"], by["kdops-sliced"], by["kdops elsewhere"]
    assert high["peer"]["point"] == "trl 4096" and high["speedup"] == pytest.approx(1.2) and high["left_out"] == 1
    assert low["peer"]["point"] == "liger chunk_size=512" and low["speedup"] == pytest.approx(0.75)
    assert other["peer"] is None and other["speedup"] is None
    assert fronts.compare(records, tolerance=0.1)[0]["peer"]["point"] == "liger chunk_size=4096"
    lines = fronts.summary_lines(records)
    assert lines[0].startswith(fronts.SUMMARY_TITLE)
    text = "\n".join(lines)
    assert "kdops 1.20 × as fast as trl 4096" in text and "1 peer point(s)" in text
    assert "a peer wins: liger chunk_size=512" in text and "1.33 × as fast" in text
    assert "kdops elsewhere (10.00 ms at 1.00 GiB): no peer point" in text


def test_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    records = [dict(_record(c, f"{c} {v}", ms, gib, 1e-7), knob="k" if v else None, value=v, value_text=str(v),
                    knob_order=i)
               for i, (c, v, ms, gib) in enumerate([("kdops-chunked", 1, 10.0, 2.0), ("kdops-chunked", 2, 9.0, 4.0),
                                                   ("kdops-sliced", None, 20.0, 0.2), ("liger", 512, 15.0, 1.0),
                                                   ("liger", 1024, 12.0, 1.5)])]
    path = tmp_path / "front.png"
    fronts.draw_front(records, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_lists_every_point_with_an_estimate(capsys):
    assert fronts.main(["--dry-run", "--gpu", "h100", "--divergence", "forward_kl"]) == 0
    out = capsys.readouterr().out
    for point in fronts.points(HEADLINE, cuda=True):
        assert f"  {point.name}: ~" in out, point.name
    assert "bench.model: 51.4 ms a pass on h100" in out  # chunked at 4 GiB, as docs/performance.md quotes it
    assert "rough:" in out and "estimated total" in out
    assert fronts.main(["--dry-run"]) == 0
    assert "skipped here: needs CUDA" in capsys.readouterr().out


def test_orda_computes_kdops_loss_where_installed():
    """orda-kernel's torch path (its Triton one needs CUDA) as the bench calls it: kdops.reference's loss."""
    assert competitors.orda_divergence("forward_kl") == ("forward", None)
    assert competitors.orda_divergence(kdops.GeneralizedJSD(beta=0.2)) == ("skew_js", 0.8)
    assert competitors.orda_divergence("tvd") is None
    pytest.importorskip(competitors.ORDA_MODULE)
    for divergence in ("forward_kl", "reverse_kl", kdops.GeneralizedJSD(beta=0.2)):
        case = Case(FUSED, divergence, 24, 300, 16, 24)
        inputs = make_inputs(case, "cpu")
        got = competitors.orda_kd(64, backend="torch")(case, inputs).forward()
        want = kdops.reference.fused_linear_kd_loss(*inputs.args, divergence=divergence)
        assert got.item() == pytest.approx(want.item(), rel=1e-5), divergence


def test_campaign_step_records_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(fronts_step, "fronts_cases", lambda: [TINY])
    monkeypatch.setattr(fronts_step, "FRONTS_REPS", 1)
    monkeypatch.setattr(fronts_step, "FRONTS_WARMUP", 0)
    monkeypatch.setattr(fronts, "points", lambda case, cuda, only=None: fronts.kdops_points(case, cuda)[:2])
    ctx = Context("fronts", tmp_path, {"device_slug": "test-device"}, 600.0, device="cpu")
    fronts_step.FRONTS.body(ctx)
    assert fronts_step.FRONTS.name == "fronts" and fronts_step.FRONTS.estimate_s > 0
    lines = [json.loads(line) for line in (tmp_path / "campaign-test-device.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["competitor"]) for r in lines] == [("fronts", "fronts", "kdops-chunked")] * 2
    assert any(fronts.SUMMARY_TITLE in line for line in ctx.result.lines)
    assert list(tmp_path.glob("fronts-*.jsonl")) and ctx.result.status == "ok"
