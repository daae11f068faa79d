"""The quickstart's raw documents: the Python sources and documentation installed with this Python, or the
user's own Dolma documents (`--documents GLOB`).

Built-in sources, each a Dolma `source`:
  stdlib-code    the standard library's .py files
  packages-code  the .py files of every installed package (site-packages)
  docstrings     module, class and function docstrings of the code files taken (English prose)
  package-docs   the packages' .md, .rst and .txt files and the descriptions in their METADATA

Selection is deterministic: files are taken in the order of a hash of their path (so every package has its
chance, whatever the file system's order) until each source's share of `raw_bytes` is full. A file is held
out, with every document made from it (its code and its docstrings), when that hash says so (1 in 20), until
the source's held-out share is full: held-out text never reaches training. Held-out files are at most an
eighth of that share, so it comes from several files. Test folders, caches and files
over `MAX_FILE_BYTES` are passed over.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash

from lmforge.core.errors import LmforgeError
from lmforge.core.manifest import write_manifest
from lmforge.curation.documents import DocumentWriter, ReadReport, expand_globs, read_documents, strip_suffix, \
    text_bytes

HELD_OUT_EVERY = 20
HELD_OUT_MIN_FILES = 8
MAX_FILE_BYTES = 256_000
SKIP_DIRS = {"test", "tests", "idle_test", "testing", "__pycache__", "site-packages", "dist-packages"}
DOC_SUFFIXES = (".md", ".rst", ".txt")
# Shares of the raw bytes per file-based source; docstrings come on top, from the code taken.
SHARES = {"stdlib-code": 0.3, "packages-code": 0.45, "package-docs": 0.25}
SHARDS_PER_SOURCE = 2
ADDED = "2026-01-01T00:00:00.000Z"


@dataclass
class Candidate:
    source: str
    key: str  # where the file is, relative to its root: "stdlib/json/decoder.py", "packages/numpy/..."
    path: Path
    size: int

    @property
    def digest(self) -> int:
        return xxhash.xxh3_64_intdigest(self.key.encode())


def _walk(root: Path, label: str, keep) -> Iterator[tuple[str, Path, int]]:
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            path = Path(directory, name)
            if keep(path):
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if 0 < size <= MAX_FILE_BYTES:
                    yield f"{label}/{path.relative_to(root).as_posix()}", path, size


def candidates() -> list[Candidate]:
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    out = [Candidate("stdlib-code", key, path, size) for key, path, size in _walk(stdlib, "stdlib", _is_python)]
    for root in sorted({paths["purelib"], paths["platlib"]}):
        for key, path, size in _walk(Path(root), "packages", lambda p: _is_python(p) or _is_package_doc(p)):
            out.append(Candidate("packages-code" if _is_python(path) else "package-docs", key, path, size))
    return out


def _is_python(path: Path) -> bool:
    return path.suffix == ".py"


def _is_package_doc(path: Path) -> bool:
    return path.name == "METADATA" and path.parent.name.endswith(".dist-info") or (
        path.suffix in DOC_SUFFIXES and not path.parent.name.endswith(".dist-info"))


def package_doc_text(candidate: Candidate) -> str:
    text = candidate.path.read_text(encoding="utf-8")
    if candidate.path.name == "METADATA":  # the long description follows the headers' blank line
        text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    return text.strip()


def docstrings(tree: ast.AST) -> str:
    found = [ast.get_docstring(node) for node in ast.walk(tree)
             if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in found if d and len(d.split()) >= 5)


def documents_of(candidate: Candidate) -> list[dict]:
    """The documents one file gives (none when it is not UTF-8 or not Python 3)."""
    doc_id = f"{candidate.digest:016x}"
    meta = {"path": candidate.key}
    try:
        if candidate.source == "package-docs":
            text = package_doc_text(candidate)
            return [{"id": f"docs-{doc_id}", "text": text, "source": candidate.source, "metadata": meta}
                    ] if text else []
        source = candidate.path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return []
    docs = [{"id": f"code-{doc_id}", "text": source, "source": candidate.source, "metadata": meta}]
    prose = docstrings(tree)
    if prose:
        docs.append({"id": f"prose-{doc_id}", "text": prose, "source": "docstrings", "metadata": meta})
    return docs


def python_documents(raw_bytes: int, heldout_bytes: int) -> tuple[list[dict], list[dict], dict]:
    """(training documents, held-out documents, counts per source) from the installed Python files."""
    train: list[dict] = []
    heldout: list[dict] = []
    counts: dict[str, dict] = {}
    pools = {source: [] for source in SHARES}
    for candidate in candidates():
        pools[candidate.source].append(candidate)
    for source, pool in pools.items():
        quota = SHARES[source] * raw_bytes
        taken = {"train": 0, "heldout": 0}
        row = counts.setdefault(source, {"files_found": len(pool), "files_unreadable": 0})
        for candidate in sorted(pool, key=lambda c: (c.digest, c.key)):
            held = candidate.digest % HELD_OUT_EVERY == 0
            if held and candidate.size > heldout_bytes // HELD_OUT_MIN_FILES:
                continue  # so that the held-out bytes come from several files, not one or two large ones
            split = "heldout" if held else "train"
            if taken[split] >= (heldout_bytes if held else quota):
                if taken["train"] >= quota and taken["heldout"] >= heldout_bytes:
                    break
                continue
            docs = documents_of(candidate)
            if not docs:
                row["files_unreadable"] += 1
                continue
            (heldout if held else train).extend(docs)
            taken[split] += text_bytes(docs[0]["text"])
    for split, docs in (("", train), ("heldout_", heldout)):
        for doc in docs:
            row = counts.setdefault(doc["source"], {})
            row[f"{split}documents"] = row.get(f"{split}documents", 0) + 1
            row[f"{split}bytes"] = row.get(f"{split}bytes", 0) + text_bytes(doc["text"])
    return train, heldout, counts


def is_heldout_id(doc_id) -> bool:
    """One document (or item) in HELD_OUT_EVERY, by a hash of its id: held out from training, for evaluation."""
    return xxhash.xxh3_64_intdigest(str(doc_id).encode()) % HELD_OUT_EVERY == 0


def check_user_documents(pattern: str) -> list[str]:
    """The files `--documents` names, refused (one line) when none match or none has a usable document."""
    try:
        paths = expand_globs([pattern])
    except LmforgeError:
        raise LmforgeError(f"--documents {pattern!r} matches no file") from None
    report = ReadReport()
    for path in paths:
        for _, doc in read_documents(path, report):
            if doc["text"].strip():
                return paths
    first = f"; first: {report.bad_lines[0]}" if report.bad_lines else ""
    raise LmforgeError(f"--documents {pattern!r}: no usable text in {len(paths)} file(s) ({report.skipped} bad "
                       f"lines skipped, the rest empty){first}")


def user_documents(paths: list[str], raw_bytes: int, heldout_bytes: int) -> tuple[list[dict], list[dict], dict]:
    """The user's documents, in file order, until `raw_bytes`; 1 in 20 held out (by a hash of its id) until
    each source's `heldout_bytes`. A document without `source` takes its file's name."""
    train: list[dict] = []
    heldout: list[dict] = []
    counts: dict[str, dict] = {}
    report = ReadReport()
    total = 0
    for path in paths:
        for _, doc in read_documents(path, report):
            if total >= raw_bytes:
                break
            if not doc["text"].strip():
                continue
            source = str(doc.get("source") or strip_suffix(path))
            row = counts.setdefault(source, {"documents": 0, "bytes": 0, "heldout_documents": 0, "heldout_bytes": 0})
            size = text_bytes(doc["text"])
            doc = {**doc, "source": source}
            if is_heldout_id(doc["id"]) and row["heldout_bytes"] < heldout_bytes:
                heldout.append(doc)
                row["heldout_documents"] += 1
                row["heldout_bytes"] += size
            else:
                train.append(doc)
                row["documents"] += 1
                row["bytes"] += size
                total += size
    if not heldout:
        raise LmforgeError(f"--documents: none of the {len(train):,} documents read fell into the held-out 1 in "
                           f"{HELD_OUT_EVERY}; give more documents")
    counts["skipped_lines"] = report.skipped
    return train, heldout, counts


def write_corpus(out: Path, train: list[dict], heldout: list[dict], counts: dict, config: dict,
                 inputs: list[str]) -> None:
    """`out/raw/documents/<source>-NNNN.jsonl.gz` (training) and `out/heldout/<source>-0000.jsonl.gz`."""
    by_source: dict[str, list[dict]] = {}
    for doc in train:
        by_source.setdefault(doc["source"], []).append(doc)
    for source, docs in by_source.items():
        for shard in range(SHARDS_PER_SOURCE):
            with DocumentWriter(out / "raw" / "documents" / f"{source}-{shard:04d}.jsonl.gz") as writer:
                for doc in docs[shard::SHARDS_PER_SOURCE]:
                    writer.write({"added": ADDED, "created": None, **doc})
    held: dict[str, list[dict]] = {}
    for doc in heldout:
        held.setdefault(doc["source"], []).append(doc)
    for source, docs in held.items():
        with DocumentWriter(out / "heldout" / f"{source}-0000.jsonl.gz") as writer:
            for doc in docs:
                writer.write({"added": ADDED, "created": None, **doc})
    write_manifest(out / "raw", command="quickstart corpus", config=config, inputs=inputs,
                   counts={"sources": counts, "documents": len(train), "heldout_documents": len(heldout)})


def write_raw_corpus(out: Path, raw_bytes: int, heldout_bytes: int = 100_000) -> dict:
    """The built-in corpus of installed Python files under `out` (as `make quickstart` leaves it)."""
    train, heldout, counts = python_documents(raw_bytes, heldout_bytes)
    write_corpus(out, train, heldout, counts, {"raw_bytes": raw_bytes, "heldout_bytes_per_source": heldout_bytes},
                 [])
    return counts
