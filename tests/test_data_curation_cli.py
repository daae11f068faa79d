"""End to end through the CLI: tag -> dedup -> mix -> stats on a tiny corpus with bad input in it."""

import gzip
import json
import textwrap

import pytest

from lmforge.cli import main
from lmforge.curation.attributes import read_attributes
from lmforge.curation.documents import read_documents

GOOD = [
    {"id": "d1", "text": "The cat sat on the mat and looked at the birds outside the window all day long. " * 8
     + "\nWrite to jane.doe@example.com for details.", "source": "web", "metadata": {"url": "http://a/1"}},
    {"id": "d2", "text": "A short note that repeats.\nA short note that repeats.", "source": "web"},
    {"id": "d3", "text": "boom " * 30, "source": "forum"},
]


def _corpus(root):
    docs = root / "documents"
    docs.mkdir(parents=True)
    lines = [json.dumps(d).encode() for d in GOOD[:2]]
    lines += [b'{"id": "bad json"', json.dumps({"id": "no-text"}).encode(), json.dumps({"text": "no id"}).encode(),
              b'{"id": "utf", "text": "\xff\xfe broken"}']
    lines += [json.dumps(GOOD[2]).encode(), json.dumps({"id": "huge", "text": "word " * 400_000}).encode()]
    with gzip.open(docs / "a.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    with gzip.open(docs / "empty.jsonl.gz", "wb"):
        pass
    (root / "boom.py").write_text(textwrap.dedent("""
        from lmforge.curation.taggers import Tagger, register_tagger

        @register_tagger("boom_test")
        class Boom(Tagger):
            attributes = ("ok",)

            def tag(self, doc):
                if doc["text"].startswith("boom"):
                    raise ValueError("cannot tag this one")
                return {"ok": [[0, len(doc["text"]), 1.0]]}
    """))
    return str(docs / "*.jsonl.gz")


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.strip().startswith("{") else out), err


def test_tag_dedup_mix_stats_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pattern = _corpus(tmp_path)
    code, summary, _ = _run(capsys, ["data", "tag", "--documents", pattern, "--taggers", "gopher,c4,pii,langid",
                                     "--taggers", "boom_test", "--tagger-module", "boom.py", "--workers", "2"])
    assert code == 0
    assert summary["documents"] == 4 and summary["skipped_lines"] == 4 and summary["tagger_errors"] == 1
    assert any("a.jsonl.gz:7: tagger 'boom_test' raised ValueError" in e for e in summary["tagger_error_examples"])
    assert any("a.jsonl.gz:3: malformed JSON" in b for b in summary["bad_line_examples"])
    manifest = json.loads((tmp_path / "attributes/gopher/manifest.json").read_text())
    assert manifest["counts"]["skipped_lines"] == 4 and len(manifest["skipped"]) == 4
    assert "gopher__fraction_of_characters_in_duplicate_10grams" in manifest["attribute_keys"]
    rows = list(read_attributes(tmp_path / "attributes/pii/a.jsonl.gz"))
    assert [r[0] for r in rows] == ["d1", "d2", "d3", "huge"]  # one line per valid document, same order
    assert rows[0][1]["pii__email_address"][0][2] == 1.0
    assert list(read_attributes(tmp_path / "attributes/gopher/empty.jsonl.gz")) == []

    code, again, _ = _run(capsys, ["data", "tag", "--documents", pattern, "--taggers", "gopher"])
    assert code == 0 and again["shards_skipped_done"] == 2  # resumable: finished shards are skipped

    code, dedup, _ = _run(capsys, ["data", "dedup", "--documents", pattern])
    assert code == 0 and dedup["duplicate_paragraphs"] == 1 and dedup["skipped_lines"] == 4

    config = tmp_path / "mix.yaml"
    config.write_text(textwrap.dedent(f"""
        streams:
          - name: web
            documents: ["{pattern}"]
            attributes: [gopher, pii, dedup]
            filter:
              exclude: ["gopher__word_count < 50", "gopher__word_count > 100000"]
            span_replacement:
              - {{span: pii__email_address, replacement: "|||EMAIL_ADDRESS|||"}}
        output:
          path: mixed
    """))
    code, mixed, _ = _run(capsys, ["data", "mix", str(config)])
    assert code == 0 and mixed["streams"]["web"]["written"] == 1  # only d1: d2, d3 < 50 words, huge > 100k
    texts = [d["text"] for p in sorted((tmp_path / "mixed").glob("*.jsonl.gz")) for _, d in read_documents(p)]
    assert texts[0].endswith("Write to |||EMAIL_ADDRESS||| for details.")

    code, stats, err = _run(capsys, ["data", "stats", "--documents", pattern, "--output", "stats",
                                     "--count", "The cat", "--no-plots"])
    assert code == 0 and stats["documents"] == 4
    assert "--output is deprecated; use --out" in err  # the old spelling still works
    report = json.loads((tmp_path / "stats/stats.json").read_text())
    assert report["string_counts"]["The cat"] == {"occurrences": 8, "documents": 1}
    assert report["per_source"]["web"]["documents"] == 2 and report["per_source"]["unknown"]["documents"] == 1
    assert report["top_ngrams"]["1"][0][0] == "word"


def _one_line_error(code, err, *mentions):
    """Exit code 2 and exactly one `lmforge: error:` line on stderr naming what is wrong, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("lmforge: error: "), err
    for text in mentions:
        assert text in err, err


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pattern = _corpus(tmp_path)
    code, _, err = _run(capsys, ["data", "tag", "--documents", pattern, "--taggers", "gopher,nope"])
    _one_line_error(code, err, "unknown tagger 'nope'; available taggers: ", "c4, ", "gopher")
    code, _, err = _run(capsys, ["data", "tag", "--documents", "missing/*.gz", "--taggers", "gopher"])
    _one_line_error(code, err, "no files match", "missing/*.gz")
    code, _, err = _run(capsys, ["data", "dedup", "--documents", pattern, "--modes", "doc,fuzzy"])
    _one_line_error(code, err, "unknown dedup mode 'fuzzy'")
    (tmp_path / "bad.yaml").write_text("streams:\n  - name: s\n    documents: ['x']\n    filter: {include: ['a >']}\n"
                                       "output: {path: o}\n")
    code, _, err = _run(capsys, ["data", "mix", "bad.yaml"])
    _one_line_error(code, err, "no files match", "'x'")
    # With documents that exist, the malformed filter itself is the one error.
    (tmp_path / "bad.yaml").write_text(f"streams:\n  - name: s\n    documents: ['{pattern}']\n"
                                       "    filter: {include: ['doc.source ==']}\noutput: {path: o}\n")
    code, _, err = _run(capsys, ["data", "mix", "bad.yaml"])
    _one_line_error(code, err, "doc.source ==", "expected a value but the filter ended")


def test_ray_executor_matches_local(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    from lmforge.core import executor

    # Record which dispatcher each run goes through: without this, a `--executor ray` that silently ran on
    # local processes would compare the local path with itself and pass.
    ray_runs, local_runs = [], []
    real_iter_ray, real_iter_local = executor._iter_ray, executor._iter_local
    monkeypatch.setattr(executor, "_iter_ray", lambda *a: ray_runs.append(len(a[1])) or real_iter_ray(*a))
    monkeypatch.setattr(executor, "_iter_local", lambda *a: local_runs.append(len(a[1])) or real_iter_local(*a))
    monkeypatch.chdir(tmp_path)
    pattern = _corpus(tmp_path)
    code, summary, _ = _run(capsys, ["data", "tag", "--documents", pattern, "--taggers", "pii",
                                     "--experiment", "viaray", "--executor", "ray", "--workers", "2"])
    assert code == 0 and summary["documents"] == 4
    assert ray_runs == [2] and local_runs == []  # both shards went to Ray tasks
    code, _, _ = _run(capsys, ["data", "tag", "--documents", pattern, "--taggers", "pii", "--experiment", "local"])
    assert code == 0
    assert ray_runs == [2] and local_runs == [2]
    ray_rows = list(read_attributes(tmp_path / "attributes/viaray/a.jsonl.gz"))
    local_rows = list(read_attributes(tmp_path / "attributes/local/a.jsonl.gz"))
    assert [r[0] for r in ray_rows] == ["d1", "d2", "d3", "huge"]
    assert ray_rows[0][1]["pii__email_address"]  # d1's address was found: not an empty-attribute comparison
    assert ray_rows == local_rows


def test_parquet_shards_are_tagged_and_mixed(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    from lmforge.curation.documents import DocumentWriter

    monkeypatch.chdir(tmp_path)
    with DocumentWriter(tmp_path / "documents" / "p.parquet") as w:
        w.write({"id": "1", "text": "mail bob@example.org now", "source": "s", "metadata": {"k": 1}})
        w.write({"id": "2", "text": "nothing here", "source": "s", "metadata": {}})
    code, summary, _ = _run(capsys, ["data", "tag", "--documents", "documents/*.parquet", "--taggers", "pii"])
    assert code == 0 and summary["documents"] == 2
    assert [r[0] for r in read_attributes(tmp_path / "attributes/pii/p.jsonl.gz")] == ["1", "2"]
    (tmp_path / "mix.yaml").write_text(
        "streams:\n  - name: s\n    documents: ['documents/*.parquet']\n    attributes: [pii]\n"
        "    filter: {include: ['count(pii__email_address) > 0']}\n"
        "    span_replacement: [{span: pii__email_address, replacement: 'EMAIL'}]\noutput: {path: out}\n")
    code, mixed, _ = _run(capsys, ["data", "mix", "mix.yaml"])
    assert code == 0 and mixed["streams"]["s"]["written"] == 1
    docs = [d for p in (tmp_path / "out").glob("*.jsonl.gz") for _, d in read_documents(p)]
    assert docs == [{"id": "1", "text": "mail EMAIL now", "source": "s", "metadata": {"k": 1}}]
