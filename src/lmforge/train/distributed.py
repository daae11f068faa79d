"""Process-group setup: one plain process, or torchrun's environment (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LmforgeError("device=cuda but no CUDA device is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); otherwise stay a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, local_world, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def launch_torchrun(lmforge_argv: list[str], nproc: int, run_dir: str, nnodes: str = "1", max_restarts: int = 0,
                    rdzv_endpoint: str | None = None, rdzv_id: str = "lmforge") -> int:
    """Run `lmforge <lmforge_argv>` under torchrun on `nproc` processes per node; returns torchrun's exit code.
    The workers see this environment and train data-parallel. On one node this process holds the run
    directory's lock for them (the workers inherit it) through every restart; across nodes only the launcher
    knows nothing of ranks, so rank 0 takes it (`lmforge.train.trainer.train`)."""
    with output_lock(run_dir) if nnodes == "1" else contextlib.nullcontext():
        return _launch_torchrun(lmforge_argv, nproc, nnodes, max_restarts, rdzv_endpoint, rdzv_id)


def _launch_torchrun(lmforge_argv: list[str], nproc: int, nnodes: str, max_restarts: int,
                     rdzv_endpoint: str | None, rdzv_id: str) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
           f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "lmforge", *lmforge_argv]
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # share the node's cores between the workers instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(nproc, 1)))
    # torchrun shares one rendezvous store between restart attempts by default; restarted gloo workers then
    # often hung forever creating their process group (tests/test_train_elastic.py), presumably on keys the
    # killed attempt left in the store. A fresh store per attempt has none.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return subprocess.call(cmd, env=env)
