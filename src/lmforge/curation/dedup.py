"""`lmforge data dedup`: duplicates become attributes; the mixer decides what to drop.

Modes (`<name>__<key>` attributes, score 1.0 unless noted):
  doc        `duplicate_doc`: the text equals an earlier document's (128-bit xxh3, exact in practice)
  url        `duplicate_url`: `metadata.url` (configurable) equals an earlier document's
  paragraph  `duplicate_paragraphs`: one span per line seen before (Bloom filter; blank lines never count)
  minhash    `near_duplicate`: [0, len, estimated Jaccard] when MinHash+LSH finds an earlier document with
             estimated Jaccard >= threshold over word n-grams
The first occurrence in (sorted) shard order survives, whatever the number of workers: workers only parse
and fingerprint shards; the main process checks and inserts in order. The state (Bloom filter, exact hashes,
MinHash index, and the shards already absorbed) is saved to `--state` so a later run, e.g. a new crawl, is
deduplicated against everything seen before; re-running the same shards skips them instead of marking them
all as duplicates of themselves.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from lmforge.curation.attributes import AttributeWriter, attribute_dir, attribute_path, source_fingerprint
from lmforge.curation.documents import InputConfig, ReadReport, input_shards, read_documents
from lmforge.core.executor import ExecutorConfig, iter_tasks
from lmforge.core.config import require, save_config, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest
from lmforge.core.files import atomic_path, atomic_write_json, atomic_write_text

MODES = ("doc", "url", "paragraph", "minhash")
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
class MinHashConfig:
    ngram: int = 5
    bands: int = 20
    rows: int = 5
    threshold: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("ngram", "bands", "rows"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(0 < self.threshold <= 1, "threshold", self.threshold, "must be in (0, 1]")


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

def _splitmix(h: np.ndarray) -> np.ndarray:
    z = h + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


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


def _all_set(rows: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return ~np.bitwise_or.reduce(masks & ~rows, axis=1).astype(bool)


class BloomFilter:
    """A split-block Bloom filter: each key picks one 512-bit block (a cache line) and sets k bits in it,
    probe i in word i mod 8, so a lookup or insert touches one cache line instead of k.

    k = round(log2(1/p)); the size starts from the standard m = -n ln p / (ln 2)^2 bits and grows by 5 % until
    the filter's false-positive rate for n keys is <= p (about 1.4x the standard size at p = 1e-6).
    """

    def __init__(self, bits: int, hashes: int, words: np.ndarray | None = None, inserted: int = 0):
        self.bits = int(bits)
        self.hashes = int(hashes)
        self.blocks = self.bits // (64 * BLOCK_WORDS)
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

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block of each key, (len(keys), 8) uint64 masks of its k bits)."""
        mix = _splitmix(keys.astype(np.uint64, copy=False) ^ np.uint64(0x5851F42D4C957F2D))
        if self.blocks < 1 << 32:  # Lemire's multiply-shift range reduction: no 64-bit division
            block = ((mix >> np.uint64(32)) * np.uint64(self.blocks)) >> np.uint64(32)
        else:
            block = mix % np.uint64(self.blocks)
        columns = [np.zeros(len(keys), dtype=np.uint64) for _ in range(BLOCK_WORDS)]
        for i in range(self.hashes):
            if i % PROBES_PER_MIX == 0:
                mix = _splitmix(mix)
            bit = (mix >> np.uint64(6 * (i % PROBES_PER_MIX))) & np.uint64(63)
            columns[i % BLOCK_WORDS] |= np.uint64(1) << bit
        return block.astype(np.intp), np.stack(columns, axis=1)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.zeros(0, dtype=bool)
        block, masks = self._locate(keys)
        table = self.words.reshape(self.blocks, BLOCK_WORDS)
        return _all_set(table[block], masks)

    def add(self, keys: np.ndarray) -> None:
        self.inserted += len(keys)
        if len(keys) == 0:
            return
        block, masks = self._locate(keys)
        table = self.words.reshape(self.blocks, BLOCK_WORDS)
        # `table[b] |= m` with a repeated b keeps only the last write: re-apply the few that got lost
        while len(block):
            table[block] |= masks
            lost = ~_all_set(table[block], masks)
            block, masks = block[lost], masks[lost]

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


# ---------------------------------------------------------------- MinHash

def word_ngram_hashes(text: str, n: int) -> np.ndarray:
    """Deterministic 64-bit hashes of the lowercased whitespace-word n-grams (one n-gram if fewer words)."""
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, map(str.encode, words)), dtype=np.uint64, count=len(words))
    if len(words) < n:
        n = len(words)
    rolled = hashes
    for k in range(1, n):
        rolled = rolled[:-1] * np.uint64(0x9E3779B97F4A7C15) + hashes[k:]
    return np.unique(rolled)


class MinHasher:
    """h_i(x) = top 32 bits of (a_i x + b_i) mod 2^64 (multiply-shift), a_i odd; signature = min over shingles."""

    def __init__(self, permutations: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2 ** 63, size=permutations, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2 ** 63, size=permutations, dtype=np.uint64)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        sig = np.full(len(self.a), np.iinfo(np.uint32).max, dtype=np.uint32)
        for i in range(0, len(shingles), 2048):
            block = shingles[i:i + 2048, None] * self.a[None, :] + self.b[None, :]
            np.minimum(sig, (block >> np.uint64(32)).min(axis=0).astype(np.uint32), out=sig)
        return sig


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(docs, bands) uint64 keys: each band's rows hashed together."""
    grouped = signatures.reshape(len(signatures), bands, rows).astype(np.uint64)
    key = np.zeros(grouped.shape[:2], dtype=np.uint64)
    for r in range(rows):
        key = _splitmix(key ^ grouped[:, :, r])
    return key


# ---------------------------------------------------------------- per-shard fingerprints (parallel)

@dataclass
class FingerprintTask:
    doc_path: str
    modes: list[str]
    url_key: str
    minhash: MinHashConfig
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
    report = ReadReport()
    ids, doc_lines, lengths, sources, doc_hashes, url_hashes, signatures = [], [], [], [], [], [], []
    line_lengths, line_hashes, line_blank, lines_per_doc = [], [], [], []
    hasher = MinHasher(task.minhash.bands * task.minhash.rows, task.minhash.seed) if "minhash" in task.modes else None
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
            # per-line work stays in C (map); offsets are computed for the whole shard at once below
            lines = text.split("\n")
            lines_per_doc.append(len(lines))
            line_lengths.extend(map(len, lines))
            line_blank.extend(map(str.isspace, lines))
            line_hashes.extend(map(xxhash.xxh3_64_intdigest, map(str.encode, lines)))
        if hasher is not None:
            signatures.append(hasher.signature(word_ngram_hashes(text, task.minhash.ngram)))
        progress(1)

    result = {
        "doc_path": task.doc_path, "ids": ids, "lines": doc_lines, "lengths": lengths, "sources": sources,
        "doc_hashes": doc_hashes, "url_hashes": url_hashes,
        "signatures": np.stack(signatures) if signatures else None,
        "read": report.counts(), "bad_lines": [str(b) for b in report.bad_lines],
        "truncated": [str(t) for t in report.truncated],
    }
    if want_paragraphs:
        result.update(_paragraph_table(line_lengths, line_hashes, line_blank, lines_per_doc, lengths))
    else:
        empty = np.zeros(0, dtype=np.int64)
        result.update(para_doc=empty, para_start=empty, para_end=empty, para_hash=np.zeros(0, dtype=np.uint64))
    return result


def _paragraph_table(line_lengths, line_hashes, line_blank, lines_per_doc, doc_lengths) -> dict:
    """Non-blank lines of a shard: owning document, [start, end) with the newline, and hash."""
    length = np.array(line_lengths, dtype=np.int64)
    doc = np.repeat(np.arange(len(lines_per_doc), dtype=np.int64), lines_per_doc)
    doc_length = np.array(doc_lengths, dtype=np.int64)
    # every line takes length + 1 (its newline, real or not), so each document takes doc_length + 1
    doc_offset = np.concatenate(([0], np.cumsum(doc_length + 1)[:-1]))
    start = np.cumsum(length + 1) - (length + 1) - doc_offset[doc]
    end = np.minimum(start + length + 1, doc_length[doc])
    keep = (length > 0) & ~np.array(line_blank, dtype=bool)
    return {"para_doc": doc[keep], "para_start": start[keep], "para_end": end[keep],
            "para_hash": np.array(line_hashes, dtype=np.uint64)[keep]}


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
        self.params = {"modes": sorted(config.modes), "url_key": config.url_key,
                       "minhash": to_dict(config.minhash) if "minhash" in config.modes else None}
        self.absorbed: dict[str, dict] = {}
        self.docs: set[int] = set()
        self.urls: set[int] = set()
        self.bloom: BloomFilter | None = None
        self.signatures: list[np.ndarray] = []
        self.lsh: dict[tuple[int, int], int] = {}
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
        if (d / "minhash.npy").is_file():
            signatures = _load_array(d / "minhash.npy")
            mh = self.params["minhash"]
            self.signatures = list(signatures)
            for index, keys in enumerate(band_keys(signatures, mh["bands"], mh["rows"])):
                for band, key in enumerate(keys.tolist()):
                    self.lsh.setdefault((band, key), index)

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
        if self.signatures:
            _save_npy(d / "minhash.npy", np.stack(self.signatures))
        bloom = None
        if self.bloom is not None:
            b = self.bloom
            bloom = {"bits": b.bits, "hashes": b.hashes, "inserted": b.inserted,
                     "estimated_false_positive_rate": b.estimated_false_positive_rate()}
        atomic_write_json(d / "state.json", {"params": self.params, "absorbed": self.absorbed, "bloom": bloom,
                                             "documents": len(self.docs), "urls": len(self.urls),
                                             "minhash_documents": len(self.signatures)})
        atomic_write_text(self.directory / STATE_POINTER, d.name + "\n")
        self.generation = d.name
        self._remove_other_generations()


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
    hashes = fp["para_hash"]
    if len(hashes) == 0:
        return np.zeros(0, dtype=bool)
    _, first = np.unique(hashes, return_index=True)
    is_first = np.zeros(len(hashes), dtype=bool)
    is_first[first] = True
    duplicate = ~is_first
    first_hashes = hashes[is_first]
    seen = state.bloom.contains(first_hashes)
    duplicate[np.flatnonzero(is_first)[seen]] = True
    if not read_only:
        state.bloom.add(first_hashes[~seen])
    return duplicate


def _absorb(fp: dict, state: DedupState, config: DedupConfig, writer: AttributeWriter) -> dict:
    key = config.name
    n = len(fp["ids"])
    modes = config.modes
    para_dup = _paragraph_duplicates(fp, state, config.read_only) if "paragraph" in modes else None
    para_spans: list[list[list[float]]] = [[] for _ in range(n)]
    if para_dup is not None:
        for d, s, e in zip(fp["para_doc"][para_dup].tolist(), fp["para_start"][para_dup].tolist(),
                           fp["para_end"][para_dup].tolist()):
            para_spans[d].append([s, e, 1.0])
    keys = band_keys(fp["signatures"], config.minhash.bands, config.minhash.rows).tolist() \
        if "minhash" in modes and fp["signatures"] is not None else None
    stats = {"documents": n, "duplicate_docs": 0, "duplicate_urls": 0, "near_duplicates": 0,
             "paragraphs": int(len(fp["para_hash"])),
             "duplicate_paragraphs": int(para_dup.sum()) if para_dup is not None else 0,
             "text_chars": sum(fp["lengths"]), "duplicate_paragraph_chars": 0}
    per_source: dict[str, dict] = {}
    for i in range(n):
        length = fp["lengths"][i]
        attributes: dict[str, list] = {}
        flagged = False
        if "doc" in modes:
            h = fp["doc_hashes"][i]
            dup = h in state.docs
            if not dup and not config.read_only:
                state.docs.add(h)
            attributes[f"{key}__duplicate_doc"] = [[0, length, 1.0]] if dup else []
            stats["duplicate_docs"] += dup
            flagged |= dup
        if "url" in modes:
            h = fp["url_hashes"][i]
            dup = h is not None and h in state.urls
            if h is not None and not dup and not config.read_only:
                state.urls.add(h)
            attributes[f"{key}__duplicate_url"] = [[0, length, 1.0]] if dup else []
            stats["duplicate_urls"] += dup
            flagged |= dup
        if para_dup is not None:
            attributes[f"{key}__duplicate_paragraphs"] = para_spans[i]
            stats["duplicate_paragraph_chars"] += sum(e - s for s, e, _ in para_spans[i])
        if keys is not None:
            signature = fp["signatures"][i]
            best = 0.0
            for band, band_key in enumerate(keys[i]):
                other = state.lsh.get((band, band_key))
                if other is not None:
                    best = max(best, estimated_jaccard(signature, state.signatures[other]))
            dup = best >= config.minhash.threshold
            attributes[f"{key}__near_duplicate"] = [[0, length, best]] if dup else []
            stats["near_duplicates"] += dup
            flagged |= dup
            if not config.read_only:
                index = len(state.signatures)
                state.signatures.append(signature)
                for band, band_key in enumerate(keys[i]):
                    state.lsh.setdefault((band, band_key), index)
        source = per_source.setdefault(fp["sources"][i], {"documents": 0, "duplicate_documents": 0})
        source["documents"] += 1
        source["duplicate_documents"] += flagged
        writer.write(fp["ids"][i], attributes, fp["lines"][i])
    stats["per_source"] = per_source
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
    tasks = [FingerprintTask(p, list(config.modes), config.url_key, config.minhash, config.input.strict,
                             weight=Path(p).stat().st_size) for p in paths if p not in records]
    executor = config.executor
    totals: dict = {}
    truncated: list[str] = []
    for fp in iter_tasks(fingerprint_shard, tasks, executor, desc="dedup"):
        with AttributeWriter(attribute_path(fp["doc_path"], config.name)) as writer:
            stats = _absorb(fp, state, config, writer)
        stats.update(fp["read"], shards=1)
        records[fp["doc_path"]] = {"counts": stats, "skipped": fp["bad_lines"]}
        truncated += fp["truncated"]
        _merge_stats(totals, stats)
        if not config.read_only:
            state.absorbed[fp["doc_path"]] = {k: v for k, v in source_fingerprint(fp["doc_path"]).items()
                                             if k != "path"} | {"record": records[fp["doc_path"]]}
    if not config.read_only and (tasks or not state.generation):  # (a state of the old layout is rewritten)
        state.save()
    keys = [f"{config.name}__{k}" for m, k in (("doc", "duplicate_doc"), ("url", "duplicate_url"),
                                              ("paragraph", "duplicate_paragraphs"), ("minhash", "near_duplicate"))
            if m in config.modes]
    for directory in sorted({attribute_dir(p, config.name) for p in paths}):
        inputs = [p for p in paths if attribute_dir(p, config.name) == directory]
        counts: dict = {"incomplete_shards": sum(attribute_dir(p, config.name) == directory for p in incomplete)}
        for p in inputs:
            _merge_stats(counts, records[p].get("counts", {}))
        save_config(config, directory)
        write_manifest(directory, command="data dedup", config=config, inputs=inputs, counts=_finish_totals(counts),
                       extra={"attribute_keys": keys, "state": str(state_dir),
                              "skipped": [b for p in inputs for b in records[p].get("skipped", [])][:100]})
    summary = {"shards": len(paths), "shards_run": len(tasks), "shards_skipped_done": len(paths) - len(tasks),
               "state": str(state_dir), **_finish_totals(totals),
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
