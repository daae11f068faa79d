"""Attribute files in Dolma's layout, and the per-shard completion markers that make stages resumable.

For `<root>/documents/<rel>.jsonl.gz` the attributes named `<name>` live in
`<root>/attributes/<name>/<rel>.jsonl.gz`: same relative path, one line per (valid) document, same order,
`{"id": ..., "attributes": {"<tagger>__<attribute>": [[start, end, score], ...]}}`. A document path with no
`documents` directory gets `<dir>/attributes/<name>/<file>` instead. Lines skipped by the document reader
(malformed JSON, missing id/text) have no attribute line, so readers that skip the same lines stay aligned;
the mixer checks ids line by line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import orjson

from lmforge.curation.documents import (DONE_DIR, AtomicShardWriter, ReadReport, TruncatedInput, compression_of,
                                        iter_lines, open_compressed_writer)
from lmforge.core.errors import LmforgeError
from lmforge.core.files import (ATTRIBUTE_SUFFIX, DOCUMENT_SUFFIX_BY_COMPRESSION, GuardedStream, atomic_write_json,
                                file_hash)

# Attribute files are mostly small numbers and repeated keys: the fastest level compresses them well enough.
COMPRESSION_LEVEL = 1
WRITE_BLOCK = 1 << 16  # bytes of attribute lines handed to the compressor at once


def split_documents_path(doc_path: str | Path) -> tuple[Path, Path]:
    """(root that holds `documents/`, path relative to `documents/`)."""
    path = Path(doc_path)
    parts = path.parts
    if "documents" in parts[:-1]:
        i = len(parts) - 2 - parts[:-1][::-1].index("documents")
        return Path(*parts[:i]) if i else Path("."), Path(*parts[i + 1:])
    return path.parent, Path(path.name)


def attribute_suffix(rel: Path) -> Path:
    parquet = DOCUMENT_SUFFIX_BY_COMPRESSION["parquet"]
    return rel.with_name(rel.name[: -len(parquet)] + ATTRIBUTE_SUFFIX) if rel.name.endswith(parquet) else rel


def attribute_dir(doc_path: str | Path, name: str) -> Path:
    root, _ = split_documents_path(doc_path)
    return root / "attributes" / name


def attribute_path(doc_path: str | Path, name: str) -> Path:
    root, rel = split_documents_path(doc_path)
    return root / "attributes" / name / attribute_suffix(rel)


def done_marker_path(doc_path: str | Path, name: str) -> Path:
    root, rel = split_documents_path(doc_path)
    return root / "attributes" / name / DONE_DIR / (str(attribute_suffix(rel)) + ".json")


def source_fingerprint(path: str | Path) -> dict:
    stat = os.stat(path)
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def written_fingerprint(path: str | Path, lines: int) -> dict:
    """What a stage wrote: its line count, and the file's size and hash, which later checks compare."""
    return {"path": str(path), "lines": lines, "bytes": os.path.getsize(path), "hash": file_hash(path)}


def is_done(doc_path: str | Path, name: str) -> bool:
    """A shard is done for `name` when its marker exists, the documents are unchanged (size, mtime) and the
    attribute file is the one the marker recorded (size and hash: a shorter or replaced file is redone)."""
    marker = done_marker_path(doc_path, name)
    attributes = attribute_path(doc_path, name)
    if not marker.is_file() or not attributes.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    source, written = recorded.get("source", {}), recorded.get("written", {})
    current = source_fingerprint(doc_path)
    if source.get("bytes") != current["bytes"] or source.get("mtime_ns") != current["mtime_ns"]:
        return False
    return written.get("bytes") == os.path.getsize(attributes) and written.get("hash") == file_hash(attributes)


def mark_done(doc_path: str | Path, name: str, result: dict, lines: int) -> None:
    """Record a shard's attribute file as complete: the documents it describes and the `lines` written."""
    atomic_write_json(done_marker_path(doc_path, name),
                      {"source": source_fingerprint(doc_path),
                       "written": written_fingerprint(attribute_path(doc_path, name), lines), **result})


def read_done_markers(directory: Path) -> list[dict]:
    done = directory / DONE_DIR
    if not done.is_dir():
        return []
    out = []
    for marker in sorted(done.rglob("*.json")):
        try:
            out.append(json.loads(marker.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def read_attributes(path: str | Path, report: ReadReport | None = None,
                    strict: bool = False) -> Iterator[tuple[str, dict]]:
    """Stream (id, attributes) from one attribute file (see `read_attribute_rows`)."""
    for doc_id, attributes, _ in read_attribute_rows(path, report, strict):
        yield doc_id, attributes


def read_attribute_rows(path: str | Path, report: ReadReport | None = None,
                        strict: bool = False) -> Iterator[tuple[str, dict, int | None]]:
    """Stream (id, attributes, document line or None) from one attribute file; a corrupt line is an error
    naming file and line. A truncated compressed file yields its complete lines and is recorded in `report`
    (raised under `strict`, or without a report)."""
    path = str(path)
    if not os.path.exists(path):
        raise LmforgeError(f"attribute file not found: {path} (run `lmforge data tag` or `dedup` first)")
    try:
        for number, raw in iter_lines(path):
            try:
                row = orjson.loads(raw)
                yield str(row["id"]), row.get("attributes") or {}, row.get("line")
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise LmforgeError(f"{path}:{number}: corrupt attribute line ({type(e).__name__})") from None
    except TruncatedInput as e:
        if report is None:
            raise
        report.truncate(e, strict, partial_line_skipped=False)  # the reader counts documents left without a line


def _dumps(value) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # values orjson does not know (numpy scalars other than arrays, huge ints)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=float).encode("utf-8")


class AttributeWriter(AtomicShardWriter):
    """Write one attribute file atomically (it appears under its name only when closed cleanly). The line of an
    id that repeats in the shard also carries its document's line number (`"line"`), so that a reader can tell
    the attributes of two documents with the same id apart (ids alone would match after a swap)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._stream = GuardedStream(open_compressed_writer(self._tmp, compression_of(self.path), COMPRESSION_LEVEL),
                                     self.path, self._tmp)
        self._no_spans: dict[tuple, bytes] = {}
        self._ids: set[str] = set()
        self.count = 0
        self._pending: list[bytes] = []  # lines reach the compressor in blocks: one call per line costs ~3x
        self._pending_bytes = 0

    def write(self, doc_id: str, attributes: dict, line: int) -> None:
        if any(attributes.values()):
            encoded = _dumps(attributes)
        else:  # most documents have no duplicate/PII spans: reuse the encoded attributes
            keys = tuple(attributes)
            encoded = self._no_spans.get(keys)
            if encoded is None:
                encoded = self._no_spans[keys] = _dumps(attributes)
        self.write_encoded(doc_id, encoded, line)

    def write_encoded(self, doc_id: str, attributes: bytes, line: int) -> None:
        """`write` with the attributes already encoded as a JSON object (for a stage that encodes its own)."""
        line_bytes = b'{"id":' + _dumps(doc_id) + b',"attributes":' + attributes
        line_bytes += b',"line":' + _dumps(line) + b"}" if doc_id in self._ids else b"}"
        self._ids.add(doc_id)
        self._pending.append(line_bytes)
        self._pending_bytes += len(line_bytes) + 1
        if self._pending_bytes >= WRITE_BLOCK:
            self._flush_pending()
        self.count += 1

    def _flush_pending(self) -> None:
        if self._pending:
            self._pending.append(b"")
            self._stream.write(b"\n".join(self._pending))
            self._pending, self._pending_bytes = [], 0

    def _finish(self) -> None:
        self._flush_pending()

