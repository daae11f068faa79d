"""Pipeline parallelism applied from outside the model with `torch.distributed.pipelining`, as torchtitan does.

The pipeline is the layout's outermost degree (`build_mesh`): the ranks of one pipeline have the same data
coordinate (`Layout.data_rank`) and read the same rows; inside a stage, tensor parallelism and FSDP over the
layout's data ranks apply as they do without a pipeline (`parallelize`). Every rank builds and initialises the
whole model from the seed (as in every layout), splits it over its tensor ranks, then keeps only its stages. A
`ModelPart` holds a stage's modules under the model's own names (`embed.weight`, `blocks.5.attn.q_proj.weight`,
`lm_head.weight`), so optimizer state and DCP checkpoints do not depend on the layout: a run saved under
tensor 2 x pipeline 2 resumes under FSDP or in one process, and the other way round.

Stages go to ranks in a loop (stage s on rank s mod degree), or in a V for ZBV (rank r: stages r and
2·degree - 1 - r). One optimizer step runs the schedule once per `microbatches` micro-batches of the rank's
step batch; the schedule accumulates the gradients (FSDP reduce-scatters after the last backward). The loss is
the objective's, from the last stage's logits, times the trainer's scale; the last stage also sums it and the
objective's metrics for the report (the other stages report zeros, which the trainer's sum over the loss group
adds).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, schedules

from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import Transformer, layer_inputs
from lmforge.train.config import PipelineConfig

SCHEDULES = {"1F1B": "Schedule1F1B", "GPipe": "ScheduleGPipe", "Interleaved1F1B": "ScheduleInterleaved1F1B",
             "ZBV": "ScheduleZBVZeroBubble"}
# (logits, labels) of a micro-batch -> (sum of its loss, sums of the metrics to report)
LogitsLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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


class ModelPart(nn.Module):
    """Some of a Transformer's modules under their names in the model: the embedding if `first`, the blocks
    `layers`, the final norm and LM head if `last`. With consecutive layers it runs as a pipeline stage: token
    ids (first stage) or hidden states in, hidden states or logits (last stage) out. Under sequence parallelism
    the hidden states between stages are this rank's 1/`sequence_shards` of the sequence."""

    def __init__(self, model: Transformer, layers: list[int], first: bool, last: bool,
                 autocast_dtype: torch.dtype | None, sequence_shards: int = 1):
        super().__init__()
        self.config = model.config
        self.autocast_dtype = autocast_dtype  # bf16 compute without FSDP's mixed precision
        self.sequence_shards = sequence_shards
        self.embed = model.embed if first else None
        self.embed_norm = model.embed_norm if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.final_norm = model.final_norm if last else None
        self.lm_head = model.lm_head if last else None
        if hasattr(model, "alibi_slopes"):
            self.register_buffer("alibi_slopes", model.alibi_slopes, persistent=False)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        device = x.device
        length = x.shape[1] if self.embed is not None else x.shape[1] * self.sequence_shards
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.embed is not None:
                x = self.embed(x)
                if self.embed_norm is not None:
                    x = self.embed_norm(x)
            ropes, masks = layer_inputs(self.config, getattr(self, "alibi_slopes", None), x.shape[0], length,
                                        device, doc_ids=doc_ids)
            for index, block in self.blocks.items():
                window = self.config.layer_window(int(index))
                x, _ = block(x, ropes[window], masks[window], None)
            if self.lm_head is not None:
                x = self.lm_head(self.final_norm(x))
        return x


def local_stages(model: Transformer, config: PipelineConfig, pipeline_rank: int, autocast_dtype: torch.dtype | None,
                 sequence_shards: int) -> dict[int, ModelPart]:
    """The stages of pipeline rank `pipeline_rank`, by stage index."""
    layers = stage_layers(model.config.n_layers, config)
    return {s: ModelPart(model, list(layers[s]), s == 0, s == config.n_stages - 1, autocast_dtype, sequence_shards)
            for s, rank in enumerate(stage_ranks(config)) if rank == pipeline_rank}


class Pipeline:
    """This rank's stages and their schedule. `module` is all of them as one `ModelPart` under the model's names:
    the module to optimise, clip and checkpoint."""

    def __init__(self, model: Transformer, stages: dict[int, ModelPart], config: PipelineConfig, mesh: DeviceMesh,
                 device: torch.device):
        self.config = config
        self.group = mesh.get_group()
        parts = list(stages.values())
        self.module = parts[0] if len(parts) == 1 else ModelPart(
            model, [int(i) for part in parts for i in part.blocks], 0 in stages, config.n_stages - 1 in stages,
            parts[0].autocast_dtype, parts[0].sequence_shards)
        self.stages = [PipelineStage(part, s, config.n_stages, device, group=self.group) for s, part in stages.items()]
        schedule_class = getattr(schedules, SCHEDULES[config.schedule], None)
        if schedule_class is None:
            raise LmforgeError(f"parallel.pipeline.schedule={config.schedule}: this torch has no "
                               f"{SCHEDULES[config.schedule]}")
        self.schedule_class = schedule_class
        self.has_first, self.has_last = 0 in stages, config.n_stages - 1 in stages
        self.last_rank = stage_ranks(config)[-1]  # in the pipeline group
        self.schedules: dict[int, schedules._PipelineSchedule] = {}
        self.metric_names: list[str] | None = None  # the objective's, learnt from the last stage at the first step
        self.logits_loss: LogitsLoss | None = None
        self.scale = torch.ones(())
        self.calls: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def _schedule(self, n_microbatches: int):
        if n_microbatches not in self.schedules:
            single = self.config.schedule in ("1F1B", "GPipe")
            self.schedules[n_microbatches] = self.schedule_class(
                self.stages[0] if single else self.stages, n_microbatches=n_microbatches, loss_fn=self._loss,
                scale_grads=False)
        return self.schedules[n_microbatches]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, metrics = self.logits_loss(logits, labels)
        self.calls.append((loss.detach(), {k: v.detach().float() for k, v in metrics.items()}))
        return loss * self.scale

    def step(self, batch: dict[str, torch.Tensor], micro_rows: int, logits_loss: LogitsLoss, scale: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of this rank's share of a step batch ("input_ids", "labels", optionally
        "doc_ids") in micro-batches of `micro_rows` instances; the gradient of each micro-batch's loss from
        `logits_loss` times `scale` accumulates in the parameters. Returns the sums of the loss and of the
        metrics over the batch (zeros off the last stage)."""
        self.logits_loss, self.scale = logits_loss, scale
        input_ids, labels = batch["input_ids"], batch["labels"]
        rows = (self.config.microbatches or 0) * micro_rows or input_ids.shape[0]
        n_microbatches = rows // micro_rows
        schedule = self._schedule(n_microbatches)
        runs = []
        for start in range(0, input_ids.shape[0], rows):
            part = slice(start, start + rows)
            args = (input_ids[part],) if self.has_first else ()
            kwargs = {"doc_ids": batch["doc_ids"][part]} if "doc_ids" in batch else {}
            self.calls = []
            schedule.step(*args, target=labels[part] if self.has_last else None, return_outputs=False, **kwargs)
            # A schedule's first run also calls the loss once on placeholder activations, to learn the
            # gradients' shapes: only the last n_microbatches calls are the batch's.
            runs += self.calls[-n_microbatches:] if self.has_last else []
        if self.metric_names is None:
            names = [sorted(runs[0][1]) if self.has_last else None]
            dist.broadcast_object_list(names, group=self.group, group_src=self.last_rank)
            self.metric_names = names[0]
        zero = torch.zeros((), device=input_ids.device)
        loss = sum((loss for loss, _ in runs), zero)
        metrics = {name: sum((m[name] for _, m in runs), zero) for name in self.metric_names}
        return loss, metrics
