"""The README's examples run, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run():
    code = blocks("python")
    assert code, "the README has no python example"
    for block in code:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = [line for b in blocks("bash") for line in b.strip().splitlines()]
    assert len(commands) == 2, f"the README's set-up should be two commands, got {commands}"
    test_command = next(c for c in commands if "pytest" in c)
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert test_command in ci, f"{test_command!r} is not a line of .ci/run: {ci}"
