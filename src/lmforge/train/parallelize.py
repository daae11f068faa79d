"""Parallelism applied to a `Transformer` from outside, in torchtitan's order: tensor (+ sequence) parallelism,
expert parallelism and context parallelism, then activation checkpointing, then compile (per block), then the
cut into pipeline stages (`train/pipeline.py`), then data parallelism (FSDP2 `fully_shard` per block and at the
root of the model or of each stage, HSDP over a 2-D mesh, or DDP). The model file knows nothing of any of it
beyond three swappable callables (`Attention.attend`, `MoE.dispatch`, `Experts.compute`); parameter names stay
the model's.

`build_mesh` lays the ranks out once, outermost first: pipeline, replicate, shard (split into the ranks outside
and inside an expert group), context, tensor. Tensor ranks sit innermost (on one node their all-gathers and
reduce-scatters ride the fastest links); FSDP shards over shard x context ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed._functional_collectives import all_gather_single_autograd, all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.nn.parallel import DistributedDataParallel

from lmforge.model.transformer import (LayerMask, Transformer, attention, cross_entropy_loss, document_positions,
                                       expert_mlps)
from lmforge.train.config import Layout, ParallelConfig
from lmforge.train.distributed import DistInfo
from lmforge.train.pipeline import ModelPart, Pipeline, local_stages


def build_mesh(layout: Layout, device_type: str) -> dict[str, DeviceMesh]:
    """The meshes of `layout` (every degree, pipeline included), each a view of one world mesh in the same
    rank order, so DTensors on one and FSDP on another compose:
      "weights": pipeline, replicate, fsdp (shard x context), tensor — where the weights live;
      "experts": pipeline, replicate, shard_outside_expert, expert, context, tensor — the experts' split;
      "batch":   pipeline, data (replicate x shard: different batch rows), context, tensor;
      "loss":    loss (pipeline x data x context: all a step's loss covers, the last stage computing it), tensor."""
    p, r, s, c, t, e = layout.pipeline, layout.replicate, layout.shard, layout.context, layout.tensor, layout.expert
    shapes = {
        "weights": {"pipeline": p, "replicate": r, "fsdp": s * c, "tensor": t},
        "experts": {"pipeline": p, "replicate": r, "shard_outside_expert": s // e, "expert": e, "context": c,
                    "tensor": t},
        "batch": {"pipeline": p, "data": r * s, "context": c, "tensor": t},
        "loss": {"loss": p * r * s * c, "tensor": t},
    }
    world = init_device_mesh(device_type, (layout.world,), mesh_dim_names=("world",))
    return {name: world._unflatten(0, tuple(dims.values()), tuple(dims)) for name, dims in shapes.items()}


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
    """What every layout applies before its data parallelism: activation checkpointing, then compile."""
    apply_activation_checkpointing(model, config)
    if config.compile:
        apply_compile(model)


# ---- tensor + sequence parallel -----------------------------------------------------------------------------

class HeadShardedNorm(ParallelStyle):
    """A norm over a whole projection whose heads are split across tensor ranks (OLMo 2's QK-norm): the weight is
    split like the heads, the mean square is reduced across ranks through DTensor, the output stays split."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def split_weight(_, mod, mesh):
            for name, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

        def take(_, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Shard(x.ndim - 1)], run_check=False) for x in inputs)

        def give(_, output, mesh):
            return output.redistribute(placements=[Shard(output.ndim - 1)]).to_local()

        return distribute_module(module, device_mesh, split_weight, take, give)


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Megatron's split with sequence parallelism (Korthikanti et al. 2022), as torchtitan writes it: between
    blocks the residual stream is split along the sequence (norms run on their chunk); attention and the MLP
    all-gather it, split heads / hidden units column-wise, and reduce-scatter back through the row-wise output
    projection. The embedding is split over the vocabulary, the LM head's logits stay split over it (the loss is
    `vocab_parallel_loss`; full logits are never gathered). Grouped-query attention splits the KV heads too, so
    each rank keeps the KV heads its query heads use."""
    sequence_norm = SequenceParallel(use_local_output=True)
    top = {"embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           "final_norm": sequence_norm,
           "lm_head": ColwiseParallel(input_layouts=Shard(1), use_local_output=False)}
    if model.embed_norm is not None:
        top["embed_norm"] = sequence_norm
    parallelize_module(model, mesh, top)
    if model.config.tie_embeddings:  # both were split along the vocabulary; distributing untied them
        model.lm_head.weight = model.embed.weight
    for block in model.blocks:
        plan = {
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None)),
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "attn_norm": sequence_norm, "mlp_norm": sequence_norm,
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.mlp.gate_proj is not None:
            plan["mlp.gate_proj"] = ColwiseParallel()
        if block.attn.q_norm is not None:
            plan["attn.q_norm"] = plan["attn.k_norm"] = HeadShardedNorm()
        parallelize_module(block, mesh, plan)


def vocab_parallel_loss(logits: DTensor, labels: torch.Tensor, ignore_index: int, z_loss_multiplier: float
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`cross_entropy_loss(..., reduction="sum")` on logits split over the vocabulary: the softmax's max and sum
    are reduced across tensor ranks (`loss_parallel`, which must also be active in the backward); every tensor
    rank gets the same sums."""
    logits = logits.float().flatten(0, 1)
    labels = labels.reshape(-1)
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum").to_local()
    if not z_loss_multiplier:
        return ce, None
    lse = torch.logsumexp(logits, dim=-1).to_local()
    return ce, z_loss_multiplier * torch.where(labels != ignore_index, lse * lse, 0.0).sum()


# ---- expert parallel ----------------------------------------------------------------------------------------

class ExpertParallelDispatch:
    """`MoE.dispatch` for experts spread over the ranks of `group`, rank r holding experts [r·E/n, (r+1)·E/n):
    the tokens, grouped by expert, go to the ranks holding their experts in one all-to-all and come back in
    another (both differentiable). Dropless, like `dropless_dispatch`, whose result it reproduces."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.local = n_experts // self.ranks

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts) -> torch.Tensor:
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // expert_ids.shape[1]
        counts = torch.bincount(flat, minlength=self.ranks * self.local)
        arriving = torch.empty_like(counts)
        dist.all_to_all_single(arriving, counts, group=self.group)
        arriving = arriving.view(self.ranks, self.local)  # [source rank, expert here]: tokens coming
        send, receive = counts.view(self.ranks, self.local).sum(1).tolist(), arriving.sum(1).tolist()
        routed = all_to_all_single_autograd(x[token], receive, send, self.group)
        # Arrived grouped by source rank, then expert; the experts want them grouped by expert.
        expert_of_row = torch.repeat_interleave(torch.arange(self.local, device=x.device).repeat(self.ranks),
                                                arriving.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        y = experts(routed[by_expert], arriving.sum(0))
        y = torch.zeros_like(y).index_copy(0, by_expert, y)  # back to arrival order
        back = all_to_all_single_autograd(y, send, receive, self.group)
        back = back * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, back.to(x.dtype))


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


@dataclass
class LocalExperts:
    """`Experts.compute` under expert parallelism: `expert_mlps` with the experts this rank holds (its shard of
    the stacked weights). Their gradient sums the tokens of the whole expert group, and FSDP then averages it only
    over the shard ranks outside the group; dividing it by the group size here makes it an average over all data
    ranks like every other gradient (FSDP's own divide factor needs PreMulSum, which gloo lacks)."""

    group_size: int

    def __call__(self, x, counts, gate, up, down):
        weights = (_ScaleGradient.apply(w.to_local(), 1 / self.group_size) for w in (gate, up, down))
        return expert_mlps(x, counts, *weights)


def apply_expert_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Split the stacked expert weights along the expert dimension over `mesh` and route tokens to them."""
    dispatch = ExpertParallelDispatch(mesh.get_group(), model.config.n_experts)
    for block in model.blocks:
        experts = block.mlp.experts
        for name, param in list(experts.named_parameters()):
            experts.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))
        experts.compute = LocalExperts(mesh.size())
        block.mlp.dispatch = dispatch


# ---- context parallel ---------------------------------------------------------------------------------------

class ContextParallel:
    """Each of the n ranks takes two of 2n sequence chunks, k and 2n-1-k (causal attention then costs every rank
    the same), and attends over the keys and values of the whole sequence, all-gathered per layer (Llama 3's
    context parallelism; the gather's backward sums the keys' gradients back to their ranks). The mask comes
    from the global positions and document ids, so intra-document masking and sliding windows hold across chunks.

    torch's `context_parallel` is not used: its ring SDPA covers only CUDA's flash/efficient/cuDNN kernels with
    `is_causal` and no mask, and its document masks need flex attention's compiled block masks."""

    def __init__(self, model: Transformer, mesh: DeviceMesh):
        self.group, self.ranks, self.rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.windows = {model.config.layer_window(i) for i in range(model.config.n_layers)}
        self.masks: dict[int | None, torch.Tensor] = {}  # the current micro-batch's, per attention window
        for block in model.blocks:
            block.attn.attend = self.attend

    def positions(self, length: int, device) -> torch.Tensor:
        """(ranks, length / ranks): the sequence positions each rank holds."""
        chunks = torch.arange(length, device=device).view(2 * self.ranks, -1)
        return torch.stack([torch.cat([chunks[r], chunks[2 * self.ranks - 1 - r]]) for r in range(self.ranks)])

    def split(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """This rank's part of a micro-batch and the model's keyword inputs; sets the masks for its forward
        (and for recomputing it under activation checkpointing)."""
        every = self.positions(input_ids.shape[1], input_ids.device)
        mine, keys = every[self.rank], every.flatten()  # keys in the order the all-gather returns them
        allowed = keys[None, :] <= mine[:, None]
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, mine, None] == doc_ids[:, None, keys])
        allowed = allowed[:, None] if allowed.ndim == 3 else allowed[None, None]
        self.masks = {w: allowed if w is None else allowed & (keys[None, :] > mine[:, None] - w) for w in self.windows}
        # RoPE positions as the whole model gives them: restarting in each document when documents are masked.
        positions = document_positions(doc_ids)[:, mine] if doc_ids is not None else mine.expand(len(input_ids), -1)
        return input_ids[:, mine], labels[:, mine], {"positions": positions}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LayerMask) -> torch.Tensor:
        k, v = (all_gather_single_autograd(t.contiguous(), 2, self.group) for t in (k, v))
        return attention(q, k, v, LayerMask(mask.window, self.masks[mask.window]))


# ---- data parallel and the whole ----------------------------------------------------------------------------

def apply_fsdp(model: Transformer | ModelPart, mesh: DeviceMesh, param_dtype: torch.dtype,
               expert_mesh: DeviceMesh | None = None) -> None:
    """FSDP2 per block and at the root (the model, or a pipeline stage). With experts split over an expert
    group, each block's experts are sharded first, over `expert_mesh` (the shard ranks outside the group)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.blocks.children())  # a list, or a pipeline stage's dict by layer index
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward; keep them gathered.
        if expert_mesh is not None:
            fully_shard(block.mlp.experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=i < last)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@dataclass
class Parallelized:
    """The module to train (possibly a DDP wrapper) and what a training step does differently under the layout."""

    module: nn.Module
    layout: Layout
    meshes: dict[str, DeviceMesh] | None = None  # `build_mesh`'s
    context: ContextParallel | None = None
    pipeline: Pipeline | None = None  # this rank's stages and their schedule; `module` is all its stages

    def _group(self, mesh: str, dim: str):
        return self.meshes[mesh][dim].get_group() if self.meshes is not None else None

    @property
    def data_group(self):
        """Ranks holding different batch rows: sums over the batch's rows."""
        return self._group("batch", "data")

    @property
    def loss_group(self):
        """Ranks holding different rows, sequence chunks or pipeline stages: sums over everything a step's loss
        covers."""
        return self._group("loss", "loss")

    @property
    def pipeline_group(self):
        """Ranks holding different pipeline stages (None without a pipeline)."""
        return self._group("weights", "pipeline") if self.layout.pipeline > 1 else None

    @property
    def averaged_ranks(self) -> int:
        """How many ranks' gradients DDP/FSDP average (the loss is scaled up by as much)."""
        return self.layout.data * self.layout.context

    def split_sequence(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """A micro-batch's inputs, labels and model keyword inputs on this rank (its chunks under context
        parallelism)."""
        if self.context is None:
            return input_ids, labels, {"doc_ids": doc_ids}
        return self.context.split(input_ids, labels, doc_ids)

    def loss_context(self):
        """Around a micro-batch's forward and backward: the vocabulary-parallel loss needs it in both."""
        return loss_parallel() if self.layout.tensor > 1 else contextlib.nullcontext()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_loss_multiplier: float
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed CE and z-loss over the real label tokens this rank sees."""
        if self.layout.tensor > 1:
            return vocab_parallel_loss(logits, labels, ignore_index, z_loss_multiplier)
        return cross_entropy_loss(logits, labels, ignore_index, z_loss_multiplier, reduction="sum")


def parallelize(model: Transformer, config: ParallelConfig, layout: Layout, dist_info: DistInfo,
                param_dtype: torch.dtype) -> Parallelized:
    if not dist_info.distributed:
        apply_model_transforms(model, config)
        return Parallelized(model, layout)
    device_type = dist_info.device.type
    meshes = build_mesh(layout, device_type)
    if layout.tensor > 1:
        apply_tensor_parallel(model, meshes["weights"]["tensor"])
    if layout.expert > 1:
        apply_expert_parallel(model, meshes["experts"]["expert"])
    context = ContextParallel(model, meshes["batch"]["context"]) if layout.context > 1 else None
    apply_model_transforms(model, config)
    parallel = Parallelized(model, layout, meshes, context)
    stages = {}
    if layout.pipeline > 1:  # the layout allows FSDP or no data parallelism with it
        # FSDP casts parameters itself (MixedPrecisionPolicy); without it a stage computes in bf16 by autocast.
        autocast_dtype = param_dtype if layout.mode == "none" and param_dtype != torch.float32 else None
        stages = local_stages(model, config.pipeline, meshes["weights"].get_local_rank("pipeline"),
                              autocast_dtype, sequence_shards=layout.tensor)
    if layout.mode in ("fsdp", "hsdp"):
        outer = ("replicate",) if layout.mode == "hsdp" else ()
        expert_mesh = meshes["experts"][outer + ("shard_outside_expert",)] if layout.expert > 1 else None
        for module in stages.values() or [model]:  # each stage is an FSDP root the schedule reduces after
            apply_fsdp(module, meshes["weights"][outer + ("fsdp",)], param_dtype, expert_mesh)
    elif layout.mode == "ddp":
        ids = [dist_info.device.index] if device_type == "cuda" else None
        parallel.module = DistributedDataParallel(model, device_ids=ids, process_group=parallel.data_group)
    if stages:
        parallel.pipeline = Pipeline(model, stages, config.pipeline, meshes["weights"]["pipeline"], dist_info.device)
        parallel.module = parallel.pipeline.module
    return parallel


def unwrap(module: nn.Module) -> Transformer:
    return module.module if isinstance(module, DistributedDataParallel) else module
