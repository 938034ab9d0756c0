"""README's set-up commands and CI must not drift apart."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"TEST_CMD='(.+?)'", ci)
    assert m, "TEST_CMD not found in .ci/run"
    cmds = _readme_commands()
    assert len(cmds) >= 2
    assert cmds[1].strip() == m.group(1)


def test_readme_first_command_installs_into_repo_venv():
    first = _readme_commands()[0]
    assert first.startswith("python3 -m venv .venv")
    assert '.venv/bin/pip install -q -e ".[dev]"' in first
    script = first.rsplit(".venv/bin/python ", 1)[1].split()[0]
    assert (ROOT / script).is_file()
