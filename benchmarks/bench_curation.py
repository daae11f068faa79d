"""Curation throughput, lmforge vs the `dolma` CLI in the same run, on ../shared/corpus (or --corpus).

    .venv/bin/python benchmarks/bench_curation.py [--tag-mb 10] [--processes 1 2] [--skip-dolma]
        [--stages tag dedup mix] [--repeat N]

Stages: tagging with Gopher + C4 + PII (lmforge `gopher,c4,pii` vs dolma `gopher_v1 c4_v1 pii_regex_v1`),
exact paragraph dedup with a Bloom filter (`dedup --modes paragraph` vs `dolma dedupe`), and mixing (drop
documents with >= 500 duplicate paragraphs, delete duplicate paragraphs). Wall time of the whole command,
start-up included, for both. Throughput is MB of UTF-8 text per second. After tagging, attribute values are
compared document by document for the rules both tools implement the same way. Needs
.peers/dolma-venv (benchmarks/peers/setup_dolma.sh).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
LMFORGE = [sys.executable, "-m", "lmforge"]
SAME_GOPHER_RULES = ("word_count", "character_count", "median_word_length", "required_word_count",
                     "fraction_of_characters_in_most_common_2grams", "fraction_of_characters_in_most_common_3grams",
                     "fraction_of_characters_in_most_common_4grams")


def build_corpus(corpus: Path, out: Path, limit_mb: float | None) -> float:
    """Copy shards as .jsonl.gz (level 1) under out/documents; with limit_mb, an equal slice of every shard."""
    shards = sorted(corpus.glob("*.jsonl.zst"))
    per_shard = None if limit_mb is None else limit_mb * 1e6 / len(shards)
    (out / "documents").mkdir(parents=True, exist_ok=True)
    text_bytes = 0
    for shard in shards:
        with open(shard, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        kept, size = [], 0
        for line in data.splitlines():
            if per_shard is not None and size >= per_shard:
                break
            doc = json.loads(line)
            size += len(doc["text"].encode())
            if doc.get("created") is None:  # dolma 1.2.1 rejects `"created": null` (a ValidationError)
                doc["created"] = doc.get("added") or ""
                line = json.dumps(doc, ensure_ascii=False).encode()
            kept.append(line)
        text_bytes += size
        name = shard.name.replace(".jsonl.zst", ".jsonl.gz")
        with gzip.open(out / "documents" / name, "wb", compresslevel=1) as g:
            g.write(b"\n".join(kept) + b"\n")
    return text_bytes / 1e6


CPU_SECONDS: dict[float, float] = {}


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    """Wall seconds; the command's CPU seconds (user+sys, its workers included) go to CPU_SECONDS[wall]."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    CPU_SECONDS[elapsed] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed


def with_peer(row: dict, ours: float, theirs: float, text_mb: float) -> dict:
    row.update(lmforge_cpu_s=CPU_SECONDS[ours], dolma_s=theirs, dolma_mb_s=text_mb / theirs,
               dolma_cpu_s=CPU_SECONDS[theirs], wall_ratio=theirs / ours,
               cpu_ratio=CPU_SECONDS[theirs] / CPU_SECONDS[ours], load=round(os.getloadavg()[0], 1))
    return row


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rb") as f:
        return [json.loads(line) for line in io.BufferedReader(f)]


def compare_tags(work: Path, ours_exp: str, dolma_exp: str) -> dict:
    """Per rule: documents where lmforge and dolma give the same value (out of all documents)."""
    same: dict[str, int] = {}
    total = 0
    for path in sorted((work / "attributes" / dolma_exp).glob("*.jsonl.gz")):
        theirs = read_jsonl_gz(path)
        ours = [row["attributes"] for row in read_jsonl_gz(work / "attributes" / ours_exp / path.name)]
        for i, row in enumerate(theirs):
            total += 1
            a, b = ours[i], row["attributes"]
            for rule in SAME_GOPHER_RULES:
                mine = a[f"gopher__{rule}"][0][2]
                their = b.get(f"{dolma_exp}__gopher_v1__{rule}", [[0, 0, 0.0]])[0][2]  # dolma omits empty values
                # dolma writes 5 decimals
                same[f"gopher {rule}"] = same.get(f"gopher {rule}", 0) + (abs(mine - their) <= 1e-5)
            key = f"{dolma_exp}__c4_v1__lines_with_no_ending_punctuation"
            mine_lines = [s[:2] for s in a["c4__lines_with_no_ending_punctuation"]]
            same["c4 lines_with_no_ending_punctuation"] = same.get("c4 lines_with_no_ending_punctuation", 0) + (
                mine_lines == [s[:2] for s in b.get(key, [])])
            same["c4 has_curly_brace"] = same.get("c4 has_curly_brace", 0) + (
                bool(a["c4__has_curly_brace"]) == bool(b.get(f"{dolma_exp}__c4_v1__has_curly_brace")))
    return {"documents": total, "same": same}


def tag_runs(work: Path, text_mb: float, processes: list[int], skip_dolma: bool) -> list[dict]:
    rows = []
    for p in processes:
        exp = f"lmf_p{p}"
        shutil.rmtree(work / "attributes" / exp, ignore_errors=True)
        seconds = timed(LMFORGE + ["data", "tag", "--documents", "documents/*.jsonl.gz", "--taggers", "gopher,c4,pii",
                                   "--experiment", exp, "--workers", str(p)], work)
        row = {"stage": "tag gopher+c4+pii", "processes": p, "lmforge_s": seconds, "lmforge_mb_s": text_mb / seconds}
        if not skip_dolma:
            dolma_exp = f"dolma_p{p}"
            shutil.rmtree(work / "attributes" / dolma_exp, ignore_errors=True)
            d = timed([str(DOLMA), "tag", "--documents", str(work / "documents/*.jsonl.gz"), "--experiment", dolma_exp,
                       "--taggers", "gopher_v1", "c4_v1", "pii_regex_v1", "--processes", str(p)], work)
            with_peer(row, seconds, d, text_mb)
            if p == processes[0]:
                row["agreement"] = compare_tags(work, exp, dolma_exp)
        rows.append(row)
    return rows


def compare_dedup(work: Path) -> dict:
    """Duplicate lines each tool flagged, and the documents where both flagged the lines starting at the same
    offsets. Ends are not compared: dolma ends a last line that has no newline one past the text."""
    ours_total = theirs_total = same = documents = 0
    for path in sorted((work / "attributes" / "dolma_para").glob("*.jsonl.gz")):
        ours = read_jsonl_gz(work / "attributes" / "para" / path.name)
        for mine, row in zip(ours, read_jsonl_gz(path), strict=True):
            a = [span[0] for span in mine["attributes"]["para__duplicate_paragraphs"]]
            b = [span[0] for span in row["attributes"].get("bff_duplicate_paragraph_spans", [])]
            ours_total, theirs_total = ours_total + len(a), theirs_total + len(b)
            same += a == b
            documents += 1
    return {"duplicate_lines_lmforge": ours_total, "duplicate_lines_dolma": theirs_total,
            "documents_with_the_same_lines": f"{same}/{documents}"}


def dedup_run(work: Path, text_mb: float, skip_dolma: bool) -> dict:
    shutil.rmtree(work / "attributes" / "para", ignore_errors=True)
    seconds = timed(LMFORGE + ["data", "dedup", "--documents", "documents/*.jsonl.gz", "--modes", "paragraph",
                               "--name", "para", "--expected-paragraphs", "5000000",
                               "--false-positive-rate", "1e-6"], work)
    row = {"stage": "dedup paragraphs (Bloom, n=5M, p=1e-6)", "processes": 1, "lmforge_s": seconds,
           "lmforge_mb_s": text_mb / seconds}
    if not skip_dolma:
        shutil.rmtree(work / "attributes" / "dolma_para", ignore_errors=True)
        (work / "dolma.bloom").unlink(missing_ok=True)
        # absolute paths: with a relative one dolma's deduper panics ("Attribute would be written to document
        # location!") in a worker thread and still exits 0
        d = timed([str(DOLMA), "dedupe", "--documents", str(work / "documents/*.jsonl.gz"),
                   "--dedupe.name", "dolma_para",
                   "--dedupe.paragraphs.attribute_name", "bff_duplicate_paragraph_spans", "--dedupe.skip_empty",
                   "--bloom_filter.file", "dolma.bloom", "--no-bloom_filter.read_only",
                   "--bloom_filter.estimated_doc_count", "5000000",
                   "--bloom_filter.desired_false_positive_rate", "1e-6", "--processes", "1"], work)
        if not list((work / "attributes" / "dolma_para").glob("*.jsonl.gz")):
            sys.exit("dolma dedupe wrote no attributes")
        with_peer(row, seconds, d, text_mb)
        row.update(compare_dedup(work))
    return row


def mix_run(work: Path, text_mb: float, skip_dolma: bool, compression: str) -> dict:
    ours = {"streams": [{"name": "bench", "documents": ["documents/*.jsonl.gz"], "attributes": ["para"],
                         "filter": {"include": ["count(para__duplicate_paragraphs) < 500"]},
                         "span_replacement": [{"span": "para__duplicate_paragraphs", "replacement": ""}]}],
            "output": {"path": "mixed_lmforge", "max_size_in_bytes": 20_000_000, "compression": compression}}
    (work / "mix_lmforge.json").write_text(json.dumps(ours))
    shutil.rmtree(work / "mixed_lmforge", ignore_errors=True)
    seconds = timed(LMFORGE + ["data", "mix", "mix_lmforge.json"], work)
    row = {"stage": f"mix (filter + delete duplicate paragraphs), {compression} output", "processes": 1,
           "lmforge_s": seconds,
           "lmforge_mb_s": text_mb / seconds}
    if not skip_dolma:
        theirs = {"streams": [{"name": "bench", "documents": [str(work / "documents/*.jsonl.gz")],
                               "attributes": ["dolma_para"],
                               "output": {"path": "mixed_dolma", "max_size_in_bytes": 20_000_000},
                               "compression": {"output": compression},
                               "filter": {"syntax": "jq", "include": [
                                   "(.attributes.bff_duplicate_paragraph_spans | length) < 500"]},
                               "span_replacement": [{"span": "$.attributes.bff_duplicate_paragraph_spans",
                                                     "min_score": 0.5, "replacement": ""}]}],
                  "processes": 1, "work_dir": {"input": "mixwork/in", "output": "mixwork/out"}}
        (work / "mix_dolma.json").write_text(json.dumps(theirs))
        shutil.rmtree(work / "mixed_dolma", ignore_errors=True)
        shutil.rmtree(work / "mixwork", ignore_errors=True)
        d = timed([str(DOLMA), "-c", "mix_dolma.json", "mix"], work)
        with_peer(row, seconds, d, text_mb)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    parser.add_argument("--work", default="/tmp/lmforge_bench_curation")
    parser.add_argument("--tag-mb", type=float, default=10.0, help="text MB for the tagging runs")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-dolma", action="store_true")
    parser.add_argument("--stages", nargs="+", choices=("tag", "dedup", "mix"), default=["tag", "dedup", "mix"])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each stage, lmforge and dolma alternating")
    args = parser.parse_args()
    global DOLMA
    DOLMA = Path(os.environ.get("DOLMA_VENV", Path(__file__).resolve().parents[1] / ".peers" / "dolma-venv")) / "bin" / "dolma"
    if not args.skip_dolma and not DOLMA.exists():
        sys.exit(f"{DOLMA} not found: run benchmarks/peers/setup_dolma.sh (or pass --skip-dolma)")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    tag_mb = build_corpus(Path(args.corpus), work / "tag", args.tag_mb) if "tag" in args.stages else 0.0
    full_mb = build_corpus(Path(args.corpus), work / "full", None)
    print(f"tag set: {tag_mb:.1f} MB text; full set: {full_mb:.1f} MB text", flush=True)
    rows = []
    for _ in range(args.repeat):
        if "tag" in args.stages:
            rows += tag_runs(work / "tag", tag_mb, args.processes, args.skip_dolma)
        if "dedup" in args.stages or "mix" in args.stages:  # the mix reads the dedup's attributes
            rows.append(dedup_run(work / "full", full_mb, args.skip_dolma))
        if "mix" in args.stages:
            rows.append(mix_run(work / "full", full_mb, args.skip_dolma, "gz"))
            rows.append(mix_run(work / "full", full_mb, args.skip_dolma, "zst"))
    for row in rows:
        agreement = row.pop("agreement", None)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        if agreement:
            print("agreement (documents with identical values / all):",
                  {k: f"{v}/{agreement['documents']}" for k, v in agreement["same"].items()})


DOLMA = Path()

if __name__ == "__main__":
    main()
