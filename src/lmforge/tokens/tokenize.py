"""Tokenize Dolma documents into flat token memmaps with a per-document sidecar.

Every input shard becomes one or more token files `<shard>-<NNNNN>.npy`: raw, headerless memmaps of uint16
(when every id fits) or uint32 ids, documents back to back as `[BOS] tokens EOS`, exactly the layout that
`dolma tokens` writes and OLMo reads. Next to each one, `<shard>-<NNNNN>.docs.parquet` holds one row per
document (id, source, start, end, line) and, as file metadata, the dtype, special ids and input shard, so a
token file describes itself and any token can be traced back to the line it came from.

A shard's output depends only on the shard and the settings, never on the number of workers, so a rerun writes
byte-identical files. Shards are the unit of work and of resume: a shard is done when its progress record in
`.progress/` exists and matches the input's hash and the settings; finished shards are skipped on rerun and
half-written files of an interrupted shard are replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash

from lmforge.curation.documents import InputConfig, ReadReport, input_shards, read_documents, strip_suffix
from lmforge.core.config import require
from lmforge.core.executor import ExecutorConfig, run_tasks
from lmforge.core.errors import LmforgeError
from lmforge.core.manifest import MANIFEST_NAME, write_manifest
from lmforge.core.locks import output_lock
from lmforge.core.files import GuardedStream, TOKENS_SIDECAR_SUFFIX, TOKENS_SUFFIX, atomic_path, atomic_write_json, file_hash
from lmforge.tokens.tokenizer import Tokenizer, encode_stream

FORMAT = "lmforge-tokens-v1"
PROGRESS_DIR = ".progress"
MAX_REPORTED_BAD_LINES = 100


@dataclass
class TokenizeConfig:
    documents: list[str]
    tokenizer: str
    out: str
    bos: bool = False
    max_tokens_per_file: int = 1 << 30
    input: InputConfig = field(default_factory=InputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.documents), "documents", self.documents, "give at least one document glob")
        require(self.max_tokens_per_file >= 1, "max_tokens_per_file", self.max_tokens_per_file, "must be >= 1")


@dataclass
class ShardTask:
    path: str
    stem: str
    out: str
    tokenizer_path: str
    eos_id: int
    bos_id: int | None
    dtype: str
    max_tokens_per_file: int
    input_hash: str
    settings_hash: str
    strict: bool = False
    parallel_encode: bool = False  # the only shard to do: encode on the tokenizer's threads instead
    weight: int = 0  # input bytes, for the progress bar


@dataclass
class ShardResult:
    stem: str
    path: str
    input_hash: str
    settings_hash: str
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    skipped_empty: int = 0
    skipped_bad_lines: int = 0
    duplicate_ids: int = 0
    bad_lines: list[str] = field(default_factory=list)
    empty: bool = False  # the shard has no line at all
    truncated: list[str] = field(default_factory=list)  # its compressed stream breaks (documents before kept)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[dict] = field(default_factory=list)


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32 (Dolma's `np.min_scalar_type(vocab - 1)` rule)."""
    return "uint16" if vocab_size - 1 <= np.iinfo(np.uint16).max else "uint32"


def shard_stems(paths: list[str]) -> list[str]:
    """Output names for input shards: the path below the inputs' common folder, `/` replaced by `__`."""
    if len(paths) == 1:
        return [strip_suffix(paths[0])]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    stems = []
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), root)
        parent = os.path.dirname(rel)
        stem = strip_suffix(rel)
        stems.append((parent.replace(os.sep, "__") + "__" if parent else "") + stem)
    seen: dict[str, str] = {}
    for p, s in zip(paths, stems):
        if s in seen:
            raise LmforgeError(f"input shards {seen[s]} and {p} would write the same token files ({s}-*.npy)")
        seen[s] = p
    return stems


def _shard_file_pattern(stem: str) -> re.Pattern:
    suffixes = "|".join(re.escape(s) for s in (TOKENS_SUFFIX, TOKENS_SIDECAR_SUFFIX))
    return re.compile(re.escape(stem) + r"-\d{5}(" + suffixes + ")$")


@lru_cache(maxsize=4)
def _load_tokenizer(path: str, eos_id: int) -> Tokenizer:
    return Tokenizer.load(path, eos_id=eos_id)


@contextlib.contextmanager
def _tokenizer_threads(parallel: bool):
    """Parallelism normally comes from worker processes, one core each, so `--workers` means cores. With a
    single shard to do, the shard's batches are encoded on the tokenizer's own threads instead."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


class _FileWriter:
    """Streams one shard's documents into token files, rolling to a new file when the next document would
    overflow the current one. Tokens go to a temporary file in 16 MiB pieces, so memory stays flat."""

    BUFFER_TOKENS = 1 << 23

    def __init__(self, task: ShardTask, result: ShardResult, vocab_size: int):
        self.task = task
        self.result = result
        self.vocab_size = vocab_size
        self.dtype = np.dtype(task.dtype)
        self.index = 0
        self._atomic: contextlib.ExitStack | None = None
        self._reset()

    def _reset(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.buffered = 0
        self.ids: list[str] = []
        self.sources: list[str] = []
        self.lines: list[int] = []
        self.ends: list[int] = []
        self.tokens = 0

    def _name(self) -> str:
        return f"{self.task.stem}-{self.index:05d}"

    def add(self, doc_id: str, source: str, line: int, parts: list[np.ndarray]) -> int:
        """Append one document given as consecutive arrays of ids; returns its number of tokens."""
        n_tokens = sum(map(len, parts))
        if self.tokens and self.tokens + n_tokens > self.task.max_tokens_per_file:
            self.flush()
        if self._atomic is None:
            self._atomic = contextlib.ExitStack()
            target = Path(self.task.out) / f"{self._name()}{TOKENS_SUFFIX}"
            tmp = self._atomic.enter_context(atomic_path(target))
            self._stream = GuardedStream(self._atomic.enter_context(open(tmp, "wb")), target, tmp)
        self.chunks.extend(parts)
        self.buffered += n_tokens
        self.tokens += n_tokens
        self.ids.append(doc_id)
        self.sources.append(source)
        self.lines.append(line)
        self.ends.append(self.tokens)
        if self.buffered >= self.BUFFER_TOKENS:
            self._write_buffer()
        return n_tokens

    def _write_buffer(self) -> None:
        if self.chunks:
            self._stream.write(np.concatenate(self.chunks).astype(self.dtype, copy=False).data)
        self.chunks = []
        self.buffered = 0

    def flush(self) -> None:
        """Finish the current token file and its sidecar (renamed into place) and start the next."""
        if self._atomic is None:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._write_buffer()
        atomic, self._atomic = self._atomic, None
        atomic.close()  # closes the stream, then renames the temporary file over the target
        name = self._name()
        ends = np.asarray(self.ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        table = pa.table({
            "id": pa.array(self.ids, pa.string()),
            "source": pa.array(self.sources, pa.string()),
            "start": pa.array(starts),
            "end": pa.array(ends),
            "line": pa.array(np.asarray(self.lines, dtype=np.int64)),
        })
        location = shard_location(self.task.path, self.task.out)
        table = table.replace_schema_metadata(sidecar_metadata(
            dtype=self.task.dtype, eos_id=self.task.eos_id, bos_id=self.task.bos_id, vocab_size=self.vocab_size,
            shard=location["path"], shard_absolute=location["absolute_path"],
        ))
        with atomic_path(Path(self.task.out) / f"{name}{TOKENS_SIDECAR_SUFFIX}") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.result.files.append({"tokens_file": f"{name}{TOKENS_SUFFIX}", "sidecar": f"{name}{TOKENS_SIDECAR_SUFFIX}",
                                  "tokens": int(self.tokens), "documents": len(self.ids)})
        self.index += 1
        self._reset()

    def abort(self, error: BaseException) -> None:
        """Drop the file being written (its temporary file is removed, the target is untouched); `error` becomes
        an `OutputWriteError` naming the file when it is the filesystem refusing the write."""
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(type(error), error, error.__traceback__)


def shard_location(shard: str, out: str | Path) -> dict:
    """Where a document shard is, from anywhere: relative to the token directory, and absolute."""
    absolute = os.path.abspath(shard)
    return {"path": os.path.relpath(absolute, os.path.abspath(out)), "absolute_path": absolute}


def sidecar_metadata(*, dtype: str, eos_id: int, bos_id: int | None, vocab_size: int, shard: str,
                     shard_absolute: str = "") -> dict:
    """`shard` is relative to the token directory when `shard_absolute` is given (older files: as given)."""
    return {
        b"lmforge.format": FORMAT.encode(),
        b"lmforge.dtype": dtype.encode(),
        b"lmforge.eos_id": str(eos_id).encode(),
        b"lmforge.bos_id": ("" if bos_id is None else str(bos_id)).encode(),
        b"lmforge.vocab_size": str(vocab_size).encode(),
        b"lmforge.shard": shard.encode(),
        b"lmforge.shard_absolute": shard_absolute.encode(),
    }


def tokenize_shard(task: ShardTask, parallel_encode: bool = False) -> ShardResult:
    """Tokenize one input shard into its token files; the progress record is written last."""
    with _tokenizer_threads(parallel_encode):
        return _tokenize_shard(task)


def _tokenize_shard(task: ShardTask) -> ShardResult:
    tokenizer = _load_tokenizer(task.tokenizer_path, task.eos_id)
    out = Path(task.out)
    pattern = _shard_file_pattern(task.stem)
    for stale in out.iterdir():
        if pattern.match(stale.name):
            stale.unlink()
    result = ShardResult(stem=task.stem, path=task.path, input_hash=task.input_hash,
                         settings_hash=task.settings_hash)
    writer = _FileWriter(task, result, tokenizer.vocab_size)
    report = ReadReport()
    dtype = np.dtype(task.dtype)
    prefix = np.array([] if task.bos_id is None else [task.bos_id], dtype=dtype)
    suffix = np.array([task.eos_id], dtype=dtype)

    def documents():
        for line, doc in read_documents(task.path, report, task.strict):
            # Dolma strips surrounding whitespace before encoding; doing the same keeps token ids identical.
            text = doc["text"].strip()
            if not text:
                result.skipped_empty += 1
                continue
            source = doc.get("source")
            source = source if isinstance(source, str) and source else task.stem
            yield (line, doc["id"], source, len(text) if text.isascii() else len(text.encode("utf-8"))), text

    try:
        for (line, doc_id, source, text_bytes), ids in encode_stream(tokenizer, documents(), dtype):
            n_tokens = writer.add(doc_id, source, line, [prefix, ids, suffix])
            stats = result.sources.setdefault(source, {"documents": 0, "tokens": 0})
            stats["documents"] += 1
            stats["tokens"] += n_tokens
            result.documents += 1
            result.tokens += n_tokens
            result.text_bytes += text_bytes
        writer.flush()
    except BaseException as e:
        writer.abort(e)
        raise
    result.skipped_bad_lines = report.skipped
    result.duplicate_ids = report.duplicate_ids
    result.bad_lines = [str(b) for b in report.bad_lines]
    result.empty = bool(report.empty_shards)
    result.truncated = [str(t) for t in report.truncated]
    atomic_write_json(out / PROGRESS_DIR / f"{task.stem}.json", result.__dict__)
    return result


def _finished(task: ShardTask) -> ShardResult | None:
    record = Path(task.out) / PROGRESS_DIR / f"{task.stem}.json"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if data.get("input_hash") != task.input_hash or data.get("settings_hash") != task.settings_hash:
        return None
    if not all((Path(task.out) / f["tokens_file"]).is_file() and (Path(task.out) / f["sidecar"]).is_file()
               for f in data.get("files", [])):
        return None
    return ShardResult(**data)


def _tokenize_task(task: ShardTask, progress) -> dict:
    return tokenize_shard(task, parallel_encode=task.parallel_encode).__dict__


def tokenize(config: TokenizeConfig) -> dict:
    """Tokenize every shard matched by `config.documents` into `config.out` on the configured executor (local
    processes or Ray); returns the manifest counts."""
    with output_lock(config.out):
        return _tokenize(config)


def _tokenize(config: TokenizeConfig) -> dict:
    paths, incomplete = input_shards(config.documents, config.input)
    stems = shard_stems(paths)
    tokenizer = Tokenizer.load(config.tokenizer)
    bos_id = None
    if config.bos:
        bos_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer")
    tokenizer_hash = file_hash(tokenizer.source)
    settings = json.dumps({"format": FORMAT, "tokenizer": tokenizer_hash, "eos": tokenizer.eos_id, "bos": bos_id,
                           "dtype": dtype, "max_tokens_per_file": config.max_tokens_per_file}, sort_keys=True)
    settings_hash = xxhash.xxh3_64_hexdigest(settings.encode("utf-8"))
    tasks = [
        ShardTask(path=p, stem=s, out=str(out), tokenizer_path=tokenizer.source, eos_id=tokenizer.eos_id,
                  bos_id=bos_id, dtype=dtype, max_tokens_per_file=config.max_tokens_per_file,
                  input_hash=file_hash(p), settings_hash=settings_hash, strict=config.input.strict)
        for p, s in zip(paths, stems)
    ]
    results: dict[str, ShardResult] = {}
    todo = []
    for task in tasks:
        done = _finished(task)
        if done is not None:
            results[task.stem] = done
        else:
            todo.append(task)
    if todo:
        # Until this run finishes, the directory must not look finished to readers (they check the manifest).
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    # Largest shards first so the last worker is not left alone with a big one.
    for task in todo:
        task.weight = os.path.getsize(task.path)
        task.parallel_encode = len(todo) == 1 and config.executor.workers > 1
    todo.sort(key=lambda t: (-t.weight, t.stem))
    for result in run_tasks(_tokenize_task, todo, config.executor, desc="tokenize"):
        results[result["stem"]] = ShardResult(**result)
    summary = _write_tokenize_manifest(config, out, [results[s] for s in stems], tokenizer, dtype, bos_id,
                                       skipped_shards=len(tasks) - len(todo), incomplete=incomplete)
    return summary | {"truncated": [t for task in todo for t in results[task.stem].truncated]}


def _write_tokenize_manifest(config: TokenizeConfig, out: Path, results: list[ShardResult], tokenizer: Tokenizer,
                             dtype: str, bos_id: int | None, skipped_shards: int, incomplete: list[str]) -> dict:
    sources: dict[str, dict[str, int]] = {}
    bad_lines: list[str] = []
    for r in results:
        for name, stats in r.sources.items():
            agg = sources.setdefault(name, {"documents": 0, "tokens": 0})
            agg["documents"] += stats["documents"]
            agg["tokens"] += stats["tokens"]
        bad_lines.extend(r.bad_lines[: MAX_REPORTED_BAD_LINES - len(bad_lines)])
    counts = {
        "shards": len(results),
        "shards_already_done": skipped_shards,
        "documents": sum(r.documents for r in results),
        "tokens": sum(r.tokens for r in results),
        "text_bytes": sum(r.text_bytes for r in results),
        "skipped_empty_documents": sum(r.skipped_empty for r in results),
        "skipped_bad_lines": sum(r.skipped_bad_lines for r in results),
        "duplicate_ids": sum(r.duplicate_ids for r in results),
        "empty_shards": sum(r.empty for r in results),
        "truncated_files": sum(len(r.truncated) for r in results),
        "incomplete_shards": len(incomplete),
        "token_files": sum(len(r.files) for r in results),
    }
    files = [dict(f, shard=shard_location(r.path, out)["path"]) for r in results for f in r.files]
    write_manifest(
        out, command="data tokenize", config=config, inputs=[r.path for r in results], counts=counts,
        extra={
            "format": FORMAT,
            "dtype": dtype,
            "tokenizer": {"path": tokenizer.source, "hash": file_hash(tokenizer.source), "eos_id": tokenizer.eos_id,
                          "bos_id": bos_id, "vocab_size": tokenizer.vocab_size, "copy": "tokenizer/tokenizer.json"},
            "sources": dict(sorted(sources.items())),
            "files": files,
            "shards": [{**shard_location(r.path, out), "documents": r.documents, "tokens": r.tokens,
                        "skipped_empty_documents": r.skipped_empty, "skipped_bad_lines": r.skipped_bad_lines,
                        "empty": r.empty, "truncated": r.truncated}
                       for r in results],
            "bad_lines": bad_lines,
            "incomplete_shards": incomplete,
        },
    )
    return {"counts": counts, "sources": sources, "bad_lines": bad_lines, "incomplete_shards": incomplete}


@dataclass
class TrainTokenizerConfig:
    documents: list[str]
    vocab_size: int
    out: str
    sample_docs: int = 100_000
    seed: int = 0
    min_frequency: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.vocab_size > 256 + 5, "vocab_size", self.vocab_size,
                "must exceed 261: the 256 byte tokens plus 5 special tokens")
        require(self.sample_docs >= 1, "sample_docs", self.sample_docs, "must be >= 1")
        require(self.min_frequency >= 0, "min_frequency", self.min_frequency, "must be >= 0")


def sample_documents(paths: list[str], sample_docs: int, seed: int, report: ReadReport) -> list[str]:
    """A seeded sample of document texts that does not depend on file order: the `sample_docs` documents whose
    hash of (seed, id, text) is smallest, returned in that hash order."""
    import heapq

    heap: list[tuple[int, str]] = []  # max-heap by negated key
    for path in paths:
        for _, doc in read_documents(path, report):
            text = doc["text"]
            if not text.strip():
                continue
            key = xxhash.xxh3_64_intdigest(f"{doc['id']}\x00{text}".encode("utf-8"), seed=seed)
            if len(heap) < sample_docs:
                heapq.heappush(heap, (-key, text))
            elif -heap[0][0] > key:
                heapq.heapreplace(heap, (-key, text))
    return [text for _, text in sorted(heap, key=lambda kv: -kv[0])]


def train_tokenizer(config: TrainTokenizerConfig) -> dict:
    with output_lock(config.out):
        return _train_tokenizer(config)


def _train_tokenizer(config: TrainTokenizerConfig) -> dict:
    """Train a byte-level BPE tokenizer on a document sample; writes tokenizer.json and a manifest."""
    from lmforge.tokens.tokenizer import train_bpe

    paths, incomplete = input_shards(config.documents, InputConfig())
    report = ReadReport()
    texts = sample_documents(paths, config.sample_docs, config.seed, report)
    if not texts:
        raise LmforgeError(f"no non-empty documents in {', '.join(config.documents)} to train a tokenizer on")
    tokenizer = train_bpe(iter(texts), config.vocab_size, min_frequency=config.min_frequency)
    out = Path(config.out)
    tokenizer.save(out)
    counts = {
        "sampled_documents": len(texts),
        "sampled_text_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "documents_read": report.documents,
        "skipped_bad_lines": report.skipped,
        "empty_shards": len(report.empty_shards),
        "truncated_files": len(report.truncated),
        "incomplete_shards": len(incomplete),
        "vocab_size": tokenizer.vocab_size,
    }
    write_manifest(out, command="data train-tokenizer", config=config, inputs=paths, counts=counts,
                   extra={"eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                          "bad_lines": [str(b) for b in report.bad_lines]})
    return {"counts": counts, "bad_lines": [str(b) for b in report.bad_lines],
            "truncated": [str(t) for t in report.truncated], "incomplete_shards": incomplete}
