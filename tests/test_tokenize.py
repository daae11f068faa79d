"""`lmforge data tokenize` / `train-tokenizer`: token ids vs direct encoding, byte-identical reruns independent
of the worker count, resume after a kill, bad input counted, and agreement with `dolma tokens`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import requires_olmo_tokenizer

from lmforge.cli import main
from lmforge.core.executor import ExecutorConfig
from lmforge.tokens.tokenize import TokenizeConfig, token_dtype, tokenize
from lmforge.tokens.tokenizer import Tokenizer, train_bpe

WORDS = ("the cat sat on a mat while data flows through pipes and tokens . model loss step "
         "Zürich 東京 naïve café λ").split()
DOLMA_VENV = Path(os.environ.get("DOLMA_VENV", Path(__file__).resolve().parents[1] / ".peers" / "dolma-venv"))


def _docs(seed: int, n: int, source: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 60)))
        docs.append({"id": f"{source}-{seed}-{i}", "text": " ".join(words) + ("\n" if i % 3 else ""),
                     "source": source})
    return docs


def _write(path: Path, lines: list[bytes]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def _encode(docs: list[dict]) -> list[bytes]:
    return [json.dumps(d, ensure_ascii=False).encode("utf-8") for d in docs]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    docs_dir = root / "documents"
    docs_dir.mkdir()
    shards = {"a-0000.jsonl.gz": _docs(1, 40, "alpha"), "a-0001.jsonl.zst": _docs(2, 35, "alpha"),
              "b-0000.jsonl": _docs(3, 50, "beta")}
    clean = {}
    for name, docs in shards.items():
        lines = _encode(docs)
        if name == "b-0000.jsonl":
            # line 3: empty text, line 6: whitespace only, line 9: invalid UTF-8, line 12: malformed JSON
            lines.insert(2, _encode([{"id": "empty", "text": "", "source": "beta"}])[0])
            lines.insert(5, _encode([{"id": "blank", "text": " \n\t", "source": "beta"}])[0])
            lines.insert(8, b'{"id": "bad", "text": "caf\xe9"}')
            lines.insert(11, b'{"id": "broken", "text": ')
        _write(docs_dir / name, lines)
        clean[name] = docs
    texts = [d["text"] for docs in shards.values() for d in docs]
    tok_dir = root / "tokenizer"
    train_bpe(iter(texts * 3), vocab_size=400).save(tok_dir)
    return {"root": root, "glob": str(docs_dir / "*"), "docs": clean, "tokenizer": str(tok_dir / "tokenizer.json")}


def _run_tokenize(corpus, out: Path, workers: int = 1, **kw) -> dict:
    return tokenize(TokenizeConfig(documents=[corpus["glob"]], tokenizer=corpus["tokenizer"], out=str(out),
                                   executor=ExecutorConfig(workers=workers, progress=False), **kw))


def _output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith(".npy") or p.name.endswith(".parquet")}


def test_tokenize_runs_on_ray_with_the_same_bytes(corpus, tmp_path, monkeypatch):
    # `data tokenize` goes through the executor every data stage shares, so it runs on Ray too.
    pytest.importorskip("ray")
    from lmforge.core import executor

    ray_runs = []
    real_iter_ray = executor._iter_ray
    monkeypatch.setattr(executor, "_iter_ray", lambda *a: ray_runs.append(len(a[1])) or real_iter_ray(*a))
    local = _run_tokenize(corpus, tmp_path / "local", workers=2)
    on_ray = tokenize(TokenizeConfig(documents=[corpus["glob"]], tokenizer=corpus["tokenizer"],
                                     out=str(tmp_path / "ray"),
                                     executor=ExecutorConfig(kind="ray", workers=2, progress=False)))
    assert on_ray["counts"] == local["counts"]
    assert _output_bytes(tmp_path / "ray") == _output_bytes(tmp_path / "local") != {}
    assert ray_runs and ray_runs[0] > 1  # the shards went to Ray tasks


def test_token_ids_match_direct_encoding_and_sidecar(corpus, tmp_path):
    out = tmp_path / "tok"
    summary = _run_tokenize(corpus, out, bos=True)
    tokenizer = Tokenizer.load(corpus["tokenizer"])
    eos = tokenizer.eos_id
    expected = {d["id"]: d for docs in corpus["docs"].values() for d in docs}
    seen = 0
    for sidecar in sorted(out.glob("*.docs.parquet")):
        table = pq.read_table(sidecar)
        meta = table.schema.metadata
        assert meta[b"lmforge.dtype"] == b"uint16"
        tokens = np.fromfile(str(sidecar).replace(".docs.parquet", ".npy"), dtype=np.uint16)
        rows = table.to_pylist()
        assert rows[0]["start"] == 0 and rows[-1]["end"] == len(tokens)
        for row in rows:
            doc = expected[row["id"]]
            want = [eos] + tokenizer.encode(doc["text"].strip()) + [eos]  # BOS falls back to EOS
            assert tokens[row["start"]:row["end"]].tolist() == want
            assert row["source"] == doc["source"]
            seen += 1
    assert seen == len(expected) == summary["counts"]["documents"]
    counts = summary["counts"]
    assert counts["skipped_empty_documents"] == 2
    assert counts["skipped_bad_lines"] == 2
    assert any("b-0000.jsonl:9: invalid UTF-8" in b for b in summary["bad_lines"])
    assert any("b-0000.jsonl:12: malformed JSON" in b for b in summary["bad_lines"])
    manifest = json.loads((out / "manifest.json").read_text())
    alpha = sum(len(tokenizer.encode(d["text"].strip())) + 2 for n in ("a-0000.jsonl.gz", "a-0001.jsonl.zst")
                for d in corpus["docs"][n])
    assert manifest["sources"]["alpha"]["tokens"] == alpha
    assert manifest["counts"]["tokens"] == sum(s["tokens"] for s in manifest["sources"].values())
    shard_b = next(s for s in manifest["shards"] if s["path"].endswith("b-0000.jsonl"))
    assert (shard_b["skipped_empty_documents"], shard_b["skipped_bad_lines"], shard_b["documents"]) == (2, 2, 50)


def test_rerun_byte_identical_and_independent_of_workers(corpus, tmp_path):
    _run_tokenize(corpus, tmp_path / "w1", workers=1, max_tokens_per_file=300)
    _run_tokenize(corpus, tmp_path / "w2", workers=2, max_tokens_per_file=300)
    one, two = _output_bytes(tmp_path / "w1"), _output_bytes(tmp_path / "w2")
    assert len(one) > 6  # several files per shard
    assert one == two
    # Documents are never split across files and no file exceeds the limit unless one document does.
    for name, data in one.items():
        if name.endswith(".npy"):
            assert len(data) // 2 <= 300
    # A single shard with 2 workers is encoded on the tokenizer's threads instead: same bytes.
    single = str(Path(corpus["glob"]).parent / "b-0000.jsonl")
    for name, workers in (("s1", 1), ("s2", 2)):
        tokenize(TokenizeConfig(documents=[single], tokenizer=corpus["tokenizer"], out=str(tmp_path / name),
                                executor=ExecutorConfig(workers=workers, progress=False)))
    assert _output_bytes(tmp_path / "s1") == _output_bytes(tmp_path / "s2")
    import shutil

    shutil.rmtree(tmp_path / "w1" / ".progress")
    _run_tokenize(corpus, tmp_path / "w1")  # other settings than before: every shard redone
    _run_tokenize(corpus, tmp_path / "w3")
    assert _output_bytes(tmp_path / "w1") == _output_bytes(tmp_path / "w3")


def test_resume_skips_finished_shards_and_redoes_killed_one(corpus, tmp_path):
    out = tmp_path / "tok"
    _run_tokenize(corpus, out)
    reference = _output_bytes(out)
    # Simulate a kill while shard b-0000 was being written: no progress record, a truncated token file and a
    # leftover temporary file.
    (out / ".progress" / "b-0000.json").unlink()
    victim = out / "b-0000-00000.npy"
    victim.write_bytes(victim.read_bytes()[:10])
    (out / ".b-0000-00000.npy.abc123.tmp").write_bytes(b"junk")
    summary = _run_tokenize(corpus, out)
    assert summary["counts"]["shards_already_done"] == 2
    assert _output_bytes(out) == reference


def test_dtype_rule():
    assert token_dtype(50_280) == "uint16"
    assert token_dtype(65_536) == "uint16"  # ids 0..65535 fit
    assert token_dtype(65_537) == "uint32"
    assert token_dtype(100_278) == "uint32"


def test_cli_tokenize_reports_skips_and_missing_input(corpus, tmp_path, capsys):
    assert main(["data", "tokenize", "--documents", corpus["glob"], "--tokenizer", corpus["tokenizer"],
                 "--out", str(tmp_path / "t"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 empty documents" in captured.err
    assert "b-0000.jsonl:9: invalid UTF-8" in captured.err
    assert main(["data", "tokenize", "--documents", str(tmp_path / "nothing*.jsonl"), "--tokenizer",
                 corpus["tokenizer"], "--out", str(tmp_path / "t2")]) == 2
    assert "no files match" in capsys.readouterr().err


def test_train_tokenizer_cli(corpus, tmp_path):
    for name in ("t1", "t2"):
        assert main(["data", "train-tokenizer", "--documents", corpus["glob"], "--vocab-size", "300",
                     "--out", str(tmp_path / name), "--sample-docs", "60", "--seed", "7"]) == 0
    assert (tmp_path / "t1" / "tokenizer.json").read_bytes() == (tmp_path / "t2" / "tokenizer.json").read_bytes()
    tok = Tokenizer.load(tmp_path / "t1")
    assert tok.vocab_size == 384 and tok.vocab_size % 128 == 0
    for special in ("<|endoftext|>", "<|padding|>", "|||EMAIL_ADDRESS|||", "|||PHONE_NUMBER|||", "|||IP_ADDRESS|||"):
        assert tok.token_to_id(special) is not None
    text = "the cat sat on a mat"
    assert tok.decode(tok.encode(text)) == text
    manifest = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert manifest["counts"]["sampled_documents"] == 60
    assert manifest["counts"]["skipped_bad_lines"] == 2


@requires_olmo_tokenizer
@pytest.mark.skipif(not (DOLMA_VENV / "bin" / "dolma").exists(), reason="dolma peer venv not installed "
                    "(benchmarks/peers/setup_dolma.sh)")
def test_token_ids_identical_to_dolma_tokens(corpus, tmp_path):
    # The OLMo tokenizer: dolma's pinned tokenizers (<=0.19) cannot read JSON that newer versions write.
    from lmforge.tokens.tokenizer import resolve_tokenizer_path

    tokenizer_path = str(resolve_tokenizer_path("olmo"))
    clean = tmp_path / "clean" / "documents"
    clean.mkdir(parents=True)
    for name, docs in corpus["docs"].items():
        _write(clean / (name.split(".")[0] + ".jsonl.gz"), _encode(docs))
    tokenizer = Tokenizer.load(tokenizer_path)
    dolma_out = tmp_path / "dolma"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    subprocess.run(
        [str(DOLMA_VENV / "bin" / "dolma"), "tokens", "--documents", str(clean / "*.jsonl.gz"),
         "--destination", str(dolma_out), "--tokenizer.name_or_path", tokenizer_path,
         "--tokenizer.eos_token_id", str(tokenizer.eos_id), "--tokenizer.pad_token_id", str(tokenizer.pad_id),
         "--dtype", "uint16", "--processes", "1", "--seed", "3"],
        check=True, env=env, capture_output=True,
    )
    theirs = {}
    for npy in dolma_out.glob("*.npy"):
        tokens = np.memmap(npy, dtype=np.uint16, mode="r")
        with gzip.open(str(npy)[:-4] + ".csv.gz", "rt") as f:
            for row in f:
                start, end, doc_id = row.split(",")[:3]
                theirs[doc_id] = tokens[int(start):int(end)].tolist()
    ours_dir = tmp_path / "ours"
    tokenize(TokenizeConfig(documents=[str(clean / "*")], tokenizer=tokenizer_path, out=str(ours_dir)))
    ours = {}
    for sidecar in ours_dir.glob("*.docs.parquet"):
        tokens = np.fromfile(str(sidecar).replace(".docs.parquet", ".npy"), dtype=np.uint16)
        for row in pq.read_table(sidecar).to_pylist():
            ours[row["id"]] = tokens[row["start"]:row["end"]].tolist()
    assert len(ours) == sum(len(d) for d in corpus["docs"].values())
    assert ours == theirs
