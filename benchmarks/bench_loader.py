"""Loader throughput: instances/s of sequence length 4096 from token memmaps, on one core.

Builds synthetic token files (random ids, documents of 50..5000 tokens, uint16 and uint32) in a temporary folder
and times `dataset.loader(...)` iteration: synchronous, with the background thread, and with document
boundaries plus the repeated n-gram filter on. The goal is >= 200 instances/s on one core.

    .venv/bin/python benchmarks/bench_loader.py [--tokens 60000000] [--batches 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmforge.tokens.tokenize import sidecar_metadata
from lmforge.tokens.instance_filter import InstanceFilterConfig
from lmforge.tokens.dataset import DataConfig


def make_files(folder: Path, total_tokens: int, dtype: str, files: int = 4) -> None:
    rng = np.random.default_rng(0)
    vocab = 50_280 if dtype == "uint16" else 100_278
    for f in range(files):
        lengths = rng.integers(50, 5000, size=total_tokens // files // 2500)
        tokens = rng.integers(0, vocab, size=int(lengths.sum()), dtype=np.int64).astype(dtype)
        ends = np.cumsum(lengths)
        tokens[ends - 1] = vocab - 1
        tokens.tofile(folder / f"part-{f:05d}.npy")
        table = pa.table({"id": [f"{f}-{i}" for i in range(len(lengths))], "source": ["synthetic"] * len(lengths),
                          "start": pa.array(ends - lengths), "end": pa.array(ends),
                          "line": pa.array(np.arange(1, len(lengths) + 1))})
        table = table.replace_schema_metadata(sidecar_metadata(dtype=dtype, eos_id=vocab - 1, bos_id=None,
                                                               vocab_size=vocab, shard=f"part-{f}.jsonl"))
        pq.write_table(table, folder / f"part-{f:05d}.docs.parquet")


def measure(config: DataConfig, batch: int, batches: int, prefetch: int) -> float:
    dataset = config.build()
    loader = dataset.loader(batch, prefetch_batches=prefetch, pin_memory=False)
    next(loader)  # thread start-up, first file reads
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=60_000_000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="instances per batch")
    parser.add_argument("--sequence-length", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for everything, thread included
    print(f"# {platform.node()} {os.cpu_count()} CPUs (pinned to 1), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = {}
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        for dtype in ("uint16", "uint32"):
            folder = work / dtype
            folder.mkdir()
            make_files(folder, args.tokens, dtype)
            base = dict(paths=[str(folder)], sequence_length=args.sequence_length, seed=1)
            variants = {
                "sync": (DataConfig(**base), 0),
                "background thread": (DataConfig(**base), 2),
                "thread + doc boundaries + n-gram filter": (
                    DataConfig(**base, document_boundaries=True, instance_filter=InstanceFilterConfig(enabled=True)), 2),
            }
            for name, (config, prefetch) in variants.items():
                rate = measure(config, args.batch, args.batches, prefetch)
                results[f"{dtype} {name}"] = rate
                print(f"{dtype:6s} seq {args.sequence_length} {name:42s} {rate:8.0f} instances/s "
                      f"({rate * args.sequence_length / 1e6:.1f} M tokens/s)")
    finally:
        shutil.rmtree(work)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
