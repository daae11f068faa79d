"""Attributes stay aligned with their documents: a stale attribute file is redone, duplicate ids are counted
and cannot pair a document with another's attributes, and a filter on an attribute no document has is refused.
"""

import gzip
import json

import pytest
import yaml

from lmforge.core.config import load_config
from lmforge.core.errors import LmforgeError
from lmforge.curation.attributes import attribute_path
from lmforge.curation.documents import DocumentWriter, read_documents
from lmforge.curation.mixer import MixerConfig, run_mix
from lmforge.curation.taggers.runner import TagConfig, run_tag

DOCS = [{"id": str(i), "text": f"Document {i}: write to person{i}@example.com today.", "source": "web"}
        for i in range(5)]


def _shard(root, docs=DOCS, name="a.jsonl.gz"):
    path = root / "documents" / name
    with DocumentWriter(path) as w:
        for d in docs:
            w.write(d)
    return path


def _lines(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_a_stale_attribute_file_is_redone(tmp_path):
    path = _shard(tmp_path)
    config = TagConfig(documents=[str(path)], taggers=["pii"])
    assert run_tag(config)["shards_run"] == 1
    attributes = attribute_path(path, "pii")
    full = _lines(attributes)
    with gzip.open(attributes, "wt", encoding="utf-8") as f:  # an older, shorter file in its place
        f.writelines(json.dumps(row) + "\n" for row in full[:3])
    assert run_tag(config)["shards_run"] == 1
    assert _lines(attributes) == full
    assert run_tag(config)["shards_run"] == 0  # and an intact one is not redone


def _mix_config(root, documents, **stream):
    config = {"streams": [{"name": "web", "documents": [str(documents)], "attributes": ["pii"], **stream}],
              "output": {"path": str(root / "out")}}
    (root / "mix.yaml").write_text(yaml.safe_dump(config))
    return load_config(MixerConfig, str(root / "mix.yaml"))


def test_duplicate_ids_are_counted_and_cannot_swap_attributes(tmp_path):
    docs = [dict(d) for d in DOCS]
    docs[1]["id"] = docs[3]["id"] = "dup"
    docs[3]["text"] = "Document without any address."
    path = _shard(tmp_path, docs)
    expected_duplicates = len(docs) - len({d["id"] for d in docs})  # brute force: 1
    tagged = run_tag(TagConfig(documents=[str(path)], taggers=["pii"]))
    assert tagged["duplicate_ids"] == expected_duplicates
    mixed = run_mix(_mix_config(tmp_path, path, filter={"exclude": ["pii__doc_count > 0"]}))
    assert mixed["streams"]["web"]["duplicate_ids"] == expected_duplicates
    assert [d["id"] for p in (tmp_path / "out").glob("*.jsonl.gz") for _, d in read_documents(p)] == ["dup"]

    attributes = attribute_path(path, "pii")
    rows = _lines(attributes)
    rows[1], rows[3] = rows[3], rows[1]  # the two "dup" lines swapped: ids still match position by position
    with gzip.open(attributes, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with pytest.raises(LmforgeError, match=r"a.jsonl.gz:2 .*'dup'.*line 4"):
        run_mix(_mix_config(tmp_path, path, filter={"exclude": ["pii__doc_count > 0"]}, sample_rate=0.99))


def test_a_filter_on_an_attribute_no_document_has_is_refused(tmp_path):
    path = _shard(tmp_path)
    with DocumentWriter(attribute_path(path, "langid")) as w:  # another tool's files: no manifest, no keys
        for d in DOCS:
            w.write({"id": d["id"], "attributes": {"langid__en": [[0, 5, 0.9]], "langid__fr": [[0, 5, 0.05]]}})
    config = {"streams": [{"name": "web", "documents": [str(path)], "attributes": ["langid"],
                           "filter": {"include": ["langid__english >= 0.5"]}}],
              "output": {"path": str(tmp_path / "out")}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(LmforgeError, match=r"langid__english.*langid__en, langid__fr"):
        run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))
    config["streams"][0]["filter"]["include"] = ["langid__en >= 0.5"]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    assert run_mix(load_config(MixerConfig, str(tmp_path / "mix.yaml")))["streams"]["web"]["written"] == len(DOCS)
