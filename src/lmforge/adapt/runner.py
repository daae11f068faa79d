"""What every adaptation stage does around its objective: load the start model, feed rows to the one trainer
(`lmforge.train.trainer`), and write the trained model as a model directory carrying its chat template."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from lmforge.adapt.config import AdaptConfig
from lmforge.adapt.data import RecordReport
from lmforge.adapt.templates import chat_tokenizer
from lmforge.core.errors import LmforgeError
from lmforge.model.directory import write_model_dir
from lmforge.model.loading import LoadedModel, load
from lmforge.tokens.tokenizer import Tokenizer
from lmforge.train.distributed import DistInfo, barrier, shutdown_distributed
from lmforge.train.objective import Objective
from lmforge.train.trainer import train

MODEL_DIR = "model"  # <out>/model: the trained model directory


def load_policy(path: str | Path, template: str = "tokenizer", device: str | torch.device = "cpu"
                ) -> tuple[LoadedModel, Tokenizer]:
    """The start model of a stage (any form `lmforge.model.loading.load` reads) and its tokenizer carrying
    the chat template `template` (`tokenizer`: the model's own)."""
    loaded = load(path, device=device, require_tokenizer=True)
    return loaded, chat_tokenizer(loaded.tokenizer, template)


class RowLoader:
    """Rows of `arrays` (first dimension) in a seeded order, epoch after epoch (epoch e's order is a function of
    (seed, e)); a global batch is the next `global_batch_instances` rows of that stream, and rank r takes rows
    r, r+world, ... of it. Its state is the position in the stream."""

    def __init__(self, arrays: dict[str, np.ndarray], global_batch_instances: int, rank: int, world: int, seed: int):
        self.arrays = arrays
        self.rows = len(next(iter(arrays.values())))
        self.per_batch, self.rank, self.world, self.seed = global_batch_instances, rank, world, seed
        self.position = 0
        self._orders: dict[int, np.ndarray] = {}

    def _row(self, position: int) -> int:
        epoch, index = divmod(position, self.rows)
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.rows)}
        return int(self._orders[epoch][index])

    def __iter__(self):
        while True:
            rows = [self._row(p) for p in range(self.position, self.position + self.per_batch)][self.rank::self.world]
            self.position += self.per_batch
            yield {k: torch.from_numpy(v[rows]) for k, v in self.arrays.items()}

    def set_global_batch_instances(self, n: int) -> None:
        self.per_batch = n

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def start_weights(config: AdaptConfig, loaded: LoadedModel) -> str:
    """A path the trainer's `init_from` reads: the start itself, or (a transformers directory) a model directory
    written once under <out>/start."""
    if loaded.kind != "hf":
        return str(loaded.path)
    start = Path(config.out) / "start"
    if not (start / "config.json").is_file():
        write_model_dir(loaded.model, start, loaded.tokenizer, command="adapt (start model)",
                        extra={"source": str(loaded.path)})
    return str(start)


def run_stage(config: AdaptConfig, stage: str, loaded: LoadedModel, tokenizer: Tokenizer,
              arrays: dict[str, np.ndarray], objective: Objective, report: RecordReport) -> Path:
    """Train `objective` on the rows of `arrays` from the start model, then write <out>/model."""
    rows = len(next(iter(arrays.values())))
    steps = config.steps(rows)
    if loaded.kind == "checkpoint" and loaded.meta.get("tokenizer") is None:
        raise LmforgeError(f"{loaded.path} records no tokenizer; export it with its tokenizer first")
    train_config = config.train_config(loaded.model.config, start_weights(config, loaded),
                                       str(Path(tokenizer.source).parent), steps)
    loaded.model = None  # the trainer builds its own copy from the start weights
    for line in report.summary():
        print(line, file=sys.stderr)
    print(f"{stage}: {rows:,} rows, {steps} steps of {config.batch_size}", file=sys.stderr)

    def loader_factory(global_batch_tokens: int, dist_info: DistInfo) -> RowLoader:
        return RowLoader(arrays, global_batch_tokens // config.max_seq_length, dist_info.rank, dist_info.world_size,
                         config.seed)

    command = f"lmforge adapt {stage}"
    summary = train(train_config, loader_factory=loader_factory, objective=objective, command=command)
    finish_ranks()
    out = Path(config.out) / MODEL_DIR
    if summary and is_main_rank():
        trained = load(config.out)
        write_model_dir(trained.model, out, tokenizer, command=command, config=config,
                        inputs=[Path(p) for p in config.data],
                        counts={**report.counts(), "rows": rows, "steps": summary["steps"]},
                        extra={"start": config.model, "template": config.template})
    return out


def finish_ranks() -> None:
    """After training on several ranks: wait for all, then end the process group, so that rank 0 alone reads the
    final checkpoint (a checkpoint read with a process group is a collective the other ranks would not join)."""
    barrier()
    shutdown_distributed()


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"
