"""The kernels ship inside the kdops import package (as kdops.kernels), never as a top-level `kernels`
package, which would collide with the `kernels` distribution that transformers probes for."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


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


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("kdops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kdops/kernels/logits.py" in names and "kdops/kernels/divergences.py" in names
    assert "kdops/api.py" in names and "kdops/compat/trl.py" in names
    assert not any(name.startswith(("kernels/", "bench/", "tests/")) for name in names)


def test_versions_agree():
    """The newest version of CHANGELOG.md is kdops.__version__ and pyproject.toml's."""
    import re
    import tomllib

    import kdops

    changelog = (ROOT / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\d+\.\d+\.\d+)\b", changelog, re.MULTILINE).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert newest == kdops.__version__ == project
