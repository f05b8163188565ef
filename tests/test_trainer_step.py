"""bench.trainer_step: whole optimizer steps of every competitor's trainer at the tiny preset on the CPU — records,
first-step losses that agree with each other and with kdops' reference, skips, the dry run — and its campaign
step."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

pytest.importorskip("transformers")

from bench import trainer_step as ts  # noqa: E402

TINY = ts.PRESETS["tiny"]
WARMUP, STEPS = 0, 2  # the first step is timed too: a couple of steps in all
FIELDS = ("preset", "competitor", "status", "message", "tokens_per_s", "step_ms", "step_iqr_ms", "peak_bytes",
          "step_peak_bytes", "first_loss", "loss_rel_diff", "loss_reference", "torch", "transformers", "trl",
          "liger_kernel", "kdops", "device", "memory_measure", "divergence")


@pytest.fixture(scope="module")
def records():
    return ts.run(TINY, device="cpu", warmup=WARMUP, steps=STEPS)


def test_every_available_competitor_trains_and_writes_records(records, tmp_path):
    assert [r["competitor"] for r in records] == [c.name for c in ts.COMPETITORS]
    for r in records:
        if r["status"] == "skipped":
            assert r["message"] == ts.BY_NAME[r["competitor"]].missing()
            continue
        assert r["status"] == "ok", r["message"]
        assert r["step_ms"] > 0 and r["step_iqr_ms"] >= 0 and r["step_peak_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(TINY.tokens / (r["step_ms"] / 1e3))
        assert r["peak_bytes"] is None and r["memory_measure"] == "bench.memory.AllocationTracker"
    path = ts.write_records(records, tmp_path)
    read = [json.loads(line) for line in path.read_text().splitlines()]
    assert read == records and all(set(FIELDS) <= set(r) for r in read)
    assert all(r["preset"] == "tiny" and r["reps"] == STEPS and r["warmup"] == WARMUP for r in read)
    table = ts.table(records)
    assert all(f"| {c.name} |" in table for c in ts.COMPETITORS)


def reference_first_loss() -> float:
    """The first step's loss computed apart from any trainer: kdops' reference generalized JSD (β = 0.5) of the
    fresh student's and the teacher's full logits, over every predicted position of the first batch."""
    import kdops
    import kdops.torch_math

    student = ts.build_model(TINY.student, TINY, "cpu", seed=0)
    teacher = ts.build_teacher(TINY, "cpu")
    ids = ts.token_batches(TINY, WARMUP + STEPS + 1)[:TINY.batch]
    with torch.no_grad():
        s, t = student(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1]
    rows = kdops.torch_math.divergence_rows(kdops.GeneralizedJSD(ts.BETA), s, t, ts.TEMPERATURE)
    return float(rows.mean())


def test_first_step_losses_agree(records):
    """Same batches, same initial weights, the same divergence: every competitor's first loss is the reference's
    to float32 accuracy, and the plain PyTorch loss is the reference."""
    ran = [r for r in records if r["status"] == "ok"]
    assert {r["competitor"] for r in ran} >= {"kdops-transformers", "torch-logits"}
    expected = reference_first_loss()
    assert expected > 0.1  # weights of std 0.2: far from uniform distributions
    for r in ran:
        assert r["first_loss"] == pytest.approx(expected, rel=1e-4), r["competitor"]
        assert r["loss_reference"] == "torch-logits" and r["loss_rel_diff"] < 1e-4


def test_missing_package_is_a_skip(monkeypatch):
    """A competitor whose package does not import is a "skipped" record with the reason, and nothing is built."""
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setattr(ts, "build_teacher", lambda *args: pytest.fail("built a teacher for nothing"))
    liger = ts.BY_NAME["liger-jsd"]
    assert liger.missing() == "liger-kernel not installed"
    absent = ts.Competitor("absent", ts._trl, "trl", (("no-such-package", "kdops_no_such_package"),))
    records = ts.run(TINY, [liger, absent], device="cpu", warmup=1, steps=1)
    assert [(r["status"], r["message"]) for r in records] == [
        ("skipped", "liger-kernel not installed"), ("skipped", "no-such-package not installed")]
    assert all(r["first_loss"] is None and r["loss_rel_diff"] is None for r in records)


def test_dry_run_lists_every_competitor(capsys):
    for preset in ("tiny", "1b-8b"):
        assert ts.main(["--dry-run", "--preset", preset]) == 0
        out = capsys.readouterr().out
        for c in ts.COMPETITORS:
            assert f"  {c.name}: ~" in out or f"  {c.name}: skipped (" in out
        assert "estimated total ~" in out and "memory plan:" in out


def test_the_gpu_preset_fits_80_gb():
    """The 1b-8b preset's memory plan (both models, AdamW for the student, activations, even the full-logits loss)
    leaves room on an 80 GB GPU without gradient checkpointing."""
    preset = ts.PRESETS["1b-8b"]
    assert not preset.gradient_checkpointing
    assert 1.2e9 < preset.student.parameters(preset.vocab) < 1.3e9
    assert 8.0e9 < preset.teacher.parameters(preset.vocab) < 8.1e9
    assert sum(ts.memory_plan(preset).values()) < 70 * 2**30


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_is_the_models(tied):
    shape = ts.Shape(64, 2, 4, 2, 96, tied=tied)
    model = ts.build_model(shape, TINY, "cpu", seed=0)
    assert shape.parameters(TINY.vocab) == model.num_parameters()


def test_campaign_step_is_declared_and_runs(monkeypatch, tmp_path):
    """The step's estimate covers bench.trainer_step's own for the 1b-8b preset and fits a 9-minute plan; its body
    (off CUDA: the tiny preset, two competitors here) records every competitor and writes its table."""
    from bench.campaign import trainer_step as step
    from bench.campaign.runner import execute_inline

    preset = ts.PRESETS[step.PRESET]
    assert step.TRAINER_STEP.name == "trainer_step"
    assert ts.run_estimate_s(preset, ts.COMPETITORS, preset.warmup, preset.steps) <= step.TRAINER_STEP_S <= 180
    monkeypatch.setattr(ts, "COMPETITORS", (ts.BY_NAME["kdops-transformers"], ts.BY_NAME["torch-logits"]))
    monkeypatch.setitem(ts.PRESETS, "tiny", dataclasses.replace(TINY, warmup=0, steps=1))
    meta = {"device_slug": "cpu"}
    result = execute_inline(tmp_path, meta, device="cpu")(step.TRAINER_STEP, 120.0)
    assert result.status == "ok", result.message
    assert any(line.startswith("| kdops-transformers | ok |") for line in result.lines)
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "campaign-cpu.jsonl").read_text().splitlines()]
    assert kinds == ["trainer_step"] * 2
    assert len(list(tmp_path.glob("trainer-step-*.jsonl"))) == 1
