"""`lmforge data stats`: What's-In-My-Big-Data-style corpus analysis, as JSON plus PNG plots.

Per source: documents, UTF-8 bytes, characters, tokens (whitespace words, or a tokenizer's tokens), exact
duplicate documents; document length histograms (log2 bins of characters); language distribution (lid.176 top
label); top-k word n-grams; occurrences and document counts of given strings (contamination checks).
N-grams are of lowercased whitespace words. The top k are exact: each shard spills its full counts to disk,
sorted, and the shards' files are merged in one streaming pass (memory: one line per shard and the k best),
ties broken alphabetically. `--count` strings count non-overlapping, case-sensitive occurrences
(`str.count`: "aa" occurs twice in "aaaa"). Plots need matplotlib (optional): without it the JSON is still
written and the manifest says plots were skipped.
"""

from __future__ import annotations

import heapq
import itertools
import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from lmforge.curation.documents import InputConfig, ReadReport, input_shards, read_documents
from lmforge.core.executor import ExecutorConfig, run_tasks
from lmforge.core.config import require
from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest
from lmforge.core.files import TEMP_SUFFIX, atomic_path, atomic_write_json

LANGID_CHARS = 2000
TOKENIZER_BATCH = 256


@dataclass
class StatsConfig:
    documents: list[str]
    out: str
    count_strings: list[str] = field(default_factory=list)
    top_k: int = 20
    ngram_sizes: list[int] = field(default_factory=lambda: [1, 2, 3])
    tokenizer: str | None = None
    langid: bool = True
    plots: bool = True
    input: InputConfig = field(default_factory=InputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.documents), "documents", self.documents, "give at least one document glob")
        require(bool(self.ngram_sizes) and all(n >= 1 for n in self.ngram_sizes), "ngram_sizes", self.ngram_sizes,
                "every n-gram size must be >= 1")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0")


@dataclass
class StatsTask:
    doc_path: str
    count_strings: list[str]
    ngram_sizes: list[int]
    tokenizer: Any  # anything with encode_batch(texts) -> ids per text, e.g. lmforge.tokens.Tokenizer; or None
    langid: bool
    spill_dir: str
    index: int
    strict: bool = False
    weight: int = 0


def _length_bin(n: int) -> int:
    return 0 if n <= 0 else int(math.log2(n)) + 1


def analyse_shard(task: StatsTask, progress) -> dict:
    report = ReadReport()
    sources: dict[str, dict] = {}
    ngrams = {n: Counter() for n in task.ngram_sizes}
    strings = {s: [0, 0] for s in task.count_strings}
    doc_hashes: dict[str, list[int]] = {}
    languages: dict[str, Counter] = {}
    model = None
    if task.langid:
        from lmforge.curation.taggers.language import lid176_path, load_fasttext, predict

        model = load_fasttext(str(lid176_path()))
    tokenizer = task.tokenizer
    pending_tokens: list[tuple[str, str]] = []

    def flush_tokens() -> None:
        for (source, _), ids in zip(pending_tokens, tokenizer.encode_batch([t for _, t in pending_tokens])):
            sources[source]["tokens"] += len(ids)
        pending_tokens.clear()

    for _, doc in read_documents(task.doc_path, report, task.strict):
        text = doc["text"]
        source = str(doc.get("source") or "unknown")
        s = sources.setdefault(source, {"documents": 0, "bytes": 0, "characters": 0, "tokens": 0, "words": 0,
                                        "length_histogram": Counter()})
        words = text.split()
        s["documents"] += 1
        s["bytes"] += len(text.encode("utf-8"))
        s["characters"] += len(text)
        s["words"] += len(words)
        s["length_histogram"][_length_bin(len(text))] += 1
        if tokenizer is not None:
            pending_tokens.append((source, text))
            if len(pending_tokens) >= TOKENIZER_BATCH:
                flush_tokens()
        else:
            s["tokens"] += len(words)
        doc_hashes.setdefault(source, []).append(xxhash.xxh3_128_intdigest(text.encode("utf-8")))
        lowered = [w.lower() for w in words]
        for n, counter in ngrams.items():
            counter.update(zip(*[lowered[i:] for i in range(n)]) if n > 1 else lowered)
        for needle, counts in strings.items():
            found = text.count(needle)
            counts[0] += found
            counts[1] += found > 0
        if model is not None:
            lang = predict(model, text[:LANGID_CHARS], 1)[0][0] if text.strip() else "none"
            languages.setdefault(source, Counter())[lang] += 1
        progress(1)
    if pending_tokens:
        flush_tokens()
    return {
        "doc_path": task.doc_path, "documents": report.documents, **report.counts(),
        "bad_lines": [str(b) for b in report.bad_lines], "truncated": [str(t) for t in report.truncated],
        "sources": sources, "doc_hashes": doc_hashes,
        "ngrams": {n: _spill(counter, Path(task.spill_dir) / f"{task.index}-{n}.tsv") for n, counter in ngrams.items()},
        "strings": strings, "languages": languages,
    }


def _spill(counter: Counter, path: Path) -> str:
    """Write `n-gram<TAB>count` lines sorted by n-gram (words never hold a tab); return the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for gram in sorted(counter, key=lambda g: " ".join(g) if isinstance(g, tuple) else g):
            f.write(f"{' '.join(gram) if isinstance(gram, tuple) else gram}\t{counter[gram]}\n")
    return str(path)


def _spilled(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            gram, _, count = line.rstrip("\n").rpartition("\t")
            yield gram, int(count)


def exact_top_ngrams(paths: list[str], k: int) -> list[tuple[str, int]]:
    """The k most frequent n-grams over sorted spill files (ties alphabetical), merged in one pass."""
    merged = heapq.merge(*(_spilled(p) for p in paths), key=lambda gc: gc[0])
    totals = ((gram, sum(c for _, c in group)) for gram, group in itertools.groupby(merged, key=lambda gc: gc[0]))
    best = heapq.nsmallest(k, ((-count, gram) for gram, count in totals))
    return [(gram, -negated) for negated, gram in best]


def _merge(results: list[dict], config: StatsConfig) -> dict:
    sources: dict[str, dict] = {}
    strings = {s: [0, 0] for s in config.count_strings}
    languages: dict[str, Counter] = {}
    seen: set[int] = set()
    duplicates: Counter = Counter()
    skipped: list[str] = []
    for r in results:
        for source, s in r["sources"].items():
            into = sources.setdefault(source, {"documents": 0, "bytes": 0, "characters": 0, "tokens": 0, "words": 0,
                                               "length_histogram": Counter()})
            for key in ("documents", "bytes", "characters", "tokens", "words"):
                into[key] += s[key]
            into["length_histogram"].update(s["length_histogram"])
        for source, hashes in r["doc_hashes"].items():
            for h in hashes:
                if h in seen:
                    duplicates[source] += 1
                else:
                    seen.add(h)
        for needle, (occurrences, docs) in r["strings"].items():
            strings[needle][0] += occurrences
            strings[needle][1] += docs
        for source, counter in r["languages"].items():
            languages.setdefault(source, Counter()).update(counter)
        skipped += r["bad_lines"]
    per_source = {}
    for source, s in sorted(sources.items()):
        histogram = {f"{2 ** (b - 1) if b else 0}-{2 ** b - 1 if b else 0}": c
                     for b, c in sorted(s["length_histogram"].items())}
        per_source[source] = {
            "documents": s["documents"], "bytes": s["bytes"], "characters": s["characters"], "words": s["words"],
            "tokens": s["tokens"], "mean_characters": s["characters"] / max(s["documents"], 1),
            "exact_duplicate_documents": duplicates[source],
            "duplicate_rate": duplicates[source] / max(s["documents"], 1),
            "length_histogram_characters": histogram,
        }
    total_languages: Counter = Counter()
    for counter in languages.values():
        total_languages.update(counter)
    totals = {key: sum(s[key] for s in per_source.values())
              for key in ("documents", "bytes", "characters", "words", "tokens", "exact_duplicate_documents")}
    totals["duplicate_rate"] = totals["exact_duplicate_documents"] / max(totals["documents"], 1)
    return {
        "totals": totals,
        "token_unit": config.tokenizer or "whitespace words",
        "per_source": per_source,
        "languages": dict(total_languages.most_common()),
        "languages_per_source": {s: dict(c.most_common()) for s, c in sorted(languages.items())},
        "top_ngrams": {str(n): exact_top_ngrams([r["ngrams"][n] for r in results], config.top_k)
                       for n in config.ngram_sizes},
        "string_counts": {s: {"occurrences": o, "documents": d} for s, (o, d) in strings.items()},
        **{key: sum(r[key] for r in results)
           for key in ("skipped_lines", "empty_shards", "truncated_files", "duplicate_ids")},
        "skipped": skipped[:100],
        "truncated": [t for r in results for t in r["truncated"]],
    }


def _save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def write_plots(report: dict, output: Path) -> list[str]:
    """Length histograms, language distribution and top n-grams as PNGs; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(8, 4))
    for source, s in report["per_source"].items():
        bins = s["length_histogram_characters"]
        upper = [int(label.split("-")[1]) + 1 for label in bins]  # bin "a-b" holds lengths a..b
        ax.plot(upper, list(bins.values()), marker="o", label=source)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document length (characters, upper edge of log2 bin)")
    ax.set_ylabel("documents")
    ax.legend(fontsize=7)
    _save_png(fig, output / "length_histogram.png")
    written.append("length_histogram.png")
    plt.close(fig)
    if report["languages"]:
        top = list(report["languages"].items())[:20]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([k for k, _ in top], [v for _, v in top])
        ax.set_ylabel("documents")
        ax.set_title("language (lid.176 top label)")
        _save_png(fig, output / "languages.png")
        written.append("languages.png")
        plt.close(fig)
    for n, pairs in report["top_ngrams"].items():
        if not pairs:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.25 * len(pairs) + 1))
        ax.barh([g for g, _ in pairs][::-1], [c for _, c in pairs][::-1])
        ax.set_title(f"top {n}-grams")
        _save_png(fig, output / f"top_{n}grams.png")
        written.append(f"top_{n}grams.png")
        plt.close(fig)
    return written


def run_stats(config: StatsConfig, tokenizer: Any = None) -> dict:
    """`tokenizer` is the loaded `config.tokenizer` (curation comes before tokens, so the caller loads it):
    anything with `encode_batch(texts)`. Without one, tokens are whitespace words."""
    if config.tokenizer and tokenizer is None:
        raise LmforgeError(f"stats: pass the loaded tokenizer {config.tokenizer!r} (lmforge.tokens.Tokenizer.load)")
    paths, incomplete = input_shards(config.documents, config.input)
    with output_lock(config.out):
        return _run_stats(config, tokenizer, paths, incomplete)


def _run_stats(config: StatsConfig, tokenizer: Any, paths: list[str], incomplete: list[str]) -> dict:
    output = Path(config.out)
    output.mkdir(parents=True, exist_ok=True)
    # Named as every temporary is, so that one left by a killed run goes when the next run takes the lock.
    spill_dir = tempfile.mkdtemp(prefix=".ngram-counts.", suffix=TEMP_SUFFIX, dir=output)
    tasks = [StatsTask(p, list(config.count_strings), list(config.ngram_sizes), tokenizer, config.langid, spill_dir,
                       i, config.input.strict, weight=Path(p).stat().st_size) for i, p in enumerate(paths)]
    if config.langid:
        from lmforge.curation.taggers.language import lid176_path

        lid176_path()
    try:
        report = _merge(run_tasks(analyse_shard, tasks, config.executor, desc="stats"), config)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    report["incomplete_shards"] = incomplete
    plots = write_plots(report, output) if config.plots else []
    atomic_write_json(output / "stats.json", report)
    read = {key: report[key] for key in ("skipped_lines", "empty_shards", "truncated_files", "duplicate_ids")}
    write_manifest(output, command="data stats", config=config, inputs=paths,
                   counts={**report["totals"], **read, "incomplete_shards": len(incomplete)},
                   extra={"plots": plots, "plots_skipped": config.plots and not plots})
    return {"output": str(output), **report["totals"], "languages": dict(list(report["languages"].items())[:10]),
            "plots": plots, **read, "truncated": report["truncated"], "incomplete_shards": incomplete}

