"""Shared pieces of the trainer tests: a tiny in-memory loader and tiny configs."""

from __future__ import annotations

import copy

import numpy as np
import torch

from lmforge.core.config import from_dict
from lmforge.core.files import is_temp_name
from lmforge.train.config import TrainConfig

TINY_MODEL = {"preset": "olmo2-tiny", "overrides": {"n_layers": 2, "d_model": 64, "n_heads": 4,
                                                    "mlp_hidden_size": 128, "vocab_size": 256,
                                                    "eos_token_id": 0, "pad_token_id": 1,
                                                    "max_sequence_length": 64}}


class ArrayLoader:
    """Fixed-length windows of a token array in a seeded order; rank r takes rows r, r+world, ... of each
    global batch, so the global batch is the same for any world size. Its state is the position in the order."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_tokens: int, rank: int, world: int,
                 seed: int = 0, mask_fraction: float = 0.0, documents: bool = False):
        n = len(tokens) // seq_len
        # Per-instance label masks with very different real-token counts, so a loss averaged per micro-batch
        # (instead of over the global batch's real tokens) would differ.
        mask_rng = np.random.default_rng(seed + 1)
        keep = mask_rng.random((n, 1)) * mask_fraction
        self.label_mask = mask_rng.random((n, seq_len)) >= keep if mask_fraction else None
        self.instances = tokens[: n * seq_len].reshape(n, seq_len)
        # With `documents`, each instance packs four documents cut at random places (`doc_lens`, as the token
        # loader gives for intra-document masking).
        cut_rng = np.random.default_rng(seed + 2)
        cuts = [np.sort(cut_rng.choice(np.arange(1, seq_len), 3, replace=False)) for _ in range(n)]
        self.doc_lens = np.diff(np.stack(cuts), prepend=0, append=seq_len) if documents else None
        self.order = np.random.default_rng(seed).permutation(n)
        self.per_batch = global_batch_tokens // seq_len
        self.rank, self.world = rank, world
        self.position = 0  # instances of the global order consumed

    def __iter__(self):
        while self.position + self.per_batch <= len(self.order):
            rows = self.order[self.position:self.position + self.per_batch][self.rank::self.world]
            self.position += self.per_batch
            batch = {"input_ids": torch.from_numpy(self.instances[rows].astype(np.int64))}
            if self.label_mask is not None:
                batch["label_mask"] = torch.from_numpy(self.label_mask[rows])
            if self.doc_lens is not None:
                batch["doc_lens"] = torch.from_numpy(self.doc_lens[rows])
            yield batch

    def set_global_batch_instances(self, n: int) -> None:
        self.per_batch = n

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def random_tokens(n: int = 40_000, vocab: int = 256, seed: int = 0) -> np.ndarray:
    """Tokens with learnable structure: a noisy repeating pattern, so loss can fall quickly."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(2, 66), n // 64 + 1)[:n]
    noise = rng.integers(2, vocab, n)
    return np.where(rng.random(n) < 0.3, noise, base).astype(np.int64)


def array_loader_factory(tokens: np.ndarray, seq_len: int, seed: int = 0, mask_fraction: float = 0.0,
                         documents: bool = False):
    def factory(global_batch_tokens, dist_info):
        return ArrayLoader(tokens, seq_len, global_batch_tokens, dist_info.data_rank, dist_info.data_world, seed,
                           mask_fraction, documents)
    return factory


def tiny_config(run_dir, **overrides) -> TrainConfig:
    data = {
        "run_dir": str(run_dir), "data": {"paths": ["in-memory"], "sequence_length": 32}, "model": TINY_MODEL,
        "global_batch_size": 8 * 32, "micro_batch_size": 2 * 32, "max_steps": 8, "precision": "fp32",
        "device": "cpu", "optimizer": {"lr": 3e-3}, "schedule": {"name": "cosine", "warmup": 2},
        "checkpoint": {"interval": 4}, "metrics": {"log_interval": 1, "tensorboard": False},
        "skip_step": {"enabled": False},
    }
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return from_dict(TrainConfig, data)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, dict]], seq_len: int, loader: dict) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lmforge.train.distributed import shutdown_distributed
    from lmforge.train.trainer import Trainer

    try:
        for run_dir, overrides in jobs:
            Trainer(tiny_config(run_dir, **overrides),
                    loader_factory=array_loader_factory(random_tokens(), seq_len, **loader)).fit()
    finally:
        shutdown_distributed()


def run_multiprocess(world: int, jobs: list[tuple[object, dict]], seq_len: int = 32, **loader) -> None:
    """Train each (run_dir, overrides) job in turn on `world` gloo processes (torch.multiprocessing, with
    the environment torchrun would set), on `array_loader_factory(..., **loader)` data. One spawn for several
    runs: starting processes is the slow part."""
    import torch.multiprocessing as mp

    jobs = [(str(d), o) for d, o in jobs]
    mp.spawn(_worker, args=(world, free_port(), jobs, seq_len, loader), nprocs=world, join=True)


def read_metrics(run_dir) -> list[dict]:
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str]) -> None:
    """`python tests/train_utils.py RUN_DIR [key=value ...] [--kill-during-save N]`: a one-process run on the
    in-memory data, for tests that kill it. With --kill-during-save N the process SIGKILLs itself in the
    middle of its N-th checkpoint save (after the shards are written, before the atomic rename)."""
    import os
    import signal

    import yaml

    torch.set_num_threads(1)
    from lmforge.train import checkpoint
    from lmforge.train.trainer import Trainer

    kill_at = None
    if "--kill-during-save" in argv:
        i = argv.index("--kill-during-save")
        kill_at = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    run_dir, overrides = argv[0], dict(a.split("=", 1) for a in argv[1:])
    overrides = {k: yaml.safe_load(v) for k, v in overrides.items()}
    if kill_at is not None:
        saves = []
        original = checkpoint._fsync_dir

        def dying_fsync(path):
            if is_temp_name(path.name):
                saves.append(path)
                if len(saves) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            original(path)

        checkpoint._fsync_dir = dying_fsync
    Trainer(tiny_config(run_dir, **overrides), loader_factory=array_loader_factory(random_tokens(), 32)).fit()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
