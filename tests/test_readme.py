"""README.md stays true: its Python examples run, and CI runs exactly its test command.

Fences marked `py` instead of `python` are fragments that need a process group (distributed training);
tests/test_vocab_parallel.py and tests/test_data_parallel.py run what they show."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {})


def test_ci_runs_the_readme_test_command():
    test_block = README.split("**Run the tests**", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", test_block, flags=re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
