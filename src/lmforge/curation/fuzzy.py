"""Fuzzy (MinHash) dedup with verified candidate pairs and union-find clusters, in bounded memory.

Three steps, as in datatrove's and Dolma 3's pipelines:
  1. per shard (in the executor's workers): each document's set of word n-gram hashes (its shingles), a MinHash
     signature of `bands * rows` values, and one key per band; the (key, document) pairs are sorted per band
     and spilled to run files whenever they exceed the memory limit (`ShardFingerprints`);
  2. per band, the runs of every shard are merged (a k-way merge that holds a bounded slice of each run), and
     documents that share a key are candidate pairs;
  3. each candidate pair is verified (exact Jaccard of the shingle sets, or the signatures' estimate) and the
     accepted pairs join documents in a union-find; a connected component is a cluster, and its document that
     comes first in source order is kept.
A pair is only verified when its two documents are not already in one cluster, so exact duplicates cost one
verification each, not one per pair of the group, and a pair found dissimilar is remembered (the rejected pairs
are held in memory), so `candidate_pairs` and `rejected_pairs` count distinct pairs. Documents with fewer words than the n-gram size have no
shingle: they are counted (`too_short_for_ngram`) and never join a cluster.
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import xxhash

from lmforge.core.config import require

MINHASH_PRESETS = {
    "dolma3": {"ngram": 5, "bands": 26, "rows": 11},  # Dolma 3 (OLMo 3): 5-grams, 26 x 11, exact Jaccard >= 0.8
    "datatrove": {"ngram": 5, "bands": 14, "rows": 8},  # datatrove 0.10.1's MinhashConfig defaults
}
SIGNATURE_BLOCK_ROWS = 4096  # shingles hashed at once: a (rows, permutations) uint64 block of ~9 MB at 286
RUN_ENTRY_BYTES = 12  # a spilled (band key uint64, document uint32) pair
_MASK32 = np.uint64(0xFFFFFFFF)


@dataclass
class MinHashConfig:
    """`minhash:` of `data dedup`. `ngram`, `bands` and `rows` left unset take the preset's values."""

    preset: str = "dolma3"
    ngram: int | None = None
    bands: int | None = None
    rows: int | None = None
    threshold: float = 0.8
    verify: Literal["exact", "estimate"] = "exact"  # exact Jaccard of the shingle sets, or the MinHash estimate
    strip_punctuation: bool = False  # punctuation (Unicode category P, BMP) becomes a space before words split
    memory_mb: float = 1024.0  # bound on spilled band keys held at once (per worker, and by the merge)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.preset in MINHASH_PRESETS, "preset", self.preset,
                f"must be one of {', '.join(MINHASH_PRESETS)}")
        for name, value in MINHASH_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        for name in ("ngram", "bands", "rows"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, getattr(self, name),
                    "must be >= 1")
        require(0 < self.threshold <= 1, "threshold", self.threshold, "must be in (0, 1]")
        require(self.verify in ("exact", "estimate"), "verify", self.verify, "must be 'exact' or 'estimate'")
        require(self.memory_mb > 0, "memory_mb", self.memory_mb, "must be positive")

    @property
    def run_entries(self) -> int:
        """(key, document) pairs held before a run is spilled, and by the merge at once."""
        return max(self.bands, int(self.memory_mb * 2 ** 20) // RUN_ENTRY_BYTES)


@functools.cache
def _punctuation_to_space() -> dict[int, str]:
    """The punctuation of the Basic Multilingual Plane (the planes above hold almost none; scanning them too would
    take seconds per worker)."""
    return {c: " " for c in range(0x10000) if unicodedata.category(chr(c)).startswith("P")}


def word_ngram_hashes(text: str, n: int, strip_punctuation: bool = False) -> np.ndarray:
    """Sorted unique 64-bit hashes of the lowercased whitespace-word n-grams; empty with fewer than n words."""
    if strip_punctuation:
        text = text.translate(_punctuation_to_space())
    words = text.lower().split()
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    rolled = hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, map(str.encode, words)), dtype=np.uint64,
                                  count=len(words))
    for k in range(1, n):
        rolled = rolled[:-1] * np.uint64(0x9E3779B97F4A7C15) + hashes[k:]
    return np.unique(rolled)


def splitmix64(h: np.ndarray) -> np.ndarray:
    z = h + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class MinHasher:
    """h_i(x) = top 32 bits of (a_i x + b_i) mod 2^64 (multiply-shift), a_i odd; signature = min over shingles."""

    def __init__(self, permutations: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2 ** 63, size=permutations, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2 ** 63, size=permutations, dtype=np.uint64)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        return self.signatures(shingles, np.array([len(shingles)]))[0]

    def signatures(self, flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(documents, permutations) uint32 for documents whose shingles lie back to back in `flat`, hashed in
        blocks of rows that may cut a document (its minimum is then taken over the blocks)."""
        out = np.full((len(counts), len(self.a)), np.iinfo(np.uint32).max, dtype=np.uint32)
        owner = np.repeat(np.arange(len(counts)), counts)
        for r0 in range(0, len(flat), SIGNATURE_BLOCK_ROWS):
            block_owner = owner[r0:r0 + SIGNATURE_BLOCK_ROWS]
            hashed = ((flat[r0:r0 + len(block_owner), None] * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
            starts = np.flatnonzero(np.r_[True, block_owner[1:] != block_owner[:-1]])
            docs = block_owner[starts]
            out[docs] = np.minimum(out[docs], np.minimum.reduceat(hashed, starts, axis=0))
        return out


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted arrays of unique values."""
    if len(a) > len(b):
        a, b = b, a
    if len(a) == 0:
        return 0.0
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    common = int(np.count_nonzero(b[at] == a))
    return common / (len(a) + len(b) - common)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(docs, bands) uint64 keys: each band's rows hashed together."""
    grouped = signatures.reshape(len(signatures), bands, rows).astype(np.uint64)
    key = np.zeros(grouped.shape[:2], dtype=np.uint64)
    for r in range(rows):
        key = splitmix64(key ^ grouped[:, :, r])
    return key


# ---------------------------------------------------------------- step 1: one shard's fingerprints

SHINGLES, OFFSETS, SIGNATURES, META = "shingles.u64", "offsets.npy", "signatures.u32", "meta.json"
BATCH_SHINGLES = 1 << 16  # shingles of the documents whose signatures are computed together


class ShardFingerprints:
    """Writes one shard's fingerprints into `directory` (a staging directory the caller renames when done):
    `shingles.u64` (every document's sorted shingles back to back) and `offsets.npy` (documents + 1 int64), or
    `signatures.u32` under `verify: estimate`; `run-NNNN.keys.npy` / `run-NNNN.docs.npy`, (bands, n) arrays
    sorted by (key, document) per band, one pair of files per spilled run; `meta.json` with the counts."""

    def __init__(self, directory: Path, config: MinHashConfig):
        self.directory, self.config = directory, config
        self.hasher = MinHasher(config.bands * config.rows, config.seed)
        self.exact = config.verify == "exact"
        self.store = open(directory / (SHINGLES if self.exact else SIGNATURES), "wb")
        self.offsets = [0]
        self.documents = self.too_short = self.runs = 0
        self.batch: list[np.ndarray] = []
        self.batch_first = 0  # local index of the batch's first document
        self.batch_rows = 0
        self.run_keys: list[np.ndarray] = []
        self.run_docs: list[np.ndarray] = []
        self.run_size = 0

    def add(self, text: str) -> None:
        shingles = word_ngram_hashes(text, self.config.ngram, self.config.strip_punctuation)
        self.too_short += len(shingles) == 0
        self.documents += 1
        self.batch.append(shingles)
        self.batch_rows += len(shingles)
        if self.exact:
            self.store.write(shingles.tobytes())
            self.offsets.append(self.offsets[-1] + len(shingles))
        if self.batch_rows >= BATCH_SHINGLES or len(self.batch) * self.config.bands >= self.config.run_entries:
            self._sign_batch()

    def _sign_batch(self) -> None:
        if not self.batch:
            return
        counts = np.fromiter(map(len, self.batch), dtype=np.int64, count=len(self.batch))
        signatures = self.hasher.signatures(np.concatenate(self.batch), counts)
        if not self.exact:
            self.store.write(signatures.tobytes())
        signed = np.flatnonzero(counts > 0)
        self.run_keys.append(band_keys(signatures[signed], self.config.bands, self.config.rows))
        self.run_docs.append((signed + self.batch_first).astype(np.uint32))
        self.run_size += len(signed) * self.config.bands
        self.batch_first += len(self.batch)
        self.batch, self.batch_rows = [], 0
        if self.run_size >= self.config.run_entries:
            self._spill()

    def _spill(self) -> None:
        if not self.run_size:
            return
        keys = np.concatenate(self.run_keys).T  # (bands, n)
        docs = np.concatenate(self.run_docs)
        order = np.argsort(keys, axis=1, kind="stable")  # documents ascend within a key: (key, document) order
        name = f"run-{self.runs:04d}"
        np.save(self.directory / f"{name}.keys.npy", np.take_along_axis(keys, order, axis=1))
        np.save(self.directory / f"{name}.docs.npy", docs[order])
        self.runs += 1
        self.run_keys, self.run_docs, self.run_size = [], [], 0

    def finish(self) -> dict:
        self._sign_batch()
        self._spill()
        self.store.close()
        if self.exact:
            np.save(self.directory / OFFSETS, np.array(self.offsets, dtype=np.int64))
        meta = {"documents": self.documents, "too_short_for_ngram": self.too_short, "runs": self.runs}
        (self.directory / META).write_text(json.dumps(meta), encoding="utf-8")
        return meta


def read_meta(directory: Path) -> dict:
    return json.loads((directory / META).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- steps 2 and 3: merge, verify, cluster

class UnionFind:
    """Parents in one compact int64 array (8 bytes per document), path halving, union by size."""

    def __init__(self, n: int):
        self.parent = array("q", range(n))
        self.size = array("q", [1]) * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]
        return a


class _Shard:
    """One shard's fingerprints for the merge and the verification, memory-mapped."""

    def __init__(self, directory: Path, base: int, config: MinHashConfig):
        self.base = base
        meta = read_meta(directory)
        self.documents = meta["documents"]
        self.runs = [(np.load(directory / f"run-{r:04d}.keys.npy", mmap_mode="r"),
                      np.load(directory / f"run-{r:04d}.docs.npy", mmap_mode="r")) for r in range(meta["runs"])]
        if config.verify == "exact":
            self.offsets = np.load(directory / OFFSETS)
            self.shingles = np.memmap(directory / SHINGLES, dtype=np.uint64, mode="r") \
                if self.offsets[-1] else np.zeros(0, dtype=np.uint64)
        else:
            perms = config.bands * config.rows
            self.signatures = np.memmap(directory / SIGNATURES, dtype=np.uint32, mode="r",
                                        shape=(self.documents, perms)) if self.documents else None


def _merged_band(runs: list[tuple[np.ndarray, np.ndarray, int]], band: int, budget: int,
                 stats: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The band's (key, global document) pairs of all runs in order, in slices that never cut a key's group.
    Each run contributes a window of at most budget / runs pairs; a window is only widened when one key fills
    it (a group larger than the window)."""
    width = [max(1, budget // max(len(runs), 1))] * len(runs)
    lo = [0] * len(runs)
    total = [keys.shape[1] for keys, _, _ in runs]
    while True:
        live = [i for i in range(len(runs)) if lo[i] < total[i]]
        if not live:
            return
        hi = {i: min(lo[i] + width[i], total[i]) for i in live}
        # keys at or past the smallest last key of a window that does not reach its run's end may continue there
        open_ends = [runs[i][0][band, hi[i] - 1] for i in live if hi[i] < total[i]]
        bound = min(open_ends) if open_ends else None
        keys, docs = [], []
        for i in live:
            window = runs[i][0][band, lo[i]:hi[i]]
            cut = len(window) if bound is None else int(np.searchsorted(window, bound, side="left"))
            keys.append(np.asarray(window[:cut]))
            docs.append(runs[i][1][band, lo[i]:lo[i] + cut].astype(np.int64) + runs[i][2])
            lo[i] += cut
        if not sum(map(len, keys)):
            for i in live:
                if hi[i] < total[i] and runs[i][0][band, hi[i] - 1] == bound:
                    width[i] *= 2
            continue
        stats["merge_rounds"] += 1
        keys_all, docs_all = np.concatenate(keys), np.concatenate(docs)
        order = np.lexsort((docs_all, keys_all))
        yield keys_all[order], docs_all[order]


@dataclass
class Clusters:
    """Per document (in source order over all shards): the kept document of its cluster, its cluster's size,
    and the best verified similarity that joined it (NaN when it joined none)."""

    kept: np.ndarray
    size: np.ndarray
    similarity: np.ndarray
    stats: dict


def cluster(directories: list[Path], config: MinHashConfig) -> Clusters:
    """Cluster the documents of the shards whose fingerprints are in `directories`, in that (source) order."""
    shards, base = [], 0
    for directory in directories:
        shards.append(_Shard(directory, base, config))
        base += shards[-1].documents
    total = base
    bases = np.array([s.base for s in shards], dtype=np.int64)
    uf = UnionFind(total)
    similarity = np.full(total, np.nan)
    stats = {"candidate_pairs": 0, "rejected_pairs": 0, "merge_rounds": 0,
             "spilled_runs": sum(len(s.runs) for s in shards)}

    def locate(doc: int) -> tuple[_Shard, int]:
        shard = shards[int(np.searchsorted(bases, doc, side="right")) - 1]
        return shard, doc - shard.base

    def similar(a: int, b: int) -> float:
        (sa, la), (sb, lb) = locate(a), locate(b)
        if config.verify == "exact":
            return exact_jaccard(sa.shingles[sa.offsets[la]:sa.offsets[la + 1]],
                                 sb.shingles[sb.offsets[lb]:sb.offsets[lb + 1]])
        return estimated_jaccard(sa.signatures[la], sb.signatures[lb])

    rejected: set[tuple[int, int]] = set()  # pairs found dissimilar, not verified again in another band

    def join_group(members: list[int]) -> None:
        """Verify each member against one member at a time of each earlier cluster of the group."""
        earlier: dict[int, list[int]] = {}  # a cluster's key (a member) -> the group's members in it
        for m in members:
            joined = [m]
            for key in list(earlier):
                others = earlier[key]
                if uf.find(key) == uf.find(m):
                    accepted = True  # joined already, in an earlier band or through another member
                else:
                    accepted = False
                    for other in others:
                        if (other, m) in rejected:
                            continue
                        stats["candidate_pairs"] += 1
                        score = similar(other, m)
                        if score >= config.threshold:
                            accepted = True
                            uf.union(other, m)
                            for doc in (other, m):
                                if not score <= similarity[doc]:  # NaN or lower
                                    similarity[doc] = score
                            break
                        stats["rejected_pairs"] += 1
                        rejected.add((other, m))
                if accepted:
                    joined.extend(earlier.pop(key))
            earlier[m] = joined

    runs = [(keys, docs, shard.base) for shard in shards for keys, docs in shard.runs]
    for band in range(config.bands):
        for keys, docs in _merged_band(runs, band, config.run_entries, stats):
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            ends = np.r_[starts[1:], len(keys)]
            for s, e in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
                join_group(docs[s:e].tolist())

    roots = np.fromiter((uf.find(d) for d in range(total)), dtype=np.int64, count=total)
    first = np.full(total, total, dtype=np.int64)
    np.minimum.at(first, roots, np.arange(total, dtype=np.int64))
    size = np.bincount(roots, minlength=total)[roots] if total else np.zeros(0, dtype=np.int64)
    kept = first[roots]
    stats["clusters"] = int(np.count_nonzero((size > 1) & (kept == np.arange(total))))
    stats["documents_in_clusters"] = int(np.count_nonzero(size > 1))
    return Clusters(kept=kept, size=size, similarity=similarity, stats=stats)


def fingerprint_key(path: str, config: MinHashConfig) -> str:
    """Name of a shard's fingerprint directory: its path, size and mtime, and the MinHash settings."""
    stat = os.stat(path)
    settings = (config.ngram, config.bands, config.rows, config.verify, config.strip_punctuation, config.seed)
    return xxhash.xxh3_64_hexdigest(repr((str(path), stat.st_size, stat.st_mtime_ns, settings)).encode())
