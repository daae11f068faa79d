"""What a run trained on, recoverable from its directory alone.

The trainer writes two files into the run directory:
- `data.json` once, at start (`write_run_data_record`): the resolved `DataConfig`, the dataset's fingerprint
  and a summary (instances, sources, token files);
- `batches.jsonl`, one line per optimizer step (`BatchLog.append`, rank 0 only): the step and where its global
  batch lies in the global order (epoch, start, size, world size). Lines are appended; after a resume from an
  earlier checkpoint a step may appear twice and the last line wins (the replayed batch is the same anyway).

`lmforge data inspect --run DIR --step N` rebuilds the dataset from `data.json`, checks the fingerprint and
lists the documents of every instance in that step's batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.core.config import from_dict, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.tokens.tokenizer import Tokenizer, find_tokenizer, tokens_tokenizer
from lmforge.core.manifest import read_json
from lmforge.core.files import atomic_write_json, writing

if TYPE_CHECKING:
    from lmforge.tokens.dataset import Dataset

RUN_DATA_FILE = "data.json"
BATCHES_FILE = "batches.jsonl"
RUN_DATA_FORMAT = "lmforge-run-data-v1"


def write_run_data_record(run_dir: str | Path, dataset) -> Path:
    """Record the dataset a run trains on; refuses to overwrite a record of a different dataset."""
    path = Path(run_dir) / RUN_DATA_FILE
    if path.is_file():
        previous = _read_json(path)
        if previous.get("fingerprint") != dataset.fingerprint:
            raise LmforgeError(f"{path} records a different dataset (fingerprint {previous.get('fingerprint')}) "
                               f"than this run's ({dataset.fingerprint}); use a new run directory")
        return path
    atomic_write_json(path, {"format": RUN_DATA_FORMAT, "config": _absolute_paths(to_dict(dataset.config)),
                             **dataset.summary()})
    return path


def _absolute_paths(config: dict) -> dict:
    """The config with every path made absolute, so `inspect` works from any working directory."""
    config = dict(config)
    config["paths"] = [os.path.abspath(p) for p in config["paths"]]
    config["mixture"] = {name: dict(source, paths=[os.path.abspath(p) for p in source["paths"]])
                         for name, source in config["mixture"].items()}
    if config.get("tokenizer") and os.path.exists(config["tokenizer"]):
        config["tokenizer"] = os.path.abspath(config["tokenizer"])
    return config


class BatchLog:
    """Appends one line per step to RUN_DIR/batches.jsonl. Call from rank 0 with the batch the loader yielded."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / BATCHES_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, step: int, batch: dict) -> None:
        record = {"step": int(step), "epoch": int(batch["epoch"]), "start": int(batch["batch_start"]),
                  "size": int(batch["global_batch_instances"]), "world_size": int(batch["world_size"])}
        with writing(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "BatchLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_json(path: Path) -> dict:
    return read_json(path, f"{path} not found: the run directory has no training-data record")


def find_batch(run_dir: str | Path, step: int) -> dict:
    path = Path(run_dir) / BATCHES_FILE
    if not path.is_file():
        raise LmforgeError(f"{path} not found: the run logged no batches")
    found = None
    steps = []
    bad_lines = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_step = record["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                # The last line of a run killed mid-write may be partial; any other bad line is corruption.
                bad_lines.append(number)
                continue
            steps.append(record_step)
            if record_step == step:
                found = record
    if found is None:
        span = f"steps {min(steps)}..{max(steps)}" if steps else "no steps"
        skipped = f"; skipped {len(bad_lines)} unreadable lines, first line {bad_lines[0]}" if bad_lines else ""
        raise LmforgeError(f"step {step} is not in {path} ({span} logged{skipped})")
    return found


def load_run_dataset(run_dir: str | Path):
    from lmforge.tokens.dataset import DataConfig

    record = _read_json(Path(run_dir) / RUN_DATA_FILE)
    dataset = from_dict(DataConfig, record["config"]).build()
    if dataset.fingerprint != record["fingerprint"]:
        raise LmforgeError(f"the token files named in {Path(run_dir) / RUN_DATA_FILE} changed since the run "
                           f"(fingerprint {dataset.fingerprint[:16]}... != recorded {record['fingerprint'][:16]}...)")
    return dataset


def batch_instances(run_dir: str | Path, step: int) -> tuple[dict, list[dict], "Dataset"]:
    """The batch record of `step`, per instance its id, rank and documents, and the rebuilt dataset."""
    from lmforge.tokens.loader import epoch_order

    dataset = load_run_dataset(run_dir)
    record = find_batch(run_dir, step)
    order = epoch_order(len(dataset), dataset.config.seed, record["epoch"], dataset.fingerprint)
    ids = order[record["start"]:record["start"] + record["size"]]
    per_rank = record["size"] // record["world_size"]
    instances = []
    for position, index in enumerate(ids):
        index = int(index)
        instances.append({
            "position": position, "rank": position // per_rank, "instance_id": index,
            "source": dataset.sources[int(dataset.source_of[index])].name,
            "filtered": not dataset.keep(dataset.instance_tokens(index)),
            "documents": dataset.instance_documents(index),
        })
    return record, instances, dataset


def _tokenizer_for(dataset) -> Tokenizer:
    return find_tokenizer(dataset.config.tokenizer, recorded=tokens_tokenizer(f.path for f in dataset.files),
                          what="the run's training data (set the data config's `tokenizer`, or keep the "
                               "tokenizer/ folder that `lmforge data tokenize` writes next to the token files)")


def inspect_batch(run_dir: str | Path, step: int, instance: int | None = None, text: bool = False,
                  as_json: bool = False) -> str:
    record, instances, dataset = batch_instances(run_dir, step)
    if instance is not None:
        if not 0 <= instance < len(instances):
            raise LmforgeError(f"instance {instance} is outside the batch of step {step} ({len(instances)} instances)")
        instances = [instances[instance]]
    tokenizer = _tokenizer_for(dataset) if text else None
    if as_json:
        if tokenizer is not None:
            for inst in instances:
                for doc in inst["documents"]:
                    doc["text"] = _decode(dataset, tokenizer, doc)
        return json.dumps({"step": step, **record, "fingerprint": dataset.fingerprint,
                           "sequence_length": dataset.sequence_length, "instances": instances},
                          ensure_ascii=False) + "\n"
    lines = [f"step {step}: epoch {record['epoch']}, global order positions {record['start']}.."
             f"{record['start'] + record['size'] - 1}, {record['size']} instances of {dataset.sequence_length} "
             f"tokens over {record['world_size']} ranks; dataset {dataset.fingerprint[:16]}"]
    for inst in instances:
        flag = "  [masked by the repeated n-gram filter]" if inst["filtered"] else ""
        lines.append(f"instance {inst['position']} (rank {inst['rank']}): id {inst['instance_id']}, "
                     f"source {inst['source']}{flag}")
        for doc in inst["documents"]:
            lines.append(f"  {doc['id']}  source={doc['source']}  tokens {doc['doc_span'][0]}..{doc['doc_span'][1]} "
                         f"of {doc['doc_tokens']}  -> instance {doc['instance_span'][0]}..{doc['instance_span'][1]}"
                         f"  ({doc['shard']}:{doc['line']})")
            if tokenizer is not None:
                lines.extend("    | " + row for row in _decode(dataset, tokenizer, doc).splitlines() or [""])
    return "\n".join(lines) + "\n"


def _decode(dataset, tokenizer, doc: dict) -> str:
    file = next(f for f in dataset.files if f.path == doc["token_file"])
    lo, hi = doc["file_span"]
    return tokenizer.decode(int(t) for t in file.tokens[lo:hi])
