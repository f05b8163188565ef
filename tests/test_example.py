"""The end-to-end example runs (in its --quick form) and reports every model."""

import importlib.util
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
