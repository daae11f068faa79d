"""Nothing lost under faults: output directories belong to one run at a time (a second one is refused in one line,
a dead holder's lock is taken over), a full disk ends every stage in one line naming the file and the free space
with the previous output intact, no temporary file outlives a run (success, failure, Ctrl-C, SIGTERM, kill -9),
and `eval --out` replaces its directory as a whole. The reliability contract is docs/reliability.md."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lmforge
from lmforge.cli import main
from lmforge.core import files

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = ROOT / "configs" / "train" / "quickstart.yaml"
TEXT = ["The quick brown fox jumps over the lazy dog.", "Question: what colour is the sky?\nAnswer: blue",
        "Tom met Ann so Ann left early.", "Two plus two is four. So the answer is 4."]

# Run `python -m lmforge ARGV` with one function made to wait (after touching $READY) until $GO exists: a real
# run, stopped mid-way where the test wants it.
PAUSED = """
import importlib, os, signal, sys, time
from pathlib import Path
# As from a terminal: a shell starts background jobs with Ctrl-C ignored, which children inherit.
signal.signal(signal.SIGINT, signal.default_int_handler)
module, _, attr = os.environ["PAUSE_AT"].partition(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
def paused(*args, **kwargs):
    Path(os.environ["READY"]).touch()
    while not Path(os.environ["GO"]).exists():
        time.sleep(0.05)
    return original(*args, **kwargs)
setattr(owner, name, paused)
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra) -> dict:
    here = str(Path(lmforge.__file__).resolve().parents[1])  # the lmforge this test imported, for the children
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def start_paused(tmp_path: Path, pause_at: str, argv: list) -> tuple[subprocess.Popen, Path]:
    ready, go = tmp_path / f"ready-{time.monotonic_ns()}", tmp_path / f"go-{time.monotonic_ns()}"
    process = subprocess.Popen([sys.executable, "-c", PAUSED, *map(str, argv)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=_env(PAUSE_AT=pause_at, READY=ready, GO=go, OMP_NUM_THREADS=1))
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the paused run never got there"
        time.sleep(0.05)
    return process, go


def lm(argv: list) -> int:
    return main([str(a) for a in argv])


def run_lmforge(argv: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, argv)], capture_output=True, text=True,
                          env=_env(OMP_NUM_THREADS=1), timeout=300)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (which a killed holder leaves behind by design)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != files.LOCK_NAME}


def temps(directory: Path) -> list[str]:
    return [str(p) for p in directory.rglob("*.tmp*")]


def assert_refused_write(code: int, err: str, path_part: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lmforge: error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert "cannot write " in errors[0] and path_part in errors[0], err
    assert "No space left on device" in errors[0] and "free space on that filesystem: " in errors[0], err


# ---------------------------------------------------------------------------------------------------- fixtures


def _write_docs(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")


@pytest.fixture
def corpus(tmp_path) -> str:
    shared = "A paragraph that both shards share, long enough to count as one for deduplication."
    for shard, n in (("a", 12), ("b", 9)):
        _write_docs(tmp_path / "documents" / f"{shard}.jsonl.gz",
                    [{"id": f"{shard}{i}", "source": "web", "text": f"{TEXT[i % 4]} Document {shard}{i}.\n{shared}"}
                     for i in range(n)])
    return str(tmp_path / "documents" / "*.jsonl.gz")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    from lmforge.tokens.tokenizer import train_bpe

    directory = tmp_path_factory.mktemp("bpe")
    train_bpe(iter(TEXT * 20), vocab_size=300).save(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory, bpe) -> list[Path]:
    """Two tiny model directories of one architecture (seeds 0 and 1), with the tokenizer."""
    from lmforge.model.directory import build_model, save_model_dir
    from lmforge.model.presets import get_preset
    from lmforge.tokens.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(bpe)
    config = get_preset("olmo2-tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    config.n_layers, config.max_sequence_length = 1, 64
    root = tmp_path_factory.mktemp("models")
    return [save_model_dir(build_model(config, seed), root / f"seed{seed}", tokenizer) for seed in (0, 1)]


def tokenize_argv(corpus: str, bpe: Path, out: Path, *extra) -> list:
    return ["data", "tokenize", "--documents", corpus, "--tokenizer", bpe, "--out", out, "--no-progress", *extra]


def train_argv(tokens: Path, run_dir: Path, steps: int) -> list:
    return ["train", TRAIN_CONFIG, f"data.paths=[{tokens}]", f"run_dir={run_dir}", "data.sequence_length=32",
            "global_batch_size=64", "micro_batch_size=64", f"max_steps={steps}", "schedule.warmup=1",
            "model.overrides.n_layers=1", "checkpoint.interval=1", "metrics.log_interval=1",
            "metrics.tensorboard=false"]


# ------------------------------------------------------------------------------------------------------- locks


def test_second_tokenize_into_a_busy_directory_is_refused_and_the_first_finishes_intact(corpus, bpe, tmp_path):
    out, reference = tmp_path / "tokens", tmp_path / "reference"
    assert lm(tokenize_argv(corpus, bpe, reference)) == 0
    first, go = start_paused(tmp_path, "lmforge.tokens.tokenize:_FileWriter._write_buffer",
                             tokenize_argv(corpus, bpe, out))
    second = run_lmforge(tokenize_argv(corpus, bpe, out, "--max-tokens-per-file", "50"))  # other settings
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"{out} is in use by another lmforge run (pid {first.pid} on " in second.stderr
    go.touch()
    assert first.wait(timeout=120) == 0, first.communicate()
    produced, expected = snapshot(out), snapshot(reference)
    assert produced.keys() == expected.keys()
    assert all(produced[k] == expected[k] for k in expected if k.endswith((".npy", ".docs.parquet")))
    assert json.loads(produced["manifest.json"])["config"]["max_tokens_per_file"] == \
        json.loads(expected["manifest.json"])["config"]["max_tokens_per_file"]


def test_second_train_into_a_busy_run_directory_is_refused_without_duplicate_metrics(corpus, bpe, tmp_path):
    tokens, run_dir = tmp_path / "tokens", tmp_path / "run"
    assert lm(tokenize_argv(corpus, bpe, tokens)) == 0
    first, go = start_paused(tmp_path, "lmforge.train.trainer:Trainer.train_step", train_argv(tokens, run_dir, 3))
    second = run_lmforge(train_argv(tokens, run_dir, 3))
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr and second.stderr.count("\n") == 1, second.stderr
    assert f"{run_dir} is in use by another lmforge run (pid {first.pid} on " in second.stderr
    go.touch()
    assert first.wait(timeout=300) == 0, first.communicate()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not (run_dir / files.LOCK_NAME).exists() and temps(run_dir) == []


def test_a_killed_runs_lock_and_temporaries_are_taken_over(corpus, bpe, tmp_path):
    out, reference = tmp_path / "tokens", tmp_path / "reference"
    assert lm(tokenize_argv(corpus, bpe, reference)) == 0
    victim, _ = start_paused(tmp_path, "lmforge.tokens.tokenize:_FileWriter._write_buffer",
                             tokenize_argv(corpus, bpe, out))
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert json.loads((out / files.LOCK_NAME).read_text())["pid"] == victim.pid  # left behind by the dead run
    assert temps(out), "the killed run should have been writing a temporary token file"
    assert lm(tokenize_argv(corpus, bpe, out)) == 0
    assert temps(out) == [] and not (out / files.LOCK_NAME).exists()
    assert snapshot(out).keys() == snapshot(reference).keys()
    assert all(snapshot(out)[k] == v for k, v in snapshot(reference).items() if k.endswith(".npy"))


def test_nested_lock_in_the_holding_process_and_its_children_is_not_refused(tmp_path):
    from lmforge.core.locks import output_lock

    with output_lock(tmp_path / "d"):
        with output_lock(tmp_path / "d"):  # the stage inside a stage (export -> save_model_dir)
            pass
        child = run_lmforge(["model", "init", "olmo2-tiny", "n_layers=1",
                             "vocab_size=300", "--out", tmp_path / "d"])  # a process this run started
        assert child.returncode == 0, child.stderr
        assert (tmp_path / "d" / files.LOCK_NAME).exists()
    assert not (tmp_path / "d" / files.LOCK_NAME).exists()


# -------------------------------------------------------------------------------------------- full disk, temps


@pytest.fixture
def fault(monkeypatch):
    """Inject ENOSPC into the N-th guarded write (of paths containing `where`) of this process."""

    def inject(n: int, where: str = "") -> None:
        monkeypatch.setattr(files, "_guarded_writes", 0)
        monkeypatch.setenv(files.FAULT_AT_ENV, str(n))
        monkeypatch.setenv(files.FAULT_PATH_ENV, where)

    return inject


def _mix_config(tmp_path: Path, corpus: str) -> Path:
    config = tmp_path / "mix.yaml"
    config.write_text(f"streams:\n  - name: web\n    documents: ['{corpus}']\n    attributes: [dedup]\n"
                      "    filter: {exclude: ['count(dedup__duplicate_paragraphs) > 5']}\n"
                      f"output: {{path: {tmp_path / 'mixed'}, max_size_in_bytes: 400}}\n")
    return config


STAGES = ["tag", "dedup", "mix", "tokenize", "train", "checkpoint export", "export hf", "model init", "soup"]


@pytest.mark.parametrize("stage", STAGES)
def test_injected_full_disk_ends_each_stage_in_one_line_with_the_previous_output_intact(
        stage, corpus, bpe, models, tmp_path, fault, capsys):
    """Each stage once fault-free, then again so that it overwrites its output, with ENOSPC injected."""
    documents = tmp_path / "documents"
    if stage == "tag":
        argv, out, where = ["data", "tag", "--documents", corpus, "--taggers", "gopher"], tmp_path / "attributes", ""
        again = [*argv, "--overwrite"]
    elif stage == "dedup":  # a new shard: the second run rewrites the persisted state (Bloom filter, hashes)
        argv, out, where = ["data", "dedup", "--documents", corpus, "--modes", "doc,paragraph"], documents.parent, ".state"
        again = argv
    elif stage == "mix":
        assert lm(["data", "dedup", "--documents", corpus]) == 0
        argv, out, where = ["data", "mix", _mix_config(tmp_path, corpus)], tmp_path / "mixed", "mixed"
        again = argv
    elif stage == "tokenize":
        argv, out, where = tokenize_argv(corpus, bpe, tmp_path / "tokens"), tmp_path / "tokens", ".npy"
        again = argv
    elif stage == "train":
        assert lm(tokenize_argv(corpus, bpe, tmp_path / "tokens")) == 0
        out, where = tmp_path / "run" / "checkpoints", "checkpoints"
        argv, again = train_argv(tmp_path / "tokens", tmp_path / "run", 2), train_argv(tmp_path / "tokens", tmp_path / "run", 3)
    elif stage == "model init":
        out, where = tmp_path / "model", ""
        argv = ["model", "init", "olmo2-tiny", "n_layers=1", "vocab_size=300", "--out", out]
        again = [*argv, "--seed", "1"]
    else:
        out, where = tmp_path / "model", ""
        argv, again = {
            "checkpoint export": (["checkpoint", "export", models[0], "--out", out],
                                  ["checkpoint", "export", models[1], "--out", out]),
            "export hf": (["export", "hf", models[0], "--out", out], ["export", "hf", models[1], "--out", out]),
            "soup": (["soup", *models, "--out", out], ["soup", *models, "--out", out, "--weights", "1", "3"]),
        }[stage]
    assert lm(argv) == 0
    if stage == "dedup":
        _write_docs(documents / "c.jsonl.gz", [{"id": "c0", "text": "Something new entirely, never seen before."}])
    if stage == "tokenize":  # shard b is redone; shard a's files must survive b's failure
        (tmp_path / "tokens" / ".progress" / "b.json").unlink()
    if stage == "mix":
        for marker in (out / ".done").iterdir():
            marker.unlink()
    before = snapshot(out)
    capsys.readouterr()
    fault(1, where)
    code = lm(again)
    assert_refused_write(code, capsys.readouterr().err, str(tmp_path))
    after = snapshot(out)
    assert temps(tmp_path) == [] and not list(tmp_path.rglob(files.LOCK_NAME))
    if stage == "tokenize":
        before = {k: v for k, v in before.items() if k.startswith("a-") or k == "tokenizer/tokenizer.json"}
    if stage == "mix":  # with its marks gone the output was unfinished; a run with work removes its manifest first
        before.pop("manifest.json")
    if stage in ("tag", "dedup", "train"):  # new shard's attributes / the run's new rows may be added, not changed
        before = {k: v for k, v in before.items() if stage != "dedup" or ".state" in k}
    assert {k: after.get(k) for k in before} == before


def test_full_filesystem_ends_model_init_in_one_line(tmp_path, capsys):
    """A real 1 MiB filesystem (tmpfs; needs root and a kernel that lets the test mount)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (not root, or no permission)")
    try:
        (small / "model").mkdir()
        (small / "model" / "keep.txt").write_text("earlier output\n")
        code = lm(["model", "init", "olmo2-tiny", "n_layers=1", "--out", str(small / "model")])  # ~26 MB
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"cannot write {small / 'model' / 'model.safetensors'}: " in err and "free space" in err, err
        assert sorted(p.name for p in small.rglob("*")) == ["keep.txt", "model"]  # no temporary, no lock
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("how, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_mid_write_exits_without_traceback_or_temporaries(how, code, corpus, bpe, tmp_path):
    out = tmp_path / "tokens"
    process, _ = start_paused(tmp_path, "lmforge.tokens.tokenize:_FileWriter._write_buffer",
                              tokenize_argv(corpus, bpe, out, "--workers", "2"))
    assert temps(out), "a worker should be writing a temporary token file"
    process.send_signal(how)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "Traceback" not in err and err.strip() == {130: "lmforge: interrupted", 143: "lmforge: terminated"}[code]
    assert temps(tmp_path) == [] and not (out / files.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------- eval --out


def test_eval_out_is_replaced_as_a_whole(models, tmp_path, capsys):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"id": i, "context": "What colour is the sky?",
                                                           "choices": ["blue", "green"], "gold": 0}) + "\n"
                                               for i in range(3)))
    (tmp_path / "sky.yaml").write_text("name: sky\ndata: mc.jsonl\n")
    (tmp_path / "sea.yaml").write_text("name: sea\ndata: mc.jsonl\n")
    out = tmp_path / "out"

    def evaluate(*tasks: str) -> list:
        return ["eval", models[0], "--tasks", ",".join(str(tmp_path / t) for t in tasks), "--out", out,
                "--device", "cpu", "--no-progress"]

    assert lm(evaluate("sky.yaml", "sea.yaml")) == 0
    old = snapshot(out)
    assert {"predictions/sky.jsonl", "predictions/sea.jsonl"} <= old.keys()
    # Killed while writing the new set (after its predictions, before its report): the old set is untouched.
    victim, _ = start_paused(tmp_path, "lmforge.core.files:atomic_write_text", evaluate("sky.yaml"))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert snapshot(out) == old
    assert lm(evaluate("sky.yaml")) == 0
    new = snapshot(out)
    assert "predictions/sea.jsonl" not in new and "predictions/sky.jsonl" in new
    assert set(json.loads(new["results.json"])["tasks"]) == {"sky"}
    assert temps(tmp_path) == [] and not (out / files.LOCK_NAME).exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_full_disk_in_the_middle_of_a_streamed_shard_names_the_shard(tmp_path):
    """Compressed writers report ENOSPC from `write` or from the flush in `close`, without a file name."""
    import errno

    from lmforge.core.errors import OutputWriteError
    from lmforge.curation.attributes import AttributeWriter

    target = tmp_path / "attributes" / "x" / "a.jsonl.gz"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"previous")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    class FullAtWrite:
        write, flush, close = full, (lambda self: None), (lambda self: None)

    class FullAtClose:
        write, flush, close = (lambda self, data: len(data)), full, full

    for stream in (FullAtWrite, FullAtClose):
        with pytest.raises(OutputWriteError, match=f"cannot write {target}: No space left on device"):
            with AttributeWriter(target) as writer:
                writer._stream._stream = stream()  # the compressor over the temporary file
                writer.write("d1", {"k": []}, 1)
        assert target.read_bytes() == b"previous" and temps(tmp_path) == []


def test_a_library_temporary_left_by_a_kill_is_removed_by_the_next_run(tmp_path):
    # Found by the fault campaign: safetensors writes `.tmpXXXXXX` (Rust's tempfile crate) beside the weights
    # before its rename; `model init` killed in between left it behind.
    out = tmp_path / "model"
    out.mkdir()
    (out / ".tmpkJE9Ul").write_bytes(b"half a safetensors file")
    (out / ".tmp_not_ours").write_text("a user's file, not a temporary name lmforge or safetensors makes")
    assert lm(["model", "init", "olmo2-tiny", "n_layers=1", "vocab_size=300", "--out", out]) == 0
    assert not (out / ".tmpkJE9Ul").exists() and (out / ".tmp_not_ours").exists()


def test_every_command_that_writes_a_model_directory_leaves_a_manifest(models, tmp_path):
    # "Every output directory carries a manifest": export hf and import hf did not write one.
    assert lm(["export", "hf", models[0], "--out", tmp_path / "hf"]) == 0
    assert lm(["import", "hf", tmp_path / "hf", "--out", tmp_path / "back"]) == 0
    exported = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    imported = json.loads((tmp_path / "back" / "manifest.json").read_text())
    assert exported["command"] == "export hf" and exported["inputs"]
    assert imported["command"] == "import hf" and imported["source_kind"] == "hf"
    assert [i["path"] for i in imported["inputs"]] == [str(tmp_path / "hf" / "model.safetensors")]
