"""`python -m bench.campaign`: the plan (--dry-run), the time budget, the step processes, and the pieces of
the GPU steps that run without a GPU (the block-size trials under the interpreter, the tables)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kdops.launchers.linear
from kdops.launchers.linear import fused_config
from bench.campaign import (cli, headline, plan, predictions, profile, runner, smoke, timeline, tune_headline,
                            tuning)
from bench.campaign import fused_check as fused_check_step  # the step; bench.fused_check is what it runs
from bench.campaign.plan import DEFAULT_STEPS, STEPS, simulate
from bench.campaign.report import add_to_readme, render_report
from bench.campaign.runner import Budget, Context, Step, StepResult, run_steps
from bench.cases import FUSED, Case
from bench.report import record_dir
from conftest import GPU_SMOKE

REPO = Path(__file__).resolve().parents[1]


def _run_campaign(*args, env=None, timeout=60):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bench.campaign", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return done, time.monotonic() - start


def test_dry_run_prints_every_step_and_the_predictions():
    done, seconds = _run_campaign("--dry-run")
    assert done.returncode == 0, done.stderr
    assert seconds < 30
    out = done.stdout
    for name in DEFAULT_STEPS:
        assert f"**{name}**" in out, name
    # the default plan: the kernels' numerics, then every competitor's every memory point beside the true floor at
    # the headline shape, each with its estimate, then a whole training step of every trainer
    for what in ("pytest -m gpu_smoke", "fused forward_kl 8192x128256 h4096/4096 bf16", "floor: ~",
                 "kdops-chunked memory_budget=2.26 GiB (smallest plan): ~", "kdops-chunked memory_budget=8.00 GiB: ~",
                 "kdops-sliced: ~", "kdops-fused: ~", "liger-chunked-jsd chunk_size=4096: ~",
                 "liger-fused-linear-jsd jsd_impl=nvidia-triton: ~", "trl-chunked-jsd TOKEN_CHUNK_SIZE=8192: ~",
                 "orda-kd chunk_size=dynamic (default): ~", "preset 1b-8b", "kdops-transformers: ~",
                 "kdops-trl: ~", "liger-jsd: ~", "torch-logits: ~"):
        assert what in out, what
    assert "Cost model (`bench.model`)" in out or "cost model unavailable" in out
    assert "would be skipped" not in out  # the default plan fits the default budget
    total = sum(STEPS[name].estimate_s for name in DEFAULT_STEPS)
    assert total <= 9 * 60 - 10  # nine minutes of steps, the report's reserve aside: 15 minutes with a start-up


def test_dry_run_writes_nothing_unless_told(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "RESULTS_DIR", tmp_path / "results")
    assert cli.main(["--dry-run", "--minutes", "3"]) == 0
    assert not (tmp_path / "results").exists()
    out = capsys.readouterr().out
    assert "would be skipped: does not fit" in out  # 3 minutes: not every step
    assert cli.main(["--dry-run", "--output", str(tmp_path / "plan")]) == 0
    assert [p.name for p in (tmp_path / "plan").iterdir()] == ["campaign-plan.md"]
    assert "**fronts**" in (tmp_path / "plan" / "campaign-plan.md").read_text()


def test_unknown_steps_and_no_cuda(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--steps", "nobody", "--dry-run"])
    if not torch.cuda.is_available():
        assert cli.main([]) == 2
        assert "--dry-run" in capsys.readouterr().err


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _step(name, estimate):
    return Step(name, f"step {name}", estimate, (f"runs {name}",), lambda ctx: None)


def test_budget_arithmetic():
    clock = Clock()
    budget = Budget(100, reserve=10, clock=clock)
    assert (budget.left(), budget.usable()) == (100, 90)
    assert budget.fits(90) and not budget.fits(90.5)
    clock.now = 95
    assert (budget.elapsed(), budget.left(), budget.usable()) == (95, 5, 0)
    assert Budget(540).reserve == runner.RESERVE_S and Budget(30).reserve == 3  # at most a tenth


def test_a_step_that_does_not_fit_is_skipped_and_reported():
    clock = Clock()
    budget = Budget(300, reserve=10, clock=clock)
    steps = [_step("a", 100), _step("b", 200), _step("c", 70)]
    takes = {"a": 150, "c": 20}
    given = {}

    def execute(step, seconds):
        given[step.name] = seconds
        clock.now += takes[step.name]
        return StepResult(step.name, lines=[f"{step.name} ran"])

    results = run_steps(steps, budget, execute, out=open(os.devnull, "w"))
    assert [r.status for r in results] == ["ok", "skipped", "ok"]
    assert results[1].message == "does not fit: estimated 200 s, 140 s left"
    assert given == {"a": 2 * 100 + runner.TIMEOUT_SLACK_S, "c": 140}  # its cap, then what is left
    assert [r.seconds for r in results] == [150, None, 20]
    report = render_report(_meta(), steps, results, budget)
    assert "| 2 | b | skipped | - | 200 | does not fit: estimated 200 s, 140 s left |" in report
    assert "## 2. b: step b\n\nSkipped: does not fit: estimated 200 s, 140 s left." in report
    assert "a ran" in report and "c ran" in report


def test_an_exception_in_a_step_is_recorded_and_the_campaign_goes_on():
    def execute(step, seconds):
        if step.name == "a":
            raise RuntimeError("broken\nsecond line")
        return StepResult(step.name)

    results = run_steps([_step("a", 1), _step("b", 1)], Budget(100), execute, out=open(os.devnull, "w"))
    assert [(r.status, r.message) for r in results] == [("error", "RuntimeError: broken"), ("ok", "")]
    assert any("Traceback" in line for line in results[0].lines)


def test_inline_steps_record_their_failures(tmp_path):
    def body(ctx):
        ctx.line("before")
        ctx.record("thing", value=2)
        raise ValueError("bad input")

    execute = runner.execute_inline(tmp_path, _meta(), device="cpu")
    result = execute(Step("x", "x", 1, (), body), 10)
    assert (result.status, result.message, result.lines[0]) == ("error", "ValueError: bad input", "before")
    record = json.loads((tmp_path / "campaign-test-device.jsonl").read_text())
    assert (record["kind"], record["step"], record["value"], record["commit"]) == ("thing", "x", 2, "abc")


def test_the_plan_follows_the_budget():
    steps = [STEPS[n] for n in DEFAULT_STEPS]
    results, budget = simulate(steps, 60 * plan.DEFAULT_MINUTES)
    assert all(r.status == "planned" for r in results)
    results, budget = simulate(steps, 240)
    assert "skipped" in [r.status for r in results]
    lines = "\n".join(plan.plan_lines(steps, results, budget))
    assert all(f"**{name}**" in lines for name in DEFAULT_STEPS) and "would be skipped" in lines


def _meta():
    return dict(campaign_id="t", timestamp="now", command="python -m bench.campaign", commit="abc", dirty=False,
                device="test device", device_slug="test-device", device_type="cpu", torch=torch.__version__,
                triton="x", liger_kernel=None, trl=None)


def _run_step(tmp_path, name, step):
    """Run a step's function in-process on the CPU: (its report's text, its records), having checked its status."""
    ctx = Context(name, tmp_path, _meta(), seconds=600, device="cpu")
    step(ctx)
    text = "\n".join(ctx.result.lines)
    assert ctx.result.status == "ok", text
    records = [json.loads(line) for line in (tmp_path / "campaign-test-device.jsonl").read_text().splitlines()]
    return text, records


def test_a_step_process_runs_and_writes_the_report_and_the_records(tmp_path):
    done, _ = _run_campaign("--allow-cpu", "--steps", "probe", "--minutes", "0.5", "--output", str(tmp_path),
                            env={"KDOPS_CAMPAIGN_PROBE_S": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = tmp_path.glob("campaign-*.md")
    (records,) = tmp_path.glob("campaign-*.jsonl")
    text = report.read_text()
    assert "| 1 | probe | ok |" in text and "probe finished" in text
    record = json.loads(records.read_text())
    for key in ("command", "commit", "device", "torch", "triton", "liger_kernel", "trl", "campaign_id"):
        assert key in record, key
    assert record["command"].startswith("python -m bench.campaign --allow-cpu --steps probe")
    assert record["torch"] == torch.__version__ and record["kind"] == "probe"


def test_the_default_output_is_the_record_dir_with_a_readme(tmp_path, monkeypatch):
    """Without --output: bench/results/<device>/<kdops version>/ (`bench.report.record_dir`), with a README.md
    naming the command, date, commit and device; a second campaign there adds its line."""
    monkeypatch.setattr(cli, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setenv("KDOPS_CAMPAIGN_PROBE_S", "0")
    assert cli.main(["--allow-cpu", "--steps", "probe", "--minutes", "0.5"]) == 0
    (folder,) = (tmp_path / "results").glob("*/*")
    assert folder.name == kdops.__version__
    record = json.loads(next(folder.glob("campaign-*.jsonl")).read_text())
    assert folder == record_dir(record["device"], tmp_path / "results")
    assert (folder / f"campaign-{record['device_slug']}.md").exists()
    readme = (folder / "README.md").read_text()
    for what in ("`python -m bench.campaign --allow-cpu --steps probe --minutes 0.5`", record["timestamp"],
                 f"commit {record['commit']}", record["device"]):
        assert what in readme, what
    add_to_readme(folder, dict(record, command="python -m bench.campaign --steps tune"))
    readme = (folder / "README.md").read_text()
    assert readme.startswith(f"# {record['device']} · kdops {record['kdops']}\n") and readme.count("\n# ") == 0
    assert readme.count("\n* `python -m bench.campaign") == 2


def test_a_step_process_is_killed_within_the_budget(tmp_path):
    budget_s = 8
    done, seconds = _run_campaign("--allow-cpu", "--steps", "probe", "--minutes", str(budget_s / 60), "--output",
                                  str(tmp_path), env={"KDOPS_CAMPAIGN_PROBE_S": "120"})
    assert done.returncode == 1
    assert seconds < budget_s + 5  # the budget, and the interpreter's own start
    text = next(tmp_path.glob("campaign-*.md")).read_text()
    assert "| 1 | probe | timeout |" in text and "killed after" in text


def test_gpu_smoke_names_existing_kernel_tests():
    """Every GPU_SMOKE entry names a collected test; the selection covers each kernel module, bf16 and fp32."""
    modules = smoke.smoke_modules()  # what the campaign's smoke run collects
    assert set(modules) == {e.split("::")[0] for e in GPU_SMOKE}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu_smoke",
                           "-p", "no:cacheprovider", *modules], cwd=REPO, capture_output=True, text=True, timeout=120)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    missing = [e for e in GPU_SMOKE if not any(i == e or i.startswith(e + "[") for i in ids)]
    assert not missing, missing
    text = "\n".join(ids)
    for what in ("test_kd_loss.py", "test_fused_linear.py", "test_log_sum.py", "bf16-fused", "fp32-fused",
                 "bf16-chunked", "fp32-chunked", "bfloat16", "float32", "test_several_chunks_splits"):
        assert what in text, what


def test_patched_fused_config_keeps_the_number_of_programs():
    gpu = kdops.targets.H100
    base = fused_config(4096, 32000, gpu)
    patched = tuning.patched_fused_config(fused_config, dict(BLOCK_N=128, BLOCK_V=256))(4096, 32000, gpu)
    assert (patched["BLOCK_N"], patched["BLOCK_V"]) == (128, 256) and patched["split_size"] % 256 == 0
    programs = -(-32000 // base["split_size"]) * -(-4096 // base["BLOCK_N"])
    assert -(-32000 // patched["split_size"]) * (4096 // 128) <= programs
    assert tuning.patched_fused_config(fused_config, {})(4096, 32000, gpu) == base
    # entries for one kernel: the other keeps kdops' own configuration
    one_side = tuning.patched_fused_config(fused_config, dict(backward=dict(BLOCK_N=32, num_stages=4)))
    assert one_side(4096, 32000, gpu, forward=True) == fused_config(4096, 32000, gpu, forward=True)
    backward = one_side(4096, 32000, gpu)
    assert (backward["BLOCK_N"], backward["num_stages"], backward["BLOCK_V"]) == (32, 4, base["BLOCK_V"])


def test_tune_records_every_trial_and_the_fastest(tmp_path):
    """Under the interpreter at a tiny size: a configuration that cannot compile is recorded as failed, the
    others are timed and checked against the first one's loss, and the launcher's config is restored."""
    ctx = Context("tune", tmp_path, _meta(), seconds=600, device="cpu")
    original = kdops.launchers.linear.fused_config
    case = Case(FUSED, "forward_kl", 24, 300, 16, 24, "float32")
    trials = ({}, dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16), dict(BLOCK_V=100))  # 100: not a power of 2
    assert tuning.patched_fused_config(original, {})(24, 300, None) == original(24, 300, None)
    rows = tuning.tune(ctx, "fused", kdops.launchers.linear, "fused_config", tuning.patched_fused_config, trials, case,
                       lambda *a: kdops.fused_linear_kd_loss(*a, impl="fused", backend="triton"), 1.0, reps=1)
    assert kdops.launchers.linear.fused_config is original
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[1]["config"]["BLOCK_V"] == 64 and rows[1]["total_ms"] > 0
    records = [json.loads(line) for line in (tmp_path / "campaign-test-device.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["tune", "tune", "tune", "tune_best"]
    assert records[-1]["trial"] in (0, 1)
    assert "**fastest**" in "\n".join(ctx.result.lines) and ctx.result.status == "ok"


def test_pytest_summary_and_tables():
    summary, counts = smoke.pytest_summary("....\nFAILED x\n==== 1 failed, 20 passed, 909 deselected in 5.1s ====\n")
    assert summary == "1 failed, 20 passed, 909 deselected in 5.1s"
    assert counts == {"failed": 1, "passed": 20, "deselected": 909}
    ok = dict(status="ok", message="", forward_ms=1.0, backward_ms=2.0, total_ms=3.0, ratio_floor_total=1.5,
              extra_bytes=2**20, loss_rel_diff=0.0)
    records = [dict(ok, competitor="kdops-fused"), dict(ok, competitor="reference", total_ms=6.0),
               dict(ok, competitor="liger-chunked-jsd", status="oom", message="out of memory")]
    rows = headline.headline_rows(records)
    assert rows[1][:7] == ["reference", "ok", 1.0, 2.0, 6.0, 1.5, 2.0] and rows[1][7] == 1.0
    assert rows[2][1] == "oom: out of memory" and len(rows[2]) == len(headline.HEADLINE_HEADER)


def test_kernel_times_of_device_events():
    from torch.autograd import DeviceType

    def event(name, device_type, us):
        return SimpleNamespace(name=name, device_type=device_type, device_time_total=us)

    events = [event("gemm", DeviceType.CUDA, 30.0), event("aten::mm", DeviceType.CPU, 99.0),
              event("kd_kernel", DeviceType.CUDA, 50.0), event("gemm", DeviceType.CUDA, 30.0)]
    assert timeline.kernel_times(events) == [("gemm", 2, 60.0), ("kd_kernel", 1, 50.0)]


def test_idle_gaps_of_a_timeline():
    """Overlapping device events make no gap; a gap names its neighbours and the innermost host op at its middle."""
    from torch.autograd import DeviceType

    def event(name, device_type, start, end):
        return SimpleNamespace(name=name, device_type=device_type, time_range=SimpleNamespace(start=start, end=end))

    events = [event("gemm", DeviceType.CUDA, 0, 10), event("fill", DeviceType.CUDA, 5, 12),
              event("kd_kernel", DeviceType.CUDA, 15, 20), event("gemm", DeviceType.CUDA, 40, 50),
              event("forward", DeviceType.CPU, 0, 60), event("cudaMalloc", DeviceType.CPU, 25, 35),
              event("aten::empty", DeviceType.CPU, 11, 16)]
    idle = timeline.idle_gaps(events, top=1)
    assert idle["span_us"] == 50 and idle["idle_us"] == 3 + 20 and idle["gaps"] == 2
    assert idle["longest"] == [dict(us=20, after="kd_kernel", before="gemm", host="cudaMalloc")]
    assert timeline.idle_gaps([event("forward", DeviceType.CPU, 0, 1)]) == {}


def test_host_lead_of_a_timeline():
    """The host's time from the call to the GPU's first work, and its outermost operations there by name."""
    from torch.autograd import DeviceType

    def event(name, device_type, start, end):
        return SimpleNamespace(name=name, device_type=device_type, time_range=SimpleNamespace(start=start, end=end))

    events = [event("setup", DeviceType.CPU, 0, 5), event(timeline.HOST_MARK, DeviceType.CPU, 10, 300),
              event("aten::empty", DeviceType.CPU, 12, 40), event("cudaMalloc", DeviceType.CPU, 15, 38),
              event("aten::ne", DeviceType.CPU, 45, 47), event("aten::empty", DeviceType.CPU, 60, 80),
              event("cudaLaunchKernel", DeviceType.CPU, 90, 95), event("gemm", DeviceType.CUDA, 100, 200),
              event("aten::mm", DeviceType.CPU, 96, 150), event("fill", DeviceType.CUDA, 210, 220)]
    lead = timeline.host_lead(events, top=2)
    assert lead["lead_us"] == 90
    assert lead["ops"] == [dict(name="aten::empty", calls=2, us=48), dict(name="cudaLaunchKernel", calls=1, us=5)]
    assert timeline.host_lead(events[:7]) == {}  # no device event
    assert timeline.host_lead([e for e in events if e.name != timeline.HOST_MARK]) == {}


def test_predictions_degrade_without_the_cost_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "bench.model", None)
    (line,) = predictions.prediction_lines(kdops.targets.H100)
    assert line.startswith("cost model unavailable")


@pytest.fixture
def tiny_headline(monkeypatch):
    """The headline's shape cut to 16 tokens × H 8 × V 100, one repetition."""
    for module, name, value in ((headline, "HEADLINE_TOKENS", 16), (headline, "HEADLINE_VOCAB", 100),
                                (headline, "HEADLINE_HIDDEN", 8), (headline, "HEADLINE_REPS", 1),
                                (headline, "HEADLINE_WARMUP", 0), (profile, "PROFILE_REPS", 1)):
        monkeypatch.setattr(module, name, value)


def test_headline_step_on_a_tiny_case(tmp_path, tiny_headline):
    """The headline's code path on the CPU: the sweep's records in both JSON-lines files, a table per
    divergence, the charts; the CUDA-only competitors skipped with their reason."""
    text, records = _run_step(tmp_path, "headline", headline.run_headline)
    assert text.count("| competitor | status |") == 2 and "skipped: needs CUDA" in text
    assert {r["competitor"] for r in records} == set(headline.HEADLINE_COMPETITORS)
    assert all(r["kind"] == "headline" and r["command"] == "python -m bench.campaign" for r in records)
    assert {r["status"] for r in records if r["competitor"] in ("floor", "reference")} == {"ok"}
    sweep_files = [p for p in tmp_path.glob("*.jsonl") if not p.name.startswith("campaign-")]
    assert len(sweep_files) == 1 and len(sweep_files[0].read_text().splitlines()) == len(records)
    if "matplotlib is not installed" not in text:
        assert list(tmp_path.glob("charts-*/*.png"))


def test_tune_headline_step_on_a_tiny_case(tmp_path, tiny_headline, monkeypatch):
    """The fused tiles at the (cut) headline shape: a table per divergence, every trial timed and recorded."""
    monkeypatch.setattr(tune_headline, "HEADLINE_FUSED_TRIALS", ({}, dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16)))
    text, records = _run_step(tmp_path, "tune_headline", tune_headline.run_tune_headline)
    assert text.count("| trial | config |") == len(headline.DIVERGENCES) and "generalized_jsd" in text
    assert [r["status"] for r in records if r["kind"] == "tune"] == ["ok"] * 2 * len(headline.DIVERGENCES)
    assert "tune_headline" in plan.STEPS and "tune_headline" not in plan.DEFAULT_STEPS


def test_profile_step_on_a_tiny_case(tmp_path, tiny_headline):
    """The profile's code path on the CPU (no device events there): measured times and the model's phases."""
    text, records = _run_step(tmp_path, "profile", profile.run_profile)
    assert text.count("Measured (CUDA events") == 6  # two divergences × impls fused, chunked, sliced
    assert text.count("Skipped: the epilogue path runs on CUDA GPUs of compute capability") == 2  # not on a CPU
    assert text.count("| phase | GFLOP |") == 6 or "cost model unavailable" in text
    assert [r["kind"] for r in records].count("profile") == 6


def test_fused_check_retries_with_fewer_tokens_and_judges_the_errors(tmp_path, monkeypatch):
    from bench import fused_check

    calls = []

    def fake_main(argv):
        tokens, divergence, out = argv[1], argv[3], argv[5]
        calls.append((divergence, tokens))
        if tokens == "8192" and divergence == "generalized_jsd":
            raise torch.OutOfMemoryError("CUDA out of memory")
        error = 0.5 if divergence == "generalized_jsd" else 1e-3
        record = dict(divergence=divergence, impl="fused", tokens=int(tokens), hs=2048, ht=4096, vocab=151936,
                      err_loss=1e-6, err_grad_hidden=error, err_grad_weight=1e-3, seconds=0.1, extra_mib=1.0,
                      reference_seconds=1.0, reference_extra_mib=100.0, device="x")
        Path(out).write_text(json.dumps(record) + "\n")

    monkeypatch.setattr(fused_check, "main", fake_main)
    ctx = Context("fused_check", tmp_path, _meta(), seconds=600, device="cpu")
    fused_check_step.run_fused_check(ctx)
    assert calls == [("forward_kl", "8192"), ("generalized_jsd", "8192"), ("generalized_jsd", "4096")]
    assert (ctx.result.status, ctx.result.message) == ("failed", "1 result(s) beyond 0.02")
    text = "\n".join(ctx.result.lines)
    assert "generalized_jsd: out of memory at 8192 tokens" in text and "| generalized_jsd | fused | 4096 |" in text
    assert len((tmp_path / "fused-check-test-device.jsonl").read_text().splitlines()) == 2


def test_smoke_step_reports_the_tests_summary(tmp_path, monkeypatch):
    ctx = Context("smoke", tmp_path, _meta(), seconds=60, device="cpu")
    monkeypatch.setattr(smoke, "SMOKE_COMMAND", ("-c", "print('== 21 passed, 9 deselected in 3.2s ==')"))
    smoke.run_smoke(ctx)
    assert ctx.result.status == "ok" and "**21 passed, 9 deselected in 3.2s**" in "\n".join(ctx.result.lines)
    ctx = Context("smoke", tmp_path, _meta(), seconds=60, device="cpu")
    monkeypatch.setattr(smoke, "SMOKE_COMMAND", ("-c", "print('== 1 failed, 3 passed in 1s =='); exit(1)"))
    smoke.run_smoke(ctx)
    assert (ctx.result.status, ctx.result.message) == ("failed", "1 failed, 3 passed in 1s")
    records = [json.loads(line) for line in (tmp_path / "campaign-test-device.jsonl").read_text().splitlines()]
    assert [r["counts"] for r in records] == [{"passed": 21, "deselected": 9}, {"failed": 1, "passed": 3}]


def test_tune_kinds_step_on_a_tiny_case(tmp_path, tiny_headline, monkeypatch):
    """The other kinds' fused tiles at the (cut) headline shape: a table per case, the options (the hard-label
    term) reaching the loss: a case the loss rejects would fail every trial."""
    small = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=16)
    monkeypatch.setattr(tune_headline, "KINDS_FUSED_TRIALS", (
        ("tvd", {}, ({}, dict(forward=small))), ("forward_kl", dict(hard_weight=0.5), ({}, dict(backward=small)))))
    text, records = _run_step(tmp_path, "tune_kinds", tune_headline.run_tune_kinds)
    assert text.count("| trial | config |") == 2 and "**fused hard_weight=0.5**" in text
    assert [r["status"] for r in records if r["kind"] == "tune"] == ["ok"] * 4
    assert "tune_kinds" in plan.STEPS and "tune_kinds" not in plan.DEFAULT_STEPS


def test_the_campaign_s_metadata_and_readme_name_the_source_hash(tmp_path):
    """`campaign_metadata` carries `bench.report.source_hash` beside the commit; the README line and the report
    name it."""
    from bench.campaign.metadata import campaign_metadata
    from bench.report import source_hash

    meta = campaign_metadata("cpu", ["--steps", "probe"])
    assert meta["source_hash"] == source_hash() and {"commit", "dirty"} <= set(meta)
    assert f"source hash {meta['source_hash']}" in add_to_readme(tmp_path, meta).read_text()
    steps = [Step("probe", "a probe", 1.0, ("probe",), lambda ctx: None)]
    assert meta["source_hash"] in render_report(meta, steps, [StepResult("probe", seconds=0.1)], Budget(60))


def test_the_headline_table_names_the_floor_s_variant():
    rows = headline.headline_rows([
        {"competitor": "floor", "status": "ok", "forward_ms": 20.0, "backward_ms": 25.0, "total_ms": 45.0,
         "ratio_floor_total": 1.0, "extra_bytes": None, "loss_rel_diff": None, "floor_variant": "full"},
        {"competitor": "kdops-fused", "status": "ok", "forward_ms": 50.0, "backward_ms": 40.0, "total_ms": 90.0,
         "ratio_floor_total": 2.0, "extra_bytes": 2**20, "loss_rel_diff": 0.0, "floor_variant": "full"}])
    assert [row[0] for row in rows] == ["floor (full)", "kdops-fused"]
