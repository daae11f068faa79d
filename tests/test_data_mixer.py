"""The filter language (incl. malformed expressions and Dolma JSONPath) and the mixer."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from lmforge.core.config import load_config
from lmforge.core.errors import LmforgeError
from lmforge.curation.attributes import attribute_path
from lmforge.curation.documents import DocumentWriter, read_documents
from lmforge.curation.filter_expr import Context, compile_filter, compile_jsonpath
from lmforge.curation.mixer import MixerConfig, replace_spans, run_mix, sample_copies

ATTRS = {
    "gopher__word_count": [[0, 20, 40.0]],
    "pii__email_address": [[0, 3, 1.0], [5, 9, 1.0]],
    "dedup__duplicate_paragraphs": [[0, 5, 1], [3, 8, 1]],
    "langid__en": [[0, 20, 0.93]],
}
DOC = {"id": "1", "text": "x" * 20, "source": "web", "metadata": {"lang": "en", "year": 2020}}


@pytest.mark.parametrize("expr,expected", [
    ("gopher__word_count < 50", True),
    ("gopher__word_count < 50 and langid__en >= 0.95", False),
    ("gopher__word_count < 50 and not (langid__en >= 0.95)", True),
    ("count(pii__email_address) + count(pii__phone_number) > 1", True),
    ("frac(dedup__duplicate_paragraphs) == 0.4", True),  # [0,8) of 20 characters, overlap counted once
    ("chars(dedup__duplicate_paragraphs) / text_length > 0.5", False),
    ("sum(pii__email_address) == 2 and max(pii__email_address) == 1", True),
    ("any(c4__has_curly_brace) or doc.source == 'web'", True),
    ("doc.metadata.year >= 2020 and doc.metadata.lang != \"de\"", True),
    ("doc.metadata.missing == 'x'", False),
    ("dedup__duplicate_paragraphs >= 1.0", True),  # integer scores compare numerically (Dolma's trap)
    ("-gopher__word_count < -39.5 or false", True),
    ("score(c4__missing) == 0", True),
])
def test_filter_language(expr, expected):
    assert compile_filter(expr)(Context(ATTRS, DOC)) is expected


@pytest.mark.parametrize("expr,message", [
    ("gopher__word_count <", "expected a value but the filter ended at column 21"),
    ("gopher__word_count", "is a number, not a condition"),
    ("(a > 1", "expected ')' but found the end"),
    ("a > > 1", "expected a value but found '>' at column 5"),
    ("foo(a) > 1", "unknown function 'foo'"),
    ("a and b", "'and' needs conditions on both sides"),
    ("'x' < 1", "strings can only be compared with == or !="),
    ("a > 1 extra", "unexpected 'extra' at column 7"),
    ("a $ 1", "unexpected character '$' at column 3"),
    ("__import__(os) > 1", "unknown function '__import__'"),
    ("__import__('os').system('x') > 1", "unexpected character '.' at column 17"),
    ("", "non-empty"),
])
def test_malformed_filters_fail_clearly(expr, message):
    with pytest.raises(LmforgeError) as error:
        compile_filter(expr)
    assert message in str(error.value)


def test_unknown_attribute_suggests_declared_key():
    keys = ["gopher__fraction_of_characters_in_most_common_2grams", "langid__*"]
    with pytest.raises(LmforgeError, match="did you mean gopher__fraction_of_characters_in_most_common_2grams"):
        compile_filter("gopher__fraction_of_characters_in_most_common_2gram > 0.2", keys)
    assert compile_filter("langid__de > 0.5", keys)  # wildcard keys accept any language


def test_dolma_jsonpath_filters():
    ctx = Context(ATTRS, DOC)
    rule = "$.attributes[?(@.gopher__word_count && @.gopher__word_count[0] && @.gopher__word_count[0][2] < 50)]"
    assert compile_jsonpath(rule)(ctx) is True
    assert compile_jsonpath("$@.attributes[?(@.dedup__duplicate_paragraphs[0][2] >= 1.0)]")(ctx) is True
    assert compile_jsonpath("$.attributes[?(@.absent[0][2] > 0.5)]")(ctx) is False
    with pytest.raises(LmforgeError, match="JSONPath"):
        compile_jsonpath("$.attributes.gopher")


def test_replace_spans_and_sampling():
    assert replace_spans("mail a@b.co now", [(5, 11, "|||EMAIL_ADDRESS|||")]) == "mail |||EMAIL_ADDRESS||| now"
    assert replace_spans("aaaa bbbb cccc", [(5, 10, ""), (0, 7, "X")]) == "Xcccc"  # overlaps merge
    kept = sum(sample_copies(0, "s", str(i), 0.3) for i in range(10_000))
    assert 2800 < kept < 3200
    copies = [sample_copies(0, "s", str(i), 2.5) for i in range(10_000)]
    assert set(copies) == {2, 3} and 24_000 < sum(copies) < 26_000
    # Deterministic across processes, not only within one (Python's str hash is salted per process), and the
    # seed and the stream name both change the choice.
    here = [sample_copies(0, "s", str(i), 0.3) for i in range(200)]
    script = ("from lmforge.curation.mixer import sample_copies as f\n"
              "print([f(0, 's', str(i), 0.3) for i in range(200)])")
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONHASHSEED": "random"}).stdout
    assert json.loads(other_process) == here
    assert [sample_copies(1, "s", str(i), 0.3) for i in range(200)] != here
    assert [sample_copies(0, "t", str(i), 0.3) for i in range(200)] != here


def _shard(root, name, docs, attrs):
    path = root / "documents" / name
    with DocumentWriter(path) as w:
        for d in docs:
            w.write(d)
    with DocumentWriter(attribute_path(path, "t")) as w:
        for d, a in zip(docs, attrs):
            w.write({"id": d["id"], "attributes": a})
    return path


def test_mixer_filters_replaces_and_reshards(tmp_path):
    docs = [{"id": str(i), "text": f"doc {i} mail x{i}@mail.com end", "source": "web"} for i in range(40)]
    attrs = [{"t__email": [[d["text"].index("x"), d["text"].index(" end"), 1.0]], "t__score": [[0, 5, i / 40]],
              "t__pii_count": [[0, 5, 9.0 if i == 13 else 1.0]]} for i, d in enumerate(docs)]
    _shard(tmp_path, "a.jsonl.gz", docs, attrs)
    config = {
        "streams": [{"name": "web", "documents": [str(tmp_path / "documents/*.jsonl.gz")], "attributes": ["t"],
                     "filter": {"include": ["t__score >= 0.25"], "exclude": ["t__pii_count > 5"]},
                     "span_replacement": [{"span": "t__email", "replacement": "|||EMAIL_ADDRESS|||"}],
                     "sample_rate": 2.0}],
        "output": {"path": str(tmp_path / "out"), "max_size_in_bytes": 500},
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    summary = run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))
    counts = summary["streams"]["web"]
    assert counts["excluded_by_include"] == 10 and counts["excluded_by_exclude"] == 1
    assert counts["written"] == 58  # ids 10..39 except 13, twice each
    out = sorted((tmp_path / "out").glob("web-*.jsonl.gz"))
    assert len(out) > 1
    texts = [d["text"] for p in out for _, d in read_documents(p)]
    assert texts[0] == "doc 10 mail |||EMAIL_ADDRESS||| end" and len(texts) == 58
    again = run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))
    assert again["tasks_skipped_done"] == 1


def test_mixer_rejects_mismatched_attributes(tmp_path):
    path = _shard(tmp_path, "a.jsonl", [{"id": "1", "text": "a"}, {"id": "2", "text": "b"}],
                  [{"t__x": []}, {"t__x": []}])
    with DocumentWriter(attribute_path(path, "t")) as w:
        w.write({"id": "1", "attributes": {}})
        w.write({"id": "9", "attributes": {}})
    config = {"streams": [{"name": "s", "documents": [str(path)], "attributes": ["t"]}],
              "output": {"path": str(tmp_path / "out")}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(LmforgeError, match="mismatched ids: .*a.jsonl:2"):
        run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))
    config["streams"][0]["attributes"] = ["missing"]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(LmforgeError, match="missing attributes 'missing'"):
        run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))


def test_mixer_writes_parquet_shards(tmp_path):
    docs = [{"id": str(i), "text": f"document number {i}", "source": "web", "metadata": {"i": i}} for i in range(30)]
    _shard(tmp_path, "a.jsonl.gz", docs, [{"t__score": [[0, 5, i / 30]]} for i in range(30)])
    config = {"streams": [{"name": "web", "documents": [str(tmp_path / "documents/*.jsonl.gz")], "attributes": ["t"],
                           "filter": {"include": ["t__score >= 0.5"]}}],
              "output": {"path": str(tmp_path / "out"), "max_size_in_bytes": 400, "compression": "parquet"}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    assert run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))["streams"]["web"]["written"] == 15
    shards = sorted((tmp_path / "out").glob("web-*.parquet"))
    assert len(shards) > 1
    assert [d for p in shards for _, d in read_documents(p)] == docs[15:]


def test_failed_mix_task_leaves_no_part_under_a_final_name(tmp_path):
    docs = [{"id": str(i), "text": f"document number {i} " * 5, "source": "web"} for i in range(40)]
    attrs = [{"t__x": []} for _ in docs]
    path = _shard(tmp_path, "a.jsonl.gz", docs, attrs)
    with DocumentWriter(attribute_path(path, "t")) as w:  # the attributes of document 31 are another's
        for i, d in enumerate(docs):
            w.write({"id": "other" if i == 30 else d["id"], "attributes": {}})
    config = {"streams": [{"name": "web", "documents": [str(path)], "attributes": ["t"]}],
              "output": {"path": str(tmp_path / "out"), "max_size_in_bytes": 400}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(LmforgeError, match="mismatched ids"):  # after several parts were full
        run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".done"]
    assert list((tmp_path / "out/.done").iterdir()) == []


def test_rerun_with_another_shard_size_replaces_the_old_run(tmp_path):
    from lmforge.curation.documents import InputConfig, input_shards

    docs = [{"id": str(i), "text": f"document number {i} " * 5, "source": "web"} for i in range(30)]
    for part in range(3):
        _shard(tmp_path, f"a{part}.jsonl.gz", docs[part * 10:(part + 1) * 10], [{"t__x": []}] * 10)
    config = {"streams": [{"name": "web", "documents": [str(tmp_path / "documents/*.jsonl.gz")], "attributes": ["t"]}],
              "output": {"path": str(tmp_path / "out"), "max_size_in_bytes": 300}}
    for size in (300, 1 << 20):  # three tasks, then one
        config["output"]["max_size_in_bytes"] = size
        (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
        run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))
    shards, _ = input_shards([str(tmp_path / "out/*.jsonl.gz")], InputConfig())
    on_disk = [d["id"] for p in sorted((tmp_path / "out").glob("*.jsonl.gz")) for _, d in read_documents(p)]
    read = [d["id"] for p in shards for _, d in read_documents(p)]
    assert sorted(read) == sorted(on_disk) == sorted(d["id"] for d in docs)


def test_mix_writes_the_resolved_config_beside_its_manifest(tmp_path):
    from lmforge.cli import main

    docs = [{"id": str(i), "text": f"document number {i}", "source": "web"} for i in range(10)]
    _shard(tmp_path, "a.jsonl.gz", docs, [{"t__score": [[0, 5, i / 10]]} for i in range(10)])
    config = {"streams": [{"name": "web", "documents": [str(tmp_path / "documents/*.jsonl.gz")], "attributes": ["t"],
                           "filter": {"include": ["t__score >= 0.5"]}}],
              "output": {"path": str(tmp_path / "out")}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "mix", str(tmp_path / "mix.yaml"), "--seed", "7", "output.compression=zst"]) == 0
    saved = tmp_path / "out" / "config.yaml"
    # Resolved: the file's settings, the flag and the override, and every default, written out in full.
    expected = {**config, "seed": 7}
    expected["output"] = {**config["output"], "compression": "zst"}
    assert load_config(MixerConfig, str(saved)) == load_config(MixerConfig, flags=expected)
    on_disk = yaml.safe_load(saved.read_text())
    assert on_disk["seed"] == 7 and on_disk["output"]["compression"] == "zst"
    assert on_disk["streams"][0]["sample_rate"] == 1.0  # a default the file did not name
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"] == on_disk


def test_mixer_counts_the_funnel_per_filter_in_bytes(tmp_path):
    """Each dropped document counts once, under the first exclude filter that matches it, with the UTF-8
    bytes of its text; bytes in and out are UTF-8 too."""
    texts = ["short", "naïve café", "long text here", "ok ok ok ok", "ü" * 12]
    docs = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    attrs = [{"t__words": [[0, 1, len(t.split())]], "t__flag": [[0, 1, 1.0]] if i in (1, 4) else []}
             for i, t in enumerate(texts)]
    _shard(tmp_path, "a.jsonl.gz", docs, attrs)
    config = {"streams": [{"name": "s", "documents": [str(tmp_path / "documents/*.jsonl.gz")], "attributes": ["t"],
                           "filter": {"exclude": ["t__words < 2", "any(t__flag)"]}}],
              "output": {"path": str(tmp_path / "out")}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    counts = run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))["streams"]["s"]
    # "short" and "üüü…" have one word (the first filter, though "ü…" is flagged too); "naïve café" is flagged.
    assert counts["excluded_by_filter"] == {"t__words < 2": {"documents": 2, "text_bytes": 5 + 24},
                                            "any(t__flag)": {"documents": 1, "text_bytes": 12}}
    assert counts["text_bytes_in"] == 5 + 12 + 14 + 11 + 24 and counts["text_bytes_out"] == 14 + 11
    assert counts["excluded_by_exclude"] == 3 and counts["written"] == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["streams"]["s"]["excluded_by_filter"] == counts["excluded_by_filter"]
