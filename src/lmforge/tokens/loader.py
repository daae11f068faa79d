"""The global instance order, rank slicing, background loading and exact resume.

The order of epoch e is `permutation(len(dataset))` from a PCG64 generator seeded with (seed, epoch,
fingerprint): nothing about the hardware enters it. A global batch is the next `global_batch_instances`
positions of that order; data-parallel rank r of W takes the contiguous block r of W equal parts. The state
is (epoch, positions consumed), so a resumed run continues at the same position whatever its world size or
batch size. When fewer positions than a global batch remain in an epoch, they are skipped and the next epoch
starts with a fresh permutation.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from lmforge.core.errors import LmforgeError

STATE_VERSION = 1


def epoch_order(num_instances: int, seed: int, epoch: int, fingerprint: str) -> np.ndarray:
    """The global order of instance ids for one epoch."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, int(fingerprint[:16], 16)]))
    return rng.permutation(num_instances)


class DataLoader:
    """Iterates over this rank's share of each global batch, prefetching on a background thread.

    Each batch is a dict: `input_ids` LongTensor[b, L]; `instance_ids` LongTensor[b] (dataset indices);
    `label_mask` BoolTensor[b, L] (False over instances the n-gram filter rejects); `instance_mask`
    BoolTensor[b]; with `document_boundaries`, `doc_lens` LongTensor[b, D] (zero-padded), `cu_seqlens`
    IntTensor[n+1] over the flattened batch and `max_doc_len`; and plain ints `epoch`, `batch_start`,
    `global_batch_instances`, `rank`, `world_size` that locate the batch in the global order.
    """

    def __init__(self, dataset, global_batch_instances: int, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 max_epochs: int | None = None, prefetch_batches: int | None = None,
                 pin_memory: bool | None = None):
        if not 0 <= rank < world_size:
            raise LmforgeError(f"rank {rank} is outside world size {world_size}")
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.prefetch_batches = dataset.config.prefetch_batches if prefetch_batches is None else prefetch_batches
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.epoch = epoch
        self.position = 0
        self.tokens_consumed = 0
        self.instances_filtered = 0
        self._orders: dict[int, np.ndarray] = {}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self.global_batch_instances = 0
        self.set_global_batch_instances(global_batch_instances)

    # ---- order -------------------------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.dataset), self.dataset.config.seed, epoch,
                                               self.dataset.fingerprint)}
        return self._orders[epoch]

    def batches_in_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_instances

    def _next_start(self, epoch: int, position: int) -> tuple[int, int]:
        """Where the next global batch starts: rolls over to the next epoch when this one has too few left."""
        if position + self.global_batch_instances > len(self.dataset):
            return epoch + 1, 0
        return epoch, position

    # ---- configuration and state -------------------------------------------------------------------------

    def set_global_batch_instances(self, global_batch_instances: int) -> None:
        """Change the batch size (e.g. a batch-size warmup); takes effect at the next batch."""
        if global_batch_instances < 1 or global_batch_instances % self.world_size:
            raise LmforgeError(f"global batch of {global_batch_instances} instances does not split evenly over "
                               f"{self.world_size} ranks")
        if global_batch_instances > len(self.dataset):
            raise LmforgeError(f"global batch of {global_batch_instances} instances is larger than the dataset "
                               f"({len(self.dataset)} instances)")
        if global_batch_instances != self.global_batch_instances:
            self._stop_prefetch()
            self.global_batch_instances = global_batch_instances

    def state_dict(self) -> dict:
        """The position after the last batch handed out (prefetched batches do not count); the same on every
        rank except `instances_filtered`, which counts this rank's instances only."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.dataset.fingerprint,
            "seed": self.dataset.config.seed,
            "sequence_length": self.dataset.sequence_length,
            "epoch": self.epoch,
            "instances_consumed": self.position,
            "tokens_consumed": self.tokens_consumed,
            "instances_filtered": self.instances_filtered,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.dataset.fingerprint:
            raise LmforgeError(
                f"cannot resume: the checkpoint's data fingerprint {str(state.get('fingerprint'))[:16]}... differs "
                f"from this dataset's {self.dataset.fingerprint[:16]}... (token files, sequence length, mixture "
                f"or seed changed); resuming would not continue the same data order")
        if state.get("seed") != self.dataset.config.seed:
            raise LmforgeError(f"cannot resume: checkpoint data seed {state.get('seed')} != configured "
                               f"{self.dataset.config.seed}")
        self._stop_prefetch()
        self.epoch = int(state["epoch"])
        self.position = int(state["instances_consumed"])
        self.tokens_consumed = int(state.get("tokens_consumed", 0))
        self.instances_filtered = int(state.get("instances_filtered", 0))

    # ---- batches -----------------------------------------------------------------------------------------

    def make_batch(self, epoch: int, start: int) -> dict:
        """This rank's part of the global batch that starts at `start` in epoch `epoch`'s order."""
        per_rank = self.global_batch_instances // self.world_size
        lo = start + self.rank * per_rank
        ids = self.order(epoch)[lo:lo + per_rank]
        dataset = self.dataset
        tokens = np.stack([dataset.instance_tokens(int(i)) for i in ids])
        keep = np.array([dataset.keep(row) for row in tokens], dtype=bool)
        batch = {
            "input_ids": torch.from_numpy(tokens),
            "instance_ids": torch.from_numpy(ids.astype(np.int64)),
            "instance_mask": torch.from_numpy(keep),
            "label_mask": torch.from_numpy(np.repeat(keep[:, None], tokens.shape[1], axis=1)),
        }
        if dataset.config.document_boundaries:
            lengths = [dataset.instance_document_lengths(int(i)) for i in ids]
            width = max(len(x) for x in lengths)
            doc_lens = np.zeros((len(ids), width), dtype=np.int64)
            for row, x in enumerate(lengths):
                doc_lens[row, :len(x)] = x
            flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lengths])
            batch["doc_lens"] = torch.from_numpy(doc_lens)
            batch["cu_seqlens"] = torch.from_numpy(np.concatenate([[0], np.cumsum(flat)]).astype(np.int32))
            batch["max_doc_len"] = int(flat.max())
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch.update(epoch=epoch, batch_start=start, global_batch_instances=self.global_batch_instances,
                     rank=self.rank, world_size=self.world_size, filtered=int((~keep).sum()))
        return batch

    def _producer(self, epoch: int, position: int, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:
            # Never block for good on a full queue: the consumer may be stopping this thread.
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                epoch, position = self._next_start(epoch, position)
                if self.max_epochs is not None and epoch >= self.max_epochs:
                    put(None)
                    return
                put(self.make_batch(epoch, position))
                position += self.global_batch_instances
        except BaseException as e:  # handed to the consumer, which re-raises it in the training thread
            put(e)

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.prefetch_batches <= 0:
            epoch, position = self._next_start(self.epoch, self.position)
            if self.max_epochs is not None and epoch >= self.max_epochs:
                raise StopIteration
            batch = self.make_batch(epoch, position)
        else:
            if self._thread is None:
                self._stop = threading.Event()
                self._queue = queue.Queue(maxsize=self.prefetch_batches)
                self._thread = threading.Thread(target=self._producer, daemon=True, name="lmforge-data",
                                                args=(self.epoch, self.position, self._queue, self._stop))
                self._thread.start()
            batch = self._queue.get()
            if batch is None:
                self._stop_prefetch()
                raise StopIteration
            if isinstance(batch, BaseException):
                self._stop_prefetch()
                raise batch
        self.epoch = batch["epoch"]
        self.position = batch["batch_start"] + batch["global_batch_instances"]
        self.tokens_consumed += batch["global_batch_instances"] * self.dataset.sequence_length
        self.instances_filtered += batch["filtered"]
        return batch

    def close(self) -> None:
        self._stop_prefetch()

    def __del__(self) -> None:
        self._stop_prefetch()
