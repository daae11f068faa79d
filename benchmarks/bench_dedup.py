"""Fuzzy and exact-substring dedup, lmforge vs datatrove 0.10.1's MinHash pipeline (and rensa as a building block),
on ../shared/corpus (or --corpus), one process each.

    .venv/bin/python benchmarks/bench_dedup.py [--limit-mb 20] [--skip-peers]

Rows (MB of UTF-8 text per second of wall time, and CPU seconds of the whole command, start-up included):
- lmforge `data dedup --modes minhash` with the datatrove preset (5-grams, 14 x 8), estimated and exact verification,
  and with the dolma3 preset (26 x 11, exact Jaccard >= 0.8);
- datatrove's four stages (MinhashDedupSignature, -Buckets, -Cluster, -Filter) with the same n-gram and band
  settings, on the same files; the agreement of the two removed sets is their Jaccard (datatrove keeps the root
  of each union-find tree, lmforge the earliest document: in a cluster of two they may keep different ones);
- MinHash signatures alone: lmforge's `MinHasher` (numpy, 112 permutations) and rensa's `RMinHash` (Rust) over the
  same 5-gram shingles;
- lmforge `data dedup --modes substring` (suffix array, 500 bytes) on the same text: bytes marked and MB/s.
Needs .peers/datatrove-venv (benchmarks/peers/setup_datatrove.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_curation import build_corpus  # noqa: E402  (the same inputs as the curation benchmark)

REPO = Path(__file__).resolve().parents[1]
LMFORGE = [sys.executable, "-m", "lmforge"]

DATATROVE_PIPELINE = r'''
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

documents, work = sys.argv[1], sys.argv[2]
config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
def reader():
    return JsonlReader(documents, glob_pattern="*.jsonl.gz", compression="gzip")
stages = [
    [reader(), MinhashDedupSignature(output_folder=f"{work}/signatures", config=config)],
    [MinhashDedupBuckets(input_folder=f"{work}/signatures", output_folder=f"{work}/buckets", config=config)],
    [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=config)],
    [reader(), MinhashDedupFilter(input_folder=f"{work}/remove",
                                  exclusion_writer=JsonlWriter(f"{work}/removed", compression=None))],
]
for i, pipeline in enumerate(stages):
    tasks = config.num_buckets if i == 1 else 1
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs{i}").run()
'''

RENSA_SIGNATURES = r'''
import gzip, json, sys, time, glob
from rensa import RMinHash
texts = [json.loads(line)["text"] for path in sorted(glob.glob(sys.argv[1] + "/*.jsonl.gz"))
         for line in gzip.open(path, "rt", encoding="utf-8")]
start = time.process_time()
for text in texts:
    words = text.lower().split()
    if len(words) >= 5:
        m = RMinHash(num_perm=112, seed=0)
        m.update([" ".join(words[i:i + 5]) for i in range(len(words) - 4)])
        m.digest()
print(json.dumps({"cpu_s": time.process_time() - start}))
'''


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the command and its children, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stdout


def ids_with(root: Path, name: str, key: str) -> set[str]:
    from lmforge.curation.attributes import read_attributes

    return {doc_id for path in sorted((root / "attributes" / name).glob("*.jsonl.gz"))
            for doc_id, attributes in read_attributes(path) if attributes.get(f"{name}__{key}")}


def lmforge_minhash(work: Path, text_mb: float, name: str, overrides: list[str]) -> dict:
    shutil.rmtree(work / "attributes" / name, ignore_errors=True)
    wall, cpu, out = timed(LMFORGE + ["data", "dedup", "--documents", "documents/*.jsonl.gz", "--modes", "minhash",
                                      "--name", name, "--no-progress", *overrides], work)
    stats = json.loads(out)["minhash"]
    return {"tool": f"lmforge {' '.join(overrides)}", "wall_s": wall, "cpu_s": cpu, "mb_s": text_mb / wall,
            "removed": stats["documents_removed"], "clusters": stats["clusters"],
            "candidate_pairs": stats["candidate_pairs"], "rejected_pairs": stats["rejected_pairs"]}


def datatrove_minhash(work: Path, text_mb: float, python: Path) -> tuple[dict, set[str]]:
    out = work / "datatrove"
    shutil.rmtree(out, ignore_errors=True)
    script = work / "datatrove_pipeline.py"
    script.write_text(DATATROVE_PIPELINE)
    wall, cpu, _ = timed([str(python), str(script), str(work / "documents"), str(out)], work)
    removed = {json.loads(line)["id"] for path in (out / "removed").glob("*.jsonl")
               for line in path.read_text(encoding="utf-8").splitlines()}
    return {"tool": "datatrove 0.10.1 (14 x 8)", "wall_s": wall, "cpu_s": cpu, "mb_s": text_mb / wall,
            "removed": len(removed)}, removed


def signature_rates(work: Path, text_mb: float, python: Path) -> list[dict]:
    import gzip

    from lmforge.curation.fuzzy import MinHasher, word_ngram_hashes

    texts = [json.loads(line)["text"] for path in sorted((work / "documents").glob("*.jsonl.gz"))
             for line in gzip.open(path, "rt", encoding="utf-8")]
    hasher = MinHasher(112, seed=0)
    start = time.process_time()
    for text in texts:
        hasher.signature(word_ngram_hashes(text, 5))
    ours = time.process_time() - start
    script = work / "rensa_signatures.py"
    script.write_text(RENSA_SIGNATURES)
    _, _, out = timed([str(python), str(script), str(work / "documents")], work)
    theirs = json.loads(out)["cpu_s"]
    return [{"tool": "lmforge MinHasher, 112 permutations, one document at a time", "cpu_s": ours,
             "mb_s": text_mb / ours},
            {"tool": "rensa 0.5.0 RMinHash, 112 permutations", "cpu_s": theirs, "mb_s": text_mb / theirs}]


def substring_run(work: Path, text_mb: float) -> dict:
    shutil.rmtree(work / "attributes" / "substr", ignore_errors=True)
    wall, cpu, out = timed(LMFORGE + ["data", "dedup", "--documents", "documents/*.jsonl.gz", "--modes", "substring",
                                      "--name", "substr", "--no-progress"], work)
    stats = json.loads(out)["substring"]
    return {"tool": "lmforge substring (suffix array, 500 bytes)", "wall_s": wall, "cpu_s": cpu,
            "mb_s": text_mb / wall, "text_bytes": stats["text_bytes"],
            "duplicate_substring_bytes": stats["duplicate_substring_bytes"]}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    parser.add_argument("--work", default="/tmp/lmforge_bench_dedup")
    parser.add_argument("--limit-mb", type=float, default=None, help="an equal slice of every shard (default: all)")
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()
    venv = Path(os.environ.get("DATATROVE_VENV", REPO / ".peers" / "datatrove-venv"))
    python = venv / "bin" / "python"
    if not args.skip_peers and not python.exists():
        sys.exit(f"{python} not found: run benchmarks/peers/setup_datatrove.sh (or pass --skip-peers)")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    text_mb = build_corpus(Path(args.corpus), work, args.limit_mb)
    print(f"{text_mb:.1f} MB of text", flush=True)
    # each row is printed when it is measured: a long run that is stopped keeps what it has (the peer runs
    # after the two lmforge settings it is compared with, before the others)
    presets = {"dt_exact": ["minhash.preset=datatrove"],
               "dt_punct": ["minhash.preset=datatrove", "minhash.strip_punctuation=true"],
               "dt_est": ["minhash.preset=datatrove", "minhash.verify=estimate"],
               "dolma3": ["minhash.preset=dolma3"]}
    for name in ("dt_exact", "dt_punct"):
        emit(lmforge_minhash(work, text_mb, name, presets[name]))
    removed = None
    if not args.skip_peers:
        row, removed = datatrove_minhash(work, text_mb, python)
        for ours in ("dt_exact", "dt_punct"):
            mine = ids_with(work, ours, "near_duplicate")
            row[f"removed_jaccard_vs_{ours}"] = jaccard(mine, removed)
            row[f"removed_by_both_{ours}"] = len(mine & removed)
        emit(row)
    for name in ("dt_est", "dolma3"):
        row = lmforge_minhash(work, text_mb, name, presets[name])
        if removed is not None:
            mine = ids_with(work, name, "near_duplicate")
            row.update(removed_jaccard_vs_datatrove=jaccard(mine, removed), removed_by_both=len(mine & removed))
        emit(row)
    if not args.skip_peers:
        for row in signature_rates(work, text_mb, python):
            emit(row)
    emit(substring_run(work, text_mb))


def emit(row: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
