"""Pipeline parallelism applied from outside the model with `torch.distributed.pipelining`, as torchtitan does.

Ranks form a (pp, dp) mesh, pipeline outermost: rank = pp_rank · dp + dp_rank; the ranks of one pipeline read
the same data. Every rank builds and initialises the whole model from the seed (as in every layout), then keeps
only its stages. A `ModelPart` holds a stage's modules under the model's own names (`embed.weight`,
`blocks.5.attn.q_proj.weight`, `lm_head.weight`), so optimizer state and DCP checkpoints do not depend on the
layout: a run saved under PP=2 resumes under FSDP or in one process, and the other way round.

Stages go to ranks in a loop (stage s on rank s mod degree), or in a V for ZBV (rank r: stages r and
2·degree - 1 - r). One optimizer step runs the schedule once per `microbatches` micro-batches of the rank's
step batch; the schedule accumulates the gradients (FSDP reduce-scatters after the last backward). The loss
is the trainer's summed CE + z-loss times its global normalisation, computed at the last stage, which also
sums CE and z-loss for the report; the trainer all-reduces those sums, so every rank reports the same loss.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, schedules

from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import Transformer, layer_inputs
from lmforge.train.config import ParallelConfig, PipelineConfig
from lmforge.train.distributed import DistInfo
from lmforge.train.parallelize import apply_fsdp, resolve_data_parallel

SCHEDULES = {"1F1B": "Schedule1F1B", "GPipe": "ScheduleGPipe", "Interleaved1F1B": "ScheduleInterleaved1F1B",
             "ZBV": "ScheduleZBVZeroBubble"}
LossSums = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def stage_layers(n_layers: int, config: PipelineConfig) -> list[range]:
    """The blocks of each stage: cut at `split_points`, else equal counts (the config check ensures they divide)."""
    cuts = config.split_points or list(range(n_layers // config.n_stages, n_layers, n_layers // config.n_stages))
    bounds = [0, *cuts, n_layers]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stage_ranks(config: PipelineConfig) -> list[int]:
    """The pipeline rank of each stage."""
    if config.schedule == "ZBV":
        return [s if s < config.degree else config.n_stages - 1 - s for s in range(config.n_stages)]
    return [s % config.degree for s in range(config.n_stages)]


def data_view(dist_info: DistInfo, degree: int) -> DistInfo:
    """This rank as the data loader sees it: its place among the data-parallel ranks."""
    data_world = dist_info.world_size // degree
    return dataclasses.replace(dist_info, rank=dist_info.rank % data_world, world_size=data_world)


class ModelPart(nn.Module):
    """Some of a Transformer's modules under their names in the model: the embedding if `first`, the blocks
    `layers`, the final norm and LM head if `last`. With consecutive layers it runs as a pipeline stage: token
    ids (first stage) or hidden states in, hidden states or logits (last stage) out."""

    def __init__(self, model: Transformer, layers: list[int], first: bool, last: bool,
                 autocast_dtype: torch.dtype | None):
        super().__init__()
        self.config = model.config
        self.autocast_dtype = autocast_dtype  # bf16 compute without FSDP's mixed precision
        self.embed = model.embed if first else None
        self.embed_norm = model.embed_norm if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.final_norm = model.final_norm if last else None
        self.lm_head = model.lm_head if last else None
        if hasattr(model, "alibi_slopes"):
            self.register_buffer("alibi_slopes", model.alibi_slopes, persistent=False)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        device = x.device
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.embed is not None:
                x = self.embed(x)
                if self.embed_norm is not None:
                    x = self.embed_norm(x)
            ropes, masks = layer_inputs(self.config, getattr(self, "alibi_slopes", None), x.shape[0], x.shape[1],
                                        device, doc_ids=doc_ids)
            for index, block in self.blocks.items():
                window = self.config.layer_window(int(index))
                x, _ = block(x, ropes[window], masks[window], None)
            if self.lm_head is not None:
                x = self.lm_head(self.final_norm(x))
        return x


class Pipeline:
    """This rank's stages and their schedule. `model` is the rank's part of the model (all its stages) under
    the model's names: the module to optimise, clip and checkpoint."""

    def __init__(self, model: Transformer, config: ParallelConfig, dist_info: DistInfo, param_dtype: torch.dtype,
                 use_bf16: bool, micro_rows: int, loss_sums: LossSums):
        pp = config.pipeline
        self.config = pp
        data = data_view(dist_info, pp.degree)
        self.dp_mode = resolve_data_parallel(config, data)
        if self.dp_mode not in ("none", "fsdp"):
            raise LmforgeError(f"parallel.pipeline runs with FSDP over the data-parallel ranks, not "
                               f"data_parallel={config.data_parallel}")
        self.mesh = init_device_mesh(dist_info.device.type, (pp.degree, data.world_size),
                                     mesh_dim_names=("pp", "dp"))
        self.group = self.mesh.get_group("pp")
        pp_rank = self.mesh.get_local_rank("pp")
        layers = stage_layers(model.config.n_layers, pp)
        mine = [s for s, rank in enumerate(stage_ranks(pp)) if rank == pp_rank]
        autocast_dtype = torch.bfloat16 if use_bf16 and self.dp_mode == "none" else None
        parts = [ModelPart(model, list(layers[s]), s == 0, s == pp.n_stages - 1, autocast_dtype) for s in mine]
        self.model = parts[0] if len(parts) == 1 else ModelPart(
            model, [i for s in mine for i in layers[s]], 0 in mine, pp.n_stages - 1 in mine, autocast_dtype)
        if self.dp_mode == "fsdp":
            for part in parts:  # each stage is an FSDP root the schedule reduces after its last backward
                apply_fsdp(part, self.mesh["dp"], param_dtype)
        stages = [PipelineStage(part, s, pp.n_stages, dist_info.device, group=self.group)
                  for part, s in zip(parts, mine)]
        schedule_class = getattr(schedules, SCHEDULES[pp.schedule], None)
        if schedule_class is None:
            raise LmforgeError(f"parallel.pipeline.schedule={pp.schedule}: this torch has no {SCHEDULES[pp.schedule]}")
        self.rows_per_run = (pp.microbatches or 0) * micro_rows  # 0: the whole step batch in one run
        self.micro_rows = micro_rows
        self.loss_sums = loss_sums
        self.has_first, self.has_last = 0 in mine, pp.n_stages - 1 in mine
        self.schedule_class, self.stages = schedule_class, stages
        self.schedules: dict[int, schedules._PipelineSchedule] = {}
        self.scale = torch.ones(())
        self.micro_sums: list[torch.Tensor] = []

    def _schedule(self, n_microbatches: int):
        if n_microbatches not in self.schedules:
            single = self.config.schedule in ("1F1B", "GPipe")
            self.schedules[n_microbatches] = self.schedule_class(
                self.stages[0] if single else self.stages, n_microbatches=n_microbatches, loss_fn=self._loss,
                scale_grads=False)
        return self.schedules[n_microbatches]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce, z = self.loss_sums(logits, labels)
        self.micro_sums.append(torch.stack([ce.detach(), z.detach() if z is not None else torch.zeros_like(ce)]))
        return (ce + z if z is not None else ce) * self.scale

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None,
             scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of this rank's share of a step batch; gradients accumulate in the parameters.
        Returns the sums of CE and z-loss over the batch's real tokens (zero off the last stage)."""
        self.scale = scale
        rows = self.rows_per_run or input_ids.shape[0]
        n_microbatches = rows // self.micro_rows
        schedule = self._schedule(n_microbatches)
        sums = torch.zeros(2, device=input_ids.device)
        for start in range(0, input_ids.shape[0], rows):
            part = slice(start, start + rows)
            args = (input_ids[part],) if self.has_first else ()
            kwargs = {"doc_ids": doc_ids[part]} if doc_ids is not None else {}
            self.micro_sums = []
            schedule.step(*args, target=labels[part] if self.has_last else None, return_outputs=False, **kwargs)
            # A schedule's first run also calls the loss once on placeholder activations, to learn the
            # gradients' shapes: only the last n_microbatches calls are the batch's.
            if self.micro_sums:
                sums += torch.stack(self.micro_sums[-n_microbatches:]).sum(0)
        return sums[0], sums[1]
