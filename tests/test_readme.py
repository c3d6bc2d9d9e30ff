"""The README's examples run, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run():
    code = blocks("python")
    assert code, "the README has no python example"
    for block in code:
        exec(compile(block, "README.md", "exec"), {})


def test_inline_settings_run(monkeypatch):
    """Every setting the README's text gives as one line of code (an assignment naming linattn, to a module's
    setting or an entry of one) runs as written and sets what it names. (The op functions shadow their packages'
    names in ``linattn.ops``, so an attribute path such as ``linattn.ops.gla.triton.KEEP_STATES`` fails: the
    README imports the module instead.)"""
    import importlib

    import linattn.ops

    pytest.importorskip("triton")
    snippets = [c for c in re.findall(r"`([^`\n]*linattn[^`\n]*)`", README) if re.search(r"[\w\]] = ", c)]
    assert snippets, "the README gives no inline setting"
    assert any("SPLIT_INFERENCE" in snippet for snippet in snippets), snippets  # an entry of a setting
    for snippet in snippets:
        imported = re.match(r"from (\S+) import (\S+) as (\S+);", snippet)
        owner, name, key, value = re.search(r"([\w.]+)\.(\w+)(?:\[\"(\w+)\"\])? = (.+)$", snippet).groups()
        path = f"{imported[1]}.{imported[2]}" if imported and owner == imported[3] else owner
        module = importlib.import_module(path)
        old = getattr(module, name)
        assert key is None or key in old, f"{snippet}: {name} has no entry {key!r}"
        monkeypatch.setattr(module, name, dict(old) if key else old)  # restored after the test
        exec(compile(snippet, "README.md", "exec"), {"linattn": linattn})
        setting = getattr(module, name)
        assert (setting[key] if key else setting) == eval(value), snippet


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
