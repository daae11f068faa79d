"""`lmforge data dedup`: duplicates become attributes; the mixer decides what to drop.

Modes (`<name>__<key>` attributes, score 1.0 unless noted):
  doc        `duplicate_doc`: the text equals an earlier document's (128-bit xxh3, exact in practice)
  url        `duplicate_url`: `metadata.url` (configurable) equals an earlier document's
  paragraph  `duplicate_paragraphs`: one span per line seen before (Bloom filter; blank lines never count)
  minhash    `near_duplicate`: [0, len, similarity] on every document of a near-duplicate cluster but the one
             kept (the first in source order); `cluster_id` ([0, len, the kept document's position in source
             order]) and `cluster_size` on every member of a cluster of two or more (`fuzzy.py`)
  substring  `duplicate_substrings`: one span per run of characters that repeats an earlier substring of at
             least `substring.min_bytes` bytes, the first occurrence kept (`substring.py`)
The first occurrence in source order survives, whatever the number of workers: workers only parse and
fingerprint shards; the main process checks and inserts in order (doc, url, paragraph), then clusters and finds
repeats over every shard at once (minhash, substring) and adds those keys to each shard's attribute file. Source
order is the order shards were absorbed into the state, then the sorted paths of this run. The state (Bloom
filter, exact hashes, MinHash fingerprints, and the shards already absorbed) is saved to `--state` so a later
run, e.g. a new crawl, is deduplicated against everything seen before; re-running the same shards skips them
instead of marking them all as duplicates of themselves. `substring` keeps no state: it sees the shards of the
run (those skipped as absorbed count as earlier text).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path

import numpy as np
import orjson
import xxhash

from lmforge.curation.attributes import (AttributeWriter, attribute_dir, attribute_path, read_attribute_rows,
                                         source_fingerprint)
from lmforge.curation.documents import InputConfig, ReadReport, input_shards, read_documents
from lmforge.core.executor import ExecutorConfig, iter_tasks
from lmforge.core.config import require, save_config, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest
from lmforge.core.files import TEMP_SUFFIX, atomic_directory, atomic_path, atomic_write_json, atomic_write_text
from lmforge.curation.fuzzy import (MinHashConfig, ShardFingerprints, cluster, fingerprint_key, read_meta,
                                    splitmix64)
from lmforge.curation.substring import SubstringConfig, repeated_spans

MODES = ("doc", "url", "paragraph", "minhash", "substring")
BLOOM_MAGIC = "lmforge-bloom"
_MASK64 = (1 << 64) - 1


@dataclass
class BloomConfig:
    expected_elements: int = 1_000_000
    false_positive_rate: float = 1e-6

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(0 < self.false_positive_rate < 1, "false_positive_rate", self.false_positive_rate, "must be in (0, 1)")
        require(self.expected_elements > 0, "expected_elements", self.expected_elements, "must be positive")


@dataclass
class DedupConfig:
    documents: list[str]
    modes: list[str] = field(default_factory=lambda: ["doc", "url", "paragraph"])
    name: str = "dedup"
    state: str | None = None
    read_only: bool = False
    url_key: str = "metadata.url"
    bloom: BloomConfig = field(default_factory=BloomConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    substring: SubstringConfig = field(default_factory=SubstringConfig)
    input: InputConfig = field(default_factory=InputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.documents), "documents", self.documents, "give at least one document glob")
        unknown = [m for m in self.modes if m not in MODES]
        require(bool(self.modes) and not unknown, "modes", self.modes,
                f"unknown dedup mode {unknown[0] if unknown else '(none given)'!r}; modes: {', '.join(MODES)}")


# ---------------------------------------------------------------- Bloom filter

BLOCK_WORDS = 8  # a block is one 64-byte cache line of 8 uint64 words
PROBES_PER_MIX = 10  # 6-bit bit positions taken from one 64-bit mix


def _probe_words(hashes: int) -> list[int]:
    """How many of the k probes land in each word of a block (probe i goes to word i mod 8)."""
    return [len(range(w, hashes, BLOCK_WORDS)) for w in range(BLOCK_WORDS)]


def blocked_false_positive_rate(bits: int, hashes: int, elements: int) -> float:
    """FP rate of the split-block filter below: block loads are Poisson, each word a small Bloom filter."""
    blocks = bits // (64 * BLOCK_WORDS)
    load = elements / blocks
    per_word = [k for k in _probe_words(hashes) if k]
    rate, j, term = 0.0, 0, math.exp(-load)
    while j < load + 12 * math.sqrt(load) + 60:
        hit = 1.0
        for k in per_word:
            hit *= (1 - (1 - 1 / 64) ** (j * k)) ** k
        rate += term * hit
        j += 1
        term *= load / j
    return rate


PROBE_CHUNK = 1 << 14  # keys located at once: their masks and rows stay in cache


class BloomFilter:
    """A split-block Bloom filter: each key picks one 512-bit block (a cache line) and sets k bits in it,
    probe i in word i mod 8, so a lookup or insert touches one cache line instead of k.

    k = round(log2(1/p)); the size starts from the standard m = -n ln p / (ln 2)^2 bits and grows by 5 % until
    the filter's false-positive rate for n keys is <= p (about 1.4x the standard size at p = 1e-6).
    A key's block grows with its mixed hash, so keys sorted by that hash visit the table front to back.
    """

    def __init__(self, bits: int, hashes: int, words: np.ndarray | None = None, inserted: int = 0):
        self.bits = int(bits)
        self.hashes = int(hashes)
        self.blocks = self.bits // (64 * BLOCK_WORDS)
        if self.blocks >= 1 << 32:  # the block is taken from the top 32 bits of the mix
            raise LmforgeError(f"a Bloom filter of {self.bits} bits is over the limit of 2^32 blocks (256 GiB)")
        self.words = words if words is not None else np.zeros(self.blocks * BLOCK_WORDS, dtype=np.uint64)
        self.inserted = inserted

    @classmethod
    def sized(cls, expected: int, false_positive_rate: float) -> "BloomFilter":
        hashes = max(1, round(-math.log2(false_positive_rate)))
        blocks = max(1, math.ceil(-expected * math.log(false_positive_rate) / math.log(2) ** 2 / 512))
        while blocked_false_positive_rate(blocks * 512, hashes, expected) > false_positive_rate:
            blocks = math.ceil(blocks * 1.05)
        return cls(blocks * 512, hashes)

    def estimated_false_positive_rate(self) -> float:
        return blocked_false_positive_rate(self.bits, self.hashes, self.inserted)

    @staticmethod
    def _mix(keys: np.ndarray) -> np.ndarray:
        return splitmix64(keys.astype(np.uint64, copy=False) ^ np.uint64(0x5851F42D4C957F2D))

    def _masks(self, mix: np.ndarray) -> np.ndarray:
        """(len(mix), 8) uint64: the k bits of each key in the 8 words of its block."""
        masks = np.zeros((len(mix), BLOCK_WORDS), dtype=np.uint64)
        for i in range(self.hashes):
            if i % PROBES_PER_MIX == 0:
                mix = splitmix64(mix)
            masks[:, i % BLOCK_WORDS] |= np.uint64(1) << ((mix >> np.uint64(6 * (i % PROBES_PER_MIX))) & np.uint64(63))
        return masks

    def _probe(self, mix: np.ndarray, add: bool) -> np.ndarray:
        """Whether each key (given by its mix, ascending and distinct) is in the filter before this call; with
        `add`, the absent ones are added. Chunks end where the block changes, so a chunk's additions never
        touch a block that a later chunk tests: every key is tested as if none of this call's were added."""
        # Lemire's multiply-shift range reduction: no 64-bit division, and monotone in the mix
        block = (((mix >> np.uint64(32)) * np.uint64(self.blocks)) >> np.uint64(32)).astype(np.intp)
        cuts = np.searchsorted(block, block[PROBE_CHUNK::PROBE_CHUNK])
        bounds = [0, *np.unique(cuts[cuts > 0]).tolist(), len(mix)]
        table = self.words.reshape(self.blocks, BLOCK_WORDS)
        present = np.empty(len(mix), dtype=bool)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            chunk_block, masks = block[lo:hi], self._masks(mix[lo:hi])
            found = ~np.bitwise_or.reduce(masks & ~table[chunk_block], axis=1).astype(bool)
            present[lo:hi] = found
            if add and not found.all():
                chunk_block, masks = chunk_block[~found], masks[~found]
                # `table[b] |= m` keeps only the last write of a repeated b: the masks of each block are ORed first
                starts = np.flatnonzero(np.r_[True, chunk_block[1:] != chunk_block[:-1]])
                table[chunk_block[starts]] |= np.bitwise_or.reduceat(masks, starts, axis=0)
        if add:
            self.inserted += int(np.count_nonzero(~present))
        return present

    def contains(self, keys: np.ndarray) -> np.ndarray:
        mix = self._mix(keys)
        distinct, inverse = np.unique(mix, return_inverse=True)
        return self._probe(distinct, add=False)[inverse.reshape(-1)]

    def insert(self, keys: np.ndarray, read_only: bool = False) -> np.ndarray:
        """Per key, in order: whether it was seen before, in the filter or earlier among `keys`; then the
        keys not in the filter are added to it (unless `read_only`). Every key is tested against the filter as
        it was before the call."""
        if len(keys) == 0:
            return np.zeros(0, dtype=bool)
        mix = self._mix(keys)
        order = np.argsort(mix)
        ordered = mix[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        first = np.minimum.reduceat(order, starts)  # the earliest of each distinct key
        seen = np.ones(len(keys), dtype=bool)
        seen[first] = self._probe(ordered[starts], add=not read_only)
        return seen

    def save(self, path: str | Path) -> None:
        header = json.dumps({"format": BLOOM_MAGIC, "version": 2, "layout": "split-block-512",
                             "bits": self.bits, "hashes": self.hashes, "inserted": self.inserted}).encode() + b"\n"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(self.words.astype("<u8", copy=False).tobytes())
                f.flush()
                os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | Path) -> "BloomFilter":
        with open(path, "rb") as f:
            try:
                header = json.loads(f.readline())
                assert header["format"] == BLOOM_MAGIC and header.get("layout") == "split-block-512"
            except (ValueError, KeyError, AssertionError):
                raise LmforgeError(f"{path} is not an lmforge Bloom filter (version 2)") from None
            data = f.read()
            words = np.frombuffer(data[:len(data) - len(data) % 8], dtype="<u8").astype(np.uint64)
        if len(words) != header["bits"] // 64:
            raise LmforgeError(f"{path}: truncated Bloom filter ({len(words)} words for {header['bits']} bits)")
        return cls(header["bits"], header["hashes"], words, header.get("inserted", 0))


# ---------------------------------------------------------------- per-shard fingerprints (parallel)

@dataclass
class FingerprintTask:
    doc_path: str
    modes: list[str]
    url_key: str
    minhash: MinHashConfig
    fingerprints: str | None = None  # where this shard's MinHash fingerprints go (mode minhash), unless there
    strict: bool = False
    weight: int = 0


def _get_path(doc: dict, dotted: str):
    value = doc
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def fingerprint_shard(task: FingerprintTask, progress) -> dict:
    with contextlib.ExitStack() as stack:
        minhash = None
        if task.fingerprints is not None and not Path(task.fingerprints).is_dir():  # else: from an interrupted run
            minhash = ShardFingerprints(stack.enter_context(atomic_directory(task.fingerprints)), task.minhash)
        result = _read_and_fingerprint(task, minhash, progress)
        if minhash is not None:
            minhash.finish()
    return result


def _read_and_fingerprint(task: FingerprintTask, minhash: ShardFingerprints | None, progress) -> dict:
    report = ReadReport()
    ids, doc_lines, lengths, sources, doc_hashes, url_hashes = [], [], [], [], [], []
    texts = []  # (paragraph mode) lines are split and hashed for the whole shard at once
    want_paragraphs = "paragraph" in task.modes
    for line, doc in read_documents(task.doc_path, report, task.strict):
        text = doc["text"]
        ids.append(doc["id"])
        doc_lines.append(line)
        lengths.append(len(text))
        sources.append(str(doc.get("source") or ""))
        if "doc" in task.modes:
            doc_hashes.append(xxhash.xxh3_128_intdigest(text.encode()))
        if "url" in task.modes:
            url = _get_path(doc, task.url_key)
            url_hashes.append(xxhash.xxh3_128_intdigest(url.encode()) if isinstance(url, str) and url else None)
        if want_paragraphs:
            texts.append(text)
        if minhash is not None:
            minhash.add(text)
        progress(1)

    result = {
        "doc_path": task.doc_path, "ids": ids, "lines": doc_lines, "lengths": lengths, "sources": sources,
        "doc_hashes": doc_hashes, "url_hashes": url_hashes,
        "read": report.counts(), "bad_lines": [str(b) for b in report.bad_lines],
        "truncated": [str(t) for t in report.truncated],
    }
    if want_paragraphs:
        result.update(_paragraph_table(texts, lengths))
    else:
        empty = np.zeros(0, dtype=np.int64)
        result.update(para_doc=empty, para_start=empty, para_end=empty, para_hash=np.zeros(0, dtype=np.uint64))
    return result


_VISIBLE_BYTE = np.array([b < 128 and not chr(b).isspace() for b in range(256)])  # ASCII, not `str.isspace`


def _paragraph_table(texts: list[str], doc_lengths: list[int]) -> dict:
    """Non-blank lines of a shard's documents: owning document, [start, end) in characters with the newline,
    and the xxh3-64 hash of the line's UTF-8 bytes. The documents are joined by newlines and measured as one
    byte array, so only splitting and hashing touch each line from Python."""
    joined = "\n".join(texts)
    data = joined.encode()
    raw = np.frombuffer(data, dtype=np.uint8)
    newline = np.flatnonzero(raw == 10)
    first_byte, end_byte = np.r_[0, newline + 1], np.r_[newline, len(data)]  # line i: [first_byte, end_byte)
    lines = data.split(b"\n")
    # a line that starts or ends with a visible ASCII character is not blank; the others are checked whole
    keep = np.zeros(len(lines), dtype=bool)
    filled = np.flatnonzero(end_byte > first_byte)
    visible = _VISIBLE_BYTE[raw[first_byte[filled]]] | _VISIBLE_BYTE[raw[end_byte[filled] - 1]]
    keep[filled[visible]] = True
    unsure = filled[~visible]
    keep[unsure] = [not lines[i].decode().isspace() for i in unsure.tolist()]
    line_offset, length = first_byte, end_byte - first_byte
    if not joined.isascii():  # in characters: less the continuation bytes of multi-byte characters
        high = np.flatnonzero(raw >= 0x80)
        continuation = high[(raw[high] & 0xC0) == 0x80]
        before = np.searchsorted(continuation, first_byte)  # a line ends where the next begins, less its newline
        line_offset, length = first_byte - before, length - (np.r_[before[1:], len(continuation)] - before)
    line_offset, length = line_offset[keep], length[keep]
    doc_length = np.array(doc_lengths, dtype=np.int64)
    doc_offset = np.cumsum(doc_length + 1) - (doc_length + 1)  # each document and its joining newline
    doc = np.searchsorted(doc_offset, line_offset, side="right") - 1
    start = line_offset - doc_offset[doc]
    end = np.minimum(start + length + 1, doc_length[doc])
    hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, compress(lines, keep.tolist())), dtype=np.uint64,
                         count=len(doc))
    return {"para_doc": doc, "para_start": start, "para_end": end, "para_hash": hashes}


# ---------------------------------------------------------------- state and the ordered pass

STATE_POINTER = "CURRENT"
STATE_FILES = ("state.json", "documents.npy", "urls.npy", "paragraphs.bloom", "minhash.npy")
GENERATION = re.compile(r"gen-(\d{8})")


class DedupState:
    """Everything seen so far, persisted under one directory as generations committed whole.

    `save` writes a new `gen-NNNNNNNN/` beside the current one and then swaps the one-line pointer file
    `CURRENT` (an atomic rename) to name it; only then are older generations removed. A kill or a full disk
    at any moment leaves `CURRENT` naming a complete generation, and a half-written one is ignored and removed
    by the next run that writes. A directory without `CURRENT` but with `state.json` is the layout before
    generations (files renamed one by one); it is read as it is and replaced by a generation on save.
    """

    def __init__(self, directory: Path, config: DedupConfig):
        self.directory = directory
        minhash = {k: v for k, v in to_dict(config.minhash).items() if k != "memory_mb"}  # memory may change
        self.params = {"modes": sorted(config.modes), "url_key": config.url_key,
                       "minhash": minhash if "minhash" in config.modes else None}
        self.absorbed: dict[str, dict] = {}
        self.docs: set[int] = set()
        self.urls: set[int] = set()
        self.bloom: BloomFilter | None = None
        self.cluster_stats: dict = {}  # the last clustering's counts, for the manifest of a run that skips all
        self.generation = self._current_generation()
        if not config.read_only:
            self._remove_other_generations()
        files = directory / self.generation if self.generation else directory
        meta_path = files / "state.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                meta["params"], meta["absorbed"]
            except (ValueError, KeyError, TypeError) as e:
                raise LmforgeError(f"corrupt dedup state {meta_path}: {e!r}") from None
            if meta["params"] != self.params:
                raise LmforgeError(f"dedup state {directory} was built with {meta['params']}, not {self.params}; "
                                   "use another --state (or --name) for different settings")
            self.absorbed = meta["absorbed"]
            self.cluster_stats = meta.get("cluster_stats") or {}
            self._load(files)
        elif self.generation:
            raise LmforgeError(f"corrupt dedup state {directory}: {STATE_POINTER} names {self.generation}, "
                               "which has no state.json")
        elif config.read_only:  # nothing to check against and nothing added: every document would pass
            raise LmforgeError(f"read_only needs an existing dedup state, but {meta_path} does not exist")
        elif "paragraph" in config.modes:
            self.bloom = BloomFilter.sized(config.bloom.expected_elements, config.bloom.false_positive_rate)

    def _current_generation(self) -> str | None:
        pointer = self.directory / STATE_POINTER
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise LmforgeError(f"corrupt dedup state pointer {pointer}: {e}") from None
        if not GENERATION.fullmatch(name) or not (self.directory / name).is_dir():
            raise LmforgeError(f"corrupt dedup state pointer {pointer}: {name[:40]!r} is not a generation here")
        return name

    def _remove_other_generations(self) -> None:
        """Generations other than the current one: half-written by a killed save, or superseded."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name != self.generation and GENERATION.fullmatch(path.name) and path.is_dir():
                shutil.rmtree(path)
        if self.generation:  # the files of the layout before generations, once a generation replaced them
            for name in STATE_FILES:
                (self.directory / name).unlink(missing_ok=True)

    def _load(self, d: Path) -> None:
        if (d / "documents.npy").is_file():
            self.docs = _ints_from_array(_load_array(d / "documents.npy"))
        if (d / "urls.npy").is_file():
            self.urls = _ints_from_array(_load_array(d / "urls.npy"))
        if (d / "paragraphs.bloom").is_file():
            self.bloom = BloomFilter.load(d / "paragraphs.bloom")

    def save(self) -> None:
        """Write the next generation, then point `CURRENT` at it, then remove the others."""
        number = int(GENERATION.fullmatch(self.generation).group(1)) + 1 if self.generation else 1
        d = self.directory / f"gen-{number:08d}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for name, values in (("documents.npy", self.docs), ("urls.npy", self.urls)):
            if values:
                _save_npy(d / name, _array_from_ints(values))
        if self.bloom is not None:
            self.bloom.save(d / "paragraphs.bloom")
        bloom = None
        if self.bloom is not None:
            b = self.bloom
            bloom = {"bits": b.bits, "hashes": b.hashes, "inserted": b.inserted,
                     "estimated_false_positive_rate": b.estimated_false_positive_rate()}
        atomic_write_json(d / "state.json", {"params": self.params, "absorbed": self.absorbed, "bloom": bloom,
                                             "documents": len(self.docs), "urls": len(self.urls),
                                             "cluster_stats": self.cluster_stats})
        atomic_write_text(self.directory / STATE_POINTER, d.name + "\n")
        self.generation = d.name
        self._remove_other_generations()
        self._remove_unused_fingerprints()

    @property
    def fingerprint_root(self) -> Path:
        """MinHash fingerprints of absorbed shards, one directory each, outside the generations: they are
        written once (by the workers), named by shard and settings, and found again by a resumed run."""
        return self.directory / "minhash"

    def _remove_unused_fingerprints(self) -> None:
        used = {record.get("fingerprints") for record in self.absorbed.values()}
        if self.fingerprint_root.is_dir():
            for path in self.fingerprint_root.iterdir():
                if path.name not in used:
                    shutil.rmtree(path, ignore_errors=True)


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (ValueError, EOFError) as e:
        raise LmforgeError(f"corrupt dedup state file {path}: {e}") from None


def _ints_from_array(array: np.ndarray) -> set[int]:
    return {(int(hi) << 64) | int(lo) for hi, lo in array}


def _array_from_ints(values: set[int]) -> np.ndarray:
    return np.array([[v >> 64, v & _MASK64] for v in sorted(values)], dtype=np.uint64).reshape(-1, 2)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())


def _paragraph_duplicates(fp: dict, state: DedupState, read_only: bool) -> np.ndarray:
    """Boolean per paragraph, with sequential check-then-insert semantics, vectorised over the shard."""
    return state.bloom.insert(fp["para_hash"], read_only)


def _seen_before(keys: list, seen: set, read_only: bool) -> list[bool]:
    """Per key, in order: whether `seen` holds it, which then adds it (unless `read_only`); None is never seen."""
    out = []
    for key in keys:
        dup = key is not None and key in seen
        if key is not None and not dup and not read_only:
            seen.add(key)
        out.append(dup)
    return out


def _encoded_spans(doc: np.ndarray, start: np.ndarray, end: np.ndarray, documents: int) -> list[bytes]:
    """Per document, the JSON of its spans `[[start,end,1.0],...]` as `orjson` writes it (`doc` ascending)."""
    encoded = [b"[]"] * documents
    bounds = np.searchsorted(doc, np.arange(documents + 1))
    pairs = np.stack([start, end], axis=1)
    for i in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
        # [[s,e],[s,e]] -> [[s,e,1.0],[s,e,1.0]]
        encoded[i] = orjson.dumps(pairs[bounds[i]:bounds[i + 1]], option=orjson.OPT_SERIALIZE_NUMPY)[:-1].replace(
            b"]", b",1.0]") + b"]"
    return encoded


def _absorb(fp: dict, state: DedupState, config: DedupConfig, writer: AttributeWriter, flags: np.ndarray) -> dict:
    """Check and insert one shard's documents (doc, url, paragraph: each in document order), write its
    attribute file, and set `flags[i]` for each document those modes mark as a whole."""
    n = len(fp["ids"])
    modes = config.modes
    stats = {"documents": n, "duplicate_docs": 0, "duplicate_urls": 0, "paragraphs": int(len(fp["para_hash"])),
             "duplicate_paragraphs": 0, "text_chars": sum(fp["lengths"]), "duplicate_paragraph_chars": 0}
    columns = []  # per attribute: `"name":value` of every document, encoded
    for mode, hashes, seen in (("doc", "doc_hashes", state.docs), ("url", "url_hashes", state.urls)):
        if mode in modes:
            dup = _seen_before(fp[hashes], seen, config.read_only)
            stats[f"duplicate_{mode}s"] = sum(dup)
            flags |= np.array(dup, dtype=bool)
            name = orjson.dumps(f"{config.name}__duplicate_{mode}") + b":"
            columns.append([name + (b"[[0,%d,1.0]]" % length if d else b"[]") for d, length in zip(dup, fp["lengths"])])
    if "paragraph" in modes:
        dup = _paragraph_duplicates(fp, state, config.read_only)
        doc, start, end = fp["para_doc"][dup], fp["para_start"][dup], fp["para_end"][dup]
        stats["duplicate_paragraphs"] = len(doc)
        stats["duplicate_paragraph_chars"] = int((end - start).sum())
        name = orjson.dumps(f"{config.name}__duplicate_paragraphs") + b":"
        columns.append([name + spans for spans in _encoded_spans(doc, start, end, n)])
    for doc_id, line, *values in zip(fp["ids"], fp["lines"], *columns):
        writer.write_encoded(doc_id, b"{" + b",".join(values) + b"}", line)
    flagged = Counter(source for source, f in zip(fp["sources"], flags.tolist()) if f)
    stats["per_source"] = {source: {"documents": count, "duplicate_documents": flagged[source]}
                           for source, count in Counter(fp["sources"]).items()}
    return stats


def _merge_stats(total: dict, part: dict) -> None:
    for k, v in part.items():
        if k == "per_source":
            for source, counts in v.items():
                into = total.setdefault("per_source", {}).setdefault(source, {})
                for ck, cv in counts.items():
                    into[ck] = into.get(ck, 0) + cv
        elif isinstance(v, (int, float)):
            total[k] = total.get(k, 0) + v


def _finish_totals(totals: dict) -> dict:
    for source in totals.get("per_source", {}).values():
        source["duplicate_rate"] = source["duplicate_documents"] / max(source["documents"], 1)
    if totals.get("text_chars"):
        totals["duplicate_paragraph_char_fraction"] = totals.get("duplicate_paragraph_chars", 0) / totals["text_chars"]
    return totals


def _unchanged(record: dict | None, path: str) -> bool:
    current = source_fingerprint(path)
    return record is not None and all(record.get(k) == current[k] for k in ("bytes", "mtime_ns"))


def run_dedup(config: DedupConfig) -> dict:
    paths, incomplete = input_shards(config.documents, config.input)
    state_dir = Path(config.state) if config.state else attribute_dir(paths[0], config.name) / ".state"
    state_written = [] if config.read_only else [state_dir]
    with output_lock(*state_written, *{attribute_dir(p, config.name) for p in paths}):
        return _run_dedup(config, paths, incomplete, state_dir)


def _run_dedup(config: DedupConfig, paths: list[str], incomplete: list[str], state_dir: Path) -> dict:
    state = DedupState(state_dir, config)
    # What each shard counted, from this run or, for a shard absorbed before, from the state's record of it.
    records = {p: state.absorbed[p].get("record", {}) for p in paths
               if not config.read_only and _unchanged(state.absorbed.get(p), p)
               and attribute_path(p, config.name).is_file()}
    todo = [p for p in paths if p not in records]
    # Source order: the shards absorbed by earlier runs, in the order they were, then this run's (sorted).
    earlier = [p for p in state.absorbed if p not in todo]
    with contextlib.ExitStack() as stack:
        fingerprints = None
        if "minhash" in config.modes:
            fingerprints = state.fingerprint_root
            if config.read_only:  # it adds nothing to the state: its fingerprints go to a temporary directory
                attribute_dir(paths[0], config.name).mkdir(parents=True, exist_ok=True)
                fingerprints = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix=".minhash.", suffix=TEMP_SUFFIX, dir=attribute_dir(paths[0], config.name))))
        tasks = [FingerprintTask(p, list(config.modes), config.url_key, config.minhash,
                                 str(fingerprints / fingerprint_key(p, config.minhash)) if fingerprints else None,
                                 config.input.strict, weight=Path(p).stat().st_size) for p in todo]
        totals: dict = {}
        truncated: list[str] = []
        shards: dict[str, dict] = {}  # what the whole-corpus modes need of each shard of this run
        for fp in iter_tasks(fingerprint_shard, tasks, config.executor, desc="dedup"):
            path = fp["doc_path"]
            flags = np.zeros(len(fp["ids"]), dtype=bool)
            with AttributeWriter(attribute_path(path, config.name)) as writer:
                stats = _absorb(fp, state, config, writer, flags)
            stats.update(fp["read"], shards=1)
            records[path] = {"counts": stats, "skipped": fp["bad_lines"]}
            truncated += fp["truncated"]
            sources = sorted(set(fp["sources"]))
            shards[path] = {"flags": flags, "lengths": np.array(fp["lengths"], dtype=np.int64),
                            "lines": np.array(fp["lines"], dtype=np.int64), "sources": sources,
                            "source_of": np.searchsorted(sources, fp["sources"]) if sources else flags}
        whole_corpus = {}
        if "minhash" in config.modes and tasks:
            whole_corpus["minhash"] = _cluster_shards(state, config, earlier, tasks, shards, records)
            state.cluster_stats = whole_corpus["minhash"]
        elif "minhash" in config.modes:
            whole_corpus["minhash"] = state.cluster_stats
        if "substring" in config.modes and tasks:
            whole_corpus["substring"] = _substring_shards(config, [p for p in earlier if p in paths] + todo,
                                                          shards, records)
        for path in todo:
            if "minhash" in config.modes or "substring" in config.modes:
                _add_whole_corpus_attributes(path, shards[path], config.name, records[path]["counts"])
            _merge_stats(totals, records[path]["counts"])
            if not config.read_only:
                state.absorbed.pop(path, None)  # a shard absorbed again moves to the end of the source order
                state.absorbed[path] = {k: v for k, v in source_fingerprint(path).items() if k != "path"} | {
                    "record": records[path]}
                if fingerprints is not None:
                    state.absorbed[path]["fingerprints"] = fingerprint_key(path, config.minhash)
    if not config.read_only and (tasks or not state.generation):  # (a state of the old layout is rewritten)
        state.save()
    keys = [f"{config.name}__{k}" for m, ks in ATTRIBUTE_KEYS.items() if m in config.modes for k in ks]
    for directory in sorted({attribute_dir(p, config.name) for p in paths}):
        inputs = [p for p in paths if attribute_dir(p, config.name) == directory]
        counts: dict = {"incomplete_shards": sum(attribute_dir(p, config.name) == directory for p in incomplete)}
        for p in inputs:
            _merge_stats(counts, records[p].get("counts", {}))
        save_config(config, directory)
        write_manifest(directory, command="data dedup", config=config, inputs=inputs, counts=_finish_totals(counts),
                       extra={"attribute_keys": keys, "state": str(state_dir), **whole_corpus,
                              "skipped": [b for p in inputs for b in records[p].get("skipped", [])][:100]})
    summary = {"shards": len(paths), "shards_run": len(tasks), "shards_skipped_done": len(paths) - len(tasks),
               "state": str(state_dir), **_finish_totals(totals), **whole_corpus,
               "bad_line_examples": [b for t in tasks for b in records[t.doc_path]["skipped"]][:10],
               "truncated": truncated, "incomplete_shards": incomplete}
    if state.bloom is not None:
        b = state.bloom
        summary["bloom_estimated_false_positive_rate"] = b.estimated_false_positive_rate()
        if b.inserted > config.bloom.expected_elements:
            summary["warning"] = (f"the Bloom filter holds {b.inserted} paragraphs, more than the "
                                  f"{config.bloom.expected_elements} it was sized for; raise --expected-paragraphs "
                                  "and start a new --state")
    return summary


ATTRIBUTE_KEYS = {"doc": ("duplicate_doc",), "url": ("duplicate_url",), "paragraph": ("duplicate_paragraphs",),
                  "minhash": ("near_duplicate", "cluster_id", "cluster_size"), "substring": ("duplicate_substrings",)}


def _cluster_shards(state: DedupState, config: DedupConfig, earlier: list[str], tasks: list[FingerprintTask],
                    shards: dict[str, dict], records: dict[str, dict]) -> dict:
    """Cluster every shard of the state and this run; give each shard of this run its documents' clusters."""
    directories = [state.fingerprint_root / state.absorbed[p]["fingerprints"] for p in earlier]
    directories += [Path(t.fingerprints) for t in tasks]
    clusters = cluster(directories, config.minhash)
    base = sum(read_meta(d)["documents"] for d in directories[:len(earlier)])
    for task in tasks:
        shard, counts = shards[task.doc_path], records[task.doc_path]["counts"]
        n = len(shard["lengths"])
        index = np.arange(base, base + n)
        shard["kept"], shard["size"] = clusters.kept[index], clusters.size[index]
        shard["similarity"], shard["removed"] = clusters.similarity[index], clusters.kept[index] != index
        counts["near_duplicates"] = int(np.count_nonzero(shard["removed"]))
        counts["too_short_for_ngram"] = read_meta(Path(task.fingerprints))["too_short_for_ngram"]
        base += n
    stats = clusters.stats
    stats["rejected_pair_rate"] = stats["rejected_pairs"] / max(stats["candidate_pairs"], 1)
    stats["documents_removed"] = stats["documents_in_clusters"] - stats["clusters"]
    return stats


def _substring_shards(config: DedupConfig, order: list[str], shards: dict[str, dict], records: dict) -> dict:
    """Find repeated substrings over the texts of `order` (every shard of the run, in source order). When they
    pass `substring.max_text_mb`, consecutive shards form groups of at most half of it, and each group is
    searched paired with every earlier one (`repeated_spans`): k groups take 1 + k (k - 1) / 2 suffix arrays."""
    limit = config.substring.max_text_mb * 2 ** 20
    report = ReadReport()

    def texts_of(paths: list[str]) -> list[bytes]:
        return [doc["text"].encode() for path in paths for _, doc in read_documents(path, report, config.input.strict)]

    held, sizes, documents = {}, {}, {}
    text_bytes = 0
    for path in order:
        texts = texts_of([path])
        sizes[path], documents[path] = sum(map(len, texts)), len(texts)
        text_bytes += sizes[path]
        if text_bytes <= limit:
            held[path] = texts
        else:
            held.clear()  # measured only, and read again group by group
    groups = [order] if held else _substring_groups(order, sizes, limit / 2, config.substring.max_text_mb)
    removed = 0
    for j, group in enumerate(groups):
        texts = [t for path in group for t in held[path]] if held else texts_of(group)
        spans, group_removed = repeated_spans(texts, config.substring.min_bytes,
                                              (texts_of(earlier) for earlier in groups[:j]))
        removed += group_removed
        start = 0
        for path in group:
            count = documents[path]
            if path in shards:
                shard = shards[path]
                shard["substrings"] = spans[start:start + count]
                counts = records[path]["counts"]
                counts["duplicate_substring_spans"] = sum(map(len, shard["substrings"]))
                counts["duplicate_substring_chars"] = sum(e - s for doc in shard["substrings"] for s, e in doc)
            start += count
    return {"min_bytes": config.substring.min_bytes, "text_bytes": text_bytes,
            "duplicate_substring_bytes": removed, "groups": len(groups)}


def _substring_groups(order: list[str], sizes: dict[str, int], group_limit: float,
                      max_text_mb: float) -> list[list[str]]:
    """Consecutive shards, as many as fit in `group_limit` bytes of text."""
    groups: list[list[str]] = [[]]
    size = 0
    for path in order:
        if sizes[path] > group_limit:
            raise LmforgeError(f"substring dedup: the text of {path} ({sizes[path] / 2 ** 20:.1f} MB) is more than "
                               f"half of substring.max_text_mb={max_text_mb:g}, what one group may hold when the "
                               "run is searched in groups; raise it or split the shard")
        if groups[-1] and size + sizes[path] > group_limit:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += sizes[path]
    return groups


def _add_whole_corpus_attributes(path: str, shard: dict, name: str, counts: dict) -> None:
    """Rewrite a shard's attribute file with the minhash and substring keys added, and count what they mark."""
    target = attribute_path(path, name)
    with AttributeWriter(target) as writer:
        for i, (doc_id, attributes, _) in enumerate(read_attribute_rows(target)):
            length = int(shard["lengths"][i])
            if "kept" in shard:
                clustered, removed = shard["size"][i] > 1, shard["removed"][i]
                attributes[f"{name}__near_duplicate"] = [[0, length, float(shard["similarity"][i])]] if removed else []
                attributes[f"{name}__cluster_id"] = [[0, length, float(shard["kept"][i])]] if clustered else []
                attributes[f"{name}__cluster_size"] = [[0, length, float(shard["size"][i])]] if clustered else []
                if removed and not shard["flags"][i]:
                    shard["flags"][i] = True
                    source = counts["per_source"][shard["sources"][shard["source_of"][i]]]
                    source["duplicate_documents"] += 1
            if "substrings" in shard:
                attributes[f"{name}__duplicate_substrings"] = [[s, e, 1.0] for s, e in shard["substrings"][i]]
            writer.write(doc_id, attributes, int(shard["lines"][i]))
