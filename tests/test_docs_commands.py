"""Every shell command shown in README.md and docs/*.md runs, so the docs cannot drift from the code.

What counts as a command: each line of a ```bash / ```sh / ```shell block (backslash continuations joined,
comments dropped), each `$ ` line of a ```console block, and each `lmforge ...` line of an unlabelled block.
Two checks:

- fast: every `lmforge ...` command parses with the real command line, and every entry of the tables below
  still matches a documented command (a table entry whose command left the docs is removed with it);
- slow: doc by doc, every command runs in order, as a user would type it, in a fresh copy of a workspace
  (below), and must exit 0 (or the code `EXPECTED_EXIT` gives) without a traceback. A command is skipped only
  when `NOT_RUN` lists it with the reason.

A new command in a new or changed doc is picked up by itself; when it cannot run as written, either fix the doc
or add one row to `SUBSTITUTIONS` (placeholders, sizes, GPU counts) or `NOT_RUN` (cannot run here at all),
with the reason. Placeholders in docs are upper-case words (`MODEL_DIR`, `RUN_DIR`) or `...` for document globs.

The workspace each doc starts from is what a user has after `make quickstart`, at tiny sizes (`quickstart/`:
raw and held-out documents, attributes, the mixed corpus, a BPE tokenizer, tokens, a 4-step run, its model
directory, an evaluation and a Hugging Face export), plus the inputs the docs name (`WORKSPACE_FILES`), and
every file a doc shows in a block whose first line is `# NAME.ext` (a bare file name, e.g. `# my_taggers.py`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import requires_olmo_tokenizer

from lmforge.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

TINY_TRAIN = ("data.sequence_length=32 global_batch_size=128 micro_batch_size=64 max_steps=4 "
              "checkpoint.interval=2 metrics.log_interval=1")
QUICKSTART_STEPS = 4  # the workspace's run; a documented rerun of it trains two more steps

# (pattern, replacement, why): applied in order (re.sub) to every command, after its comment is dropped.
SUBSTITUTIONS = [
    # placeholders: what the user's paths stand for in the workspace
    (r"\bMODEL_DIR\b", "quickstart/model", "a model directory: the quickstart's"),
    (r"\bRUN_DIR\b|\bRUN_[A-Z]\b|\bruns/my-run\b", "quickstart/run", "a training run: the quickstart's"),
    (r"--documents (?:'\.\.\.'|\.\.\.)", "--documents 'data/*/documents/*.jsonl.gz'", "'...' stands for a glob"),
    (r"data\.paths=\[tokens/\]", "data.paths=[quickstart/tokens]", "a token directory: the quickstart's"),
    (r"(?:\./)?\.venv/lib/python3\.\d+/site-packages/", sysconfig.get_paths()["purelib"] + "/",
     "the docs run from the repository root; the workspace finds the venv's packages where they are"),
    (r"^source \.venv/bin/activate$", "", "`lmforge` is the interpreter running the tests (a shim on PATH)"),
    # sizes and device counts
    (r"configs/train/olmo2-1b\.yaml (.*) --nproc 8", rf"configs/train/quickstart.yaml run_dir=runs/nproc \1 "
     rf"{TINY_TRAIN} --nproc 2", "a 1B model on 8 GPUs: the tiny model on 2 CPU processes (gloo), same "
     "code path; a run_dir the doc gives comes later and wins"),
    (r"(configs/train/quickstart\.yaml .*run_dir=runs/a)$", rf"\1 {TINY_TRAIN}", "4 steps of 4 short sequences"),
    (r"(configs/train/quickstart\.yaml .*run_dir=quickstart/run)$", rf"\1 max_steps={QUICKSTART_STEPS + 2}",
     "the workspace's run has its 4 steps: the rerun resumes and trains (and saves) two more"),
    (r"step00000100", "step00000002", "the tiny run checkpoints at steps 2 and 4"),
    (r"step00000150", "step00000004", "the tiny run checkpoints at steps 2 and 4"),
    (r"--step (10|100|1200)\b", "--step 2", "the tiny runs have 4 steps"),
    (r"--limit \d+", "--limit 4", "4 items per task"),
    (r"--instances \d+", "--instances 4", "4 items per task, as the `--limit 4` of the eval it compares with"),
    (r"^(lmforge eval (?!.*--limit).*)$", r"\1 --limit 4", "4 items per task (a whole suite takes hours on CPU)"),
    (r"^(lmforge adapt score (?!.*--limit).*)$", r"\1 --limit 4", "4 items (a 135M model's 200 answers take minutes)"),
    (r"(configs/adapt/(?:smollm2-sft-arithmetic|quickstart-sft)\.yaml)$", r"\1 max_steps=2 batch_size=2 "
     "micro_batch_size=2", "two steps of two records (the recipes' 12-20 steps of 8 take minutes on 2 CPU cores)"),
    (r"--expected-paragraphs \d+", "--expected-paragraphs 100000", "a Bloom filter for 50M paragraphs is 180 MB"),
    (r"--vocab-size 4096 --out quickstart/tokenizer", "--vocab-size 512 --out quickstart/tokenizer",
     "the workspace's quickstart trained a 512-token BPE (its run's vocabulary)"),
    (r"(configs/train/quickstart_anneal\.yaml .*data\.seed=\d)$", r"\1 max_steps=3",
     "the workspace's anneals have one step: two more, not the config's 20"),
]

# (pattern, why): documented commands that cannot run here at all.
NOT_RUN = [
    (r"^make quickstart\b", "the workspace is the quickstart's output, built by the recipe `make quickstart` runs "
     "(lmforge.recipes.quickstart) at tiny sizes; the target itself also builds .venv"),
    (r"^(LMFORGE_REQUIRE_PEERS=1 )?make test\b", "the test suite this test is part of"),
    (r"pip install", "downloads packages (the tests run offline)"),
    (r"^bash benchmarks/peers/setup_", "downloads the peers (the tests run offline)"),
    (r"^torchrun --nnodes [2-9]", "several machines; one machine's torchrun path is `train --nproc`, which runs"),
    (r"--executor ray", "needs Ray (the `ray` extra) and a cluster to join; the executor's Ray path is tested where "
     "ray is installed"),
    (r"olmo2-7b-stage2\.yaml", "stage 2 of a 7B model needs the 7B stage-1 run and GPUs"),
    (r"--nproc 8 .*parallel\.(tensor|context|expert|pipeline|data)", "layouts of 8 or 16 GPUs; "
     "tests/test_train_scaleout.py and tests/test_train_pipeline.py pass each through the launcher's checks"),
    (r"tulu3-8b|llama-3\.1-8b", "Tülu 3's 8B recipes need an 8B start model and GPUs; tests/test_shipped_configs.py "
     "and tests/test_adapt_rlvr.py load the recipes"),
    (r"^benchmarks/gpu_check\.sh(?!.*--dry)", "needs a CUDA GPU; tests/test_gpu_check.py runs its CPU dry run "
     "(`--dry`), which goes through every step"),
    (r"^python benchmarks/fault_campaign\.py", "kills and reruns every stage dozens of times (minutes); "
     "tests/test_fault_campaign.py runs a short campaign on real stages"),
]

# (pattern, exit code, why): commands the docs show failing on purpose.
EXPECTED_EXIT = [
    (r"^LMFORGE_FAULT_ENOSPC_AT=", 2, "the docs show the one error line of a full disk"),
]

# Inputs the docs name that the quickstart does not leave: path -> how it is made from the quickstart's files.
WORKSPACE_FILES = {
    "data/web/documents/": "quickstart/raw/documents (the README's `cp`; configs/data/gopher_c4_mix.yaml reads it)",
    "crawl1/documents/, crawl2/documents/": "the raw shards 0000 and 0001 (two crawls for a persisted dedup state)",
    "corpus/*.jsonl.zst": "the raw documents, zstd-compressed",
    "heldout/*.jsonl.gz, heldout/stdlib/documents/": "quickstart/heldout",
    "eval_questions.txt": "two strings to count",
    "my_task.yaml, my_qa.jsonl": "a user multiple-choice task",
    "gsm8k-train.parquet, gsm8k/main/train-00000-of-00001.parquet": "two GSM8K-style train items (question, answer "
    "with `#### N`), the Hub's columns",
    "mine.jsonl": "one user SFT record (messages)",
    "benchmarks/": "a link to the repository's, for `python benchmarks/...`",
}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int  # where the command starts in the doc
    text: str  # as written, continuations joined, comment dropped

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


FENCE = re.compile(r"^```(\w*)\s*$")


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` outside quotes, at the start or after a blank)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def fenced_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the block's first line, lines) of every fenced block."""
    blocks, current = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line.strip())
        if current is None and fence:
            current = (fence.group(1), number + 1, [])
        elif current is not None and line.strip() == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def documented_commands(path: Path) -> list[Command]:
    commands = []
    for language, first, lines in fenced_blocks(path):
        pending, start = "", 0
        for offset, line in enumerate(lines):
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            elif language not in ("bash", "sh", "shell", ""):
                break
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            text = strip_comment(pending + line.strip()).strip()
            pending = ""
            if text and (language or text.startswith("lmforge ")):
                commands.append(Command(path.name, start, re.sub(r"\s+", " ", text)))
    return commands


def documented_files(path: Path) -> dict[str, str]:
    """Files a doc shows whole: blocks whose first line is `# NAME.ext`."""
    files = {}
    for _, _, lines in fenced_blocks(path):
        named = re.fullmatch(r"# ([\w.-]+\.\w+)", lines[0].strip()) if lines else None
        if named:
            files[named.group(1)] = "\n".join(lines[1:]) + "\n"
    return files


ALL_COMMANDS = [c for doc in DOCS for c in documented_commands(doc)]
LMFORGE_COMMANDS = [c for c in ALL_COMMANDS if c.text.startswith("lmforge ")]


def substituted(text: str) -> str:
    for pattern, replacement, _ in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text)
    return text.strip()


def not_run_reason(text: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, text)), None)


def expected_exit(text: str) -> int:
    return next((code for pattern, code, _ in EXPECTED_EXIT if re.search(pattern, text)), 0)


def test_the_docs_show_commands():
    assert len(LMFORGE_COMMANDS) >= 40 and {c.doc for c in ALL_COMMANDS} >= {"README.md", "curation.md"}


@pytest.mark.parametrize("command", LMFORGE_COMMANDS, ids=str)
def test_documented_command_parses(command):
    try:
        parse_args(shlex.split(command.text)[1:])
    except SystemExit:
        pytest.fail(f"{command}: the command line does not parse (see the usage message above)")


@pytest.mark.parametrize("table", ["SUBSTITUTIONS", "NOT_RUN", "EXPECTED_EXIT"])
def test_every_table_entry_matches_a_documented_command(table):
    texts = [c.text for c in ALL_COMMANDS]
    for pattern, *_, why in globals()[table]:
        assert any(re.search(pattern, t) for t in texts), f"{table}: {pattern!r} ({why}) matches no command any more"


def test_comments_and_continuations_are_read_as_the_shell_does(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\nlmforge a 'x # y' \\\n    --b 1   # note\n# only a comment\n```\n"
                   "```console\n$ lmforge c\noutput line\n```\n```\nlmforge d\nnot a command\n```\n"
                   "```python\n# tool.py\nprint(1)\n```\n")
    assert [(c.line, c.text) for c in documented_commands(doc)] == [
        (3, "lmforge a 'x # y' --b 1"), (8, "lmforge c"), (12, "lmforge d")]
    assert documented_files(doc) == {"tool.py": "print(1)\n"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny quickstart output plus `WORKSPACE_FILES`, and `bin/` with `lmforge` and `python` shims."""
    from lmforge.curation.documents import DocumentWriter, read_documents

    root = tmp_path_factory.mktemp("docs-workspace")
    env = command_env(root)
    done = subprocess.run([sys.executable, "-m", "lmforge.recipes.quickstart", "--out", "quickstart", "--raw-bytes",
                           "400000", "--steps", str(QUICKSTART_STEPS), "--vocab-size", "512", "--eval-limit", "4",
                           "--adapt-steps", "2"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"the tiny quickstart failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    raw = root / "quickstart/raw/documents"
    shutil.copytree(raw, root / "data/web/documents")
    for path in sorted(raw.glob("*.jsonl.gz")):
        crawl = "crawl1" if path.name.endswith("-0000.jsonl.gz") else "crawl2"
        (root / crawl / "documents").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / crawl / "documents" / path.name)
        with DocumentWriter(root / "corpus" / path.name.replace(".jsonl.gz", ".jsonl.zst")) as writer:
            for _, doc in read_documents(path):
                writer.write(doc)
    shutil.copytree(root / "quickstart/heldout", root / "heldout/stdlib/documents")
    for path in (root / "quickstart/heldout").glob("*.jsonl.gz"):
        shutil.copy(path, root / "heldout" / path.name)
    (root / "eval_questions.txt").write_text("Return the value of the attribute\ndef __init__(self\n")
    (root / "my_task.yaml").write_text("name: my_qa\ndata: my_qa.jsonl\nkind: multiple_choice\n")
    (root / "my_qa.jsonl").write_text(
        '{"id": "q1", "context": "Question: What colour is the sky?\\nAnswer:", "choices": ["blue", "green"], '
        '"gold": 0}\n{"id": "q2", "context": "Question: What do cows drink?\\nAnswer:", "choices": ["water", '
        '"milk"], "gold": 0}\n')
    gsm8k = pa.table({"question": ["Tom has 3 apples and buys 4 more. How many apples does he have?",
                                   "A box holds 6 eggs. How many eggs are in 5 boxes?"],
                      "answer": ["He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "5 * 6 = <<5*6=30>>30 eggs.\n#### 30"]})
    for name in ("gsm8k-train.parquet", "gsm8k/main/train-00000-of-00001.parquet"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(gsm8k, root / name)
    (root / "mine.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi."},
                                                              {"role": "assistant", "content": "Hi!"}]}) + "\n")
    (root / "benchmarks").symlink_to(ROOT / "benchmarks")
    return root


def command_env(root: Path) -> dict:
    shims = root / "bin"
    shims.mkdir(exist_ok=True)
    for name, run in (("lmforge", f'"{sys.executable}" -m lmforge'), ("python", f'"{sys.executable}"')):
        (shims / name).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (shims / name).chmod(0o755)
    # The sources under test, whatever the working directory (a relative PYTHONPATH would not follow the cd).
    path = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path}


@requires_olmo_tokenizer
@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_documented_commands_run(doc, workspace, tmp_path):
    commands = documented_commands(doc)
    if not commands:
        pytest.skip(f"{doc.name} shows no shell command")
    here = tmp_path / "w"
    shutil.copytree(workspace, here, symlinks=True)
    for name, text in documented_files(doc).items():
        (here / name).write_text(text, encoding="utf-8")
    env = command_env(here)
    for command in commands:
        if not_run_reason(command.text):
            continue
        run = substituted(command.text)
        if not run:
            continue
        done = subprocess.run(["bash", "-c", run], cwd=here, env=env, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        assert done.returncode == expected_exit(command.text) and "Traceback" not in output, (
            f"{command}\n  ran as `{run}`: exit {done.returncode}\n{output[-4000:]}\n"
            "Fix the doc, or add a row to SUBSTITUTIONS or NOT_RUN in tests/test_docs_commands.py")
