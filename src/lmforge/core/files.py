"""Atomic writes and content hashes: an output file is either its old bytes or its new ones, never half.

Every stage writes through these, so a kill at any moment leaves the last good output intact. A write the
filesystem refuses (disk full, quota, read-only, no permission) becomes one `OutputWriteError` naming the file
and the free space there. Temporaries are named `.NAME.<random>.tmp` beside their target, so the holder of a
directory's lock (`core/locks.py`) can recognise and remove the ones a killed run left (`remove_temps`).

Fault injection (docs/reliability.md): `LMFORGE_FAULT_ENOSPC_AT=N` makes the N-th guarded write of this process
fail with ENOSPC; `LMFORGE_FAULT_ENOSPC_PATH=TEXT` counts only writes whose path contains TEXT.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import xxhash

from lmforge.core.errors import LmforgeError, OutputWriteError

# Every file suffix lmforge reads or writes, defined once (formats in docs/formats.md).
DOCUMENT_SUFFIX_BY_COMPRESSION = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl", "parquet": ".parquet"}
DOCUMENT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".parquet")
ATTRIBUTE_SUFFIX = ".jsonl.gz"  # attributes of a Parquet shard are written as JSONL
TOKENS_SUFFIX = ".npy"  # headerless token memmaps
TOKENS_SIDECAR_SUFFIX = ".docs.parquet"  # lmforge's per-document sidecar of a token file
DOLMA_SIDECAR_SUFFIX = ".csv.gz"  # Dolma's per-document sidecar of a token file
TEMP_SUFFIX = ".tmp"  # temporaries are `.NAME.<random>.tmp` (or `.NAME.tmp`), hidden, beside their target
LOCK_NAME = ".lock"  # an output directory's lock file (core/locks.py)

# The filesystem refusing to store more, as opposed to a bug or a missing input.
REFUSED_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
NEARLY_FULL_BYTES = 1 << 20  # below this, a failed write without an errno is taken for a full disk
FAULT_AT_ENV = "LMFORGE_FAULT_ENOSPC_AT"
FAULT_PATH_ENV = "LMFORGE_FAULT_ENOSPC_PATH"
_guarded_writes = 0  # per process, for the fault-injection hook only


# safetensors saves through Rust's `tempfile` crate: `.tmp` and six random letters beside the file, then a rename.
_LIBRARY_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_temp_name(name: str) -> bool:
    return (name.startswith(".") and name.endswith(TEMP_SUFFIX)) or _LIBRARY_TEMP.fullmatch(name) is not None


def temp_name(name: str) -> str:
    """The fixed temporary name of `name` (for a temporary every rank must find, such as a checkpoint's)."""
    return f".{name}{TEMP_SUFFIX}"


def remove_temps(directory: str | Path) -> int:
    """Delete the temporaries under `directory`, except in subdirectories with a lock of their own; only the
    holder of `directory`'s lock may call this (it proves no one else is writing them). Returns how many."""
    removed = 0
    for root, dirs, files in os.walk(directory):
        for name in [d for d in dirs if is_temp_name(d)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
            removed += 1
        dirs[:] = [d for d in dirs if not os.path.exists(os.path.join(root, d, LOCK_NAME))]
        for name in files:
            if is_temp_name(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                removed += 1
    return removed


def free_bytes(path: str | Path) -> int | None:
    """Free space for an unprivileged user on the filesystem that holds (or would hold) `path`."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _inject_fault(path: Path) -> None:
    global _guarded_writes
    at = os.environ.get(FAULT_AT_ENV)
    if not at or os.environ.get(FAULT_PATH_ENV, "") not in str(path):
        return
    _guarded_writes += 1
    if _guarded_writes == int(at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {FAULT_AT_ENV}={at})")


def _refused_write(e: Exception, path: Path, own_paths) -> OutputWriteError | None:
    """`e` as the filesystem refusing to store `path`, or None when it is something else."""
    if isinstance(e, OutputWriteError):
        return e
    if isinstance(e, OSError) and e.errno is not None:
        ours = [str(p) for p in (path, *own_paths) if p is not None]
        if e.errno not in REFUSED_WRITE_ERRNOS or not (
                e.filename is None or str(e.filename) == str(path.parent)
                or any(str(e.filename) == p or str(e.filename).startswith(p + os.sep) for p in ours)):
            return None  # another failure, or about another file (an input read inside the block)
        return OutputWriteError(str(path), e.strerror or str(e), free_bytes(path.parent))
    # Some writers report a full disk without an errno (torch: "unexpected pos", safetensors: "os error 28",
    # numpy: "N requested and M written"): a write that failed on a filesystem with no room left is one.
    free = free_bytes(path.parent)
    if free is None or free >= NEARLY_FULL_BYTES or isinstance(e, LmforgeError):
        return None
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OutputWriteError(str(path), f"the filesystem is full ({detail})", free)


@contextlib.contextmanager
def writing(path: str | Path, *own_paths: str | Path) -> Iterator[None]:
    """Guard a write of `path` that does not go through `atomic_path` (DCP, torch.save, appends): the
    filesystem refusing it becomes an `OutputWriteError` naming `path`; `own_paths` (temporaries, directories
    written into) stand for it."""
    path = Path(path)
    try:
        _inject_fault(path)
        yield
    except Exception as e:
        refused = _refused_write(e, path, own_paths)
        if refused is None or refused is e:
            raise
        raise refused from None


class GuardedStream:
    """A binary stream whose refused writes (also the flush in `close`) raise `OutputWriteError` naming `path`
    at once, whatever the code around it does with the exception; for streaming writers into a temporary."""

    def __init__(self, stream, path: str | Path, *own_paths: str | Path):
        self._stream, self._path, self._own = stream, Path(path), own_paths

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            refused = _refused_write(e, self._path, self._own)
            if refused is None or refused is e:
                raise
            raise refused from None

    def write(self, data) -> int:
        return self._guarded(self._stream.write, data)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def close(self) -> None:
        self._guarded(self._stream.close)


def _default_mode(directory: bool = False) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it over `path` only if the block succeeds. An
    exception thrown in (also through `__exit__`, as streaming writers do) removes the temporary."""
    path = Path(path)
    tmp_path = None
    try:
        _inject_fault(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, _default_mode())  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp_path, path)
    except Exception as e:
        refused = _refused_write(e, path, [tmp_path])
        if refused is None or refused is e:
            raise
        raise refused from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | Path, keep: tuple[str, ...] = (LOCK_NAME,)) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `path` as a whole if the block succeeds: a reader sees
    the old set of files or the new one, never a mix. Entries named in `keep` (the lock) move across."""
    path = Path(path)
    staging = None
    try:
        _inject_fault(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
        yield staging
        os.chmod(staging, _default_mode(directory=True))  # mkdtemp creates 0700
        for name in keep:
            if (path / name).exists():
                os.replace(path / name, staging / name)
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old" + TEMP_SUFFIX, dir=path.parent))
            os.replace(path, aside / path.name)
            os.replace(staging, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, path)
    except Exception as e:
        refused = _refused_write(e, path, [staging])
        if refused is None or refused is e:
            raise
        raise refused from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_siblings(path: str | Path) -> None:
    """Delete the temporaries `atomic_directory(path)` left beside `path` (the caller holds `path`'s lock)."""
    path = Path(path)
    # mkdtemp's random part has no dots, so the staging directories of `a.b` are not taken for those of `a`
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]+(\.old)?{re.escape(TEMP_SUFFIX)}")
    if path.parent.is_dir():
        for sibling in path.parent.iterdir():
            if ours.fullmatch(sibling.name):
                shutil.rmtree(sibling, ignore_errors=True)


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


def truncate_step_log(path: str | Path, step: int) -> None:
    """Keep the rows of a JSON-lines log up to `step` (and rows without one): a run resumed from the checkpoint
    at `step` drops what its killed predecessor logged after it, so the log reads as one uninterrupted run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if not isinstance(row, dict) or row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


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
