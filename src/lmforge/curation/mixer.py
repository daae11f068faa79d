"""`lmforge data mix CONFIG`: join documents with their attributes, filter, edit, sample, re-shard.

Per stream: a document is kept iff (no `include` filter, or any include matches) and no `exclude` matches
(Dolma's rule); then spans are replaced (`""` deletes, PII becomes ` |||EMAIL_ADDRESS||| `...), documents whose
text ends up shorter than `min_text_length` are dropped, and `sample_rate` keeps a deterministic fraction
(< 1) or writes extra copies (> 1, e.g. 2.5 = two copies plus a third for half the documents). Output shards
`<stream>-<task>-<part>.jsonl.gz` roll over at `max_size_in_bytes` of uncompressed JSON. Attribute lines are
matched to documents by position and their ids are checked. Finished tasks are skipped on a rerun with the
same config; a manifest in the output directory records counts per stream.

A task's parts are written under temporary names and renamed only when the whole task succeeded, and its
completion mark `.done/<stream>-<task>.json` (listing its parts) is written after the renames: readers of the
output directory (`documents.input_shards`) read only the parts a mark lists, so a task that failed or was
killed is never half read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import xxhash
import zstandard

from lmforge.curation.attributes import attribute_dir, attribute_path, read_attribute_rows
from lmforge.curation.documents import (DONE_DIR, DocumentWriter, InputConfig, ReadReport, input_shards,
                                        read_documents, text_bytes)
from lmforge.core.executor import ExecutorConfig, run_tasks
from lmforge.curation.filter_expr import (Context, attribute_keys, compile_filter, compile_jsonpath,
                                          jsonpath_span_key)
from lmforge.core.config import require, save_config, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock
from lmforge.core.manifest import MANIFEST_NAME, write_manifest
from lmforge.core.files import DOCUMENT_SUFFIX_BY_COMPRESSION, atomic_write_json

DEFAULT_COMPRESSION_RATIO = 4


@dataclass
class SpanReplacement:
    span: str
    replacement: str = ""
    min_score: float = 0.5
    max_score: float | None = None


@dataclass
class StreamFilter:
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    syntax: Literal["lmforge", "jsonpath"] = "lmforge"


@dataclass
class StreamConfig:
    name: str
    documents: list[str]
    attributes: list[str] = field(default_factory=list)
    filter: StreamFilter = field(default_factory=StreamFilter)
    span_replacement: list[SpanReplacement] = field(default_factory=list)
    sample_rate: float = 1.0
    # Documents whose edited text (stripped) is shorter are dropped. Unset: 1 (an emptied document is dropped),
    # but 0 under `filter.syntax: jsonpath`, as Dolma's mixer writes emptied documents.
    min_text_length: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(), "name", self.name,
                "use letters, digits, '-' and '_'")
        require(self.sample_rate >= 0, "sample_rate", self.sample_rate, "must be >= 0")
        require(self.min_text_length is None or self.min_text_length >= 0, "min_text_length", self.min_text_length,
                "must be >= 0")

    @property
    def text_length_floor(self) -> int:
        if self.min_text_length is not None:
            return self.min_text_length
        return 0 if self.filter.syntax == "jsonpath" else 1


@dataclass
class OutputConfig:
    path: str
    max_size_in_bytes: int = 1 << 30
    compression: Literal["gz", "zst", "none", "parquet"] = "gz"  # "parquet" writes Parquet shards instead of JSONL
    discard_fields: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.max_size_in_bytes > 0, "max_size_in_bytes", self.max_size_in_bytes, "must be positive")


@dataclass
class MixerConfig:
    streams: list[StreamConfig]
    output: OutputConfig
    seed: int = 0
    input: InputConfig = field(default_factory=InputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        names = [s.name for s in self.streams]
        require(bool(names), "streams", [], "give at least one stream")
        require(len(set(names)) == len(names), "streams", names, "stream names must be unique")


@dataclass
class MixTask:
    stream: StreamConfig
    index: int
    paths: list[str]
    output: OutputConfig
    seed: int
    known_keys: list[str] | None
    config_hash: str
    strict: bool = False
    weight: int = 0


def _compile(stream: StreamConfig, known_keys: list[str] | None):
    compile_one = compile_jsonpath if stream.filter.syntax == "jsonpath" else compile_filter
    include = [compile_one(f, known_keys) for f in stream.filter.include]
    exclude = [compile_one(f, known_keys) for f in stream.filter.exclude]
    replacements = []
    for r in stream.span_replacement:
        key = jsonpath_span_key(r.span) if r.span.startswith("$") else r.span
        if known_keys is not None:
            compile_filter(f"any({key})", known_keys)  # the same unknown-key check as filters
        replacements.append((key, r.replacement, r.min_score, r.max_score))
    return include, exclude, replacements


def used_keys(stream: StreamConfig) -> set[str]:
    """The attribute keys a stream's filters and span replacements read."""
    jsonpath = stream.filter.syntax == "jsonpath"
    keys = {k for f in [*stream.filter.include, *stream.filter.exclude] for k in attribute_keys(f, jsonpath)}
    return keys | {jsonpath_span_key(r.span) if r.span.startswith("$") else r.span for r in stream.span_replacement}


def replace_spans(text: str, spans: list[tuple[int, int, str]], dolma: bool = False) -> str:
    """Replace spans (start, end, replacement). Overlapping spans merge and keep the first replacement; with
    `dolma`, Dolma's rule instead: spans in config order, stably sorted by start, and a span that starts inside
    the last one kept is dropped (its characters past that span's end stay)."""
    if not spans:
        return text
    if dolma:
        spans.sort(key=lambda s: s[0])
        pieces, reach = [], 0
        for start, end, replacement in spans:
            if start < reach:
                continue
            pieces.append(text[reach:start])
            pieces.append(replacement)
            reach = max(end, start)
        pieces.append(text[reach:])
        return "".join(pieces)
    spans.sort()
    pieces, reach = [], 0
    for start, end, replacement in spans:
        if start < reach:
            if end > reach:
                reach = end
            continue
        pieces.append(text[reach:start])
        pieces.append(replacement)
        reach = end if end > start else start
    pieces.append(text[reach:])
    return "".join(pieces)


def sample_copies(seed: int, stream: str, doc_id: str, rate: float) -> int:
    if rate == 1.0:
        return 1
    whole = int(rate)
    u = xxhash.xxh3_64_intdigest(f"{seed}\x00{stream}\x00{doc_id}".encode()) / 2.0 ** 64
    return whole + (u < rate - whole)


def _suffix(compression: str) -> str:
    return DOCUMENT_SUFFIX_BY_COMPRESSION[compression]


class _RollingWriter:
    """A task's parts: each finished under a temporary name when it is full, all renamed by `commit`."""

    def __init__(self, directory: Path, prefix: str, output: OutputConfig):
        self.directory, self.prefix, self.output = directory, prefix, output
        self.parts: list[DocumentWriter] = []
        self.writer: DocumentWriter | None = None
        self.bytes = 0

    @property
    def files(self) -> list[str]:
        return [part.path.name for part in self.parts]

    def write(self, doc: dict) -> None:
        if self.writer is None:
            path = self.directory / f"{self.prefix}-{len(self.parts):03d}{_suffix(self.output.compression)}"
            self.writer = DocumentWriter(path)
            self.parts.append(self.writer)
        self.writer.write(doc)
        if self.writer.bytes >= self.output.max_size_in_bytes:
            self._finish_part()

    def _finish_part(self) -> None:
        if self.writer is not None:
            self.bytes += self.writer.bytes
            self.writer.finish()
            self.writer = None

    def commit(self) -> None:
        self._finish_part()
        for part in self.parts:
            part.commit()

    def abort(self) -> None:
        for part in self.parts:
            part.abort()


def mix_task(task: MixTask, progress) -> dict:
    stream = task.stream
    include, exclude, replacements = _compile(stream, task.known_keys)
    out_dir = Path(task.output.path)
    writer = _RollingWriter(out_dir, f"{stream.name}-{task.index:04d}", task.output)
    counts = dict.fromkeys(("read", "excluded_by_include", "excluded_by_exclude", "sampled_out", "too_short",
                            "written", "spans_replaced", "text_chars_in", "text_chars_out", "text_bytes_in",
                            "text_bytes_out"), 0)
    # The data funnel: documents and bytes each exclude filter dropped, a document counted by the first that
    # matches (Dolma drops on any; this attributes the drop to one filter, in the config's order).
    by_filter = {f: {"documents": 0, "text_bytes": 0} for f in stream.filter.exclude}
    report = ReadReport()
    keys_seen: set[str] = set()
    discard = set(task.output.discard_fields)
    try:
        for path in task.paths:
            attr_iters = [(attribute_path(path, name), read_attribute_rows(attribute_path(path, name), report,
                                                                            task.strict))
                          for name in stream.attributes]
            for line, doc in read_documents(path, report, task.strict):
                counts["read"] += 1
                counts["text_chars_in"] += len(doc["text"])
                counts["text_bytes_in"] += text_bytes(doc["text"])
                progress(1)
                attributes: dict = {}
                cut_off = None
                for attr_path, it in attr_iters:
                    row = next(it, None)
                    if row is None:
                        if _was_truncated(report, attr_path):
                            cut_off = attr_path
                            continue
                        raise LmforgeError(f"{attr_path} has fewer lines than {path} (document at line {line}); "
                                           "re-run the tagger on this shard")
                    if row[0] != doc["id"]:
                        raise LmforgeError(f"mismatched ids: {path}:{line} has id {doc['id']!r} but {attr_path} "
                                           f"has {row[0]!r} at the same position")
                    if row[2] is not None and row[2] != line:  # a repeated id: its line was written with it
                        raise LmforgeError(f"misaligned attributes: {path}:{line} has id {doc['id']!r} (repeated "
                                           f"in the shard) but {attr_path} has the attributes of its document at "
                                           f"line {row[2]} in this position")
                    attributes.update(row[1])
                    keys_seen.update(row[1])
                if cut_off is not None:
                    report.skip(path, line, f"no attributes: {cut_off} is truncated before this document")
                    continue
                if include or exclude:
                    ctx = Context(attributes, doc)
                    if include and not any(f(ctx) for f in include):
                        counts["excluded_by_include"] += 1
                        continue
                    hit = next((i for i, f in enumerate(exclude) if f(ctx)), None)
                    if hit is not None:
                        counts["excluded_by_exclude"] += 1
                        dropped = by_filter[stream.filter.exclude[hit]]
                        dropped["documents"] += 1
                        dropped["text_bytes"] += text_bytes(doc["text"])
                        continue
                copies = sample_copies(task.seed, stream.name, doc["id"], stream.sample_rate)
                if copies == 0:
                    counts["sampled_out"] += 1
                    continue
                spans = [(int(s[0]), int(s[1]), replacement) for key, replacement, lo, hi in replacements
                         for s in attributes.get(key) or [] if s[2] >= lo and (hi is None or s[2] < hi)]
                counts["spans_replaced"] += len(spans)
                text = replace_spans(doc["text"], spans, dolma=stream.filter.syntax == "jsonpath")
                if len(text.strip()) < stream.text_length_floor:
                    counts["too_short"] += 1
                    continue
                out = {k: v for k, v in doc.items() if k not in discard} if discard else doc
                out["text"] = text
                for _ in range(copies):
                    writer.write(out)
                    counts["written"] += 1
                    counts["text_chars_out"] += len(text)
                    counts["text_bytes_out"] += text_bytes(text)
            for attr_path, it in attr_iters:
                if next(it, None) is not None and not _was_truncated(report, path):
                    raise LmforgeError(f"{attr_path} has more lines than {path} has documents")
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    read = report.counts()
    counts.update(empty_shards=read["empty_shards"], truncated_files=read["truncated_files"],
                  duplicate_ids=read["duplicate_ids"])
    result = {"stream": stream.name, "task": task.index, "files": writer.files, "output_bytes": writer.bytes,
              "counts": counts, "excluded_by_filter": by_filter, "documents": counts["read"], "skipped_lines": report.skipped,
              "bad_lines": [str(b) for b in report.bad_lines], "truncated": [str(t) for t in report.truncated],
              "config_hash": task.config_hash, "attribute_keys_seen": sorted(keys_seen)}
    atomic_write_json(_done_mark(task), result)
    return result


def _was_truncated(report: ReadReport, path: str | Path) -> bool:
    return any(t.path == str(path) for t in report.truncated)


def _done_mark(task: MixTask) -> Path:
    return Path(task.output.path) / DONE_DIR / f"{task.stream.name}-{task.index:04d}.json"


def estimated_text_bytes(path: str) -> int:
    """Uncompressed size of a shard: gzip's trailer, zstd's frame header, else a typical ratio."""
    size = os.path.getsize(path)
    try:
        if path.endswith(".gz") and size >= 18:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", f.read(4))[0]
            return max(isize, size)
        if path.endswith(".zst"):
            with open(path, "rb") as f:
                content = zstandard.frame_content_size(f.read(18))
            return content if content > 0 else size * DEFAULT_COMPRESSION_RATIO
    except (OSError, struct.error, zstandard.ZstdError):
        pass
    return size


def _known_keys(paths: list[str], names: list[str]) -> list[str] | None:
    keys: set[str] = set()
    for name in names:
        for directory in {attribute_dir(p, name) for p in paths}:
            manifest = directory / MANIFEST_NAME
            if not manifest.is_file():
                return None  # attributes from another tool: no declared keys to check against
            try:
                declared = json.loads(manifest.read_text(encoding="utf-8")).get("attribute_keys")
            except (OSError, json.JSONDecodeError):
                return None
            if declared is None:
                return None
            keys.update(declared)
    return sorted(keys)


def plan_tasks(config: MixerConfig) -> tuple[list[MixTask], dict[str, list[str]]]:
    """(the tasks, each stream's shards left out for want of a completion mark)."""
    tasks = []
    incomplete = {}
    for stream in config.streams:
        paths, incomplete[stream.name] = input_shards(stream.documents, config.input)
        for path in paths:
            for name in stream.attributes:
                if not attribute_path(path, name).is_file():
                    raise LmforgeError(f"stream {stream.name!r}: missing attributes {name!r} for {path} "
                                       f"(expected {attribute_path(path, name)})")
        known = _known_keys(paths, stream.attributes)
        _compile(stream, known)  # fail on a bad filter before any work starts
        fingerprint = json.dumps([to_dict(stream), to_dict(config.output), config.seed,
                                  [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]], sort_keys=True)
        config_hash = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        group: list[str] = []
        group_bytes = 0
        for path in paths:
            estimate = estimated_text_bytes(path)
            if group and group_bytes + estimate > config.output.max_size_in_bytes:
                tasks.append(MixTask(stream, len([t for t in tasks if t.stream is stream]), group, config.output,
                                     config.seed, known, config_hash, config.input.strict,
                                     weight=sum(map(os.path.getsize, group))))
                group, group_bytes = [], 0
            group.append(path)
            group_bytes += estimate
        if group:
            tasks.append(MixTask(stream, len([t for t in tasks if t.stream is stream]), group, config.output,
                                 config.seed, known, config_hash, config.input.strict,
                                 weight=sum(map(os.path.getsize, group))))
    return tasks, incomplete


def _finished(task: MixTask) -> dict | None:
    mark = _done_mark(task)
    try:
        result = json.loads(mark.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("config_hash") != task.config_hash:
        mark.unlink()  # first, so no reader takes the files below for complete ones
        for name in result.get("files", []):
            (Path(task.output.path) / name).unlink(missing_ok=True)
        return None
    if not all((Path(task.output.path) / name).is_file() for name in result.get("files", [])):
        return None
    return result


def _refuse_absent_keys(config: MixerConfig, results: list[dict]) -> None:
    """A filter or span on a key that no attribute line has would silently drop (or keep) every document: a
    misspelling that a wildcard declaration (`langid__*`) or attribute files without a manifest let through."""
    for stream in config.streams:
        ran = [r for r in results if r["stream"] == stream.name]
        if not stream.attributes or any("attribute_keys_seen" not in r for r in ran):
            continue
        seen = {k for r in ran for k in r["attribute_keys_seen"]}
        absent = sorted(used_keys(stream) - seen)
        if absent and any(r["documents"] for r in ran):
            raise LmforgeError(f"stream {stream.name!r}: no document has the attribute(s) {', '.join(absent)} that "
                               f"its filter or span_replacement reads; the attribute files have: "
                               f"{', '.join(sorted(seen)) or 'no keys'}")


def _remove_other_runs(output: Path, tasks: list[MixTask]) -> None:
    """Drop the completion marks, and the parts they list, of tasks this plan does not have (a run with other
    settings: another `max_size_in_bytes` groups the inputs into other tasks), so the directory never holds two
    runs (a task of this plan run with other settings is replaced by `_finished`)."""
    current = {_done_mark(t).name for t in tasks}
    for mark in (output / DONE_DIR).glob("*.json"):
        if mark.name not in current:
            try:
                files = json.loads(mark.read_text(encoding="utf-8")).get("files", [])
            except (OSError, ValueError, AttributeError):
                files = []
            mark.unlink()  # first, so no reader takes the files below for complete ones
            for name in files:
                (output / name).unlink(missing_ok=True)


def run_mix(config: MixerConfig) -> dict:
    with output_lock(config.output.path):
        return _run_mix(config)


def _run_mix(config: MixerConfig) -> dict:
    tasks, incomplete = plan_tasks(config)
    output = Path(config.output.path)
    (output / DONE_DIR).mkdir(parents=True, exist_ok=True)  # from now on readers go by the completion marks
    _remove_other_runs(output, tasks)
    done = {id(t): _finished(t) for t in tasks}
    todo = [t for t in tasks if done[id(t)] is None]
    if todo:
        # Until this run finishes, the directory must not look finished to readers (they check the manifest).
        (output / MANIFEST_NAME).unlink(missing_ok=True)
    executor = config.executor
    fresh = iter(run_tasks(mix_task, todo, executor, desc="mix"))
    results = [done[id(t)] if done[id(t)] is not None else next(fresh) for t in tasks]
    per_stream = {stream: {"skipped_lines": 0, "output_bytes": 0, "files": 0, "incomplete_shards": len(shards)}
                  for stream, shards in incomplete.items()}
    skipped: list[str] = []
    files: list[str] = []
    for r in results:
        totals = per_stream[r["stream"]]
        for key, value in r["counts"].items():
            totals[key] = totals.get(key, 0) + value
        totals["skipped_lines"] += r["skipped_lines"]
        totals["output_bytes"] += r["output_bytes"]
        totals["files"] += len(r["files"])
        for expression, dropped in r.get("excluded_by_filter", {}).items():
            into = totals.setdefault("excluded_by_filter", {}).setdefault(expression, {"documents": 0, "text_bytes": 0})
            for key, value in dropped.items():
                into[key] += value
        skipped += r["bad_lines"]
        files += r["files"]
    _refuse_absent_keys(config, results)
    inputs = [p for t in tasks for p in t.paths]
    save_config(config, config.output.path)
    write_manifest(config.output.path, command="data mix", config=config, inputs=inputs,
                   counts={"streams": per_stream}, extra={"files": sorted(files), "skipped": skipped[:100]})
    return {"output": config.output.path, "tasks": len(tasks), "tasks_skipped_done": len(tasks) - len(todo),
            "streams": per_stream, "bad_line_examples": skipped[:10],
            "truncated": [t for task, r in zip(tasks, results) if done[id(task)] is None for t in r["truncated"]],
            "incomplete_shards": [p for shards in incomplete.values() for p in shards]}
