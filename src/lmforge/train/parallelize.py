"""Parallelism applied to a `Transformer` from outside, in torchtitan's order: activation checkpointing,
then compile (per block), then data parallelism (FSDP2 `fully_shard` per block and at the root, HSDP over a
2-D mesh, or DDP). The model file knows nothing of any of it; parameter names stay the model's."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import Transformer
from lmforge.train.config import ParallelConfig
from lmforge.train.distributed import DistInfo


def resolve_data_parallel(config: ParallelConfig, dist_info: DistInfo) -> str:
    if config.data_parallel == "auto":
        return "fsdp" if dist_info.distributed else "none"
    if config.data_parallel != "none" and not dist_info.distributed:
        return "none"  # one process: nothing to shard or replicate
    if config.data_parallel == "none" and dist_info.distributed:
        raise LmforgeError("parallel.data_parallel=none with more than one process; use ddp, fsdp or hsdp")
    return config.data_parallel


def apply_activation_checkpointing(model: Transformer, config: ParallelConfig) -> None:
    if config.activation_checkpointing == "none":
        return
    every = 1 if config.activation_checkpointing == "full" else config.ac_every
    for i, block in enumerate(model.blocks):
        if i % every == 0:
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    for block in model.blocks:
        block.compile(fullgraph=False)


def apply_model_transforms(model: Transformer, config: ParallelConfig) -> None:
    """What every layout applies before its own sharding: activation checkpointing, then compile."""
    apply_activation_checkpointing(model, config)
    if config.compile:
        apply_compile(model)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype) -> None:
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.blocks.children())  # a list, or a pipeline stage's dict by layer index
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward; keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize(model: Transformer, config: ParallelConfig, dist_info: DistInfo, param_dtype: torch.dtype
                ) -> tuple[nn.Module, str]:
    """Returns the module to train (possibly a DDP wrapper) and the data-parallel mode used."""
    mode = resolve_data_parallel(config, dist_info)
    apply_model_transforms(model, config)
    device_type = dist_info.device.type
    if mode == "fsdp":
        mesh = init_device_mesh(device_type, (dist_info.world_size,))
        apply_fsdp(model, mesh, param_dtype)
        return model, mode
    if mode == "hsdp":
        shard = config.hsdp_shard_size or dist_info.local_world_size
        if dist_info.world_size % shard:
            raise LmforgeError(f"hsdp: world size {dist_info.world_size} is not divisible by the shard size {shard}")
        mesh = init_device_mesh(device_type, (dist_info.world_size // shard, shard),
                                mesh_dim_names=("replicate", "shard"))
        apply_fsdp(model, mesh, param_dtype)
        return model, mode
    if mode == "ddp":
        ids = [dist_info.device.index] if device_type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), mode
    return model, mode


def unwrap(module: nn.Module) -> Transformer:
    return module.module if isinstance(module, DistributedDataParallel) else module
