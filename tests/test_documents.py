import pytest

from lmforge.curation.documents import DocumentWriter, ReadReport, read_documents, strip_suffix


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"])
def test_round_trip_every_format(tmp_path, name):
    docs = [{"id": "1", "text": "héllo ☃", "source": "s", "metadata": {"lang": "fr"}},
            {"id": "2", "text": "", "source": "s", "metadata": {"other": [1, 2]}}]
    with DocumentWriter(tmp_path / name) as writer:
        for doc in docs:
            writer.write(doc)
    report = ReadReport()
    assert [d for _, d in read_documents(tmp_path / name, report)] == docs
    assert report.documents == 2 and report.skipped == 0
    assert strip_suffix(tmp_path / name) == "a"


def test_bad_lines_are_skipped_counted_and_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id":1,"text":"ok"}\nnot json\n{"id":3}\n\xff\xfe\n{"text":"x"}\n\n'
                     b'{"id":5,"text":"a\\ud800b"}\n[1]\n{"id":6,"text":"fine \\u00e9"}\n')
    report = ReadReport()
    docs = list(read_documents(path, report))
    assert [(line, d["id"]) for line, d in docs] == [(1, "1"), (9, "6")]
    reasons = {b.line: b.reason for b in report.bad_lines}
    assert report.skipped == 7 and set(reasons) == {2, 3, 4, 5, 6, 7, 8}
    assert reasons[2].startswith("malformed JSON") and reasons[3] == "missing 'text'"
    assert reasons[4] == "invalid UTF-8 at byte 0" and reasons[5] == "missing 'id'"
    assert "lone surrogate" in reasons[7] and reasons[8] == "not a JSON object"


def test_failed_write_leaves_previous_file(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with DocumentWriter(path) as writer:
        writer.write({"id": "old", "text": "kept"})
    with pytest.raises(RuntimeError):
        with DocumentWriter(path) as writer:
            writer.write({"id": "new", "text": "lost"})
            raise RuntimeError("crash mid-write")
    assert [d["id"] for _, d in read_documents(path)] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl.gz"]


def test_concatenated_streams_padding_and_a_zero_filled_file(tmp_path):
    import gzip

    import zstandard

    one, two = b'{"id":"1","text":"a"}\n', b'{"id":"2","text":"b"}\n'
    (tmp_path / "members.jsonl.gz").write_bytes(gzip.compress(one) + gzip.compress(two) + b"\0" * 64)
    (tmp_path / "frames.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(one)
                                                + zstandard.ZstdCompressor().compress(two))
    for name in ("members.jsonl.gz", "frames.jsonl.zst"):
        report = ReadReport()
        assert [d["id"] for _, d in read_documents(tmp_path / name, report)] == ["1", "2"]
        assert report.counts() == {"skipped_lines": 0, "empty_shards": 0, "truncated_files": 0, "duplicate_ids": 0}
    (tmp_path / "zeros.jsonl.gz").write_bytes(b"\0" * 64)  # what a crash can leave of a file never flushed
    report = ReadReport()
    assert list(read_documents(tmp_path / "zeros.jsonl.gz", report)) == []
    assert report.counts()["truncated_files"] == 1 and not report.empty_shards
    assert str(report.truncated[0]).startswith(f"{tmp_path / 'zeros.jsonl.gz'}: truncated after line 0")
