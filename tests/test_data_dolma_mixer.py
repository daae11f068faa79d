"""Under Dolma-syntax configs (`filter.syntax: jsonpath`) lmforge's mixer writes the texts Dolma 1.2.1's mixer
writes: overlapping spans (sorted by start, config order kept, a span starting inside the last kept one
dropped), presence filters (`@.k` holds when the key exists, even with no span), and documents emptied by span
removal (kept: Dolma's `min_text_length` is 0). Dolma runs from its own venv (as test_data_dolma_agreement.py);
the test skips when it is absent.
"""

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from lmforge.core.config import load_config
from lmforge.curation.attributes import attribute_path
from lmforge.curation.documents import DocumentWriter, read_documents
from lmforge.curation.mixer import MixerConfig, run_mix

DOLMA_VENV = Path(os.environ.get("DOLMA_VENV", Path(__file__).resolve().parents[1] / ".peers" / "dolma-venv"))
DOLMA = DOLMA_VENV / "bin" / "dolma"

pytestmark = pytest.mark.skipif(not DOLMA.exists(), reason=f"dolma not installed in {DOLMA_VENV}")

TEXT = "alpha beta gamma\ndelta epsilon\nzeta eta theta\n"
DOCS = [{"id": str(i), "text": TEXT + f"doc {i}\n", "source": "web"} for i in range(6)]
ATTRS = [
    # overlapping spans of two attributes, out of order in the file: Dolma keeps [0,8) and [10,20), drops [6,12)
    {"t__x": [[6, 12, 1.0], [0, 8, 1.0]], "t__y": [[10, 20, 1.0]], "t__flag": []},
    # a span ending inside the next, which ends on the newline: the union would remove the newline too
    {"t__x": [[0, 17, 1.0]], "t__y": [[14, 31, 1.0]], "t__flag": []},
    # spans with the same start: config order decides which replacement is written
    {"t__x": [[17, 31, 1.0]], "t__y": [[17, 40, 1.0]], "t__flag": []},
    # everything removed: Dolma writes the empty document
    {"t__y": [[0, len(DOCS[3]["text"]), 1.0]], "t__flag": [[0, 1, 0.2]]},
    # no flag key at all: the presence filter fails
    {"t__x": [[0, 5, 1.0]]},
    # a low score below min_score is not replaced
    {"t__x": [[0, 5, 0.1]], "t__flag": []},
]
FILTER = {"include": ["$.attributes[?(@.t__flag)]"], "syntax": "jsonpath"}
REPLACE = [{"span": "$.attributes.t__x", "min_score": 0.5, "replacement": "<X>"},
           {"span": "$.attributes.t__y", "min_score": 0.5, "replacement": ""}]


def _corpus(root: Path) -> Path:
    path = root / "documents" / "a.jsonl.gz"
    with DocumentWriter(path) as w:
        for d in DOCS:
            w.write(d)
    with DocumentWriter(attribute_path(path, "t")) as w:
        for d, a in zip(DOCS, ATTRS):
            w.write({"id": d["id"], "attributes": a})
    return path


def _dolma_texts(root: Path) -> dict:
    config = {"streams": [{"name": "web", "documents": [str(root / "documents" / "*.jsonl.gz")],
                           "attributes": ["t"], "filter": FILTER, "span_replacement": REPLACE,
                           "output": {"path": str(root / "dolma_out"), "max_size_in_bytes": 1 << 20}}],
              "processes": 1}
    (root / "dolma.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([str(DOLMA), "-c", str(root / "dolma.yaml"), "mix"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts = {}
    for shard in (root / "dolma_out").glob("*.gz"):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            texts.update((d["id"], d["text"]) for d in map(json.loads, f))
    return texts


def _lmforge_texts(root: Path) -> dict:
    config = {"streams": [{"name": "web", "documents": [str(root / "documents" / "*.jsonl.gz")],
                           "attributes": ["t"], "filter": FILTER, "span_replacement": REPLACE}],
              "output": {"path": str(root / "lmforge_out")}}
    (root / "mix.yaml").write_text(yaml.safe_dump(config))
    run_mix(load_config(MixerConfig, str(root / "mix.yaml")))
    return {d["id"]: d["text"] for p in (root / "lmforge_out").glob("*.jsonl.gz") for _, d in read_documents(p)}


def test_jsonpath_mix_writes_what_dolma_writes(tmp_path):
    _corpus(tmp_path)
    dolma = _dolma_texts(tmp_path)
    assert set(dolma) == {"0", "1", "2", "3", "5"}  # the peer's behaviour this test relies on
    assert dolma["3"] == ""
    assert _lmforge_texts(tmp_path) == dolma
