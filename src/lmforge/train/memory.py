"""Memory planner: per-device training memory of a model under a parallel layout, before reserving a cluster.

Per device, for AdamW training as `Trainer` runs it (fp32 master weights, fp32 gradients and moments; with
`bf16`, FSDP computes in bf16 from gathered copies, a single device through autocast):

- parameters, gradients, optimizer state: 4 + 4 + 8 bytes per parameter the device holds. Tensor parallelism
  divides the matrices (norms stay replicated), pipeline parallelism gives the device the layers of its
  stage (the first holds the embedding, the last the final norm and LM head: the larger counts), expert
  parallelism divides the experts, and FSDP shards what is left over `dp_shard x cp` ranks (torchtitan's
  `dp_shard_cp` mesh; experts over `dp_shard x cp / ep`). Replicas (`replicate`, HSDP) hold full copies.
- activations: the bytes autograd saves for backward, counted by running the model's own code (one block,
  then final norm, LM head and loss) on fake tensors (`FakeTensorMode`: shapes and dtypes, no memory) and
  summing the distinct storages the saved-tensor hooks see (parameters excluded). Attention is counted as the
  flash kernels save it (q, k, v, output and log-sum-exp, no L x L matrix), which is what CPU and GPU
  SDPA do without a mask. Sequence and context parallelism divide activations by `tp x cp`; a 1F1B pipeline
  keeps up to `pp` micro-batches in flight on its first stage. With activation checkpointing a block keeps
  only its input, and one block's activations are recomputed at a time in backward.
- buffers: what a step holds besides the above: FSDP's gathered copy of the largest unit (twice: the next one
  is prefetched) and the unsharded fp32 gradient it reduce-scatters; autocast's bf16 weight copies on one
  device; the logits' gradient when backward starts (fp32 tokens x vocabulary); the model's own buffers.

The peak is the larger of backward's start (everything above, gradients already allocated: true from the
second micro-batch of a step) and the optimizer step (weights, gradients, moments and foreach AdamW's
temporary of one moment's size). `tests/test_train_memory.py` compares it with a hand count and with the peak
of tensor memory measured in real training steps (docs/training.md, "Memory planner").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lmforge.core.config import require
from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import (Block, LayerMask, ModelConfig, Transformer, cross_entropy_loss,
                                       rope_frequencies, rope_tables)

PLAN_KEYS = {"tp": "tp", "pp": "pp", "cp": "cp", "ep": "ep", "dp": "dp_shard", "shard": "dp_shard",
             "dp_shard": "dp_shard", "replicate": "dp_replicate", "dp_replicate": "dp_replicate"}
# A layout fits when the estimate is at most this share of the device: the CUDA context, NCCL's buffers and
# the caching allocator's fragmentation take the rest.
USABLE_FRACTION = 0.9
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of each kind of parallelism; the world size is tp x pp x cp x dp_shard x dp_replicate (expert
    parallelism reuses the dp_shard x cp ranks, as in torchtitan)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "dp_shard", "dp_replicate"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, getattr(self, name),
                    "must be a positive integer")
        require((self.dp_shard * self.cp) % self.ep == 0, "ep", self.ep,
                f"must divide dp_shard x cp ({self.dp_shard} x {self.cp}): experts are spread over those ranks")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp_shard * self.dp_replicate

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.cp

    @classmethod
    def parse(cls, text: str) -> "ParallelPlan":
        """`tp=8,pp=4,dp=16`: keys tp, pp, cp, ep, dp (or shard, dp_shard) and replicate (or dp_replicate)."""
        degrees: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in PLAN_KEYS:
                raise LmforgeError(f"--plan: {part!r} is not KEY=N with KEY one of {', '.join(PLAN_KEYS)}")
            if not value.strip().isdigit():
                raise LmforgeError(f"--plan: {part!r}: the degree must be a positive integer")
            field_name = PLAN_KEYS[key.strip()]
            if field_name in degrees:
                raise LmforgeError(f"--plan: {field_name} is given twice")
            degrees[field_name] = int(value)
        return cls(**degrees)

    def check(self, model: ModelConfig, seq_len: int) -> None:
        """Refuse a layout the model cannot be split by, naming the numbers."""
        problems = []
        if model.n_heads % self.tp or model.n_kv_heads % self.tp:
            problems.append(f"tp={self.tp} must divide the attention heads ({model.n_heads}) and KV heads "
                            f"({model.n_kv_heads})")
        if model.mlp_hidden_size % self.tp:
            problems.append(f"tp={self.tp} must divide the MLP hidden size ({model.mlp_hidden_size})")
        if self.pp > model.n_layers:
            problems.append(f"pp={self.pp} is more stages than layers ({model.n_layers})")
        if seq_len % (2 * self.cp) and self.cp > 1:
            problems.append(f"cp={self.cp}: the sequence ({seq_len}) must split into 2 x cp equal chunks")
        if self.ep > 1 and (not model.n_experts or model.n_experts % self.ep):
            problems.append(f"ep={self.ep} must divide the experts ({model.n_experts})")
        if self.pp > 1 and model.tie_embeddings:
            problems.append(f"pp={self.pp} with tied embeddings: the first and last stage would share a weight")
        if problems:
            raise LmforgeError("; ".join(problems))

    def __str__(self) -> str:
        names = (("tp", self.tp), ("pp", self.pp), ("cp", self.cp), ("ep", self.ep), ("dp", self.dp_shard),
                 ("replicate", self.dp_replicate))
        return ",".join(f"{k}={v}" for k, v in names if v > 1 or k == "dp")


@dataclass(frozen=True)
class TrainingShape:
    micro_batch: int = 1  # sequences per device per forward/backward
    seq_len: int = 4096
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    ac_every: int = 2  # selective: every n-th block is checkpointed

    def __post_init__(self) -> None:
        require(self.micro_batch >= 1, "micro_batch", self.micro_batch, "must be positive")
        require(self.seq_len >= 1, "seq_len", self.seq_len, "must be positive")
        require(self.ac_every >= 1, "ac_every", self.ac_every, "must be positive")


def parse_bytes(text: str) -> int:
    """`80GB`, `80 GiB`, `1.5TB`, `81559MiB` or a byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise LmforgeError(f"--gpu-memory {text!r}: give a size such as 80GB, 80GiB or 141GB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


# ---- counting -----------------------------------------------------------------------------------------------

def _saved_bytes(run, exclude: set[int]) -> tuple[int, set[int]]:
    """Bytes of the distinct storages autograd saves while `run()` executes (storages in `exclude`, such as
    parameters, left out), and their identities."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in exclude:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total, seen


def _fake_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fake CPU tensors in place of a meta module's parameters (fake, so CPU kernels' choices apply; meta
    tensors would take SDPA's math path and count an L x L matrix)."""
    return {name: torch.empty(p.shape, dtype=p.dtype, requires_grad=True) for name, p in module.named_parameters()}


def _ids(tensors) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors}


@dataclass
class ActivationCount:
    """Bytes autograd saves for one micro-batch, per block and for the rest."""

    block: int  # what one block's forward saves, its input included (every block saves the same)
    block_input: int  # one block's input (all a checkpointed block keeps)
    shared: int  # RoPE tables, saved once for all blocks
    head: int  # final norm, LM head and loss
    logits_grad: int  # the logits' gradient, allocated when backward starts


def count_activations(config: ModelConfig, tokens_shape: tuple[int, int], dtype: torch.dtype) -> ActivationCount:
    """What autograd saves when the model's code runs on fake tensors of (batch, seq) tokens in `dtype`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    batch, seq = tokens_shape
    dense = replace(config, n_experts=0)  # a token's path through the MoE is counted as top-k dense MLPs
    with torch.device("meta"):
        block = Block(dense, 0).to(dtype)
        head_model = Transformer(replace(dense, n_layers=1)).to(dtype)
    with FakeTensorMode():
        x = torch.empty(batch, seq, config.d_model, dtype=dtype, requires_grad=True)
        rope = None
        if config.position == "rope":
            inv_freq, scale = rope_frequencies(config, scaled=True)
            rope = rope_tables(inv_freq, torch.arange(seq).expand(batch, seq), scale)
        params = _fake_parameters(block)
        excluded = _ids(params.values())
        block_bytes, seen = _saved_bytes(lambda: functional_call(block, params, (x, rope, LayerMask(None, None), None)),
                                         excluded)
        shared = sum(t.untyped_storage().nbytes() for t in rope or () if t.untyped_storage()._cdata in seen)
        block_bytes -= shared
        if config.position == "alibi":  # the fp32 bias (heads x L x L per sequence) every layer's attention reads
            shared += batch * config.n_heads * seq * seq * 4
        if config.n_experts:
            mlp_bytes, _ = _saved_bytes(lambda: functional_call(block.mlp, {n[4:]: p for n, p in params.items()
                                                                           if n.startswith("mlp.")}, (x,)),
                                        excluded)
            block_bytes += (config.moe_top_k - 1) * mlp_bytes + batch * seq * config.n_experts * 4
        head_params = {n: p for n, p in _fake_parameters(head_model).items() if not n.startswith("blocks.")}
        labels = torch.zeros(batch, seq, dtype=torch.long)

        def run_head():
            hidden = functional_call(head_model.final_norm, {n[11:]: p for n, p in head_params.items()
                                                             if n.startswith("final_norm.")}, (x,))
            weight = head_params.get("lm_head.weight", head_params["embed.weight"])  # tied: stored once
            logits = torch.nn.functional.linear(hidden, weight)
            cross_entropy_loss(logits, labels, z_loss_multiplier=1e-5, reduction="sum")

        head, _ = _saved_bytes(run_head, _ids(head_params.values()))
    block_input = batch * seq * config.d_model * _itemsize(dtype)
    logits_grad = batch * seq * config.embedding_size * 4
    return ActivationCount(block_bytes, block_input, shared, head, logits_grad)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- the estimate -------------------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Bytes per device on the pipeline stage that needs the most (the first holds `pp` micro-batches'
    activations, the last the LM head and the loss)."""

    plan: ParallelPlan
    shape: TrainingShape
    stage: str  # "first", "last" or "only"
    parameters_held: int  # parameters of this device's stage after TP and EP, before FSDP sharding
    parts: dict[str, int]  # parameters, gradients, optimizer, buffers
    activations: dict[str, int]  # per activation-checkpointing mode: none, selective, full
    peak: dict[str, int]  # per activation-checkpointing mode

    def total(self, checkpointing: str | None = None) -> int:
        return self.peak[checkpointing or self.shape.activation_checkpointing]


def _parameter_groups(config: ModelConfig) -> dict[str, int]:
    """Parameter counts: the embedding (and its norm), the head (final norm and an untied LM head), and per
    block its matrices, its norms (replicated under TP) and its experts."""
    with torch.device("meta"):
        model = Transformer(replace(config, n_layers=1))
    block = model.blocks[0]
    experts = sum(p.numel() for n, p in block.named_parameters() if ".experts." in f".{n}")
    norms = sum(p.numel() for p in block.parameters() if p.ndim == 1)
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embed.", "embed_norm.")))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("final_norm.", "lm_head.")))
    return {"embed": embed, "head": head, "norms": norms, "experts": experts,
            "matrices": sum(p.numel() for p in block.parameters()) - experts - norms}


def estimate_memory(config: ModelConfig, plan: ParallelPlan, shape: TrainingShape,
                    counted: dict[int, ActivationCount] | None = None) -> MemoryEstimate:
    """`counted` keeps activation counts by local sequence length across calls (layouts differing in cp)."""
    plan.check(config, shape.seq_len)
    compute = torch.bfloat16 if shape.precision == "bf16" else torch.float32
    local_seq = shape.seq_len // plan.cp
    counted = {} if counted is None else counted
    if local_seq not in counted:
        counted[local_seq] = count_activations(config, (shape.micro_batch, local_seq), compute)
    count = counted[local_seq]
    groups = _parameter_groups(config)
    layers = math.ceil(config.n_layers / plan.pp)
    stages = {"only": (True, True)} if plan.pp == 1 else {"first": (True, False), "last": (False, True)}
    estimates = [_stage_estimate(config, plan, shape, count, groups, layers, name, has_embed, has_head)
                 for name, (has_embed, has_head) in stages.items()]
    return max(estimates, key=lambda e: e.total())


def _stage_estimate(config, plan, shape, count, groups, layers, stage, has_embed, has_head) -> MemoryEstimate:
    tp, fsdp, itemsize = plan.tp, plan.fsdp, 2 if shape.precision == "bf16" else 4
    per_block = groups["matrices"] / tp + groups["norms"]
    experts = layers * groups["experts"] / plan.ep
    ends = (groups["embed"] if has_embed else 0) / tp + (groups["head"] if has_head else 0) / tp
    held = ends + layers * per_block + experts
    sharded = (held - experts) / fsdp + experts / max(1, fsdp // plan.ep)
    parts = {"parameters": int(4 * sharded), "gradients": int(4 * sharded), "optimizer": int(8 * sharded)}
    buffers = sum(b.numel() * b.element_size() for b in _model_buffers(config))
    if fsdp > 1:  # the gathered unit, the prefetched next one, and the fp32 gradient being reduce-scattered
        unit = max(per_block + groups["experts"] / plan.ep, ends)
        buffers += int(unit * (2 * itemsize + 4))
    elif shape.precision == "bf16":
        buffers += int(2 * held)  # autocast keeps a bf16 copy of every weight it cast in the forward
    parts["buffers"] = buffers

    split = tp  # sequence parallelism splits the activations tensor parallelism does not
    in_flight = plan.pp if has_embed else 1  # 1F1B: micro-batches whose backward the first stage still owes
    head = count.head + count.logits_grad if has_head else 0
    activations = {mode: int(_activation_peak(count, layers, in_flight, head, checkpointed) / split)
                   for mode, checkpointed in (("none", lambda i: False), ("full", lambda i: True),
                                              ("selective", lambda i: i % shape.ac_every == 0))}
    model_states = sum(parts.values())
    optimizer_step = parts["parameters"] + parts["gradients"] + parts["optimizer"] + int(4 * sharded)
    peak = {mode: max(model_states + act, optimizer_step) for mode, act in activations.items()}
    return MemoryEstimate(plan, shape, stage, int(held), parts, activations, peak)


def _activation_peak(count: ActivationCount, layers: int, in_flight: int, head: int, checkpointed) -> int:
    """The most activation memory alive at once: when backward starts (every block's kept tensors, the head's
    and the logits' gradient), or while a checkpointed block is recomputed (the blocks before it keep theirs;
    the head's are freed by then). Earlier micro-batches in flight keep all of theirs."""
    kept = [count.block_input if checkpointed(i) else count.block for i in range(layers)]
    earlier = (in_flight - 1) * (sum(kept) + count.shared)
    recompute = max((sum(kept[:i]) + count.block for i in range(layers) if checkpointed(i)), default=0)
    return earlier + count.shared + max(sum(kept) + head, recompute)


def _model_buffers(config: ModelConfig) -> list[torch.Tensor]:
    with torch.device("meta"):
        return list(Transformer(replace(config, n_layers=1)).buffers())


# ---- verdicts and suggestions ---------------------------------------------------------------------------------

def verdict(estimate: MemoryEstimate, device_bytes: int) -> str:
    usable = device_bytes * USABLE_FRACTION
    if estimate.total("none") <= usable:
        return "fits"
    if estimate.total("selective") <= usable:
        return "fits with selective activation checkpointing"
    if estimate.total("full") <= usable:
        return "fits with full activation checkpointing"
    return "does not fit"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_layouts(config: ModelConfig, world_size: int, shape: TrainingShape, device_bytes: int,
                    limit: int = 5, max_tp: int = 8) -> list[tuple[MemoryEstimate, str]]:
    """Layouts of `world_size` devices that fit, least model parallelism first (data parallelism scales best):
    ordered by tp x pp x cp, then by needing no activation checkpointing, then by memory."""
    found, counted = [], {}
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            for cp in _divisors(world_size // (tp * pp)):
                if tp > max_tp:
                    continue
                plan = ParallelPlan(tp=tp, pp=pp, cp=cp, dp_shard=world_size // (tp * pp * cp))
                try:
                    estimate = estimate_memory(config, plan, shape, counted)
                except LmforgeError:
                    continue
                judged = verdict(estimate, device_bytes)
                if judged != "does not fit":
                    rank = (tp * pp * cp, judged != "fits", judged.startswith("fits with full"),
                            estimate.total("none"))
                    found.append((rank, estimate, judged))
    found.sort(key=lambda item: item[0])
    return [(estimate, judged) for _, estimate, judged in found[:limit]]


def _gib(n: int | float) -> str:
    return f"{n / 2**30:9.2f} GiB"


def format_estimate(estimate: MemoryEstimate, device_bytes: int | None) -> list[str]:
    plan, shape = estimate.plan, estimate.shape
    stage = {"only": "", "first": ", first pipeline stage (embedding, most micro-batches in flight)",
             "last": ", last pipeline stage (LM head and loss)"}[estimate.stage]
    lines = [f"memory per device: {plan} ({plan.world_size} devices), micro-batch {shape.micro_batch} x "
             f"{shape.seq_len} tokens, {shape.precision}, AdamW{stage}",
             f"  parameters held         {estimate.parameters_held:>16,}  (after tensor/pipeline/expert split)"]
    labels = {"parameters": "parameters (fp32)", "gradients": "gradients (fp32)",
              "optimizer": "optimizer (AdamW moments)", "buffers": "buffers (gathers, casts)"}
    lines += [f"  {labels[k]:<26}{_gib(v)}" for k, v in estimate.parts.items()]
    names = {"none": "no checkpointing", "selective": f"selective (every {shape.ac_every})",
             "full": "full checkpointing"}
    for mode in ("none", "selective", "full"):
        lines.append(f"  activations, {names[mode]:<21}{_gib(estimate.activations[mode])}   "
                     f"peak {_gib(estimate.total(mode))}")
    if device_bytes is not None:
        lines.append(f"  verdict on {device_bytes / 1e9:g} GB ({USABLE_FRACTION:.0%} usable, "
                     f"{device_bytes * USABLE_FRACTION / 2**30:.2f} GiB): {verdict(estimate, device_bytes)}")
    return lines


def format_suggestions(found: list[tuple[MemoryEstimate, str]], world_size: int, device_bytes: int) -> list[str]:
    if not found:
        return [f"no layout of {world_size} devices fits in {device_bytes / 1e9:g} GB at this micro-batch and "
                "sequence length: more devices, a smaller micro-batch or a shorter sequence"]
    lines = [f"smallest layouts of {world_size} devices that fit in {device_bytes / 1e9:g} GB "
             "(least model parallelism first):",
             f"  {'plan':<28}{'peak, none':>14}{'selective':>14}{'full':>14}  verdict"]
    for estimate, judged in found:
        peaks = "".join(f"{estimate.total(m) / 2**30:10.2f} GiB" for m in ("none", "selective", "full"))
        lines.append(f"  {str(estimate.plan):<28}{peaks}  {judged}")
    return lines
