"""Paragraph-level decontamination of training documents against evaluation texts (Paloma / Dolma style).

The filter holds every paragraph of the evaluation texts (task prompts and answers, held-out documents) that
has at least `min_words` words (13, as Dolma's decontamination). A paragraph is a line; it is compared after
collapsing whitespace and dropping a short leading prompt label ("Question:", "Answer:", "Goal:" ...), so
"Question: <q>" in a task matches "<q>" in a web page. Training documents containing any filter paragraph are
contaminated: `mark` writes Dolma-layout attributes (`<name>__contaminated_paragraphs` spans) for the mixer,
`remove` writes the clean documents to a new directory. Counts are reported per source.

The evaluation texts are passed in (`lmforge.eval.tasks.task_texts` gives a task's), so curation does not depend
on evaluation. Dolma uses a Bloom filter; this uses an exact set of 64-bit hashes (no false positives short of a hash
collision), which fits in memory for evaluation-sized filters (~16 bytes per paragraph).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import xxhash

from lmforge.curation.attributes import (attribute_dir, attribute_path, is_done, mark_done, read_done_markers,
                                         split_documents_path)
from lmforge.curation.documents import DocumentWriter, ReadReport, expand_globs, read_documents
from lmforge.core.config import require
from lmforge.core.errors import LmforgeError
from lmforge.core.executor import ExecutorConfig, run_tasks
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest

WORD = re.compile(r"\w+", re.UNICODE)
PROMPT_LABEL = re.compile(r"^(?:[A-Z][A-Za-z]{0,15}(?: [A-Za-z]{1,15})?:|[A-J][.)])\s+")


@dataclass
class DecontaminationConfig:
    documents: list[str] = field(default_factory=list)  # training document globs
    tasks: list[str] = field(default_factory=list)  # names of the evaluation tasks whose texts are passed in
    eval_documents: list[str] = field(default_factory=list)  # held-out document globs (e.g. Paloma)
    min_words: int = 13
    mode: Literal["mark", "remove"] = "mark"
    name: str = "decontamination"  # attribute name (mark)
    out: str | None = None  # output directory (remove)
    overwrite: bool = False
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.documents), "documents", self.documents, "give at least one document glob")
        require(self.mode != "remove" or bool(self.out), "out", self.out,
                "mode remove writes the clean documents to an output directory; give one")
        require(bool(self.tasks or self.eval_documents), "tasks", self.tasks,
                "build the filter from tasks and/or eval_documents")
        require(self.min_words >= 1, "min_words", self.min_words, "must be positive")


def normalize_paragraph(paragraph: str) -> str:
    return PROMPT_LABEL.sub("", " ".join(paragraph.split()))


def paragraph_spans(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, normalised text) of each line."""
    start = 0
    for line in text.split("\n"):
        yield start, start + len(line), normalize_paragraph(line)
        start += len(line) + 1


def paragraph_key(normalized: str) -> int:
    return xxhash.xxh3_64_intdigest(normalized.encode("utf-8"))


class ParagraphFilter:
    def __init__(self, min_words: int = 13):
        self.min_words = min_words
        self.keys: set[int] = set()

    def add_text(self, text: str) -> None:
        for _, _, norm in paragraph_spans(text):
            if len(WORD.findall(norm)) >= self.min_words:
                self.keys.add(paragraph_key(norm))

    def contaminated_spans(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for start, end, norm in paragraph_spans(text):
            if len(WORD.findall(norm)) >= self.min_words and paragraph_key(norm) in self.keys:
                spans.append((start, end))
        return spans

    def __len__(self) -> int:
        return len(self.keys)


def build_filter(config: DecontaminationConfig, eval_texts: Iterable[str]) -> tuple[ParagraphFilter, dict]:
    paragraphs = ParagraphFilter(config.min_words)
    counts = {"eval_texts": 0, "eval_documents": 0}
    for text in eval_texts:
        paragraphs.add_text(text)
        counts["eval_texts"] += 1
    report = ReadReport()
    for path in expand_globs(config.eval_documents) if config.eval_documents else []:
        for _, doc in read_documents(path, report):
            paragraphs.add_text(doc["text"])
            counts["eval_documents"] += 1
    counts["filter_paragraphs"] = len(paragraphs)
    counts["eval_documents_skipped_lines"] = report.skipped
    if not len(paragraphs):
        raise LmforgeError(f"the evaluation texts have no paragraph of {config.min_words}+ words: nothing to filter")
    return paragraphs, counts


@dataclass
class ScanTask:
    path: str
    paragraphs: ParagraphFilter
    config: DecontaminationConfig
    output: Path | None
    weight: int = 0  # input bytes, for the progress bar


def scan_task(task: ScanTask, progress) -> dict:
    result = scan_shard(task.path, task.paragraphs, task.config, task.output, progress)
    if task.config.mode == "mark":  # written by the worker, so a killed run keeps every shard it finished
        mark_done(task.path, task.config.name, result, sum(s["documents"] for s in result["sources"].values()))
    return result


def scan_shard(path: str, paragraphs: ParagraphFilter, config: DecontaminationConfig,
               output: Path | None, progress=lambda n: None) -> dict:
    """Mark or remove contaminated documents of one shard; counts per source."""
    per_source: dict[str, dict] = defaultdict(lambda: {"documents": 0, "contaminated": 0, "paragraphs": 0})
    report = ReadReport()
    attr_writer = DocumentWriter(attribute_path(path, config.name)) if config.mode == "mark" else None
    doc_writer = DocumentWriter(output) if output is not None else None
    try:
        for _, doc in read_documents(path, report):
            spans = paragraphs.contaminated_spans(doc["text"])
            counts = per_source[str(doc.get("source") or "unknown")]
            counts["documents"] += 1
            counts["contaminated"] += bool(spans)
            counts["paragraphs"] += len(spans)
            if attr_writer is not None:
                attr_writer.write({"id": doc["id"], "attributes": {
                    f"{config.name}__contaminated_paragraphs": [[s, e, 1.0] for s, e in spans]}})
            if doc_writer is not None and not spans:
                doc_writer.write(doc)
            progress(1)
    except BaseException:
        for w in (attr_writer, doc_writer):
            if w is not None:
                w.abort()
        raise
    for w in (attr_writer, doc_writer):
        if w is not None:
            w.close()
    return {"sources": dict(per_source), "skipped_lines": report.skipped, "bad_lines": report.to_dict()["bad_lines"]}


def output_path(doc_path: str, out: Path) -> Path:
    _, rel = split_documents_path(doc_path)
    return out / "documents" / rel


def decontaminate(config: DecontaminationConfig, eval_texts: Iterable[str] = (), log=print) -> dict:
    """`eval_texts` are the texts of the tasks named in `config.tasks` (`lmforge.eval.tasks.task_texts`):
    curation comes before evaluation, so the caller loads them."""
    shards = expand_globs(config.documents)
    written = [config.out] if config.mode == "remove" else {attribute_dir(p, config.name) for p in shards}
    with output_lock(*written):
        return _decontaminate(config, eval_texts, log, shards)


def _decontaminate(config: DecontaminationConfig, eval_texts: Iterable[str], log, shards: list[str]) -> dict:
    paragraphs, counts = build_filter(config, eval_texts)
    log(f"filter: {counts['filter_paragraphs']} paragraphs of {config.min_words}+ words")
    totals: dict[str, dict] = defaultdict(lambda: {"documents": 0, "contaminated": 0, "paragraphs": 0})
    todo = [path for path in shards
            if config.mode == "remove" or config.overwrite or not is_done(path, config.name)]
    done_before = len(shards) - len(todo)
    tasks = [ScanTask(path, paragraphs, config, output_path(path, Path(config.out)) if config.mode == "remove"
                      else None, weight=Path(path).stat().st_size) for path in todo]
    skipped = 0
    for result in run_tasks(scan_task, tasks, config.executor, desc="decontaminate"):
        skipped += result["skipped_lines"]
        for source, c in result["sources"].items():
            for k, v in c.items():
                totals[source][k] += v
    summary = {"mode": config.mode, "shards": len(shards), "shards_already_done": done_before,
               "skipped_lines": skipped, **counts, "per_source": dict(totals)}
    if config.mode == "remove":
        write_manifest(config.out, command="data decontaminate", config=config, inputs=shards, counts=summary)
    else:
        _write_attribute_manifests(config, shards, counts)
    return summary


def _write_attribute_manifests(config: DecontaminationConfig, shards: list[str], filter_counts: dict) -> None:
    """One manifest per attribute directory, as `data tag` writes: what its shards' completion marks counted
    (this run's and earlier ones'), and the key it declares, which the mixer checks filters against."""
    for directory in sorted({attribute_dir(p, config.name) for p in shards}):
        inputs = [p for p in shards if attribute_dir(p, config.name) == directory]
        markers = read_done_markers(directory)
        per_source: dict[str, dict] = defaultdict(lambda: {"documents": 0, "contaminated": 0, "paragraphs": 0})
        for marker in markers:
            for source, c in marker.get("sources", {}).items():
                for k, v in c.items():
                    per_source[source][k] += v
        counts = {"shards": len(markers), "skipped_lines": sum(m.get("skipped_lines", 0) for m in markers),
                  **filter_counts, "per_source": dict(per_source)}
        write_manifest(directory, command="data decontaminate", config=config, inputs=inputs, counts=counts,
                       extra={"attribute_keys": [f"{config.name}__contaminated_paragraphs"],
                              "skipped": [b for m in markers for b in m.get("bad_lines", [])][:100]})


def format_counts(summary: dict) -> Iterable[str]:
    yield "| source | documents | contaminated | contaminated paragraphs |"
    yield "|---|---|---|---|"
    for source, c in sorted(summary["per_source"].items()):
        yield f"| {source} | {c['documents']} | {c['contaminated']} | {c['paragraphs']} |"
