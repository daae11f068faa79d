"""Atomic writes and content hashes: an output file is either its old bytes or its new ones, never half.

Every stage writes through these, so a kill at any moment leaves the last good output intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import xxhash

# Every file suffix lmforge reads or writes, defined once (formats in docs/formats.md).
DOCUMENT_SUFFIX_BY_COMPRESSION = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl", "parquet": ".parquet"}
DOCUMENT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".parquet")
ATTRIBUTE_SUFFIX = ".jsonl.gz"  # attributes of a Parquet shard are written as JSONL
TOKENS_SUFFIX = ".npy"  # headerless token memmaps
TOKENS_SIDECAR_SUFFIX = ".docs.parquet"  # lmforge's per-document sidecar of a token file
DOLMA_SIDECAR_SUFFIX = ".csv.gz"  # Dolma's per-document sidecar of a token file


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_mode())  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def file_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return "xxh3_64:" + h.hexdigest()


def combined_hash(paths: list[str | Path]) -> str:
    """One hash of several files' contents in order (a checkpoint's shards), or of one file."""
    if len(paths) == 1:
        return file_hash(paths[0])
    h = xxhash.xxh3_64()
    for path in paths:
        h.update(file_hash(path).encode())
    return "xxh3_64-of-files:" + h.hexdigest()
