"""`lmforge data tag`: run taggers over document shards, writing Dolma-layout attribute files.

Each tagger writes `attributes/<tagger>/...` (or all of them `attributes/<experiment>/...`). Shards whose
attribute files are complete are skipped, so an interrupted run resumes. A tagger that raises on one document
leaves that document without its attributes, and the error is counted and reported with file and line.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.curation import taggers as registry
from lmforge.curation.attributes import (AttributeWriter, attribute_dir, attribute_path, is_done, mark_done,
                                      read_done_markers)
from lmforge.curation.documents import InputConfig, ReadReport, input_shards, read_documents
from lmforge.core.executor import ExecutorConfig, run_tasks
from lmforge.core.config import require
from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest

MAX_REPORTED_ERRORS = 100
COUNTED = ("documents", "skipped_lines", "empty_shards", "truncated_files", "duplicate_ids", "tagger_errors",
           "documents_too_large", "text_chars")
DEFAULT_MAX_DOCUMENT_BYTES = 10 * 2**20
TOO_LARGE = "document_too_large"  # the one attribute a tagger writes for a document it did not run on


@dataclass
class TagConfig:
    documents: list[str]
    taggers: list[str]
    experiment: str | None = None
    tagger_modules: list[str] = field(default_factory=list)
    tagger_options: dict[str, dict[str, str]] = field(default_factory=dict)
    overwrite: bool = False
    input: InputConfig = field(default_factory=InputConfig)
    # Documents whose text is larger (UTF-8 bytes) are not tagged: each tagger writes only
    # `<tagger>__document_too_large` for them, and they are counted. 0: no limit.
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.documents), "documents", self.documents, "give at least one document glob")
        require(bool(self.taggers), "taggers", self.taggers, "give at least one tagger")
        require(self.max_document_bytes >= 0, "max_document_bytes", self.max_document_bytes,
                "must be >= 0 (0: no limit)")


@dataclass
class TagTask:
    doc_path: str
    groups: list[tuple[str, list[str]]]  # (attribute name, taggers writing into it)
    tagger_modules: list[str]
    tagger_options: dict[str, dict[str, str]]
    strict: bool = False
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    weight: int = 0


_TAGGER_CACHE: dict[tuple, registry.Tagger] = {}


def _tagger(name: str, options: dict[str, str]) -> registry.Tagger:
    key = (name, tuple(sorted(options.items())))
    if key not in _TAGGER_CACHE:
        _TAGGER_CACHE[key] = registry.make_tagger(name, options)
    return _TAGGER_CACHE[key]


def too_large(text: str, limit: int) -> bool:
    """The UTF-8 size of `text` is over `limit` (0: no limit). The text is encoded only when its length
    (1 to 4 bytes a character) cannot tell."""
    if not limit or 4 * len(text) <= limit:
        return False
    if len(text) > limit:
        return True
    return not text.isascii() and len(text.encode("utf-8")) > limit


def tag_shard(task: TagTask, progress) -> dict:
    registry.load_tagger_modules(task.tagger_modules)
    groups = [(attr_name, [(t, _tagger(t, task.tagger_options.get(t, {}))) for t in names])
              for attr_name, names in task.groups]
    report = ReadReport()
    errors: dict[str, list[str]] = {name: [] for _, taggers in groups for name, _ in taggers}
    n_errors = dict.fromkeys(errors, 0)
    text_chars = 0
    too_large_examples: list[str] = []
    n_too_large = 0
    writers = [AttributeWriter(attribute_path(task.doc_path, attr_name)) for attr_name, _ in groups]
    try:
        for line, doc in read_documents(task.doc_path, report, task.strict):
            text_chars += len(doc["text"])
            skip = too_large(doc["text"], task.max_document_bytes)
            if skip:
                n_too_large += 1
                if len(too_large_examples) < MAX_REPORTED_ERRORS:
                    too_large_examples.append(f"{task.doc_path}:{line}: {len(doc['text'])} characters, over "
                                              f"max_document_bytes={task.max_document_bytes}: not tagged")
            for writer, (_, taggers) in zip(writers, groups):
                attributes: dict[str, list] = {}
                if skip:
                    for name, _ in taggers:
                        attributes[f"{name}__{TOO_LARGE}"] = [[0, len(doc["text"]), 1.0]]
                    writer.write(doc["id"], attributes, line)
                    continue
                for name, tagger in taggers:
                    try:
                        for key, spans in tagger.tag(doc).items():
                            attributes[f"{name}__{key}"] = spans
                    except Exception as e:  # a user tagger may raise anything; the document is reported
                        n_errors[name] += 1
                        if len(errors[name]) < MAX_REPORTED_ERRORS:
                            where = traceback.extract_tb(e.__traceback__)[-1]
                            errors[name].append(f"{task.doc_path}:{line}: tagger {name!r} raised "
                                          f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})")
                writer.write(doc["id"], attributes, line)
            progress(1)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    result = {"documents": report.documents, **report.counts(), "bad_lines": [str(b) for b in report.bad_lines],
              "truncated": [str(t) for t in report.truncated], "text_chars": text_chars,
              "documents_too_large": n_too_large, "too_large_examples": too_large_examples}
    for writer, (attr_name, taggers) in zip(writers, groups):
        names = [name for name, _ in taggers]
        mark_done(task.doc_path, attr_name, {
            **result, "tagger_errors": sum(n_errors[n] for n in names),
            "tagger_error_examples": [e for n in names for e in errors[n]][:MAX_REPORTED_ERRORS]}, writer.count)
    return {"doc_path": task.doc_path, **result, "tagger_errors": sum(n_errors.values()),
            "tagger_error_examples": [e for examples in errors.values() for e in examples][:MAX_REPORTED_ERRORS]}


def plan_tasks(config: TagConfig) -> tuple[list[TagTask], list[str], list[str], dict[str, list[str]]]:
    """(tasks still to run, all document paths, shards left out as incomplete, attribute name -> taggers)."""
    if not config.taggers:
        raise LmforgeError("no taggers given; available taggers: " + ", ".join(registry.available_taggers()))
    registry.load_tagger_modules(config.tagger_modules)
    for name in config.taggers:
        registry.tagger_class(name)
    for name in config.tagger_options:
        if name not in config.taggers:
            raise LmforgeError(f"option given for tagger {name!r}, which is not one of the taggers run")
    for name in config.taggers:  # build once here so bad options fail before any work starts
        _tagger(name, config.tagger_options.get(name, {}))
    groups = {config.experiment: list(config.taggers)} if config.experiment else {t: [t] for t in config.taggers}
    paths, incomplete = input_shards(config.documents, config.input)
    tasks = []
    for path in paths:
        todo = [(name, taggers) for name, taggers in groups.items()
                if config.overwrite or not is_done(path, name)]
        if todo:
            tasks.append(TagTask(path, todo, list(config.tagger_modules), dict(config.tagger_options),
                                 config.input.strict, config.max_document_bytes, weight=Path(path).stat().st_size))
    return tasks, paths, incomplete, groups


def run_tag(config: TagConfig) -> dict:
    tasks, paths, incomplete, groups = plan_tasks(config)
    with output_lock(*{attribute_dir(p, name) for p in paths for name in groups}):
        return _run_tag(config, tasks, paths, incomplete, groups)


def _run_tag(config: TagConfig, tasks: list[TagTask], paths: list[str], incomplete: list[str],
             groups: dict[str, list[str]]) -> dict:
    executor = config.executor
    results = run_tasks(tag_shard, tasks, executor, desc="tag")
    summary = {"shards": len(paths), "shards_run": len(tasks), "shards_skipped_done": len(paths) - len(tasks),
               **{key: sum(r[key] for r in results) for key in COUNTED}}
    for attr_name, taggers in groups.items():
        directories = {attribute_dir(p, attr_name) for p in paths}
        for directory in directories:
            markers = read_done_markers(directory)
            counts = {key: sum(m.get(key, 0) for m in markers) for key in COUNTED}
            counts["shards"] = len(markers)
            counts["incomplete_shards"] = sum(attribute_dir(p, attr_name) == directory for p in incomplete)
            problems = [b for m in markers for b in m.get("bad_lines", [])]
            problems += [e for m in markers for e in m.get("tagger_error_examples", [])]
            problems += [e for m in markers for e in m.get("too_large_examples", [])]
            keys = [f"{t}__{a}" for t in taggers for a in (*registry.tagger_class(t).attributes, TOO_LARGE)]
            write_manifest(directory, command="data tag", config=config,
                           inputs=[p for p in paths if attribute_dir(p, attr_name) == directory],
                           counts=counts, extra={"attribute_keys": keys, "skipped": problems[:MAX_REPORTED_ERRORS]})
    summary["bad_line_examples"] = [b for r in results for b in r["bad_lines"]][:10]
    summary["tagger_error_examples"] = [e for r in results for e in r["tagger_error_examples"]][:10]
    summary["truncated"] = [t for r in results for t in r["truncated"]]
    summary["incomplete_shards"] = incomplete
    summary["too_large_examples"] = [e for r in results for e in r["too_large_examples"]][:10]
    return summary
