"""The README's short tour runs, command by command, as a new user would type it: each exits 0 without a
traceback. Only sizes change, so the tour fits in a test; every substitution is listed below with its reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_olmo_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ("data.sequence_length=32 global_batch_size=128 micro_batch_size=64 max_steps=4 "
              "checkpoint.interval=2 metrics.log_interval=1")

# (pattern, replacement, why). Applied in order to each command line of the tour.
SUBSTITUTIONS = [
    (r"^source \.venv/bin/activate$", "", "the test runs `lmforge` from the interpreter running the tests"),
    (r"configs/train/olmo2-1b\.yaml (.*) --nproc 8", rf"configs/train/quickstart.yaml \1 run_dir=runs/b {TINY_TRAIN} "
     "--nproc 2", "a 1B model on 8 processes does not fit a CI machine: the tiny model on 2 processes"),
    (r"(configs/train/quickstart\.yaml .*run_dir=runs/a)", rf"\1 {TINY_TRAIN}", "4 steps of 4 short sequences"),
    (r"step00000100", "step00000002", "the tiny run checkpoints at steps 2 and 4"),
    (r"step00000150", "step00000004", "the tiny run checkpoints at steps 2 and 4"),
    (r"--step (10|100)\b", "--step 2", "the tiny run has 4 steps"),
    (r"--limit \d+", "--limit 4", "4 items per task"),
]


def tour_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## A short tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def substituted(line: str) -> str:
    for pattern, replacement, _ in SUBSTITUTIONS:
        line = re.sub(pattern, replacement, line)
    return line


def test_every_substitution_is_used():
    commands = tour_commands()
    for pattern, _, why in SUBSTITUTIONS:
        assert any(re.search(pattern, c) for c in commands), f"unused substitution ({why}): the README changed"


@requires_olmo_tokenizer
@pytest.mark.slow
def test_readme_tour_runs(tmp_path):
    from lmforge.recipes.corpus import write_raw_corpus

    write_raw_corpus(tmp_path / "quickstart", 1_500_000)  # what `make quickstart` leaves, smaller
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "lmforge").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lmforge "$@"\n')
    (shim / "lmforge").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    for line in tour_commands():
        command = substituted(line)
        if not command.strip():
            continue
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (
            f"README tour: `{line}` (run as `{command}`) exited {done.returncode}:\n{done.stderr[-3000:]}")
