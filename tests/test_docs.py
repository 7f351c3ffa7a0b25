"""The README and docs/ show commands; each of them must be one the project accepts as written."""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from fashion_lightning.cli import main
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> list[tuple[str, str, list[str]]]:
    """Every ``python -m fashion_lightning ...`` line in the indented code blocks of the pages,
    continuation lines joined: (page, command as shown, its arguments)."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        joined: list[str] = []
        for line in lines:
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1] + " " + line.strip()
            elif line.startswith("    "):
                joined.append(line.strip())
        loop: tuple[str, list[str]] | None = None  # a shell loop's variable and its values
        for line in joined:
            shown = line.split("  #")[0].strip()
            matched = re.match(r"for (\w+) in (.+); do$", shown)
            if matched:
                loop = (matched.group(1), matched.group(2).split())
            start = shown.find("-m fashion_lightning")
            if start < 0:
                continue
            variable, values = loop if loop and f"${loop[0]}" in shown else ("", [""])
            for value in values:
                command = shown.replace(f"${variable}", value) if variable else shown
                found.append((page.name, shown, shlex.split(command[start + 3 :])))
    return found


COMMANDS = _commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 15
    assert {page for page, _, _ in COMMANDS} >= {"README.md", "resuming.md", "search.md"}


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """The example of docs/trust.md: a user's own callback in a module of their own."""
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "callbacks.py").write_text(
        "from lightning.pytorch.callbacks import Callback\n\nclass Mine(Callback):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FASHION_LIGHTNING_TRUSTED_IMPORTS", "tests.helpers,my_package.callbacks")


@pytest.mark.parametrize(
    ("page", "shown", "words"), COMMANDS, ids=[f"{p}:{s[:60]}" for p, s, _ in COMMANDS]
)
def test_every_command_shown_is_accepted(page, shown, words, user_package, monkeypatch, capsys):
    program, arguments = words[0], [w.replace("<file.ckpt>", "x.ckpt") for w in words[1:]]
    if program == "fashion_lightning.tune":
        from fashion_lightning.tune.command import parse_args

        parse_args(arguments)  # exits 2 with its one-line error if a flag is wrong
        return
    assert program == "fashion_lightning", shown
    if arguments[:1] == ["runs"]:
        from fashion_lightning.runs import parse_args as runs_arguments

        runs_arguments(arguments[1:])  # exits 2 with its one-line error if a flag is wrong
        return
    if arguments == ["fit", "--help"]:
        arguments = ["fit", "--print_config"]
    monkeypatch.setattr(sys, "argv", ["python -m fashion_lightning"])
    with pytest.raises(SystemExit) as exit_:
        main([*arguments, "--print_config"])
    assert exit_.value.code in (0, None), capsys.readouterr().err[-2000:]
