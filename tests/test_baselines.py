"""Baselines a model's bits per byte must beat: a unigram model of the training tokens, gzip and zstd."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest
import zstandard

from lmforge.cli import main as lmforge
from lmforge.curation.documents import DocumentWriter
from lmforge.eval.baselines import baseline_bits_per_byte, deflate_size, unigram_log2_probs, zstd_size
from lmforge.tokens.tokenizer import Tokenizer


class Letters:
    """a=0, b=1, c=2; EOS=3; one piece per text."""

    splits_at_spaces = False

    def encode_batch(self, texts):
        return [[ord(c) - ord("a") for c in text] for text in texts]


class Bytes(Letters):
    def encode_batch(self, texts):
        return [list(text.encode()) for text in texts]


def test_unigram_bits_per_byte_by_hand():
    # Training counts a:3 b:1 c:0 and two EOS, which the model never has to predict: add-one smoothing over
    # the 4 ids gives p(a) = 4/8, p(b) = 2/8, p(c) = 1/8 -> "abc" costs 1 + 2 + 3 = 6 bits over 3 bytes.
    log2_probs = unigram_log2_probs(np.array([3, 1, 0, 2]), [3, None])
    assert np.allclose(2 ** log2_probs, [4 / 8, 2 / 8, 1 / 8, 1 / 8])
    docs = [("web", "web", "abc"), ("web", "web", "aa"), ("code", "code", "c")]
    rows = baseline_bits_per_byte(docs, log2_probs, Letters())
    assert rows["web"]["unigram_bits_per_byte"] == pytest.approx((6 + 2) / 5)  # "aa" costs 1 + 1
    assert rows["code"]["unigram_bits_per_byte"] == pytest.approx(3.0)
    assert rows["total"]["unigram_bits_per_byte"] == pytest.approx((6 + 2 + 3) / 6)
    assert (rows["web"]["documents"], rows["web"]["bytes"], rows["web"]["tokens"]) == (2, 5, 5)
    assert list(rows)[-1] == "total"


def test_compressors_per_document():
    text = ("def add(a, b):\n    return a + b\n\n" * 40).encode()
    # gzip -9 with mtime 0 and no name: a 10-byte header and an 8-byte trailer around the same DEFLATE stream.
    assert deflate_size(text) == len(gzip.compress(text, compresslevel=9, mtime=0)) - 18
    frame = zstandard.ZstdCompressor(level=19, write_checksum=False, write_content_size=False).compress(text)
    assert zstd_size(text) == len(frame)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == text
    docs = [("code", "code", text.decode()), ("code", "code", "x = 1\n")]
    rows = baseline_bits_per_byte(docs, np.zeros(128), Bytes())
    expected = 8 * (deflate_size(text) + deflate_size(b"x = 1\n")) / (len(text) + 6)
    assert rows["code"]["gzip_bits_per_byte"] == pytest.approx(expected)
    assert 0 < rows["code"]["zstd_bits_per_byte"] < 1 and 0 < rows["code"]["gzip_bits_per_byte"] < 1


def test_baselines_command(tmp_path, capsys):
    """`lmforge baselines` on token files from `lmforge data tokenize`: the unigram counts equal those of
    the training documents encoded one by one (EOS aside), and each source gets a row."""
    train = [{"id": str(i), "text": f"def f{i}(x):\n    return x * {i}", "source": "code"} for i in range(60)]
    held = [{"id": "h1", "text": "def g(y):\n    return y + 1\n", "source": "code"},
            {"id": "h2", "text": "The function returns its argument.", "source": "prose"}]
    for name, docs in (("train/documents/a.jsonl.gz", train), ("held/b.jsonl.gz", held)):
        with DocumentWriter(tmp_path / name) as writer:
            for doc in docs:
                writer.write(doc)
    docs_glob = str(tmp_path / "train/documents/*.jsonl.gz")
    assert lmforge(["data", "train-tokenizer", "--documents", docs_glob, "--vocab-size", "300",
                    "--out", str(tmp_path / "tok")]) == 0
    assert lmforge(["data", "tokenize", "--documents", docs_glob, "--tokenizer", str(tmp_path / "tok"),
                    "--out", str(tmp_path / "tokens")]) == 0
    assert lmforge(["baselines", "--tokens", str(tmp_path / "tokens"), "--ppl", str(tmp_path / "held/*.jsonl.gz"),
                    "--out", str(tmp_path / "base")]) == 0
    results = json.loads((tmp_path / "base/results.json").read_text())
    tokenizer = Tokenizer.load(tmp_path / "tok")
    counts = Counter(t for doc in train for t in tokenizer.encode(doc["text"]))
    total, vocab = sum(counts.values()), tokenizer.vocab_size
    expected_bits = -sum(np.log2((counts[t] + 1) / (total + vocab)) for t in tokenizer.encode(held[0]["text"]))
    assert results["unigram"]["vocab_size"] == vocab
    assert results["sources"]["code"]["unigram_bits_per_byte"] == pytest.approx(
        expected_bits / len(held[0]["text"]))
    assert set(results["sources"]) == {"code", "prose", "total"}
    assert "| prose |" in capsys.readouterr().out
    assert json.loads((tmp_path / "base/manifest.json").read_text())["counts"]["documents"] == 2
