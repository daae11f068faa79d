"""Fixed-length training instances over token files, with source mixtures and a fingerprint.

Each source is one token stream: its documents back to back (token files in order, or the documents of the
token files whose `source` field names it), cut into `sequence_length` windows; a tail shorter than a window
is dropped once per source. A mixture gives each source a share of the tokens: a source is down-sampled (a
seeded subset of its instances) or up-sampled (every instance repeated, plus a seeded subset) until its
instances hold that share. The resulting list of (source, instance) pairs is the dataset; its fingerprint
hashes everything that decides that list, and the loader's global order is derived from it.

    dataset = DataConfig(paths=["tokens/"], sequence_length=4096, seed=1).build()
    loader = dataset.loader(global_batch_instances=512, rank=rank, world_size=world_size)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lmforge.core.config import require
from lmforge.core.errors import LmforgeError
from lmforge.tokens.instance_filter import InstanceFilterConfig, keep_instance
from lmforge.tokens.token_files import TokenFile, open_token_file, resolve_token_paths

if TYPE_CHECKING:
    from lmforge.tokens.loader import DataLoader

FINGERPRINT_VERSION = 1


@dataclass
class SourceConfig:
    """One mixture source. With `paths` empty, the source is every document of `DataConfig.paths` whose
    `source` field equals the source's name."""

    paths: list[str] = field(default_factory=list)
    share: float | None = None


@dataclass
class DataConfig:
    """What to train on. Either `paths` alone (one stream) or a `mixture` of named sources."""

    paths: list[str] = field(default_factory=list)
    mixture: dict[str, SourceConfig] = field(default_factory=dict)
    # Total tokens the mixture should hold; default: the most it can hold without repeating any source.
    mixture_tokens: int | None = None
    max_repetition: float = 4.0
    sequence_length: int = 2048
    seed: int = 0
    # Needed only for Dolma token files, whose sidecars do not record it.
    dtype: str | None = None
    instance_filter: InstanceFilterConfig = field(default_factory=InstanceFilterConfig)
    document_boundaries: bool = False
    # tokenizer.json for decoding in `lmforge data inspect`; default: the copy `data tokenize` keeps.
    tokenizer: str | None = None
    prefetch_batches: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.sequence_length >= 2, "sequence_length", self.sequence_length, "must be >= 2")
        require(bool(self.paths or self.mixture), "paths", self.paths,
                "give paths (token directories, .npy files or globs) or a mixture")
        require(self.max_repetition >= 1, "max_repetition", self.max_repetition, "must be >= 1")
        require(self.mixture_tokens is None or self.mixture_tokens >= 1, "mixture_tokens", self.mixture_tokens,
                "must be >= 1")

    def build(self) -> "Dataset":
        return Dataset(self)


@dataclass
class SourceStream:
    """A source's tokens as contiguous segments of token files, in order."""

    name: str
    seg_file: np.ndarray
    seg_start: np.ndarray
    seg_end: np.ndarray
    share: float | None = None

    def __post_init__(self) -> None:
        self.cum = np.concatenate([[0], np.cumsum(self.seg_end - self.seg_start)]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.cum[-1])

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(file index, start, stop) pieces covering stream positions [start, stop)."""
        out = []
        i = int(np.searchsorted(self.cum, start, side="right")) - 1
        pos = start
        while pos < stop:
            seg_offset = pos - self.cum[i]
            take = min(stop - pos, int(self.cum[i + 1] - pos))
            file_start = int(self.seg_start[i] + seg_offset)
            out.append((int(self.seg_file[i]), file_start, file_start + take))
            pos += take
            i += 1
        return out


class Dataset:
    def __init__(self, config: DataConfig):
        self.config = config
        self.sequence_length = config.sequence_length
        self.files: list[TokenFile] = []
        self._file_index: dict[str, int] = {}
        self.sources = self._build_sources()
        self._check_lengths()
        self.source_of, self.local_index, self.source_instances = self._sample_mixture()
        self.fingerprint = self._fingerprint()

    # ---- construction ------------------------------------------------------------------------------------

    def _open(self, paths: list[str]) -> list[int]:
        indices = []
        for path in resolve_token_paths(paths):
            if path not in self._file_index:
                self._file_index[path] = len(self.files)
                self.files.append(open_token_file(path, self.config.dtype))
            indices.append(self._file_index[path])
        return indices

    def _whole_files(self, name: str, indices: list[int], share: float | None) -> SourceStream:
        return SourceStream(name, np.array(indices, dtype=np.int64), np.zeros(len(indices), dtype=np.int64),
                            np.array([self.files[i].num_tokens for i in indices], dtype=np.int64), share)

    def _build_sources(self) -> list[SourceStream]:
        config = self.config
        if not config.mixture:
            return [self._whole_files("all", self._open(config.paths), None)]
        shares = [s.share for s in config.mixture.values()]
        if any(s is None for s in shares) and any(s is not None for s in shares):
            raise LmforgeError("mixture: give a share to every source or to none")
        if any(s is not None and s <= 0 for s in shares):
            raise LmforgeError("mixture: shares must be > 0")
        pooled = self._open(config.paths) if config.paths else []
        by_source = self._documents_by_source(pooled) if any(not s.paths for s in config.mixture.values()) else {}
        streams = []
        for name, source in config.mixture.items():
            if source.paths:
                try:
                    streams.append(self._whole_files(name, self._open(source.paths), source.share))
                except LmforgeError as e:
                    raise LmforgeError(f"mixture source {name!r}: {e}") from None
                continue
            if not pooled:
                raise LmforgeError(f"mixture source {name!r} has no paths and there are no top-level paths to "
                                   f"select its documents from")
            if name not in by_source:
                known = ", ".join(sorted(by_source)) or "none"
                raise LmforgeError(f"mixture source {name!r} has no documents in {', '.join(config.paths)} "
                                   f"(sources found there: {known})")
            seg_file, seg_start, seg_end = by_source[name]
            streams.append(SourceStream(name, seg_file, seg_start, seg_end, source.share))
        return streams

    def _documents_by_source(self, file_indices: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Runs of consecutive documents of the same `source` in the pooled files, per source name."""
        runs: dict[str, list[tuple[int, int, int]]] = {}
        for fi in file_indices:
            sources, starts, ends = self.files[fi].doc_sources()
            names = np.asarray(sources, dtype=object)
            if len(names) == 0:
                continue
            change = np.flatnonzero(names[1:] != names[:-1]) + 1
            run_starts = np.concatenate([[0], change])
            run_ends = np.concatenate([change, [len(names)]])
            for a, b in zip(run_starts, run_ends):
                runs.setdefault(names[a], []).append((fi, int(starts[a]), int(ends[b - 1])))
        return {name: tuple(np.array(col, dtype=np.int64) for col in zip(*r)) for name, r in runs.items()}

    def _check_lengths(self) -> None:
        length = self.sequence_length
        for stream in self.sources:
            if stream.num_tokens < length:
                raise LmforgeError(
                    f"source {stream.name!r} holds {stream.num_tokens} tokens, fewer than one instance of "
                    f"sequence_length {length}; lower sequence_length or add data")

    def _sample_mixture(self) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        length = self.sequence_length
        available = [s.num_tokens // length for s in self.sources]
        if self.sources[0].share is None:
            wanted = available
        else:
            total_share = sum(s.share for s in self.sources)
            shares = [s.share / total_share for s in self.sources]
            if self.config.mixture_tokens is not None:
                total = self.config.mixture_tokens // length
            else:
                total = min(int(a / sh) for a, sh in zip(available, shares))
            wanted = [int(round(total * sh)) for sh in shares]
            for stream, want, have in zip(self.sources, wanted, available):
                if want > have * self.config.max_repetition:
                    raise LmforgeError(
                        f"mixture source {stream.name!r} would be repeated {want / have:.2f} times "
                        f"({want} instances from {have}); max_repetition is {self.config.max_repetition}")
        source_of, local = [], []
        counts = {}
        for k, (stream, want, have) in enumerate(zip(self.sources, wanted, available)):
            rng = np.random.Generator(np.random.PCG64([self.config.seed, _stable_int(stream.name)]))
            repeats, rest = divmod(want, have)
            picked = np.concatenate([np.tile(np.arange(have, dtype=np.int64), repeats),
                                     np.sort(rng.choice(have, size=rest, replace=False)).astype(np.int64)])
            source_of.append(np.full(len(picked), k, dtype=np.int32))
            local.append(picked)
            counts[stream.name] = int(len(picked))
        if sum(counts.values()) == 0:
            raise LmforgeError("the mixture holds no instances; raise mixture_tokens")
        return np.concatenate(source_of), np.concatenate(local), counts

    def _fingerprint(self) -> str:
        description = {
            "version": FINGERPRINT_VERSION,
            "sequence_length": self.sequence_length,
            "seed": self.config.seed,
            "sources": [
                {"name": s.name, "share": s.share, "instances": self.source_instances[s.name],
                 "segments": hashlib.sha256(np.stack([s.seg_file, s.seg_start, s.seg_end]).tobytes()).hexdigest()}
                for s in self.sources
            ],
            "files": [f.identity() for f in self.files],
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()

    # ---- access ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.source_of)

    @property
    def num_tokens(self) -> int:
        return len(self) * self.sequence_length

    def _pieces(self, index: int) -> tuple[SourceStream, list[tuple[int, int, int]]]:
        stream = self.sources[int(self.source_of[index])]
        start = int(self.local_index[index]) * self.sequence_length
        return stream, stream.pieces(start, start + self.sequence_length)

    def instance_tokens(self, index: int) -> np.ndarray:
        """Token ids of instance `index` as int64."""
        _, pieces = self._pieces(index)
        return np.concatenate([self.files[f].tokens[a:b] for f, a, b in pieces]).astype(np.int64)

    def instance_document_lengths(self, index: int) -> list[int]:
        """Lengths of the document pieces that make up the instance, in order (they sum to sequence_length)."""
        _, pieces = self._pieces(index)
        lengths = []
        for f, a, b in pieces:
            ends = self.files[f].doc_ends()
            inner = ends[np.searchsorted(ends, a, side="right"):np.searchsorted(ends, b, side="left")]
            cuts = np.concatenate([[a], inner, [b]])
            lengths.extend(int(x) for x in np.diff(cuts))
        return lengths

    def instance_documents(self, index: int) -> list[dict]:
        """Every document piece of the instance: id, source, shard, line, and the token span inside the
        document and inside the instance."""
        stream, pieces = self._pieces(index)
        out = []
        offset = 0
        for f, a, b in pieces:
            file = self.files[f]
            docs = file.documents()
            first = int(np.searchsorted(docs.ends, a, side="right"))
            last = int(np.searchsorted(docs.starts, b, side="left"))
            for d in range(first, last):
                lo, hi = max(a, int(docs.starts[d])), min(b, int(docs.ends[d]))
                out.append({
                    "id": docs.ids[d], "source": docs.sources[d], "shard": docs.shards[d], "line": int(docs.lines[d]),
                    "token_file": file.path, "doc_tokens": int(docs.ends[d] - docs.starts[d]),
                    "doc_span": [lo - int(docs.starts[d]), hi - int(docs.starts[d])],
                    "instance_span": [offset + lo - a, offset + hi - a], "file_span": [lo, hi],
                })
            offset += b - a
        return out

    def keep(self, tokens: np.ndarray) -> bool:
        return keep_instance(tokens, self.config.instance_filter)

    def summary(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "instances": len(self),
            "sequence_length": self.sequence_length,
            "tokens": self.num_tokens,
            "sources": {
                s.name: {"available_tokens": s.num_tokens, "instances": self.source_instances[s.name],
                         "repetition": self.source_instances[s.name] / max(s.num_tokens // self.sequence_length, 1)}
                for s in self.sources
            },
            "token_files": [f.path for f in self.files],
        }

    def loader(self, global_batch_instances: int, rank: int = 0, world_size: int = 1, epoch: int = 0,
               **kwargs) -> "DataLoader":
        from lmforge.tokens.loader import DataLoader

        return DataLoader(self, global_batch_instances, rank=rank, world_size=world_size, epoch=epoch, **kwargs)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
