"""The benchmark harness (bench/): records, floor and ratio arithmetic, failures, charts — on tiny CPU cases."""

import io
import json
import pathlib
import sys

import pytest
import torch

import kdops
import kdops.reference
from bench.__main__ import main
from bench.cases import FUSED, KD_LOSS, QUICK, Case, parse_shape, select
from bench.competitors import COMPETITORS, FLOOR, KDOPS, REFERENCE, Competitor, liger_beta, trl_beta
from bench.floor import chunk_rows, floor_work
from bench.measure import HEAD_START_CYCLES, Phases, Result, failure, make_inputs, measure_in_turn, time_steps
from bench.report import RECORD_FIELDS, case_records, results_path
from bench.sweep import run_sweep

KD = Case(KD_LOSS, "forward_kl", 16, 100)
KD_JSD = Case(KD_LOSS, "generalized_jsd", 16, 100)
FUSED_KL = Case(FUSED, "forward_kl", 16, 100, 8, 12)
BY_NAME = {c.name: c for c in COMPETITORS}


def _sweep(cases, tmp_path=None, competitors=COMPETITORS):
    out = io.StringIO()
    records = run_sweep(cases, device="cpu", reps=1, warmup=0, competitors=competitors, results_dir=tmp_path, out=out)
    return records, out.getvalue()


def _stand_in(module):
    """fused_linear_kd_loss from materialized logits, for when kdops does not have it yet."""
    def fused(hs, ws, ht, wt, labels=None, *, impl="auto", backend="auto", **kwargs):
        if module is kdops:
            kwargs["backend"] = backend
        return module.kd_loss(hs @ ws.T, ht @ wt.T, labels, **kwargs)
    return fused


@pytest.fixture
def with_fused(monkeypatch):
    for module in (kdops, kdops.reference):
        if not hasattr(module, FUSED):
            monkeypatch.setattr(module, FUSED, _stand_in(module), raising=False)


def _by(records, label, competitor):
    return next(r for r in records if r["label"] == label and r["competitor"] == competitor)


def test_tiny_run_writes_well_formed_records(tmp_path):
    records, table = _sweep([KD, KD_JSD, FUSED_KL], tmp_path)
    lines = results_path(tmp_path, records[0]["device"]).read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(records))
    for record in records:
        assert set(RECORD_FIELDS) <= set(record), set(RECORD_FIELDS) - set(record)
        assert record["status"] in {"ok", "skipped"}, record
        assert record["commit"] and record["torch"] == torch.__version__ and record["device_type"] == "cpu"
    for case in (KD, KD_JSD):
        kd = _by(records, case.label, KDOPS)
        assert kd["status"] == "ok" and kd["total_ms"] > 0 and kd["forward_ms"] > 0
        assert kd["input_bytes"] == 2 * 16 * 100 * 4 + 16 * 8  # both logits and the int64 labels
        assert kd["grad_bytes"] == 16 * 100 * 4
        assert kd["extra_bytes"] == kd["peak_bytes"] - kd["grad_bytes"]
        assert kd["loss_rel_diff"] < 1e-5
        assert _by(records, case.label, FLOOR)["ratio_floor_total"] == 1.0
        compiled = _by(records, case.label, "reference-compiled")
        assert (compiled["status"], compiled["message"]) == ("skipped", "needs CUDA")
    fused = _by(records, FUSED_KL.label, KDOPS)
    if not hasattr(kdops, FUSED):
        assert (fused["status"], fused["message"]) == ("skipped", "not available")
    assert KD.label in table and "floor" in table and "skipped:" in table


def test_fused_cases_run_against_the_matmul_floor(with_fused):
    records, _ = _sweep([FUSED_KL])
    for name in (FLOOR, KDOPS, REFERENCE):
        assert _by(records, FUSED_KL.label, name)["status"] == "ok"
    kd = _by(records, FUSED_KL.label, KDOPS)
    assert kd["floor_unit"] == "flop" and kd["floor_total"] == 2 * 16 * 100 * (3 * 8 + 12)
    assert kd["grad_bytes"] == (16 * 8 + 100 * 8) * 4  # student hidden and weight
    assert kd["ratio_floor_total"] == pytest.approx(kd["total_ms"] / _by(records, FUSED_KL.label, FLOOR)["total_ms"])


def test_floor_work_formulas():
    fused = floor_work(Case(FUSED, "forward_kl", 2, 3, 5, 7))
    assert (fused.forward, fused.backward, fused.total, fused.unit) == (144, 120, 264, "flop")  # 2·2·3·(3·5 + 7)
    kd = floor_work(Case(KD_LOSS, "forward_kl", 4, 10))
    assert (kd.forward, kd.backward, kd.total, kd.unit) == (320, 160, 480, "byte")  # 2, 1, 3 × N·V·4
    assert floor_work(Case(KD_LOSS, "forward_kl", 4, 10, dtype="bfloat16")).total == 240
    assert chunk_rows(vocab=1000, itemsize=2, budget_bytes=10_000) == 5 and chunk_rows(10**9, 4) == 1


def _ok(name, forward, backward, loss):
    return Result(name, median_ms={"forward": forward, "backward": backward, "total": forward + backward},
                  iqr_ms={"forward": 0.0, "backward": 0.0, "total": 0.0}, loss=loss)


def test_ratio_arithmetic():
    results = [_ok(FLOOR, 1.0, 1.0, None), _ok(KDOPS, 3.0, 5.0, 2.0), _ok(REFERENCE, 6.0, 14.0, 2.5),
               Result("liger-jsd", "oom", "out of memory")]
    records = {r["competitor"]: r for r in case_records(KD, results, {})}
    reference = records[REFERENCE]
    assert (reference["ratio_floor_forward"], reference["ratio_floor_backward"], reference["ratio_floor_total"]) \
        == (6.0, 14.0, 10.0)
    assert (reference["ratio_kdops_forward"], reference["ratio_kdops_backward"], reference["ratio_kdops_total"]) \
        == (2.0, 2.8, 2.5)
    assert records[KDOPS]["ratio_kdops_total"] == 1.0 and records[KDOPS]["ratio_floor_total"] == 4.0
    assert records[KDOPS]["loss_rel_diff"] == pytest.approx(0.2)  # |2 − 2.5| / 2.5
    assert records["liger-jsd"]["ratio_floor_total"] is None and records["liger-jsd"]["total_ms"] is None
    no_floor = {r["competitor"]: r for r in case_records(KD, results[1:], {})}
    assert no_floor[KDOPS]["ratio_floor_total"] is None


def _raising(error):
    def build(case, inputs):
        def forward():
            raise error
        return Phases.of_loss(forward)
    return build


def test_oom_and_errors_are_recorded_and_the_sweep_goes_on():
    competitors = (BY_NAME[FLOOR], Competitor("oom", (KD_LOSS,), _raising(torch.OutOfMemoryError("CUDA oom"))),
                   Competitor("oom-message", (KD_LOSS,), _raising(RuntimeError("CUDA out of memory. Tried"))),
                   Competitor("broken", (KD_LOSS,), _raising(ValueError("bad\nsecond line"))), BY_NAME[KDOPS])
    records, table = _sweep([KD, KD_JSD], competitors=competitors)
    for case in (KD, KD_JSD):
        assert _by(records, case.label, "oom")["status"] == "oom"
        assert _by(records, case.label, "oom-message")["status"] == "oom"
        assert (_by(records, case.label, "broken")["status"], _by(records, case.label, "broken")["message"]) \
            == ("error", "ValueError: bad")
        assert _by(records, case.label, KDOPS)["status"] == "ok"
    assert "OOM" in table and "ERROR: ValueError: bad" in table
    assert failure("x", MemoryError()).status == "oom"


def test_missing_liger_is_skipped_never_an_error(monkeypatch, with_fused):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel → ImportError
    liger = tuple(c for c in COMPETITORS if c.name.startswith("liger-"))
    for competitor in liger:
        for case in (KD, FUSED_KL):
            if case.function in competitor.functions:
                assert competitor.applies(case, "cuda") == (False, "liger-kernel not installed")
    records, _ = _sweep([KD, FUSED_KL], competitors=(BY_NAME[FLOOR], *liger))
    statuses = {(r["competitor"], r["status"]) for r in records if r["competitor"] != FLOOR}
    assert statuses == {("liger-jsd", "skipped"), ("liger-fused-linear-jsd", "skipped"),
                        ("liger-chunked-jsd", "skipped")}
    assert _by(records, FUSED_KL.label, "liger-chunked-jsd")["message"] == "liger-kernel not installed"
    assert BY_NAME["liger-chunked-jsd"].applies(Case(FUSED, "tvd", 16, 100, 8, 12), "cpu") \
        == (False, "liger-kernel has no tvd")


def test_liger_beta_matches_kdops_conventions():
    assert (liger_beta("forward_kl"), liger_beta("reverse_kl"), liger_beta("generalized_jsd")) == (0.0, 1.0, 0.5)
    assert liger_beta(kdops.GeneralizedJSD(beta=0.2)) == 0.2 and liger_beta("tvd") is None


def test_trl_beta_matches_kdops_conventions():
    """TRL's mixture is β·teacher + (1 − β)·student, β = 0 forward KL, β = 1 reverse KL: kdops' β."""
    assert (trl_beta("forward_kl"), trl_beta("reverse_kl"), trl_beta("generalized_jsd")) == (0.0, 1.0, 0.5)
    assert trl_beta(kdops.GeneralizedJSD(beta=0.2)) == 0.2
    assert all(trl_beta(name) is None for name in ("tvd", "skew_forward_kl", "skew_reverse_kl", "alpha_beta"))
    trl = BY_NAME["trl-chunked-jsd"]
    assert trl.functions == (FUSED,) and not trl.needs_cuda
    assert trl.applies(KD, "cpu") == (False, "has no kd_loss")
    assert trl.applies(Case(FUSED, "tvd", 16, 100, 8, 12), "cpu") == (False, "trl has no tvd")


def test_missing_trl_is_skipped_never_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl → ImportError
    assert BY_NAME["trl-chunked-jsd"].applies(FUSED_KL, "cpu") == (False, "trl not installed")
    records, _ = _sweep([FUSED_KL], competitors=(BY_NAME[FLOOR], BY_NAME["trl-chunked-jsd"]))
    trl = _by(records, FUSED_KL.label, "trl-chunked-jsd")
    assert (trl["status"], trl["message"]) == ("skipped", "trl not installed")


def test_trl_loss_and_gradients_equal_the_reference():
    """TRL's _chunked_divergence_loss (torch tiles on the CPU) as the bench calls it, and with a β ∉ {0, ½, 1},
    a temperature and ignored tokens as a completion mask: kdops.reference's loss and student gradients."""
    loss_fn = pytest.importorskip("trl.trainer.distillation_trainer")._chunked_divergence_loss
    for divergence in ("forward_kl", "reverse_kl", "generalized_jsd"):
        case = Case(FUSED, divergence, 24, 300, 16, 24)
        inputs = make_inputs(case, "cpu")
        phases = BY_NAME["trl-chunked-jsd"].build(case, inputs)
        loss = phases.forward()
        phases.backward(loss)
        got = [loss.detach(), *(t.grad for t in inputs.trainable)]
        inputs.clear_grads()
        want_loss = kdops.reference.fused_linear_kd_loss(*inputs.args, divergence=divergence)
        want_loss.backward()
        want = [want_loss.detach(), *(t.grad for t in inputs.trainable)]
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), divergence
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(2, 9, 16, generator=g, requires_grad=True), torch.randn(2, 9, 24, generator=g)
    ws, wt = torch.randn(300, 16, generator=g) / 4, torch.randn(300, 24, generator=g) / 5
    labels = torch.randint(0, 300, (2, 9), generator=g)
    labels[:, :3] = -100
    for beta in (0.2, 0.9):
        got = loss_fn(hs, ht, ws, wt, labels != -100, trl_beta(kdops.GeneralizedJSD(beta=beta)), temperature=2.0)[0]
        want = kdops.reference.fused_linear_kd_loss(hs, ws, ht, wt, labels, divergence=kdops.GeneralizedJSD(beta=beta),
                                                    temperature=2.0)
        assert torch.allclose(got, want, rtol=1e-5), beta
        grads = [torch.autograd.grad(x, hs)[0] for x in (got, want)]
        assert torch.allclose(*grads, rtol=1e-4, atol=1e-7), beta


def test_chart_and_summary(tmp_path, with_fused):
    pytest.importorskip("matplotlib")
    from bench.plot import plot

    records, _ = _sweep([KD, Case(KD_LOSS, "forward_kl", 32, 100), FUSED_KL], tmp_path / "results")
    written = plot([results_path(tmp_path / "results", records[0]["device"])], tmp_path / "charts")
    charts = [p for p in written if p.suffix == ".png"]
    assert len(charts) == 2  # kd forward_kl V=100 (two token counts), fused forward_kl
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in charts)
    summary = (tmp_path / "charts" / "SUMMARY.md").read_text()
    assert records[0]["device"] in summary and f"| {KD.label} | {KDOPS} |" in summary
    assert all(f"]({p.name})" in summary for p in charts)


def test_plot_reads_the_repository_s_own_records(tmp_path):
    """`python -m bench plot` as docs/performance.md gives it: every committed record under bench/results/, read
    recursively from the folders <device slug>/<kdops version>/ (a campaign's other JSON lines left out), records
    written before a case field existed (the top-k `k`) included; the newest record of each case wins."""
    pytest.importorskip("matplotlib")
    from bench.plot import load_latest, plot, record_files
    from bench.report import RESULTS_DIR, slug

    results = pathlib.Path(RESULTS_DIR)
    inputs = record_files()
    assert inputs and inputs == sorted(results.rglob("*.jsonl"))
    assert not list(results.glob("*.jsonl")), "records belong in <device slug>/<kdops version>/"
    records = load_latest(inputs)
    devices = {r["device"] for r in records}
    assert {"NVIDIA H100 80GB HBM3", "NVIDIA H200"} <= devices and len(devices) >= 3
    for path in inputs:
        folder = path.relative_to(results).parts
        assert len(folder) >= 3 and folder[0] in {slug(d) for d in devices}, path
    newest_h100 = max(r["run_id"] for r in records if r["device"] == "NVIDIA H100 80GB HBM3")
    headline = [r for r in records if r["device"] == "NVIDIA H100 80GB HBM3" and r["competitor"] == "kdops-chunked"]
    assert headline and all(r["run_id"][:9] == newest_h100[:9] for r in headline)
    written = plot(None, tmp_path)
    assert any(p.suffix == ".png" for p in written) and (tmp_path / "SUMMARY.md").exists()
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert all(f"## {device}" in summary for device in devices)


def test_plot_skips_lines_that_are_not_bench_records(tmp_path):
    """A campaign's JSON lines mix the bench's records with other measurements (smoke, fused check, profile):
    `load_latest` keeps the records alone, and `record_files` searches folders recursively."""
    from bench.plot import load_latest, record_files

    records, _ = _sweep([KD], tmp_path / "results")
    sweep_file = results_path(tmp_path / "results", records[0]["device"])
    other = tmp_path / "results" / "deeper" / "campaign-cpu.jsonl"
    other.parent.mkdir()
    other.write_text(json.dumps({"step": "smoke", "device": records[0]["device"], "summary": "1 passed"}) + "\n"
                     + sweep_file.read_text())
    assert sorted(record_files([tmp_path / "results"])) == sorted([other, sweep_file])
    latest = load_latest(record_files([tmp_path]))
    assert sorted(r["competitor"] for r in latest) == sorted(r["competitor"] for r in records)


def test_a_run_appends_to_its_device_and_version_folder(tmp_path, monkeypatch):
    """`python -m bench --output DIR` writes into DIR/<device slug>/<kdops version>/ (`bench.report.record_dir`),
    the folder layout of bench/results; --no-save writes nothing."""
    import bench.sweep
    from bench.report import device_name, record_dir, slug

    calls = []
    monkeypatch.setattr(bench.sweep, "run_sweep", lambda cases, **kwargs: calls.append(kwargs["results_dir"]))
    assert main(["--quick", "--function", KD_LOSS, "--reps", "1", "--warmup", "0", "--output", str(tmp_path)]) == 0
    assert main(["--quick", "--function", KD_LOSS, "--no-save"]) == 0
    device = device_name("cpu")
    assert calls == [tmp_path / slug(device) / kdops.__version__, None]
    assert calls[0] == record_dir(device, tmp_path)
    assert results_path(calls[0], device) == tmp_path / slug(device) / kdops.__version__ / f"{slug(device)}.jsonl"


def test_cli_filters_and_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    assert parse_shape("512x32000") == (512, 32000)
    with pytest.raises(ValueError, match="TOKENSxVOCAB"):
        parse_shape("512")
    assert select(QUICK.cases(), shapes=["512x32000"]) == [c for c in QUICK.cases() if c.function == KD_LOSS]
    with pytest.raises(SystemExit):
        main(["--quick", "--impl", "nobody"])
    with pytest.raises(SystemExit):
        main(["--quick", "--divergence", "not_a_divergence"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_topk_cases_run_against_their_floors_and_the_chunked_baseline():
    """Sparse teachers: kdops, its reference and the DistillKit-style chunked baseline compute the same loss;
    the floors are the student's logits read and written (on logits) and its matmuls (from hidden states)."""
    from bench.cases import FUSED_TOPK, TOPK

    cases = [Case(TOPK, "forward_kl", 16, 100, k=5), Case(FUSED_TOPK, "generalized_jsd", 16, 100, 8, k=5)]
    records, table = _sweep(cases)
    for case in cases:
        for name in (FLOOR, KDOPS, REFERENCE, "torch-chunked-topk"):
            assert _by(records, case.label, name)["status"] == "ok", (case.label, name)
        for name in (REFERENCE, "torch-chunked-topk"):
            assert _by(records, case.label, name)["loss_rel_diff"] < 1e-5
    kd, fused = (_by(records, c.label, KDOPS) for c in cases)
    assert (kd["floor_unit"], kd["floor_total"]) == ("byte", 2 * 16 * 100 * 4)
    assert (fused["floor_unit"], fused["floor_total"]) == ("flop", 2 * 16 * 100 * 3 * 8)
    assert kd["grad_bytes"] == 16 * 100 * 4 and "kd-topk5 forward_kl 16x100 fp32" in table
    assert "fused-topk5 generalized_jsd 16x100 h8 fp32" in table


def test_a_slower_kdops_row_says_what_it_trades():
    """Where a kdops competitor takes more time than the reference, the table says so, with its memory against
    the reference's; where it is faster, nothing is added."""
    from bench.report import describe_trade

    def row(name, ms, extra):
        return dict(competitor=name, status="ok", total_ms=ms, extra_bytes=extra)

    slower = describe_trade([row("reference", 250.0, 400.0), row("kdops-torch", 289.0, 100.0), row("floor", 1.0, 0)])
    assert "kdops-torch takes 1.16 × the reference's time at 0.25 × its extra memory" in slower
    assert describe_trade([row("reference", 250.0, 400.0), row("kdops", 100.0, 10.0)]) == ""
    assert describe_trade([row("kdops", 100.0, 10.0)]) == ""


def test_competitors_take_turns_and_a_failure_leaves_the_others_running():
    """measure_in_turn: repetition k of every competitor before repetition k + 1 of any (warm-ups included); one
    that fails on its third run leaves the turns as an error, one that cannot be built is an error from the start,
    and the others keep every sample."""
    calls = []
    inputs = make_inputs(KD, "cpu")

    def build(name, fail_at=None):
        def forward():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
            return (inputs.args[0].float() * 2).sum()
        return lambda: Phases.of_loss(forward)

    def unbuildable():
        raise torch.OutOfMemoryError("CUDA oom")

    results = measure_in_turn([("a", build("a")), ("b", build("b", fail_at=3)), ("c", unbuildable), ("d", build("d"))],
                              inputs, "cpu", reps=3, warmup=1)
    assert [r.competitor for r in results] == ["a", "b", "c", "d"]
    # four turns (one warm-up, three timed): in the third b fails, and d goes on; then one untimed run each for memory
    assert calls == ["a", "b", "d"] * 2 + ["a", "b", "d"] + ["a", "d"] + ["a", "d"]
    assert [r.status for r in results] == ["ok", "error", "oom", "ok"]
    assert results[1].message == "RuntimeError: b broke"
    for r in (results[0], results[3]):
        assert r.median_ms["forward"] >= 0 and r.peak_bytes is not None and r.loss is not None


def test_gpu_steps_are_timed_after_a_head_start(monkeypatch):
    """On CUDA, time_steps synchronizes, queues HEAD_START_CYCLES of GPU wait, and only then records its first mark
    and runs the first step: the host's work before the first kernel overlaps the wait (CUDA faked here)."""
    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("mark")
            self.at = len(log)

        def elapsed_time(self, other):
            return float(other.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("wait", cycles)))
    ms = time_steps([lambda: log.append("step 1") or 7, lambda value: log.append(f"step 2 of {value}")], "cuda")
    assert log == ["sync", ("wait", HEAD_START_CYCLES), "mark", "step 1", "mark", "step 2 of 7", "mark", "sync"]
    assert ms == [2.0, 2.0] and HEAD_START_CYCLES >= 5_000_000


def test_no_installed_peer_is_skipped_as_not_importable():
    """`python -m bench --quick` from the repository root, in a fresh interpreter: a peer that is installed imports
    there (a top-level folder of the project shadowing one of its dependencies made TRL "not importable: no module
    'kernels'"), so every skip reason is "not installed", a missing function or "needs CUDA"."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    probe = ("from bench.cases import PRESETS, TOPK_PRESET\n"
             "from bench.competitors import COMPETITORS\n"
             "for case in PRESETS['quick'].cases() + TOPK_PRESET.cases():\n"
             "    for c in COMPETITORS:\n"
             "        print(c.name, '|', c.applies(case, 'cpu')[1])\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "", "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reasons = set(done.stdout.splitlines())
    assert reasons and not [r for r in reasons if "not importable" in r], sorted(reasons)


# --- the floor's variants, the model's floor, the source hash --------------------------------------------------

FLOOR_VARIANTS = {"full", "chunked", "full/chunked", "chunked/full"}


def test_the_matmul_floor_times_the_faster_variant_of_each_phase(monkeypatch, with_fused):
    """With chunks of 5 of the 16 tokens, the floor has a full and a chunked variant and times the faster one of
    each phase; every record of the case names it, once; the floors on logits have none."""
    import bench.floor

    monkeypatch.setattr(bench.floor, "CHUNK_BYTES", 5 * 100 * 4)  # 5 rows of V = 100 float32 logits
    assert sorted(bench.floor.matmul_variants(FUSED_KL, make_inputs(FUSED_KL, "cpu"))) == ["chunked", "full"]
    records, _ = _sweep([FUSED_KL, KD])
    variants = {r["floor_variant"] for r in records if r["label"] == FUSED_KL.label}
    assert len(variants) == 1 and variants <= FLOOR_VARIANTS
    assert {r["floor_variant"] for r in records if r["label"] == KD.label} == {None}
    monkeypatch.setattr(bench.floor, "CHUNK_BYTES", 16 * 100 * 4)  # one chunk: the variants are the same
    assert list(bench.floor.matmul_variants(FUSED_KL, make_inputs(FUSED_KL, "cpu"))) == ["full"]


def test_fastest_picks_each_phase_s_faster_variant():
    import time

    from bench.floor import fastest

    def sleeping(forward_s, backward_s):
        return Phases(lambda: time.sleep(forward_s), lambda _: time.sleep(backward_s))

    variants = {"slow-forward": sleeping(0.02, 0.0), "slow-backward": sleeping(0.0, 0.02)}
    assert fastest(variants, "cpu", reps=1) == ("slow-backward", "slow-forward")
    assert fastest({"full": sleeping(0.0, 0.0)}, "cpu") == ("full", "full")


def test_the_full_floor_that_runs_out_of_memory_leaves_the_chunked_one(monkeypatch, with_fused):
    """Out of memory while allocating the full variant's buffers: the chunked variant alone, named in the records;
    any other error is the floor's."""
    import bench.floor

    def allocate(case, inputs, rows, error=torch.OutOfMemoryError("CUDA out of memory")):
        if rows == case.tokens:
            raise error
        return chunked(case, inputs, rows)

    chunked = bench.floor._matmul_phases
    monkeypatch.setattr(bench.floor, "CHUNK_BYTES", 5 * 100 * 4)
    monkeypatch.setattr(bench.floor, "_matmul_phases", allocate)
    assert list(bench.floor.matmul_variants(FUSED_KL, make_inputs(FUSED_KL, "cpu"))) == ["chunked"]
    records, _ = _sweep([FUSED_KL])
    assert {r["floor_variant"] for r in records} == {"chunked"}
    assert _by(records, FUSED_KL.label, FLOOR)["status"] == "ok"
    monkeypatch.setattr(bench.floor, "_matmul_phases",
                        lambda case, inputs, rows: allocate(case, inputs, rows, ValueError("not memory")))
    with pytest.raises(ValueError, match="not memory"):
        bench.floor.matmul_variants(FUSED_KL, make_inputs(FUSED_KL, "cpu"))


def test_the_floor_record_carries_the_model_s_floor(monkeypatch):
    """On a GPU (faked: the H100's rates) the floor's record carries `bench.model`'s floor time, split by phase
    as the work is, ratio 1; the modelled competitors their own prediction, with the same floor."""
    import kdops.targets
    from bench.model import Shape, predict
    from bench.report import model_floor

    headline = Case(FUSED, "forward_kl", 8192, 128256, 4096, 4096, "bfloat16")
    floor = model_floor(headline, kdops.targets.H100)
    chunked = predict("chunked", Shape(8192, 4096, 4096, 128256), kdops.targets.H100)
    assert floor["predicted_total_ms"] == pytest.approx(chunked.floor_s * 1e3)
    assert floor["predicted_forward_ms"] + floor["predicted_backward_ms"] == pytest.approx(floor["predicted_total_ms"])
    assert floor["predicted_forward_ms"] / floor["predicted_backward_ms"] == pytest.approx(2 * 8192 / (4 * 4096))
    monkeypatch.setattr(kdops.targets, "of_device", lambda device: kdops.targets.H100)
    results = [_ok(FLOOR, 40.0, 5.0, None), _ok(KDOPS, 50.0, 10.0, 1.0)]
    records = {r["competitor"]: r for r in case_records(headline, results, {"device_type": "cuda"})}
    assert records[FLOOR]["predicted_path"] == FLOOR and records[FLOOR]["predicted_ratio_floor"] == 1.0
    assert records[FLOOR]["predicted_total_ms"] == pytest.approx(floor["predicted_total_ms"])
    kdops_ms = records[KDOPS]["predicted_total_ms"]
    assert kdops_ms / records[KDOPS]["predicted_ratio_floor"] == pytest.approx(floor["predicted_total_ms"])
    assert set(records[FLOOR]) == set(records[KDOPS])


def _source_tree(tmp_path):
    """A copy of kernels/, kdops/ and bench/ without their caches and records."""
    import shutil

    root = pathlib.Path(__file__).resolve().parents[1]
    for top in ("kernels", "kdops", "bench"):
        shutil.copytree(root / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return tmp_path


def test_the_source_hash_names_the_code_on_disk(tmp_path):
    """Stable; changed by an edit under kdops/ or a new file under bench/, tracked or not; blind to __pycache__
    and bench/results/."""
    from bench.report import source_files, source_hash

    root = _source_tree(tmp_path)
    first = source_hash(root)
    assert first == source_hash(root) and len(first) == 16 and int(first, 16) >= 0
    for extra in ("kdops/__pycache__/api.cpython-311.pyc", "bench/results/gpu/0.4.0/gpu.jsonl"):
        (root / extra).parent.mkdir(parents=True, exist_ok=True)
        (root / extra).write_bytes(b"not code")
    assert source_hash(root) == first
    assert not [p for p in source_files(root) if "__pycache__" in p.parts or "results" in p.parts]
    edited = root / "kdops" / "__init__.py"
    original = edited.read_bytes()
    edited.write_bytes(original + b"\n# an edit\n")
    assert source_hash(root) != first
    edited.write_bytes(original)
    assert source_hash(root) == first
    (root / "bench" / "notes.txt").write_text("an untracked file")
    assert source_hash(root) != first


def test_records_carry_the_source_hash():
    from bench.report import source_hash

    records, _ = _sweep([KD])
    assert {r["source_hash"] for r in records} == {source_hash()}
