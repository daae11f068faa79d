"""Tokenization throughput: `lmforge data tokenize` vs `dolma tokens`, same documents, same tokenizer JSON.

Runs both as subprocesses (start-up included, as a user would see it) at each process count, prints text MB/s,
tokens/s and the ratio, then checks that every document's token ids are identical in the two outputs.

    .venv/bin/python benchmarks/bench_tokenize.py                       # 4 shards of ../shared/corpus
    .venv/bin/python benchmarks/bench_tokenize.py --documents '../shared/corpus/*.jsonl.zst' --processes 1 2

Needs the dolma peer: benchmarks/peers/setup_dolma.sh (creates .peers/dolma-venv).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lmforge.curation.documents import open_binary, strip_suffix
from lmforge.tokens.tokenizer import Tokenizer

CORPUS = str(Path(__file__).resolve().parents[2] / "shared" / "corpus")
DEFAULT_SHARDS = ["python-docs-0000", "debian-reference-0000", "fortunes-0001", "python-stdlib-0000"]


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its worker processes). CPU time is what to compare on a
    shared machine: other tenants' load stretches wall time but not the work done."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def dolma_ids(out: Path, dtype: str) -> dict[str, list[int]]:
    ids = {}
    for npy in out.rglob("*.npy"):
        tokens = np.memmap(npy, dtype=dtype, mode="r")
        with gzip.open(str(npy)[:-4] + ".csv.gz", "rt") as f:
            for row in f:
                start, end, doc_id = row.split(",")[:3]
                ids[doc_id] = tokens[int(start):int(end)].tolist()
    return ids


def lmforge_ids(out: Path, dtype: str) -> dict[str, list[int]]:
    ids = {}
    for sidecar in out.glob("*.docs.parquet"):
        tokens = np.fromfile(str(sidecar)[:-len(".docs.parquet")] + ".npy", dtype=dtype)
        table = pq.read_table(sidecar, columns=["id", "start", "end"])
        for doc_id, start, end in zip(*(table.column(c).to_pylist() for c in ("id", "start", "end"))):
            ids[doc_id] = tokens[start:end].tolist()
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", nargs="+",
                        default=[f"{CORPUS}/{name}.jsonl.zst" for name in DEFAULT_SHARDS])
    parser.add_argument("--tokenizer", default="olmo")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dolma", default=str(Path(os.environ.get("DOLMA_VENV", Path(__file__).resolve().parents[1] / ".peers" / "dolma-venv")) / "bin" / "dolma"))
    args = parser.parse_args()

    if not os.path.exists(args.dolma):
        sys.exit(f"{args.dolma} not found: run benchmarks/peers/setup_dolma.sh first")
    tokenizer = Tokenizer.load(args.tokenizer)
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    files = sorted(f for pattern in args.documents for f in glob.glob(pattern))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    work = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    # Both tools read the same gzip copies: dolma's smart_open needs the `backports.zstd` module for .zst and,
    # without it, logs a traceback and writes zero documents with exit status 0.
    docs_dir = work / "documents"
    docs_dir.mkdir()
    for f in files:
        with open_binary(f) as src, gzip.open(docs_dir / (strip_suffix(f) + ".jsonl.gz"), "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
    files = sorted(str(p) for p in docs_dir.iterdir())
    print(f"# {platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# {len(files)} shards: {', '.join(os.path.basename(f) for f in files)}; tokenizer {tokenizer.source}")
    results = []
    try:
        for processes in args.processes:
            ours_out, dolma_out = work / f"ours_p{processes}", work / f"dolma_p{processes}"
            t_ours, cpu_ours = run([sys.executable, "-m", "lmforge", "data", "tokenize", "--documents", *files,
                          "--tokenizer", args.tokenizer, "--out", str(ours_out), "--workers", str(processes),
                          "--no-progress"], env)
            t_dolma, cpu_dolma = run([args.dolma, "tokens", "--documents", str(docs_dir / "*"), "--destination", str(dolma_out),
                           "--tokenizer.name_or_path", tokenizer.source, "--tokenizer.eos_token_id",
                           str(tokenizer.eos_id), "--tokenizer.pad_token_id", str(tokenizer.pad_id), "--dtype", dtype,
                           "--processes", str(processes), "--seed", "3920"], env)
            counts = json.loads((ours_out / "manifest.json").read_text())["counts"]
            mb, tokens = counts["text_bytes"] / 1e6, counts["tokens"]
            row = {"processes": processes, "ours_s": t_ours, "dolma_s": t_dolma, "ours_cpu_s": cpu_ours,
                   "dolma_cpu_s": cpu_dolma, "text_MB": mb, "tokens": tokens, "load": os.getloadavg()[0]}
            results.append(row)
            print(f"P={processes}: lmforge {t_ours:6.1f} s  {mb / t_ours:5.2f} MB/s  {tokens / t_ours / 1e6:5.3f} M tok/s"
                  f" | dolma {t_dolma:6.1f} s  {mb / t_dolma:5.2f} MB/s  {tokens / t_dolma / 1e6:5.3f} M tok/s"
                  f" | speed-up {t_dolma / t_ours:4.2f}x")
            print(f"     per CPU second: lmforge {tokens / cpu_ours / 1e6:5.3f} M tok/s, dolma "
                  f"{tokens / cpu_dolma / 1e6:5.3f} M tok/s, ratio {cpu_dolma / cpu_ours:4.2f}x "
                  f"(load average {os.getloadavg()[0]:.1f})")
            ours, theirs = lmforge_ids(ours_out, dtype), dolma_ids(dolma_out, dtype)
            if not theirs:
                sys.exit("dolma wrote no documents; see its log")
            same = sum(ours.get(k) == v for k, v in theirs.items())
            print(f"     token ids identical for {same} of {len(theirs)} dolma documents "
                  f"({len(ours)} lmforge documents)")
            shutil.rmtree(ours_out)
            shutil.rmtree(dolma_out)
    finally:
        shutil.rmtree(work)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
