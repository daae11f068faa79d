"""Bloom filter, MinHash and the dedup stage's keep-the-first semantics and persisted state."""

import gzip
import json

import numpy as np
import orjson
import xxhash
import yaml
import pytest

from lmforge.core.errors import LmforgeError
from lmforge.core.executor import ExecutorConfig
from lmforge.curation.attributes import attribute_path, read_attributes
from lmforge.curation import dedup
from lmforge.curation.dedup import BloomConfig, BloomFilter, DedupConfig, blocked_false_positive_rate, run_dedup
from lmforge.curation.fuzzy import MinHashConfig, MinHasher, estimated_jaccard, word_ngram_hashes
from lmforge.curation.documents import DocumentWriter


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_bloom_false_positive_rate_within_target(tmp_path, target):
    rng = np.random.default_rng(0)
    bloom = BloomFilter.sized(20_000, target)
    members = rng.integers(0, 2 ** 63, size=20_000, dtype=np.uint64)
    others = rng.integers(0, 2 ** 63, size=200_000, dtype=np.uint64)
    bloom.insert(members)
    assert bloom.contains(members).all()  # no false negatives
    fp = bloom.contains(others).mean()
    assert fp <= target * 1.25  # 200k trials: 3 sigma is 0.07 * target at 1e-2, 0.21 * target at 1e-3
    bloom.save(tmp_path / "f.bloom")
    loaded = BloomFilter.load(tmp_path / "f.bloom")
    assert loaded.bits == bloom.bits and loaded.hashes == bloom.hashes
    assert np.array_equal(loaded.contains(others[:1000]), bloom.contains(others[:1000]))


def test_bloom_sizing_formula():
    bloom = BloomFilter.sized(1_000_000, 1e-6)
    assert bloom.hashes == 20  # k = log2(1/p) = 19.9
    # the standard filter needs m = -n ln p / ln(2)^2 = 28.76 bits per element; blocking costs under 50 % more
    assert 28.76 <= bloom.bits / 1_000_000 <= 1.5 * 28.76
    assert blocked_false_positive_rate(bloom.bits, bloom.hashes, 1_000_000) <= 1e-6
    # the model agrees with the standard formula's order of magnitude when blocks are large and lightly loaded
    assert 1e-7 < blocked_false_positive_rate(bloom.bits, bloom.hashes, 1_000_000)


def test_bloom_insert_marks_repeats_and_tests_each_key_against_the_filter_before_the_call(monkeypatch):
    """Reference: a key is seen when it occurs earlier in the batch or the filter held it before the call; the
    bits set are those of each distinct key inserted alone. One 512-bit block and 3-key chunks: a chunk that
    split a block would find keys that only this call's earlier chunks had set."""
    monkeypatch.setattr(dedup, "PROBE_CHUNK", 3)
    rng = np.random.default_rng(2)
    bloom = BloomFilter(512, 3)
    earlier = rng.integers(0, 2 ** 64, size=20, dtype=np.uint64)
    bloom.insert(earlier)
    keys = np.concatenate([rng.integers(0, 2 ** 64, size=200, dtype=np.uint64), earlier[:5]])
    keys = np.concatenate([keys, keys[rng.integers(0, len(keys), size=60)]])[rng.permutation(len(keys) + 60)]
    before = bloom.contains(keys)
    expected = [bool(before[i]) or keys[i] in keys[:i] for i in range(len(keys))]
    assert bloom.insert(keys).tolist() == expected
    alone = BloomFilter(512, 3)
    for key in dict.fromkeys(np.concatenate([earlier, keys]).tolist()):
        alone.insert(np.array([key], dtype=np.uint64))
    assert np.array_equal(bloom.words, alone.words)


@pytest.mark.parametrize("texts", [
    [],
    ["", "\n", "a"],
    ["shared line\nunique\r\n\n \t\n", "\x1c\x1f \nx"],
    ["caf\u00e9 \u65e5\u672c\n\u00a0\u3000\n\u2028\n \u00e9 \n\U0001F600\n", "\x85\n\u200b\nend\u00a0"],
])
def test_paragraph_table_matches_a_line_by_line_reference(texts):
    """Each document's lines one at a time: skipped when empty or all `str.isspace`, else [start, end) in
    characters (the newline included when there is one) and the xxh3-64 of the line's UTF-8."""
    expected = []
    for doc, text in enumerate(texts):
        start = 0
        for line in text.split("\n"):
            if line and not line.isspace():
                expected.append((doc, start, min(start + len(line) + 1, len(text)),
                                 xxhash.xxh3_64_intdigest(line.encode())))
            start += len(line) + 1
    table = dedup._paragraph_table(texts, [len(t) for t in texts])
    got = list(zip(*(table[k].tolist() for k in ("para_doc", "para_start", "para_end", "para_hash"))))
    assert got == expected


def test_dedup_attribute_lines_are_orjson_encoded_rows(tmp_path):
    """The attribute encoder assembles lines from pieces: each must read back as the row, byte for byte as
    orjson writes it, scores as floats, and a repeated id carries its document line."""
    _write(tmp_path / "documents" / "a.jsonl.gz", [
        {"id": "x\"1", "text": "p\nq\n", "metadata": {"url": "u"}},
        {"id": "x\"1", "text": "p\nq\n", "metadata": {"url": "u"}},
        {"id": "\u00e9", "text": "r\np", "metadata": {"url": "v"}},
    ])
    run_dedup(DedupConfig(documents=[str(tmp_path / "documents" / "*.jsonl.gz")], modes=["doc", "url", "paragraph"]))
    with gzip.open(attribute_path(tmp_path / "documents" / "a.jsonl.gz", "dedup"), "rb") as f:
        rows = [(raw, orjson.loads(raw)) for raw in f.read().splitlines()]
    assert all(raw == orjson.dumps(row) for raw, row in rows)
    assert [row.get("line") for _, row in rows] == [None, 2, None]
    assert rows[1][1]["attributes"] == {"dedup__duplicate_doc": [[0, 4, 1.0]], "dedup__duplicate_url": [[0, 4, 1.0]],
                                        "dedup__duplicate_paragraphs": [[0, 2, 1.0], [2, 4, 1.0]]}
    assert rows[2][1]["attributes"]["dedup__duplicate_paragraphs"] == [[2, 3, 1.0]]
    assert all(isinstance(span[2], float) for _, row in rows for spans in row["attributes"].values() for span in spans)


def _exact_jaccard(a: str, b: str, n: int) -> float:
    x, y = set(word_ngram_hashes(a, n).tolist()), set(word_ngram_hashes(b, n).tolist())
    return len(x & y) / len(x | y)


def test_minhash_estimate_close_to_exact_jaccard():
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(500)]
    hasher = MinHasher(256, seed=3)
    for keep in (0.2, 0.5, 0.8, 0.95):
        base = list(rng.choice(vocab, size=300))
        other = [w if rng.random() < keep else str(rng.choice(vocab)) for w in base]
        a, b = " ".join(base), " ".join(other)
        exact = _exact_jaccard(a, b, 3)
        estimate = estimated_jaccard(hasher.signature(word_ngram_hashes(a, 3)),
                                     hasher.signature(word_ngram_hashes(b, 3)))
        assert abs(estimate - exact) < 0.1, (keep, exact, estimate)  # sd <= 0.031 with 256 permutations


def _write(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with DocumentWriter(path) as w:
        for d in docs:
            w.write(d)


LONG = " ".join(f"word{i} filler text" for i in range(60))


def _corpus(root):
    _write(root / "documents" / "a.jsonl.gz", [
        {"id": "a1", "text": "shared line\nunique one\n\n", "source": "web", "metadata": {"url": "http://x/1"}},
        {"id": "a2", "text": LONG, "source": "web", "metadata": {"url": "http://x/2"}},
    ])
    _write(root / "documents" / "b.jsonl.gz", [
        {"id": "b1", "text": "shared line\nunique one\n\n", "source": "books", "metadata": {"url": "http://x/3"}},
        {"id": "b2", "text": "other\nshared line\n\n", "source": "books", "metadata": {"url": "http://x/1"}},
        {"id": "b3", "text": LONG.replace("word59", "changed"), "source": "books"},
    ])


def _attrs(root, shard, name="dedup"):
    return dict(read_attributes(attribute_path(root / "documents" / shard, name)))


@pytest.mark.parametrize("workers", [1, 2])
def test_dedup_marks_later_copies_and_keeps_first(tmp_path, workers):
    _corpus(tmp_path)
    summary = run_dedup(DedupConfig(documents=[str(tmp_path / "documents" / "*.jsonl.gz")],
                                    modes=["doc", "url", "paragraph", "minhash"],
                                    executor=ExecutorConfig(workers=workers),
                                    minhash=MinHashConfig(ngram=3, threshold=0.7)))
    a, b = _attrs(tmp_path, "a.jsonl.gz"), _attrs(tmp_path, "b.jsonl.gz")
    assert a["a1"]["dedup__duplicate_doc"] == [] and a["a1"]["dedup__duplicate_paragraphs"] == []
    assert b["b1"]["dedup__duplicate_doc"] == [[0, 24, 1.0]]
    assert b["b1"]["dedup__duplicate_paragraphs"] == [[0, 12, 1.0], [12, 23, 1.0]]  # blank lines never count
    assert b["b2"]["dedup__duplicate_url"] == [[0, 19, 1.0]]
    assert b["b2"]["dedup__duplicate_paragraphs"] == [[6, 18, 1.0]]
    assert b["b3"]["dedup__near_duplicate"][0][2] >= 0.7 and a["a2"]["dedup__near_duplicate"] == []
    assert summary["per_source"]["books"]["duplicate_documents"] == 3
    assert summary["per_source"]["web"]["duplicate_rate"] == 0


def test_dedup_state_persists_across_crawls_and_reruns_skip(tmp_path):
    _corpus(tmp_path / "crawl1")
    state = tmp_path / "state"
    cfg = dict(modes=["doc", "paragraph"], state=str(state))
    run_dedup(DedupConfig(documents=[str(tmp_path / "crawl1/documents/*.gz")], **cfg))
    again = run_dedup(DedupConfig(documents=[str(tmp_path / "crawl1/documents/*.gz")], **cfg))
    assert again["shards_skipped_done"] == 2  # not re-marked as duplicates of themselves
    assert _attrs(tmp_path / "crawl1", "a.jsonl.gz")["a1"]["dedup__duplicate_doc"] == []
    _write(tmp_path / "crawl2/documents/c.jsonl.gz", [{"id": "c1", "text": "unique one\nbrand new\n"}])
    run_dedup(DedupConfig(documents=[str(tmp_path / "crawl2/documents/*.gz")], **cfg))
    assert _attrs(tmp_path / "crawl2", "c.jsonl.gz")["c1"]["dedup__duplicate_paragraphs"] == [[0, 11, 1.0]]
    meta = json.loads((state / (state / "CURRENT").read_text().strip() / "state.json").read_text())
    assert len(meta["absorbed"]) == 3
    with pytest.raises(LmforgeError, match="was built with"):
        run_dedup(DedupConfig(documents=[str(tmp_path / "crawl2/documents/*.gz")], modes=["doc"], state=str(state)))


class Interrupted(BaseException):
    """A kill: nothing after it runs (not even `except Exception` handlers)."""


def _crawls(root):
    _corpus(root / "crawl1")
    _write(root / "crawl2/documents/c.jsonl.gz", [
        {"id": "c1", "text": "shared line\nbrand new\n", "source": "web", "metadata": {"url": "http://x/2"}},
        {"id": "c2", "text": LONG, "source": "web"},
        {"id": "c3", "text": "only in crawl two\nand crawl three\n", "source": "web"},
    ])
    _write(root / "crawl2/documents/d.jsonl.gz", [
        {"id": "d1", "text": "fresh words\nonly here\n", "source": "books", "metadata": {"url": "http://x/9"}},
        {"id": "d2", "text": LONG.replace("word3 ", "other3 "), "source": "books"},
    ])
    _write(root / "crawl3/documents/e.jsonl.gz", [
        {"id": "e1", "text": "only in crawl two\nand crawl three\n", "source": "web"},
        {"id": "e2", "text": "fresh words\nnever seen\n", "source": "web", "metadata": {"url": "http://x/9"}},
        {"id": "e3", "text": "a new document entirely\n", "source": "web"},
    ])


def _dedup_crawl(root, crawl):
    return run_dedup(DedupConfig(documents=[str(root / crawl / "documents/*.gz")], state=str(root / "state"),
                                 modes=["doc", "url", "paragraph", "minhash"],
                                 minhash=MinHashConfig(ngram=3, threshold=0.7)))


def _outcome(root):
    """Every attribute row and every attribute directory's manifest counts, by crawl."""
    out = {}
    for crawl in ("crawl1", "crawl2", "crawl3"):
        for path in sorted((root / crawl / "documents").glob("*.gz")):
            out[f"{crawl}/{path.name}"] = list(read_attributes(attribute_path(path, "dedup")))
        out[f"{crawl}/counts"] = json.loads((root / crawl / "attributes/dedup/manifest.json").read_text())["counts"]
    return out


def test_dedup_rerun_after_interruption_at_any_write_matches_uninterrupted_run(tmp_path, monkeypatch):
    import os

    reference = tmp_path / "reference"
    _crawls(reference)
    real_replace = os.replace
    renames = {}
    for crawl in ("crawl1", "crawl2", "crawl3"):
        renames[crawl] = []
        monkeypatch.setattr(os, "replace", lambda a, b, seen=renames[crawl]: seen.append(b) or real_replace(a, b))
        _dedup_crawl(reference, crawl)
    monkeypatch.setattr(os, "replace", real_replace)
    expected = _outcome(reference)
    assert expected["crawl3/e.jsonl.gz"][0][1]["dedup__duplicate_doc"] != []  # crawl2 was absorbed

    # every file lmforge writes goes through a rename: a kill before the (k+1)-th one of a run, for every k
    for interrupted in ("crawl1", "crawl2"):
        assert len(renames[interrupted]) >= 6, renames
        for k in range(len(renames[interrupted]) + 1):
            root = tmp_path / f"{interrupted}-{k}"
            _crawls(root)
            if interrupted == "crawl2":
                _dedup_crawl(root, "crawl1")
            done = []

            def replace(a, b, done=done, k=k):
                if len(done) == k:
                    raise Interrupted
                done.append(b)
                return real_replace(a, b)

            monkeypatch.setattr(os, "replace", replace)
            try:
                _dedup_crawl(root, interrupted)
            except Interrupted:
                pass
            monkeypatch.setattr(os, "replace", real_replace)
            for crawl in ("crawl1", "crawl2", "crawl3"):
                _dedup_crawl(root, crawl)
            assert _outcome(root) == expected, (interrupted, k, done)
            leftovers = sorted(p.name for p in (root / "state").iterdir())
            # the pointer, one generation, and the MinHash fingerprints of the 5 shards absorbed, no more
            assert len(leftovers) == 3 and leftovers[0] == "CURRENT" and leftovers[2] == "minhash", leftovers
            assert len(list((root / "state" / "minhash").iterdir())) == 5


def test_dedup_reads_a_state_of_the_layout_before_generations(tmp_path):
    import shutil

    _crawls(tmp_path)
    _dedup_crawl(tmp_path, "crawl1")
    state = tmp_path / "state"
    generation = state / (state / "CURRENT").read_text().strip()
    for path in generation.iterdir():  # the files as the layout before generations kept them
        if path.name != "state.json":
            path.rename(state / path.name)
    meta = json.loads((generation / "state.json").read_text())
    for record in meta["absorbed"].values():
        del record["record"]
    (state / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(generation)
    (state / "CURRENT").unlink()
    assert _dedup_crawl(tmp_path, "crawl1")["shards_skipped_done"] == 2
    assert _dedup_crawl(tmp_path, "crawl2")["duplicate_docs"] == 1  # c2 repeats crawl1's a2
    assert sorted(p.name for p in state.iterdir()) == ["CURRENT", "gen-00000002", "minhash"]


def test_dedup_rerun_with_nothing_to_do_keeps_manifest_counts(tmp_path):
    _corpus(tmp_path)
    config = DedupConfig(documents=[str(tmp_path / "documents" / "*.jsonl.gz")], modes=["doc", "paragraph"])
    first = run_dedup(config)
    manifest = tmp_path / "attributes/dedup/manifest.json"
    counts = json.loads(manifest.read_text())["counts"]
    assert counts["documents"] == 5 and counts["duplicate_docs"] == first["duplicate_docs"] == 1
    assert run_dedup(config)["shards_skipped_done"] == 2
    assert json.loads(manifest.read_text())["counts"] == counts


def test_dedup_from_a_config_file_writes_the_resolved_config(tmp_path):
    from lmforge.cli import main
    from lmforge.core.config import load_config, to_dict

    _corpus(tmp_path)
    (tmp_path / "dedup.yaml").write_text(yaml.safe_dump({
        "documents": [str(tmp_path / "documents" / "*.jsonl.gz")], "modes": ["doc", "minhash"],
        "minhash": {"ngram": 3}, "state": str(tmp_path / "state")}))
    assert main(["data", "dedup", "--config", str(tmp_path / "dedup.yaml"), "--name", "dd",
                 "minhash.threshold=0.7", "--no-progress"]) == 0
    directory = tmp_path / "attributes" / "dd"
    saved = yaml.safe_load((directory / "config.yaml").read_text())
    assert saved["name"] == "dd" and saved["modes"] == ["doc", "minhash"]  # the flag and the file
    assert saved["minhash"]["ngram"] == 3 and saved["minhash"]["threshold"] == 0.7  # file and override
    assert saved["bloom"] == to_dict(BloomConfig())  # a section the file did not name, in full
    assert json.loads((directory / "manifest.json").read_text())["config"] == saved
    # Given back to the command, it is the same run: nothing left to do, the same attributes.
    before = _attrs(tmp_path, "b.jsonl.gz", "dd")
    again = run_dedup(load_config(DedupConfig, directory / "config.yaml"))
    assert again["shards_run"] == 0 and _attrs(tmp_path, "b.jsonl.gz", "dd") == before
