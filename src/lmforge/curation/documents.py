"""Dolma documents: streaming read and atomic write of JSONL (plain, .gz, .zst) and Parquet shards.

A document is one JSON object per line with `id`, `text`, `source`, `added`, `created`, `metadata`.
Reading never stops on a bad line: malformed JSON, a missing `id`/`text`, invalid UTF-8 or a non-string
text is recorded as a `BadLine(path, line, reason)` in a `ReadReport` and skipped, so a run can finish and
say exactly what it left out. A compressed shard whose stream breaks (cut short by a full disk or a killed
copy, or corrupt) is decompressed incrementally, so every complete line before the break is kept; the report
records the file, its last good line and the compressed byte where the stream broke (`input.strict` makes
that an error), and a partial last line is a skipped line. A shard with no line at all is counted as empty.
Gzip is written with a fixed header (mtime 0, no file name), so the same documents give the same bytes.

Every stage that reads documents takes its shards through `input_shards`, which leaves out (and counts) the
shards of an lmforge output directory that have no completion mark (`completed_outputs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import orjson
import zstandard

try:  # ISA-L inflates gzip about twice as fast as zlib, to the same bytes; zlib where it has no wheel
    from isal import isal_zlib as inflate_lib
except ImportError:
    inflate_lib = zlib

from lmforge.core.config import require
from lmforge.core.errors import LmforgeError, OutputWriteError
from lmforge.core.files import DOCUMENT_SUFFIXES, GuardedStream, atomic_path

MAX_REPORTED_BAD_LINES = 100
READ_BLOCK = 1 << 16  # bytes read from a file at a time (64 KiB measured fastest for gzip and zstd)
MAX_INFLATED = 1 << 22  # most bytes one gzip decompression step may produce
DOCUMENT_COMPRESSION_LEVEL = 3  # gzip 3: about twice as fast as the default 6 for ~10% larger shards
DONE_DIR = ".done"  # completion marks of an lmforge output directory


@dataclass
class InputConfig:
    """The `input:` section of every stage that reads documents (tag, dedup, mix, stats, tokenize)."""

    # A truncated compressed shard, or a shard of an lmforge output directory without its completion mark, is
    # an error (exit 2) instead of a warning with the readable part kept and the count in the manifest.
    strict: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(isinstance(self.strict, bool), "strict", self.strict, "must be true or false")


@dataclass
class BadLine:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class Truncation:
    """A compressed file whose stream breaks before its end: cut short, or corrupt from `offset` on."""

    path: str
    line: int  # the last complete line before the break
    offset: int  # compressed bytes read when the stream broke
    kind: str  # gzip or zstd
    reason: str

    def __str__(self) -> str:
        return (f"{self.path}: truncated after line {self.line}: the {self.kind} stream breaks at compressed "
                f"byte {self.offset} ({self.reason})")


class TruncatedInput(LmforgeError):
    """Raised by `iter_lines` after it yielded every complete line before the break."""

    def __init__(self, truncation: Truncation, partial_line: bool):
        super().__init__(str(truncation))
        self.truncation, self.partial_line = truncation, partial_line


@dataclass
class ReadReport:
    """What reading shards saw: documents yielded, lines skipped (the first 100 kept verbatim), empty shards
    and truncated files."""

    documents: int = 0
    skipped: int = 0
    duplicate_ids: int = 0  # documents whose id an earlier document of the same shard has
    bad_lines: list[BadLine] = field(default_factory=list)
    empty_shards: list[str] = field(default_factory=list)
    truncated: list[Truncation] = field(default_factory=list)

    def skip(self, path: str, line: int, reason: str) -> None:
        self.skipped += 1
        if len(self.bad_lines) < MAX_REPORTED_BAD_LINES:
            self.bad_lines.append(BadLine(path, line, reason))

    def merge(self, other: "ReadReport") -> None:
        self.documents += other.documents
        self.skipped += other.skipped
        self.duplicate_ids += other.duplicate_ids
        room = MAX_REPORTED_BAD_LINES - len(self.bad_lines)
        self.bad_lines.extend(other.bad_lines[:max(room, 0)])
        self.empty_shards.extend(other.empty_shards)
        self.truncated.extend(other.truncated)

    def truncate(self, error: TruncatedInput, strict: bool, partial_line_skipped: bool = True) -> None:
        """Record a broken stream (its partial last line is a skipped line), or raise it under `strict`."""
        if strict:
            raise LmforgeError(f"{error} (--strict: a truncated input is an error)")
        if error.partial_line and partial_line_skipped:
            self.skip(error.truncation.path, error.truncation.line + 1, "partial last line: the file is truncated")
        self.truncated.append(error.truncation)

    def counts(self) -> dict:
        """The counts every stage puts in its manifest."""
        return {"skipped_lines": self.skipped, "empty_shards": len(self.empty_shards),
                "truncated_files": len(self.truncated), "duplicate_ids": self.duplicate_ids}

    def to_dict(self) -> dict:
        return {"documents": self.documents, "skipped": self.skipped,
                "bad_lines": [str(b) for b in self.bad_lines]}


def text_bytes(text: str) -> int:
    """UTF-8 length of a document's text (what bits per byte and byte counts divide by)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def strip_suffix(path: str | Path) -> str:
    """Shard name without its document suffix: `a/b/en-0001.jsonl.zst` -> `en-0001`."""
    name = Path(path).name
    for suffix in sorted(DOCUMENT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def compression_of(path: str | Path) -> str | None:
    name = str(path)
    return "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else None


class _GzipWriter:
    """Gzip with a fixed header (mtime 0, no file name: zlib's own), so equal input gives equal bytes; the
    `gzip` module would record the temporary file's name and the time."""

    def __init__(self, path: str | Path, level: int):
        self._file = open(path, "wb")
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, 31)

    def write(self, data: bytes) -> int:
        self._file.write(self._deflate.compress(data))
        return len(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.write(self._deflate.flush())
            self._file.close()


def open_compressed_writer(path: str | Path, compression: str | None, level: int) -> IO[bytes]:
    """A binary stream writing `path` gzip- or zstd-compressed at `level`, or plain."""
    if compression == "gz":
        return _GzipWriter(path, level)
    if compression == "zst":
        return zstandard.ZstdCompressor(level=level).stream_writer(open(path, "wb"), closefd=True)
    return open(path, "wb")


class _BrokenStream(Exception):
    def __init__(self, offset: int, reason: str):
        self.offset, self.reason = offset, reason


def _decompressor(compression: str):
    return inflate_lib.decompressobj(31) if compression == "gz" else zstandard.ZstdDecompressor().decompressobj()


def _blocks(path: str | Path) -> Iterator[bytes]:
    """The file's (decompressed) bytes in blocks. A compressed stream is decompressed incrementally, member
    after member (gzip) or frame after frame (zstd), so a break yields everything before it and then raises
    `_BrokenStream`; a buffered reader over `gzip`/`zstandard` streams would lose its last block."""
    compression = compression_of(path)
    with open(path, "rb") as f:
        if compression is None:
            while block := f.read(READ_BLOCK):
                yield block
            return
        offset = 0  # compressed bytes before the current block
        decompressor = None  # None between members/frames
        ended = False  # a member/frame ended
        while block := f.read(READ_BLOCK):
            data = block
            while data:
                if decompressor is None:
                    if ended and compression == "gz" and not data.strip(b"\0"):
                        break  # zero padding after the last member, which gzip allows
                    decompressor = _decompressor(compression)
                try:
                    if compression == "gz":
                        out = decompressor.decompress(data, MAX_INFLATED)
                    else:
                        out = decompressor.decompress(data)
                except (zlib.error, inflate_lib.error, zstandard.ZstdError) as e:
                    raise _BrokenStream(offset + len(block) - len(data), f"corrupt data: {e}") from None
                if out:
                    yield out
                if decompressor.eof:
                    data, decompressor, ended = decompressor.unused_data, None, True
                else:
                    data = decompressor.unconsumed_tail if compression == "gz" else b""
            offset += len(block)
        if decompressor is not None:
            raise _BrokenStream(offset, "the file ends inside the stream")


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw line without newline), streaming. When a compressed stream breaks,
    raise `TruncatedInput` after every complete line before the break."""
    number = 0
    pending: list[bytes] = []  # the start of a line that continues in the next block
    try:
        for block in _blocks(path):
            *complete, rest = block.split(b"\n")
            if complete:
                if pending:
                    complete[0] = b"".join(pending) + complete[0]
                    pending = []
                for line in complete:
                    number += 1
                    yield number, line.rstrip(b"\r")
            if rest:
                pending.append(rest)
    except _BrokenStream as e:
        kind = "gzip" if compression_of(path) == "gz" else "zstd"
        raise TruncatedInput(Truncation(str(path), number, e.offset, kind, e.reason), bool(pending)) from None
    if pending:
        yield number + 1, b"".join(pending).rstrip(b"\r")


def parse_document(raw: bytes, path: str, line: int, report: ReadReport) -> dict | None:
    try:
        # orjson rejects invalid UTF-8 and lone surrogates itself, so a line it parses needs no more checks
        # than the fields'; a line it refuses goes through the slow path below for a precise message.
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_document_slowly(raw, path, line, report)
    return _checked_fields(doc, path, line, report)


def _parse_document_slowly(raw: bytes, path: str, line: int, report: ReadReport) -> dict | None:
    if not raw.strip():
        report.skip(path, line, "empty line")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.skip(path, line, f"invalid UTF-8 at byte {e.start}")
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        report.skip(path, line, f"malformed JSON: {e.msg} at column {e.colno}")
        return None
    if isinstance(doc, dict) and isinstance(doc.get("text"), str) and _has_lone_surrogate(doc["text"]):
        report.skip(path, line, "invalid UTF-8 (lone surrogate escape in 'text')")
        return None
    return _checked_fields(doc, path, line, report)


def _checked_fields(doc, path: str, line: int, report: ReadReport) -> dict | None:
    if not isinstance(doc, dict):
        report.skip(path, line, "not a JSON object")
        return None
    if "id" not in doc or doc["id"] is None:
        report.skip(path, line, "missing 'id'")
        return None
    if not isinstance(doc.get("text"), str):
        report.skip(path, line, "missing 'text'" if "text" not in doc else "'text' is not a string")
        return None
    doc["id"] = str(doc["id"])
    return doc


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_documents(path: str | Path, report: ReadReport | None = None,
                   strict: bool = False) -> Iterator[tuple[int, dict]]:
    """Stream (line number, document) from one shard; bad lines go to `report` and are skipped. A truncated
    compressed shard yields its complete documents and is recorded in `report` (raised under `strict`).
    Documents whose id repeats within the shard are counted in `report.duplicate_ids` (and still yielded)."""
    report = report if report is not None else ReadReport()
    seen: set[str] = set()
    for line, doc in _read_shard(path, report, strict):
        if doc["id"] in seen:
            report.duplicate_ids += 1
        else:
            seen.add(doc["id"])
        yield line, doc


def _read_shard(path: str | Path, report: ReadReport, strict: bool) -> Iterator[tuple[int, dict]]:
    path_str = str(path)
    if not os.path.exists(path_str):
        raise LmforgeError(f"document file not found: {path_str}")
    if path_str.endswith(".parquet"):
        lines = yield from _read_parquet(path_str, report)
    else:
        lines = 0
        try:
            for lines, raw in iter_lines(path_str):
                doc = parse_document(raw, path_str, lines, report)
                if doc is not None:
                    report.documents += 1
                    yield lines, doc
        except TruncatedInput as e:
            report.truncate(e, strict)
            return
        except OSError as e:
            report.skip(path_str, lines + 1, f"unreadable file: {e.strerror or e}")
            return
    if lines == 0:
        report.empty_shards.append(path_str)


def _read_parquet(path: str, report: ReadReport):
    """Yield (row, document); return the number of rows."""
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise LmforgeError(f"cannot read Parquet file {path}: {e}") from None
    number = 0
    for batch in table_file.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            if row.get("id") is None:
                report.skip(path, number, "missing 'id'")
                continue
            if not isinstance(row.get("text"), str):
                report.skip(path, number, "missing 'text'")
                continue
            row["id"] = str(row["id"])
            if isinstance(row.get("metadata"), str):
                row["metadata"] = json.loads(row["metadata"])
            report.documents += 1
            yield number, row
    return number


def _to_parquet_row(doc: dict) -> dict:
    """Parquet needs one schema per file: ids are strings and free-form metadata is stored as a JSON string."""
    row = dict(doc)
    row["id"] = str(row["id"])
    if "metadata" in row:
        row["metadata"] = json.dumps(row["metadata"], ensure_ascii=False)
    return row


def dumps_document(doc: dict) -> bytes:
    """Compact JSON, non-ASCII unescaped (Dolma's layout); the json module takes what orjson cannot (huge ints)."""
    try:
        return orjson.dumps(doc) + b"\n"
    except TypeError:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class AtomicShardWriter:
    """A shard that appears under its name only when closed cleanly: `abort()`, or an exception inside a
    `with` block, drops the partial file and leaves whatever the target held before. `close` is `finish`
    (the bytes are complete under a temporary name) then `commit` (the rename), which a caller may defer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._stream: IO[bytes] | None = None
        self._finished = False

    def _finish(self) -> None:
        """Write anything held back (subclasses); called by `finish` before the stream closes."""

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            try:
                self._finish()
                self._close_stream()  # flushes: a full disk may show only here
            except BaseException as e:
                self.abort(e)
                raise

    def _close_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()

    def commit(self) -> None:
        self._atomic.__exit__(None, None, None)

    def close(self) -> None:
        self.finish()
        self.commit()

    def abort(self, error: BaseException | None = None) -> None:
        """Drop the partial file; `error` (what stopped the writing) becomes an `OutputWriteError` naming this
        shard when it is the filesystem refusing the write."""
        with contextlib.suppress(Exception):  # the partial file is dropped: its flush may fail as the write did
            self._close_stream()
        error = error or RuntimeError("aborted")
        try:
            self._atomic.__exit__(type(error), error, error.__traceback__)
        except OutputWriteError:
            raise
        except BaseException as e:
            if e is not error:
                raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


class DocumentWriter(AtomicShardWriter):
    """Write documents to a shard atomically (.jsonl, .gz, .zst or .parquet by suffix)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.count = 0
        self.bytes = 0
        self._parquet_rows: list[dict] | None = [] if self.path.name.endswith(".parquet") else None
        if self._parquet_rows is None:
            self._stream = GuardedStream(
                open_compressed_writer(self._tmp, compression_of(self.path), DOCUMENT_COMPRESSION_LEVEL),
                self.path, self._tmp)

    def write(self, doc: dict) -> None:
        self.count += 1
        data = dumps_document(doc)  # for Parquet too: `bytes` (JSON size) is what output shards roll over on
        self.bytes += len(data)
        if self._parquet_rows is not None:
            self._parquet_rows.append(_to_parquet_row(doc))
            return
        self._stream.write(data)

    def _finish(self) -> None:
        if self._parquet_rows is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(self._parquet_rows), str(self._tmp))


def expand_globs(patterns: list[str] | str) -> list[str]:
    """Expand document globs to a sorted, de-duplicated list; a pattern matching nothing is an error."""
    import glob

    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise LmforgeError(f"no files match {pattern!r}")
        found.extend(matches)
    return sorted(dict.fromkeys(found))


def completed_outputs(directory: str | Path) -> set[str] | None:
    """Names of the complete shards of an lmforge output directory: the files its completion marks
    (`.done/*.json`, each with a `files` list) name. None when `directory` has no `.done/`: not an lmforge
    output directory, every shard in it is complete."""
    done = Path(directory) / DONE_DIR
    if not done.is_dir():
        return None
    names: set[str] = set()
    for mark in done.glob("*.json"):
        try:
            files = json.loads(mark.read_text(encoding="utf-8")).get("files", [])
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable mark marks nothing complete
        names.update(f for f in files if isinstance(f, str))
    return names


def incomplete_shards_message(incomplete: list[str]) -> str:
    return (f"left out {len(incomplete)} shard(s) of an lmforge output directory without a completion mark "
            f"(written by a task that failed or has not finished): {', '.join(incomplete)}")


def input_shards(patterns: list[str] | str, config: InputConfig) -> tuple[list[str], list[str]]:
    """(shards to read, shards left out): the files matching `patterns`, less the shards of an lmforge output
    directory that lack their completion mark, which are an error under `config.strict`."""
    paths = expand_globs(patterns)
    complete = {directory: completed_outputs(directory) for directory in {os.path.dirname(p) for p in paths}}
    incomplete = [p for p in paths if complete[os.path.dirname(p)] is not None
                  and os.path.basename(p) not in complete[os.path.dirname(p)]]
    if incomplete and (config.strict or len(incomplete) == len(paths)):
        why = " (--strict)" if config.strict else "; nothing left to read"
        raise LmforgeError(incomplete_shards_message(incomplete) + why)
    left_out = set(incomplete)
    return [p for p in paths if p not in left_out], incomplete
