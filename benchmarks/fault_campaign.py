"""Fault campaign: kill every stage at random points (and fill the disk at random writes), rerun it, and check
that nothing was lost, against an uninterrupted run of the same stage on the same tiny input.

    python benchmarks/fault_campaign.py [--stages tag,dedup,...] [--faults kill,enospc] [--trials 10]
                                        [--seed 0] [--out fault_campaign] [--keep]
    python benchmarks/fault_campaign.py --stage tokenize --fault kill --seed 1234 --trials 1   # replay one trial

Every stage runs as a subprocess of this interpreter (`sys.executable -m lmforge ...`, so PYTHONPATH is
honoured) in its own process group, always in the same work directory (`OUT/work/STAGE`), so two runs see the
same absolute paths and their outputs can be compared file by file. Per stage:

1. clean: the stage runs to completion from its prepared inputs; every file's content key is recorded after
   each step, with the step's duration and the temporary files seen appearing (polled). It runs twice: both
   runs must agree (the `repeat` line), else the comparisons below would mean nothing.
2. kill: SIGKILL the process group after a delay drawn from the trial seed within the clean step's duration,
   or when the k-th temporary file appears (mid-write). Then no file may be half written: every file is the
   one from before the step or the clean run's, or a temporary. The same command is rerun (and the steps after
   it): it must exit 0, leave no temporary file, every output directory its manifest, and every file equal to
   the clean run's.
3. enospc: run the step with LMFORGE_FAULT_ENOSPC_AT=N (the N-th write of core/files.py's atomic writer in a
   process fails with ENOSPC): a non-zero exit with one `lmforge: error:` line and no traceback, files as after
   a kill; then the rerun as in 2. A run that exits 0 with the variable set injected nothing (the hook is not
   there, or the process made fewer than N writes): counted as not injected, and its outputs still checked.

Content keys: sha256 of the bytes, except where bytes may legitimately differ between two runs of the same
command (VOLATILE below: timestamps and timings in JSON files, RNG states), which are compared by value.
Results: `stage/fault: tried N, held M` lines, and OUT/results.json with every trial; each failure carries its
seed and a replay command. The exit code is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import zstandard

ENOSPC_VARIABLE = "LMFORGE_FAULT_ENOSPC_AT"
CORPUS_SEED = 0  # the inputs never change with --seed: a replay sees the same documents
SCRIPT = "benchmarks/fault_campaign.py"

# Where two uninterrupted runs of one command legitimately differ, and why: (path pattern, how the file is read,
# fields removed at any depth before comparing values). Every other file is compared by its sha256.
VOLATILE = [
    # The wall-clock time of the write; the source tree's commit (+dirty), which an edit of the tree during a
    # long campaign changes; how many shards this invocation found already done (a resume's own count).
    ("*manifest.json", "json", {"created", "git_commit", "shards_already_done"}),
    ("*metrics.jsonl", "jsonl", {"tokens_per_second", "tokens_per_second_per_device", "data_wait_pct",
                                 "memory_gib", "mfu"}),  # measured speeds and memory
    ("eval/results.json", "json", {"timing"}),  # seconds and instances per second
    # A checkpoint's process RNG states (Python, NumPy, torch) come from unseeded global generators that a CPU
    # run of these models never draws from; they are saved so that a resume continues them.
    ("*/checkpoints/step*/train/rank*.pt", "torch", {"python_rng", "numpy_rng", "torch_rng"}),
    ("*/checkpoints/step*/*/.metadata", "pickle", {"save_id"}),  # torch.distributed.checkpoint: a uuid per save
]


def is_temp(name: str) -> bool:
    """`*.tmp*` files and directories, and a directory's `.lock` (a killed holder leaves it; the next run into
    the directory takes it over and removes it when done), so neither may outlive a rerun."""
    return ".tmp" in name or Path(name).name == ".lock"


# ----------------------------------------------------------------------------------------------- content keys


def _digest(value, drop: set[str], h) -> None:
    """Feed a parsed value to hash `h`, leaving out the fields named in `drop` at any depth."""
    import numpy as np

    if isinstance(value, dict):
        for key, item in value.items():
            if key not in drop:
                h.update(repr(key).encode())
                _digest(item, drop, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _digest(item, drop, h)
    elif isinstance(value, bytes):
        h.update(value)
    elif isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode() + value.tobytes())
    elif type(value).__module__.startswith("torch") and hasattr(value, "numpy") and hasattr(value, "dtype"):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode() + value.detach().cpu().contiguous().numpy().tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__name__.encode())
        _digest({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, drop, h)
    else:
        h.update(repr(value).encode())


def _parse(data: bytes, reader: str):
    if reader == "json":
        return json.loads(data)
    if reader == "jsonl":
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    if reader == "torch":
        import torch

        return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    import pickle

    import torch.distributed.checkpoint  # noqa: F401  (the classes the metadata pickle names)

    return pickle.loads(data)


def volatile_fields(rel: str) -> set[str]:
    return next((drop for pattern, _, drop in VOLATILE if fnmatch.fnmatch(rel, pattern)), set())


def content_key(path: Path, rel: str) -> tuple[str, str]:
    """(key compared between runs, sha256 of the raw bytes)."""
    data = path.read_bytes()
    raw = hashlib.sha256(data).hexdigest()
    for pattern, reader, drop in VOLATILE:
        if fnmatch.fnmatch(rel, pattern):
            try:
                value = _parse(data, reader)
            except Exception:  # a half-written file: its raw bytes will match nothing
                return f"unreadable {reader}:" + raw, raw
            h = hashlib.sha256()
            _digest(value, drop, h)
            return f"{reader}:" + h.hexdigest(), raw
    return raw, raw


@dataclasses.dataclass
class Snapshot:
    keys: dict[str, str]  # relative path -> content key
    raw: dict[str, str]  # relative path -> sha256 of the bytes
    temps: list[str]  # temporary files and directories present


def snapshot(root: Path) -> Snapshot:
    keys, raw, temps = {}, {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        temps += [str(rel_dir / d) for d in dirnames if is_temp(d)]
        for name in filenames:
            rel = str(rel_dir / name)
            if is_temp(rel):
                temps.append(rel)
                continue
            try:
                keys[rel], raw[rel] = content_key(Path(dirpath) / name, rel)
            except FileNotFoundError:  # renamed away while we looked (a run in progress)
                continue
    return Snapshot(keys, raw, sorted(set(temps)))


def temp_names(root: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        found.update(os.path.join(dirpath, n) for n in (*dirnames, *filenames) if is_temp(n))
    return found


def differences(got: Snapshot, want: Snapshot, got_root: Path, want_root: Path, limit: int = 6) -> list[str]:
    """What differs between two trees; for JSON files, which fields."""
    problems = [f"missing {p}" for p in sorted(set(want.keys) - set(got.keys))]
    problems += [f"unexpected {p}" for p in sorted(set(got.keys) - set(want.keys))]
    for path in sorted(set(got.keys) & set(want.keys)):
        if got.keys[path] != want.keys[path]:
            fields = _json_fields_differing(got_root / path, want_root / path, volatile_fields(path))
            problems.append(f"differs {path}" + (f" (fields {', '.join(fields)})" if fields else ""))
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit else [])


def _json_fields_differing(a: Path, b: Path, drop: set[str], limit: int = 4) -> list[str]:
    if a.suffix not in (".json", ".jsonl"):
        return []
    try:
        values = [[json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.suffix == ".jsonl"
                  else json.loads(p.read_text()) for p in (a, b)]
    except (OSError, ValueError):
        return []
    found: list[str] = []

    def walk(x, y, where):
        if len(found) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted((set(x) | set(y)) - drop, key=str):
                walk(x.get(key), y.get(key), f"{where}.{key}" if where else str(key))
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                found.append(f"{where or '(lines)'}: {len(x)} entries vs {len(y)}")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            found.append(f"{where or '(value)'}: {str(x)[:40]!s} vs {str(y)[:40]!s}")

    walk(*values, "")
    return found


# Files an interrupted run legitimately leaves in an intermediate state, and what that state must be: an
# append-only log ("log"), the clean run's rows up to some point (its last line may be torn: readers skip it);
# a file rewritten as the run goes ("complete"), whole and readable (the run's manifest says finished: false
# until the end).
IN_PROGRESS = [("*metrics.jsonl", "log"), ("*batches.jsonl", "log"), ("run/manifest.json", "complete")]


def half_written(got: Snapshot, before: Snapshot, clean: Snapshot, units: tuple[str, ...], got_root: Path,
                 clean_root: Path) -> list[str]:
    """After an interruption: every file must be the one from before the step or the clean run's (a
    temporary may remain) or a sound intermediate state (IN_PROGRESS), and the files of a unit (a directory
    committed as one) all from the same side."""
    problems = []
    for path, key in sorted(got.keys.items()):
        if key == before.keys.get(path) or key == clean.keys.get(path):
            continue
        state = next((kind for pattern, kind in IN_PROGRESS if fnmatch.fnmatch(path, pattern)), None)
        if state is not None:
            problem = _in_progress_problem(got_root / path, clean_root / path, state, volatile_fields(path))
            if problem:
                problems.append(f"{path} {problem}")
            continue
        side = "differs from both the previous and the clean output" if path in clean.keys or path in before.keys \
            else "is in neither the previous nor the clean output"
        problems.append(f"{path} {side}")
    for unit in units:
        live = _live_files(unit, got_root, clean_root)
        inside = [p for p in set(got.keys) | set(before.keys) | set(clean.keys) if live(p)]
        as_before = all(got.keys.get(p) == before.keys.get(p) for p in inside)
        as_clean = all(got.keys.get(p) == clean.keys.get(p) for p in inside)
        if not (as_before or as_clean):
            mixed = sorted(p for p in inside if got.keys.get(p) != clean.keys.get(p))
            problems.append(f"{unit}/ mixes the previous and the new state ({', '.join(mixed[:4])} not new)")
    return problems


def _live_files(unit: str, root: Path, clean_root: Path):
    """Which paths make up a unit's state: all its files, or, when a `CURRENT` pointer names the generation
    directory in use (written aside, then the pointer swapped), the pointer and that generation only; a
    generation being written beside it is not yet state, nor is one written before any pointer existed."""
    pointer = root / unit / "CURRENT"
    if not pointer.is_file():
        if (clean_root / unit / "CURRENT").is_file():
            return lambda p: p == f"{unit}/CURRENT"
        return lambda p: p.startswith(unit + "/")
    generation = f"{unit}/{pointer.read_text().strip()}/"
    return lambda p: p == f"{unit}/CURRENT" or p.startswith(generation)


def _in_progress_problem(path: Path, clean_path: Path, state: str, drop: set[str]) -> str | None:
    if state == "complete":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            return f"is not whole: {e}"
        return None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(_strip(json.loads(line), drop))
        except ValueError:
            if number < len(lines):
                return f"has a torn line {number} before its end"
    want = [_strip(json.loads(line), drop) for line in clean_path.read_text(encoding="utf-8").splitlines()]
    if rows != want[:len(rows)]:
        first = next(i for i, (a, b) in enumerate(zip(rows + [None] * len(want), want + [None] * len(rows))) if a != b)
        return f"is not a prefix of the clean run's log (line {first + 1} differs)"
    return None


def _strip(value, drop: set[str]):
    return {k: v for k, v in value.items() if k not in drop} if isinstance(value, dict) else value


# ------------------------------------------------------------------------------------------------ the inputs


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ter", "san", "do", "ri", "vel", "non", "pa", "stu", "gle", "ber", "an", "ox"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(n)})
    return vocab


def _paragraph(rng: random.Random, vocab: list[str]) -> str:
    sentences = []
    for _ in range(rng.randint(2, 5)):
        words = [rng.choice(vocab) for _ in range(rng.randint(6, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def _documents(rng: random.Random, vocab: list[str], prefix: str, n: int, earlier: list[dict]) -> list[dict]:
    boilerplate = [_paragraph(random.Random(i), vocab) for i in range(4)]  # shared by both crawls
    docs = []
    for i in range(n):
        if (earlier or docs) and rng.random() < 0.12:  # an exact copy, under another id
            text, url = rng.choice(earlier + docs)["text"], f"http://{prefix}.example/{i}"
        else:
            paragraphs = [_paragraph(rng, vocab) for _ in range(rng.randint(2, 6))]
            if rng.random() < 0.3:
                paragraphs.insert(rng.randint(0, len(paragraphs)), rng.choice(boilerplate))
            if rng.random() < 0.2:
                paragraphs.append(f"Write to {rng.choice(vocab)}@example.com for more.")
            text, url = "\n".join(paragraphs), f"http://{prefix}.example/{i % (n - 5)}"  # a few repeated URLs
        docs.append({"id": f"{prefix}-{i:04d}", "text": text, "source": rng.choice(["web", "forum"]),
                     "added": "2026-01-01T00:00:00.000Z", "created": None, "metadata": {"url": url}})
    return docs


def write_shard(path: Path, docs: list[dict]) -> None:
    data = "".join(json.dumps(d) + "\n" for d in docs).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    else:
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as f:
            f.write(data)
        path.write_bytes(buffer.getvalue())


def write_corpus(root: Path) -> None:
    """Crawl A: 240 documents in 4 shards (gz and zst); crawl B: 80 more, a quarter copied from A; held out: 8."""
    rng = random.Random(CORPUS_SEED)
    vocab = _words(rng, 400)
    crawl_a = _documents(rng, vocab, "a", 240, [])
    for shard in range(4):
        suffix = ".jsonl.gz" if shard % 2 == 0 else ".jsonl.zst"
        write_shard(root / "crawl_a" / "documents" / f"a-{shard:04d}{suffix}", crawl_a[shard::4])
    crawl_b = _documents(rng, vocab, "b", 80, crawl_a)
    write_shard(root / "crawl_b" / "documents" / "b-0000.jsonl.gz", crawl_b[0::2])
    write_shard(root / "crawl_b" / "documents" / "b-0001.jsonl.zst", crawl_b[1::2])
    write_shard(root / "heldout" / "h-0000.jsonl.gz", _documents(rng, vocab, "h", 8, []))
    task = []
    for i in range(8):
        context = " ".join(rng.choice(vocab) for _ in range(8)).capitalize()
        task.append({"id": i, "context": context, "choices": rng.sample(vocab, 3), "gold": i % 3})
    (root / "task").mkdir(parents=True, exist_ok=True)
    (root / "task" / "tiny.jsonl").write_text("".join(json.dumps(t) + "\n" for t in task), encoding="utf-8")
    (root / "task" / "tiny.yaml").write_text("name: tiny\ndata: tiny.jsonl\n", encoding="utf-8")


TINY_MODEL = ["n_layers=2", "d_model=64", "n_heads=4", "mlp_hidden_size=128", "max_sequence_length=64"]
TRAIN_YAML = """\
data: {{paths: [{tokens}], sequence_length: 32, seed: 0}}
model:
  preset: olmo2-tiny
  overrides: {{n_layers: 2, d_model: 64, n_heads: 4, mlp_hidden_size: 128, max_sequence_length: 64}}
  vocab_from_tokenizer: true
run_dir: {run}
seed: 0
global_batch_size: 256
micro_batch_size: 128
max_steps: {steps}
precision: fp32
device: cpu
optimizer: {{lr: 3.0e-3}}
schedule: {{name: cosine, warmup: 2}}
skip_step: {{enabled: false}}
checkpoint: {{interval: {interval}, keep_last: 100}}
metrics: {{log_interval: 1, tensorboard: false}}
"""
MIX_YAML = """\
streams:
  - name: web
    documents: ["{docs}"]
    attributes: [gopher, c4, dedup]
    filter:
      exclude: ["gopher__word_count < 40", "any(dedup__duplicate_doc)"]
    span_replacement:
      - {{span: dedup__duplicate_paragraphs, replacement: ""}}
output: {{path: {out}, max_size_in_bytes: 20000, compression: zst}}
seed: 0
"""


def lmforge(*args: str) -> list[str]:
    return ["-m", "lmforge", *args]


def docs_glob(root: Path) -> str:
    return str(root / "documents" / "*")


# Each fixture: the fixtures it needs, and the steps that build it in its directory (from copies of those).
FIXTURES: dict[str, tuple[tuple[str, ...], Callable[[Path], list[list[str]]]]] = {
    "corpus": ((), lambda d: []),  # written by write_corpus
    "tokenizer": (("corpus",), lambda d: [lmforge(
        "data", "train-tokenizer", "--documents", docs_glob(d / "corpus" / "crawl_a"), "--vocab-size", "300",
        "--out", str(d / "tokenizer"))]),
    "tagged": (("corpus",), lambda d: [
        lmforge("data", "tag", "--documents", docs_glob(d / "corpus" / "crawl_a"), "--taggers", "gopher,c4",
                "--no-progress"),
        lmforge("data", "dedup", "--documents", docs_glob(d / "corpus" / "crawl_a"), "--no-progress")]),
    "tokens": (("corpus", "tokenizer"), lambda d: [lmforge(
        "data", "tokenize", "--documents", docs_glob(d / "corpus" / "crawl_a"), "--tokenizer",
        str(d / "tokenizer" / "tokenizer"), "--out", str(d / "tokens"), "--no-progress")]),
    "run": (("tokens",), lambda d: [_train_step(d, d / "tokens" / "tokens", d / "run", steps=4, interval=2)]),
    "model": (("tokenizer",), lambda d: [lmforge(
        "model", "init", "olmo2-tiny", *TINY_MODEL, "--tokenizer", str(d / "tokenizer" / "tokenizer"),
        "--out", str(d / "model"))]),
}


def _train_step(work: Path, tokens: Path, run: Path, steps: int, interval: int) -> list[str]:
    config = work / f"train-{run.name}.yaml"
    config.write_text(TRAIN_YAML.format(tokens=tokens, run=run, steps=steps, interval=interval), encoding="utf-8")
    return lmforge("train", str(config))


def _mix_step(work: Path) -> list[str]:
    config = work / "mix.yaml"
    config.write_text(MIX_YAML.format(docs=docs_glob(work / "tagged" / "corpus" / "crawl_a"),
                                      out=work / "mixed"), encoding="utf-8")
    return lmforge("data", "mix", str(config), "--workers", "2", "--no-progress")


@dataclasses.dataclass
class Stage:
    """What a stage needs (fixtures copied into its work directory), its commands (argv after the
    interpreter) given that directory, the directories that must hold a manifest after a run, and the
    directories committed as one unit."""

    name: str
    needs: tuple[str, ...]
    steps: Callable[[Path], list[list[str]]]
    manifests: tuple[str, ...] = ()
    units: tuple[str, ...] = ()


STAGES = [
    Stage("tag", ("corpus",), lambda w: [lmforge(
        "data", "tag", "--documents", docs_glob(w / "corpus" / "crawl_a"), "--taggers", "gopher,c4",
        "--workers", "2", "--no-progress")],
        manifests=("corpus/crawl_a/attributes/gopher", "corpus/crawl_a/attributes/c4")),
    Stage("dedup", ("corpus",), lambda w: [
        lmforge("data", "dedup", "--documents", docs_glob(w / "corpus" / "crawl_a"), "--state", str(w / "state"),
                "--workers", "2", "--no-progress"),
        lmforge("data", "dedup", "--documents", docs_glob(w / "corpus" / "crawl_b"), "--state", str(w / "state"),
                "--workers", "2", "--no-progress")],
        manifests=("corpus/crawl_a/attributes/dedup", "corpus/crawl_b/attributes/dedup"), units=("state",)),
    Stage("mix", ("tagged",), lambda w: [_mix_step(w)], manifests=("mixed",)),
    Stage("stats", ("corpus",), lambda w: [lmforge(
        "data", "stats", "--documents", docs_glob(w / "corpus" / "crawl_a"), "--out", str(w / "stats"),
        "--no-plots", "--workers", "2", "--no-progress")], manifests=("stats",)),
    Stage("tokenize", ("corpus", "tokenizer"), lambda w: [lmforge(
        "data", "tokenize", "--documents", docs_glob(w / "corpus" / "crawl_a"), "--tokenizer",
        str(w / "tokenizer" / "tokenizer"), "--out", str(w / "tokens"), "--max-tokens-per-file", "6000",
        "--workers", "2", "--no-progress")], manifests=("tokens",)),
    Stage("train", ("tokens",), lambda w: [_train_step(w, w / "tokens" / "tokens", w / "run", steps=6, interval=1)],
          manifests=("run",)),
    Stage("model-init", ("tokenizer",), lambda w: [lmforge(
        "model", "init", "olmo2-tiny", *TINY_MODEL, "--tokenizer", str(w / "tokenizer" / "tokenizer"),
        "--seed", "3", "--out", str(w / "model"))], manifests=("model",)),
    Stage("export-hf", ("model",), lambda w: [lmforge(
        "export", "hf", str(w / "model" / "model"), "--out", str(w / "hf"))], manifests=("hf",)),
    Stage("soup", ("run",), lambda w: [lmforge(
        "soup", str(w / "run" / "run" / "checkpoints" / "step00000002"),
        str(w / "run" / "run" / "checkpoints" / "step00000004"), "--out", str(w / "soup"))], manifests=("soup",)),
    Stage("eval", ("model", "corpus"), lambda w: [lmforge(
        "eval", str(w / "model" / "model"), "--tasks", str(w / "corpus" / "task" / "tiny.yaml"),
        "--ppl", str(w / "corpus" / "heldout" / "*.jsonl.gz"), "--out", str(w / "eval"), "--device", "cpu",
        "--batch-size", "2", "--no-progress")], manifests=("eval",)),
]
STAGE_NAMES = [s.name for s in STAGES]
FAULTS = ("kill", "enospc")


# ---------------------------------------------------------------------------------------------- running steps

RENAMES_VARIABLE = "FAULT_CAMPAIGN_RENAMES"  # a file that gets one byte per rename, from every process of a step
KILL_AT_RENAME_VARIABLE = "FAULT_CAMPAIGN_KILL_AT_RENAME"
# Each step runs as `python -c HOOK -m lmforge ...`: the command itself, with os.replace and os.rename counted
# (every atomic write and checkpoint ends in one) so that a kill can land just before the N-th, between the
# renames of a multi-file commit, where a timer or polling rarely lands. Forked workers inherit the count file.
HOOK = """
import os, runpy, signal, sys
counter, kill_at = os.environ["FAULT_CAMPAIGN_RENAMES"], int(os.environ.get("FAULT_CAMPAIGN_KILL_AT_RENAME") or 0)
def counted(rename):
    def wrapper(*args, **kwargs):
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"r")
        count = os.fstat(fd).st_size
        os.close(fd)
        if kill_at and count >= kill_at:
            os.killpg(0, signal.SIGKILL)
        return rename(*args, **kwargs)
    return wrapper
os.replace, os.rename = counted(os.replace), counted(os.rename)
args = sys.argv[1:]
if args[0] == "-m":
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
"""


def child_env(counter: Path, enospc_at: int | None, kill_at_rename: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENOSPC_VARIABLE, KILL_AT_RENAME_VARIABLE)}
    if env.get("PYTHONPATH"):  # steps run in their work directory: a relative PYTHONPATH=src must still hold
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # tiny runs: threads only cost start-up time
        env.setdefault(name, "1")
    env[RENAMES_VARIABLE] = str(counter)
    if enospc_at is not None:
        env[ENOSPC_VARIABLE] = str(enospc_at)
    if kill_at_rename is not None:
        env[KILL_AT_RENAME_VARIABLE] = str(kill_at_rename)
    return env


@dataclasses.dataclass
class StepRun:
    returncode: int
    seconds: float
    stderr: str
    temps_seen: int  # distinct temporary files seen appearing (polled: fast writes are missed)
    renames: int  # os.replace/os.rename calls of all its processes

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def run_step(argv: list[str], work: Path, counter: Path, *, kill_after: float | None = None,
             kill_at_temp: int | None = None, kill_at_rename: int | None = None, enospc_at: int | None = None,
             poll: float = 0.003) -> StepRun:
    """Run one command in its own process group; SIGKILL the group after `kill_after` seconds, when the
    `kill_at_temp`-th temporary file appears, or just before the `kill_at_rename`-th rename."""
    counter.write_bytes(b"")
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, "-c", HOOK, *argv], cwd=work,
                                   env=child_env(counter, enospc_at, kill_at_rename),
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        seen: set[str] = set()
        while process.poll() is None:
            seen |= temp_names(work)
            due = kill_after is not None and time.monotonic() - start >= kill_after
            if due or (kill_at_temp is not None and len(seen) >= kill_at_temp):
                kill_group(process)
                break
            time.sleep(poll)
        process.wait()
        wait_for_group(process.pid)
        seconds = time.monotonic() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return StepRun(process.returncode, seconds, stderr, len(seen), counter.stat().st_size)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for_group(pgid: int, timeout: float = 10) -> None:
    """Workers of a killed group die with it (and get reaped by init): wait until none is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def last_lines(text: str, n: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-n:])


def one_line_error(run: StepRun) -> list[str]:
    """What an injected ENOSPC must give: an exit code (not a signal), one `lmforge: error:` line, no traceback."""
    problems = []
    if run.returncode < 0:
        problems.append(f"error-message: died of signal {-run.returncode} instead of exiting with an error")
    if "Traceback" in run.stderr:
        problems.append(f"error-message: a traceback on stderr: {last_lines(run.stderr, 2)}")
    errors = [line for line in run.stderr.splitlines() if line.startswith("lmforge: error:")]
    if len(errors) != 1:
        problems.append(f"error-message: {len(errors)} `lmforge: error:` lines (one expected): "
                        f"{last_lines(run.stderr, 2)}")
    return problems


# ------------------------------------------------------------------------------------------------- the campaign

# What a problem's kind means (each problem is "kind: detail").
PROBLEM_KINDS = {
    "half-written": "right after the fault, a file is neither the previous one nor the clean run's (or a unit "
                    "directory mixes both)",
    "lost": "after the rerun, a file is missing, unexpected, or differs from the clean run's",
    "rerun-failed": "the rerun (or a step run without a fault) exited non-zero",
    "temp-left": "a temporary file remains after the rerun",
    "no-manifest": "an output directory lacks its manifest.json after the rerun",
    "error-message": "the injected ENOSPC did not end in one `lmforge: error:` line with an exit code",
}


def problem_kinds(record: dict) -> set[str]:
    return {p.split(":", 1)[0] for p in record["problems"]}


class Campaign:
    def __init__(self, out: Path, stages: list[Stage], keep: bool = False, log=print):
        self.out = out.resolve()
        self.stages = {s.name: s for s in stages}
        self.keep = keep
        self.log = log
        self.out.mkdir(parents=True, exist_ok=True)
        self.counter = self.out / "renames.count"
        self.clean: dict[str, dict] = {}

    def run_step(self, argv: list[str], work: Path, **inject) -> StepRun:
        return run_step(argv, work, self.counter, **inject)

    # fixtures and work directories

    def fixture(self, name: str) -> Path:
        path = self.out / "fixtures" / name
        if (path / ".done").is_file():
            return path
        needs, steps = FIXTURES[name]
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        for need in needs:
            shutil.copytree(self.fixture(need), path / need, ignore=shutil.ignore_patterns(".done"))
        if name == "corpus":
            write_corpus(path)
        for argv in steps(path):
            run = self.run_step(argv, path)
            if run.returncode != 0:
                raise RuntimeError(f"building the {name} fixture failed: {' '.join(argv)}: {last_lines(run.stderr)}")
        (path / ".done").touch()
        return path

    def prepare(self, stage: Stage) -> tuple[Path, list[list[str]]]:
        """A fresh work directory, always at the same path, with copies of the stage's fixtures."""
        work = self.out / "work" / stage.name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for need in stage.needs:
            shutil.copytree(self.fixture(need), work / need, ignore=shutil.ignore_patterns(".done"))
        return work, stage.steps(work)

    # the uninterrupted run

    def clean_run(self, stage: Stage) -> dict:
        """Run the stage to completion twice; keep the first run's snapshot after each step, the step
        durations (the faster run's), temporary files and renames seen; compare the two runs."""
        runs = []
        for _ in range(2):
            work, steps = self.prepare(stage)
            after, seconds, temps, renames = [], [], [], []
            for argv in steps:
                run = self.run_step(argv, work)
                if run.returncode != 0:
                    raise RuntimeError(f"{stage.name}: the clean run failed: {' '.join(argv)}: "
                                       f"{last_lines(run.stderr)}")
                after.append(snapshot(work))
                seconds.append(run.seconds)
                temps.append(run.temps_seen)
                renames.append(run.renames)
            runs.append({"after": after, "seconds": seconds, "temps": temps, "renames": renames})
            if len(runs) == 1:  # kept to name the fields that differ, and for a look by hand
                clean_copy = self.out / "clean" / stage.name
                shutil.rmtree(clean_copy, ignore_errors=True)
                shutil.copytree(work, clean_copy, symlinks=True)
        first, second = runs
        final_a, final_b = first["after"][-1], second["after"][-1]
        missing = [d for d in stage.manifests if not (clean_copy / d / "manifest.json").is_file()]
        return {**first, "copy": clean_copy, "missing_manifests": missing,
                "seconds": [min(a, b) for a, b in zip(first["seconds"], second["seconds"])],
                "repeat_problems": [f"lost: {d}" for d in differences(final_b, final_a, work, clean_copy)],
                "raw_differences": sorted(p for p in final_a.raw if final_a.raw[p] != final_b.raw.get(p))}

    # one trial

    @staticmethod
    def plan(clean: dict, fault: str, rng: random.Random) -> dict:
        """Which step gets the fault, and when: drawn from the trial's seed."""
        if fault == "enospc":
            step = rng.randrange(len(clean["renames"]))
            return {"step": step, "enospc_at": rng.randint(1, max(1, clean["renames"][step]))}
        modes = ["kill_after"] + ["kill_at_temp"] * bool(sum(clean["temps"])) \
            + ["kill_at_rename"] * bool(sum(clean["renames"]))
        mode = rng.choice(modes)
        if mode == "kill_after":
            sizes = clean["seconds"]
            at = rng.uniform(0, 0.95 * sum(sizes))
        else:
            sizes = clean["temps" if mode == "kill_at_temp" else "renames"]
            at = rng.randint(1, sum(sizes))
        step = _locate(sizes, at)
        at -= sum(sizes[:step])
        return {"step": step, mode: round(at, 3) if mode == "kill_after" else int(at)}

    def trial(self, stage: Stage, fault: str, seed: int) -> dict:
        clean = self.clean[stage.name]
        plan = self.plan(clean, fault, random.Random(f"{stage.name}/{fault}/{seed}"))
        step = plan.pop("step")
        record: dict = {"stage": stage.name, "fault": fault, "seed": seed, "step": step, **plan,
                        "replay": f"python {SCRIPT} --stage {stage.name} --fault {fault} --seed {seed} --trials 1"}
        work, steps = self.prepare(stage)
        problems: list[str] = []
        for argv in steps[:step]:
            run = self.run_step(argv, work)
            if run.returncode != 0:
                problems.append(f"rerun-failed: a step before the fault exited {run.returncode}: "
                                f"{last_lines(run.stderr)}")
        before = snapshot(work)
        faulted = self.run_step(steps[step], work, **plan)
        record["returncode"] = faulted.returncode
        record["injected"] = faulted.killed if fault == "kill" else faulted.returncode != 0
        if record["injected"]:
            if fault == "enospc":
                record["message"] = last_lines(faulted.stderr, 1)
                problems += one_line_error(faulted)
            problems += [f"half-written: {p}" for p in half_written(snapshot(work), before, clean["after"][step],
                                                                    stage.units, work, clean["copy"])]
            rerun = self.run_step(steps[step], work)
            if rerun.returncode != 0:
                problems.append(f"rerun-failed: the rerun exited {rerun.returncode}: {last_lines(rerun.stderr)}")
        elif faulted.returncode != 0:
            problems.append(f"rerun-failed: exited {faulted.returncode} without a fault: {last_lines(faulted.stderr)}")
        for argv in steps[step + 1:]:
            run = self.run_step(argv, work)
            if run.returncode != 0:
                problems.append(f"rerun-failed: a later step exited {run.returncode}: {last_lines(run.stderr)}")
        final = snapshot(work)
        problems += [f"temp-left: {t}" for t in final.temps[:4]]
        problems += [f"no-manifest: {d}" for d in stage.manifests if d not in clean["missing_manifests"]
                     and not (work / d / "manifest.json").is_file()]
        problems += [f"lost: {d}" for d in differences(final, clean["after"][-1], work, clean["copy"])]
        record["problems"] = problems
        record["held"] = not problems
        if problems and self.keep:
            kept = self.out / "failures" / f"{stage.name}-{fault}-{seed}"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(work, kept, symlinks=True)
            record["kept"] = str(kept)
        return record

    def run(self, faults: list[str], trials: int, seed: int) -> dict:
        summary, records = {}, []
        for stage in self.stages.values():
            self.clean[stage.name] = clean = self.clean_run(stage)
            final = clean["after"][-1]
            repeat = {"tried": 1, "held": int(not (clean["repeat_problems"] or clean["missing_manifests"])),
                      "files": len(final.keys),
                      "raw_bytes_differ": clean["raw_differences"]}
            summary[stage.name] = {"clean_seconds": round(sum(clean["seconds"]), 2), "renames": clean["renames"],
                                   "repeat": repeat}
            differ = clean["raw_differences"]
            self.log(f"{stage.name}/repeat: tried 1, held {repeat['held']} ({len(final.keys)} files, "
                     f"{sum(clean['seconds']):.1f} s; raw bytes differ in {len(differ)}"
                     f"{': ' + ', '.join(differ[:3]) if differ else ''}{' ...' if len(differ) > 3 else ''})")
            # An output directory without a manifest even after an uninterrupted run: reported once, here.
            repeat_problems = clean["repeat_problems"] + [f"no-manifest: {d} (uninterrupted run)"
                                                          for d in clean["missing_manifests"]]
            if repeat_problems:
                records.append({"stage": stage.name, "fault": "repeat", "seed": None, "held": False,
                                "problems": repeat_problems,
                                "replay": f"python {SCRIPT} --stage {stage.name} --trials 0"})
            for fault in faults:
                counts = {"tried": 0, "held": 0, "not_injected": 0}
                for i in range(trials):
                    record = self.trial(stage, fault, seed + i)
                    records.append(record)
                    if record["injected"] or not record["held"]:
                        counts["tried"] += 1
                        counts["held"] += record["held"]
                    else:
                        counts["not_injected"] += 1
                    for kind in problem_kinds(record):
                        counts[kind] = counts.get(kind, 0) + 1
                    if not record["held"]:
                        self.log(f"  FAILED {record['replay']}: {'; '.join(record['problems'][:4])}")
                summary[stage.name][fault] = counts
                notes = [f"{n} {k}" for k, n in counts.items() if k not in ("tried", "held")
                         and n and not (k == "not_injected" and fault == "kill")]
                notes = [n.replace("not_injected", "not injected") for n in notes]
                if fault == "kill" and counts["not_injected"]:
                    notes.append(f"{counts['not_injected']} ended before the kill")
                self.log(f"{stage.name}/{fault}: tried {counts['tried']}, held {counts['held']}"
                         + (f" ({', '.join(notes)})" if notes else ""))
        failures = [r for r in records if not r["held"]]
        return {"seed": seed, "trials": trials, "faults": faults, "python": sys.executable,
                "problem_kinds": PROBLEM_KINDS, "summary": summary, "failures": failures, "records": records}


def _locate(sizes: list[float], position: float) -> int:
    """The index of the piece of `sizes`, laid end to end, that holds `position`."""
    total = 0.0
    for i, size in enumerate(sizes):
        total += size
        if position <= total:
            return i
    return len(sizes) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", "--stage", default=",".join(STAGE_NAMES),
                        help=f"comma-separated, of {', '.join(STAGE_NAMES)}")
    parser.add_argument("--faults", "--fault", default=",".join(FAULTS), help="comma-separated, of kill, enospc")
    parser.add_argument("--trials", type=int, default=10, help="trials per stage and fault kind")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first trial (trial i uses seed + i)")
    parser.add_argument("--out", default="fault_campaign", help="work directories, fixtures and results.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory of each failed trial")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [s for s in stages if s not in STAGE_NAMES] + [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown stage or fault {unknown[0]!r}")
    out = Path(args.out)
    campaign = Campaign(out, [s for s in STAGES if s.name in stages], keep=args.keep)
    start = time.monotonic()
    result = campaign.run(faults, args.trials, args.seed)
    result["seconds"] = round(time.monotonic() - start, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{len(result['failures'])} failed trials in {result['seconds']:.0f} s; details in {out / 'results.json'}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
