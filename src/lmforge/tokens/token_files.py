"""Token files on disk: headerless `.npy` memmaps plus the per-document sidecar that describes them.

A token file is read with the sidecar next to it: lmforge's `<name>.docs.parquet` (which also records the
dtype) or Dolma's `<name>.csv.gz` (`start,end,id,src,loc` rows; the dtype must then be given). Opening a file
checks its length against the sidecar, which catches truncated files and files of the wrong dtype before a
single step is trained on them.
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from lmforge.core.errors import LmforgeError
from lmforge.core.files import DOLMA_SIDECAR_SUFFIX, TOKENS_SIDECAR_SUFFIX, TOKENS_SUFFIX

DTYPES = ("uint16", "uint32")


@dataclass
class Documents:
    """One token file's documents: token offsets plus what is needed to trace them back to their shard."""

    ids: list[str]
    sources: list[str]
    starts: np.ndarray
    ends: np.ndarray
    lines: np.ndarray
    shards: list[str]


@dataclass
class TokenFile:
    path: str
    sidecar: str
    dtype: str
    num_tokens: int
    sidecar_digest: str
    _documents: Documents | None = field(default=None, repr=False)
    _memmap: np.memmap | None = field(default=None, repr=False)
    _ends: np.ndarray | None = field(default=None, repr=False)

    @property
    def tokens(self) -> np.memmap:
        if self._memmap is None:
            self._memmap = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._memmap

    def documents(self) -> Documents:
        if self._documents is None:
            self._documents = read_sidecar(self.sidecar)
        return self._documents

    def doc_ends(self) -> np.ndarray:
        """End offsets of the documents, read without their ids (what document boundaries need)."""
        if self._ends is None:
            if self._documents is None and self.sidecar.endswith(TOKENS_SIDECAR_SUFFIX):
                self._ends = _read_parquet_columns(self.sidecar, ["end"])["end"].to_numpy().astype(np.int64)
            else:
                self._ends = self.documents().ends
        return self._ends

    def doc_sources(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(source per document, starts, ends), read without the ids."""
        if self._documents is None and self.sidecar.endswith(TOKENS_SIDECAR_SUFFIX):
            table = _read_parquet_columns(self.sidecar, ["source", "start", "end"])
            return (table["source"].to_pylist(), table["start"].to_numpy().astype(np.int64),
                    table["end"].to_numpy().astype(np.int64))
        docs = self.documents()
        return docs.sources, docs.starts, docs.ends

    def identity(self) -> list:
        """What the dataset fingerprint hashes: the file's name, length and dtype and a digest of its sidecar,
        not its folder, so moving a dataset keeps its fingerprint."""
        return [os.path.basename(self.path), self.num_tokens, self.dtype, self.sidecar_digest]


def resolve_token_paths(patterns: list[str]) -> list[str]:
    """Token files named by a list of directories (their manifest's file list, else every `*.npy` in them),
    `.npy` files or globs, sorted within each pattern and de-duplicated."""
    from lmforge.core.manifest import MANIFEST_NAME, read_manifest

    found: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            if os.path.isfile(os.path.join(pattern, MANIFEST_NAME)):
                manifest = read_manifest(pattern)
                files = [os.path.join(pattern, f["tokens_file"]) for f in manifest.get("files", [])]
            elif os.path.isdir(os.path.join(pattern, ".progress")):
                raise LmforgeError(f"{pattern} has no {MANIFEST_NAME}: its tokenization has not finished "
                                   f"(rerun `lmforge data tokenize` with the same arguments to complete it)")
            else:
                files = sorted(glob.glob(os.path.join(pattern, "*" + TOKENS_SUFFIX)))
            if not files:
                raise LmforgeError(f"no token files (*.npy) in {pattern}")
        else:
            files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not files:
                raise LmforgeError(f"no token files match {pattern!r}")
        found.extend(os.path.abspath(f) for f in files)
    return list(dict.fromkeys(found))


def open_token_file(path: str, dtype: str | None = None) -> TokenFile:
    """Open a token file with its sidecar; `dtype` is required for Dolma files and checked for ours."""
    if not os.path.isfile(path):
        raise LmforgeError(f"token file not found: {path}")
    base = path[: -len(TOKENS_SUFFIX)] if path.endswith(TOKENS_SUFFIX) else path
    if os.path.isfile(base + TOKENS_SIDECAR_SUFFIX):
        sidecar = base + TOKENS_SIDECAR_SUFFIX
        meta_dtype, expected = _parquet_summary(sidecar)
        if dtype is not None and dtype != meta_dtype:
            raise LmforgeError(f"{path}: configured dtype {dtype} but its sidecar says the file holds {meta_dtype}")
        dtype = meta_dtype
    elif os.path.isfile(base + DOLMA_SIDECAR_SUFFIX):
        sidecar = base + DOLMA_SIDECAR_SUFFIX
        if dtype is None:
            raise LmforgeError(f"{path} is a Dolma token file (no dtype recorded): set dtype to uint16 or uint32")
        expected = int(read_sidecar(sidecar).ends.max(initial=0))
    else:
        raise LmforgeError(f"{path}: no sidecar ({Path(base).name}{TOKENS_SIDECAR_SUFFIX} or {Path(base).name}"
                           f"{DOLMA_SIDECAR_SUFFIX}) that says which documents it holds")
    if dtype not in DTYPES:
        raise LmforgeError(f"{path}: unsupported token dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    size = os.path.getsize(path)
    itemsize = np.dtype(dtype).itemsize
    if size != expected * itemsize:
        other = "uint32" if dtype == "uint16" else "uint16"
        if size == expected * np.dtype(other).itemsize:
            raise LmforgeError(f"{path}: wrong dtype: {size} bytes are {expected} tokens of {other}, "
                               f"not of {dtype} as expected")
        raise LmforgeError(f"{path}: truncated or corrupt: {size} bytes, but its sidecar describes {expected} "
                           f"{dtype} tokens ({expected * itemsize} bytes)")
    return TokenFile(path=path, sidecar=sidecar, dtype=dtype, num_tokens=expected, sidecar_digest=sidecar_digest(sidecar))


def sidecar_digest(sidecar: str, tail_bytes: int = 1 << 16) -> str:
    """xxh3 of the sidecar's size and last 64 KiB. For Parquet the tail is the footer, which holds
    per-row-group sizes and min/max statistics of every column. That makes the digest content-sensitive
    without reading sidecars that can be gigabytes in total."""
    size = os.path.getsize(sidecar)
    with open(sidecar, "rb") as f:
        f.seek(max(0, size - tail_bytes))
        tail = f.read()
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(str(size).encode() + b"\x00" + tail)


def _read_parquet_columns(sidecar: str, columns: list[str]):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(sidecar, columns=columns)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise LmforgeError(f"cannot read token sidecar {sidecar}: {e}") from None


def _parquet_summary(sidecar: str) -> tuple[str, int]:
    """(dtype, number of tokens) from the sidecar's footer alone: file metadata and the `end` column's maximum."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(sidecar)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise LmforgeError(f"cannot read token sidecar {sidecar}: {e}") from None
    kv = meta.metadata or {}
    dtype = kv.get(b"lmforge.dtype", b"").decode()
    if not dtype:
        raise LmforgeError(f"{sidecar} is not an lmforge token sidecar (no lmforge.dtype metadata)")
    end_col = meta.schema.names.index("end")
    expected = 0
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(end_col).statistics
        if stats is None or not stats.has_min_max:
            return dtype, int(read_sidecar(sidecar).ends.max(initial=0))
        expected = max(expected, int(stats.max))
    return dtype, expected


def _resolve_shard(sidecar: str, shard: str, absolute: str) -> str:
    """The document shard as an absolute path: `shard` is relative to the token directory (the absolute path
    recorded beside it is the fallback when the two directories moved apart). Files without `absolute` recorded
    the path as given at tokenize time."""
    if not absolute:
        return shard
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(sidecar)), shard))
    return beside if os.path.exists(beside) or not os.path.exists(absolute) else absolute


def read_sidecar(sidecar: str) -> Documents:
    if sidecar.endswith(TOKENS_SIDECAR_SUFFIX):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(sidecar)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise LmforgeError(f"cannot read token sidecar {sidecar}: {e}") from None
        metadata = table.schema.metadata or {}
        shard = _resolve_shard(sidecar, metadata.get(b"lmforge.shard", b"").decode(),
                               metadata.get(b"lmforge.shard_absolute", b"").decode())
        return Documents(
            ids=table.column("id").to_pylist(), sources=table.column("source").to_pylist(),
            starts=table.column("start").to_numpy().astype(np.int64),
            ends=table.column("end").to_numpy().astype(np.int64),
            lines=table.column("line").to_numpy().astype(np.int64), shards=[shard] * table.num_rows,
        )
    return _read_dolma_sidecar(sidecar)


def _read_dolma_sidecar(sidecar: str) -> Documents:
    """Dolma's `start,end,id,src,loc` rows; Dolma shuffles documents, so rows are sorted by offset here."""
    rows = []
    try:
        with gzip.open(sidecar, "rt", encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                if len(row) < 4:
                    raise LmforgeError(f"{sidecar}:{number}: expected start,end,id,src[,loc], got {row!r}")
                loc = int(row[4]) if len(row) > 4 and row[4].isdigit() else -1
                rows.append((int(row[0]), int(row[1]), row[2], row[3], loc))
    except (OSError, EOFError, ValueError) as e:
        raise LmforgeError(f"cannot read Dolma sidecar {sidecar}: {e}") from None
    rows.sort()
    # Dolma records the input file, not a source name, per document: it serves as both.
    return Documents(
        ids=[r[2] for r in rows], sources=[r[3] for r in rows],
        starts=np.array([r[0] for r in rows], dtype=np.int64), ends=np.array([r[1] for r in rows], dtype=np.int64),
        lines=np.array([r[4] for r in rows], dtype=np.int64), shards=[r[3] for r in rows],
    )
