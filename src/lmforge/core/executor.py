"""Run one function over many shards: local processes or a Ray cluster, with a progress bar.

A task is a picklable object with a `weight` (input bytes, for the ETA) handled by a top-level function
`fn(task, progress) -> dict`; `progress(n)` reports n more documents done. Stages make tasks resumable by
writing each output atomically and skipping tasks whose outputs exist, so a killed run restarts where it
stopped. Results come back in task order.

    results = run_tasks(tag_shard, tasks, ExecutorConfig(workers=2), desc="tag")
    results = run_tasks(tag_shard, tasks, ExecutorConfig(kind="ray", address="auto"), desc="tag")
"""

from __future__ import annotations

import multiprocessing as mp
import collections
import itertools
import queue
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

from lmforge.core.config import require
from lmforge.core.errors import LmforgeError
from lmforge.core.progress import Progress

PROGRESS_EVERY_DOCS = 500


@dataclass
class ExecutorConfig:
    """The `executor:` section every data stage shares (tag, dedup, mix, stats, decontaminate, tokenize)."""

    kind: Literal["local", "ray"] = "local"  # local processes, or Ray tasks (the same command across machines)
    workers: int = 1  # parallel processes (local) or CPUs of a new local Ray instance; one shard per task
    address: str | None = None  # Ray cluster address (e.g. auto or ray://host:10001); default: a new instance
    progress: bool = True  # a progress bar when stderr is a terminal

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.workers >= 1, "workers", self.workers, "must be at least 1")


class ShardProgress:
    """Input bytes done (for the ETA) with documents/s beside them."""

    def __init__(self, total_bytes: int, n_tasks: int, desc: str, enabled: bool):
        self.docs = 0
        self.bar = Progress(total_bytes, f"{desc} ({n_tasks} shards)", unit="B", enabled=enabled, unit_scale=True)

    def documents(self, n: int) -> None:
        self.docs += n
        if self.bar.shown:  # called per document: format only for a bar someone sees
            self.bar.note(f"{self.docs} docs, {self.docs / max(self.bar.elapsed, 1e-9):,.0f} docs/s")

    def task_done(self, weight: int) -> None:
        self.bar.update(weight)

    def close(self) -> None:
        self.bar.close()


_WORKER_QUEUE = None


def _init_worker(docs_queue) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = docs_queue
    # Ctrl-C reaches the whole process group: the parent alone handles it, and its pool then ends the workers
    # with SIGTERM at once (not the parent's handler, which a forked worker inherits). The temporary files a
    # worker leaves are removed by the parent, which holds the output directory's lock (core/locks.py).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_local(fn: Callable, task: Any) -> dict:
    docs_queue = _WORKER_QUEUE
    pending = 0

    def progress(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= PROGRESS_EVERY_DOCS:
            docs_queue.put(pending)
            pending = 0

    result = fn(task, progress)
    if pending:
        docs_queue.put(pending)
    return result


def _drain(docs_queue, bar: ShardProgress, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            bar.documents(docs_queue.get(timeout=0.2))
        except queue.Empty:
            continue
        except (EOFError, OSError):
            return


def run_tasks(fn: Callable, tasks: Sequence[Any], config: ExecutorConfig, desc: str = "") -> list[dict]:
    return list(iter_tasks(fn, tasks, config, desc))


def iter_tasks(fn: Callable, tasks: Sequence[Any], config: ExecutorConfig, desc: str = "") -> Iterator[dict]:
    """Yield fn's results in task order while the tasks run in parallel."""
    if not tasks:
        return
    bar = ShardProgress(sum(getattr(t, "weight", 0) for t in tasks), len(tasks), desc, config.progress)
    try:
        if config.kind == "local":
            yield from _iter_local(fn, tasks, config, bar)
        elif config.kind == "ray":
            yield from _iter_ray(fn, tasks, config, bar)
        else:
            raise LmforgeError(f"unknown executor {config.kind!r}; choose 'local' or 'ray'")
    finally:
        bar.close()


def _iter_local(fn: Callable, tasks: Sequence[Any], config: ExecutorConfig, bar: ShardProgress) -> Iterator[dict]:
    workers = max(1, min(config.workers, len(tasks)))
    if workers == 1:
        for task in tasks:
            result = fn(task, bar.documents)
            bar.task_done(getattr(task, "weight", 0))
            yield result
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    docs_queue = ctx.Queue()
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(docs_queue, bar, stop), daemon=True)
    drainer.start()
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(docs_queue,)) as pool:
            # A few tasks in flight, not all: when one fails, the pool is terminated with no task handler
            # blocked on a pipe that dead workers no longer read (found hung by the fault campaign).
            upcoming = iter(tasks)
            pending = collections.deque((task, pool.apply_async(_run_local, (fn, task)))
                                        for task in itertools.islice(upcoming, 2 * workers))
            while pending:
                task, handle = pending.popleft()
                result = handle.get()
                for following in itertools.islice(upcoming, 1):
                    pending.append((following, pool.apply_async(_run_local, (fn, following))))
                bar.task_done(getattr(task, "weight", 0))
                yield result
    finally:
        stop.set()
        drainer.join(timeout=1)


def _iter_ray(fn: Callable, tasks: Sequence[Any], config: ExecutorConfig, bar: ShardProgress) -> Iterator[dict]:
    try:
        import ray
    except ImportError:
        raise LmforgeError("the ray executor needs Ray: pip install 'lmforge[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
        if config.address:
            kwargs["address"] = config.address
        else:
            kwargs["num_cpus"] = max(1, config.workers)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise LmforgeError(f"cannot connect to Ray at {config.address or 'a new local instance'}: {e}") from None
        started_here = True
    try:
        remote = ray.remote(_run_ray_task)
        refs = [remote.remote(fn, task) for task in tasks]
        for task, ref in zip(tasks, refs):
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, LmforgeError):  # a refused write, bad input: its one line, not Ray's report
                    raise e.cause from None
                raise
            bar.documents(int(result.get("documents", 0)))
            bar.task_done(getattr(task, "weight", 0))
            yield result
    finally:
        if started_here:
            ray.shutdown()


def _run_ray_task(fn: Callable, task: Any) -> dict:
    return fn(task, lambda n: None)
