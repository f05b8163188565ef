"""The kernels ship inside the kdops import package (as kdops.kernels), never as a top-level `kernels`
package: the `kernels` distribution, which transformers 5 depends on and imports, must win `import kernels`
everywhere, the repository root included (kernels/README.md says how)."""

import importlib.metadata
import importlib.util
import os
import pathlib
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: where `import kernels` and `kdops.kernels` come from, and whether an interpreted
# kernel runs from there. Prints a JSON object.
PROBE = r"""
import importlib.util, json, os
spec = importlib.util.find_spec("kernels")
try:
    import kernels
except ModuleNotFoundError:
    kernels = None
import kdops, kdops.kernels.logits, torch
student = torch.randn(3, 37, requires_grad=True)
loss = kdops.kd_loss(student, torch.randn(3, 37), backend="triton")
loss.backward()
report = {
    "spec_origin": spec.origin if spec else None,
    "kernels_file": getattr(kernels, "__file__", None),
    "kernels_names": sorted(n for n in vars(kernels) if not n.startswith("__")) if kernels else [],
    "kdops_kernels_file": os.path.realpath(kdops.kernels.logits.__file__),
    "loss_finite": bool(torch.isfinite(loss)) and bool(torch.isfinite(student.grad).all()),
}
try:
    from transformers.utils import import_utils
    import transformers.integrations.hub_kernels  # `from kernels import CUDAProperties, ...` where available
    report["transformers_sees_kernels"] = import_utils.is_kernels_available()
except ImportError as error:
    report["transformers_error"] = repr(error)
print(json.dumps(report))
"""


def _probe(cwd, *python_flags, pythonpath=None) -> dict:
    import json

    env = {"PATH": os.environ.get("PATH", ""), "TRITON_INTERPRET": "1", "HOME": os.environ.get("HOME", "/tmp")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    done = subprocess.run([sys.executable, *python_flags, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _is_under(path, folder) -> bool:
    return path is not None and pathlib.Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _site_packages() -> list[str]:
    folders = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return sorted(f for f in folders if os.path.isdir(f))


def test_kernels_distribution_wins_from_the_repository_root():
    """From the root (first on sys.path), `import kernels` is the installed distribution: transformers imports
    its names, and kdops' kernels still load as kdops.kernels and run interpreted."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` distribution is not installed (transformers >= 5 installs it)")
    report = _probe(ROOT)
    assert not _is_under(report["spec_origin"], ROOT), report
    assert report["kernels_file"] is not None and not _is_under(report["kernels_file"], ROOT), report
    assert report["kdops_kernels_file"] == str(ROOT / "kernels" / "logits.py")
    assert report["loss_finite"]
    if importlib.util.find_spec("transformers") is not None:
        assert "transformers_error" not in report, report["transformers_error"]


def test_without_the_kernels_distribution_nothing_of_kdops_answers_import_kernels(tmp_path):
    """The same interpreter with every installed package but the `kernels` distribution (its site-packages linked
    entry by entry into one folder, `python -S`): from the root, `import kernels` runs none of kdops' code (at most
    an empty namespace, which transformers reads as "not installed"), and kdops' kernels still run."""
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    hidden = []
    for folder in _site_packages():
        for entry in os.scandir(folder):
            if entry.name == "kernels" or (entry.name.startswith("kernels-") and entry.name.endswith(".dist-info")):
                hidden.append(entry.name)
            elif not (shadow / entry.name).exists():
                (shadow / entry.name).symlink_to(entry.path)
    report = _probe(ROOT, "-S", pythonpath=[shadow])
    assert report["spec_origin"] is None and report["kernels_file"] is None, report
    assert report["kernels_names"] == [], report  # no kernel module of kdops imported under that name
    assert report["kdops_kernels_file"] == str(ROOT / "kernels" / "logits.py")
    assert report["loss_finite"]
    if importlib.util.find_spec("transformers") is not None:
        assert "transformers_error" not in report, report["transformers_error"]
        assert report["transformers_sees_kernels"] is False


def test_installed_layout(tmp_path):
    """From outside the source tree: kdops.kernels imports, and kdops installs no top-level `kernels`."""
    probe = (
        "import importlib.util, kdops.kernels.logits as k; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(k.__file__); print(spec.origin if spec else None)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PATH": "", "TRITON_INTERPRET": "1"})
    kernel_file, top_level_kernels = out.stdout.split()
    assert pathlib.Path(kernel_file).name == "logits.py"
    assert top_level_kernels == "None" or not top_level_kernels.startswith(str(ROOT))


def test_wheel_contents_and_its_install(tmp_path):
    """The wheel holds the kernels under kdops/kernels/ and nothing at the top level but kdops; installed on its own
    (no link, no source tree) it imports kdops.kernels from there and runs a kernel."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True)
    (wheel,) = wheels.glob("kdops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = {f"kdops/{p.relative_to(ROOT / 'kdops')}" for p in (ROOT / "kdops").rglob("*.py")}
    sources |= {f"kdops/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert sources <= set(names), f"not in the wheel: {sorted(sources - set(names))}"
    assert "kdops/kernels/logits.py" in names and "kdops/api.py" in names
    assert not any(name.startswith(("kernels/", "bench/", "tests/")) for name in names)
    target = tmp_path / "target"
    zipfile.ZipFile(wheel).extractall(target)  # what `pip install --target` lays out for a pure-Python wheel
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    report = _probe(outside, pythonpath=[target])
    assert report["kdops_kernels_file"] == os.path.realpath(target / "kdops" / "kernels" / "logits.py")
    assert report["loss_finite"]


def test_versions_agree():
    """The newest version of CHANGELOG.md is kdops.__version__ and pyproject.toml's."""
    import re
    import tomllib

    import kdops

    changelog = (ROOT / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\d+\.\d+\.\d+)\b", changelog, re.MULTILINE).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert newest == kdops.__version__ == project
