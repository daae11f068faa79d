"""The manifest every output directory carries.

`manifest.json` records what made a directory: the command, the resolved config, lmforge's version and git
commit, every input file with its size and xxh3 hash, and free-form counts (documents, tokens, skipped
lines...). With it an artifact can be traced back to its inputs and rebuilt.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Any

import lmforge
from lmforge.core.config import to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, file_hash

MANIFEST_NAME = "manifest.json"


def git_commit() -> str | None:
    """Commit of the lmforge source tree, or None when it is not a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5,
    )
    return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def describe_inputs(paths: list[str | Path], hash_files: bool = True) -> list[dict]:
    entries = []
    for p in sorted({str(p) for p in paths}):
        path = Path(p)
        entry: dict[str, Any] = {"path": str(path)}
        if path.is_file():
            entry["bytes"] = path.stat().st_size
            if hash_files:
                entry["hash"] = file_hash(path)
        entries.append(entry)
    return entries


def write_manifest(
    directory: str | Path,
    *,
    command: str,
    config: Any = None,
    inputs: list[str | Path] | None = None,
    counts: dict | None = None,
    extra: dict | None = None,
) -> Path:
    directory = Path(directory)
    manifest = {
        "command": command,
        "lmforge_version": lmforge.__version__,
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(config) if config is not None else None,
        "inputs": describe_inputs(inputs or []),
        "counts": counts or {},
    }
    if extra:
        manifest.update(extra)
    path = directory / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def read_json(path: str | Path, missing: str) -> dict:
    """A JSON file the user's workflow produced; `missing` says what its absence means."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(missing) from None
    except ValueError as e:  # malformed JSON or not UTF-8
        raise LmforgeError(f"corrupt {path}: {e}") from None


def read_manifest(directory: str | Path) -> dict:
    return read_json(Path(directory) / MANIFEST_NAME, f"no {MANIFEST_NAME} in {directory}")
