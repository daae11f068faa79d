"""Every `lmforge ...` command shown in README.md and docs/ parses with the real command line: a renamed flag or
command in the code fails here until the docs follow (the commands' behaviour is tested elsewhere)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lmforge.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text(encoding="utf-8")):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                if line.startswith("lmforge "):
                    found.append((f"{doc.name}: {line}", line))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20  # the parser below must not be checking an empty list


@pytest.mark.parametrize("where, line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, line):
    argv = shlex.split(line, comments=True)[1:]
    try:
        parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: the command line does not parse (see the usage message above)")
