"""The training config: one YAML file (plus dotted overrides) describes a whole run.

Sizes are in tokens, as in OLMo-core (the sequence length is the data's, `data.sequence_length`): `global_batch_size` tokens per optimizer step across all ranks,
`micro_batch_size` tokens per forward/backward on one device. Gradient accumulation follows from the two
and the world size. `TrainConfig.check(world_size)` refuses configs that cannot run before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.core.config import from_dict, require, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.eval.inloop import InLoopEvalConfig
from lmforge.model.presets import get_preset
from lmforge.model.transformer import ModelConfig
from lmforge.tokens.dataset import DataConfig


@dataclass
class ModelSpec:
    """A preset by name with field overrides, e.g. {preset: olmo2-tiny, overrides: {n_layers: 2}}."""

    preset: str = "olmo2-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    # Take vocab_size and the EOS/PAD/BOS ids from the run's tokenizer (e.g. a BPE trained for this corpus).
    vocab_from_tokenizer: bool = False

    def build_config(self, tokenizer=None) -> ModelConfig:
        base = to_dict(get_preset(self.preset))
        if self.vocab_from_tokenizer:
            if tokenizer is None:
                raise LmforgeError("model.vocab_from_tokenizer is set but the run has no tokenizer: set "
                                   "`tokenizer: PATH` or keep the tokenizer/ folder next to the token files")
            base.update(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id)
        unknown = sorted(set(self.overrides) - set(base))
        if unknown:
            raise LmforgeError(f"model.overrides: unknown model field {unknown[0]!r} (valid: {', '.join(base)})")
        return from_dict(ModelConfig, {**base, **self.overrides}, prefix="model.overrides.")


@dataclass
class OptimizerConfig:
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # OLMo 2: no weight decay on the token embeddings
    decay_norm_and_bias: bool = True  # OLMo 2 decays norm weights; OLMo 1 configs set this false
    max_grad_norm: float | None = 1.0
    clip_after_warmup_only: bool = False
    fused: bool | None = None  # None: fused on CUDA, foreach on CPU


@dataclass
class ScheduleConfig:
    """LR multiplier over time. `units` says whether warmup/decay/duration count optimizer steps or tokens."""

    name: Literal["constant", "linear", "cosine", "inv_sqrt", "wsd"] = "cosine"
    units: Literal["steps", "tokens"] = "steps"
    warmup: int = 0
    # The LR the schedule ends at, as a fraction of the peak (OLMo-core's alpha_f, or WSD's decay_min_lr / lr).
    # Unset: OLMo-core's default for the schedule, 0.1 for linear, cosine and inv_sqrt, 0.0 for wsd.
    final_lr_fraction: float | None = None
    decay: int | None = None  # wsd: length of the final decay; default 10% of the duration
    duration: int | None = None  # where linear/cosine reach the final LR; default: the run's length

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.final_lr_fraction is None or 0.0 <= self.final_lr_fraction <= 1.0, "schedule.final_lr_fraction",
                self.final_lr_fraction, "must be between 0 and 1")

    def final_fraction(self) -> float:
        if self.name == "constant":
            return 1.0
        if self.final_lr_fraction is not None:
            return self.final_lr_fraction
        return 0.0 if self.name == "wsd" else 0.1


@dataclass
class SkipStepConfig:
    """OLMo-core's skip-step rule: skip the update when loss or grad norm is non-finite or above
    mean + sigma_factor·std of the previous `window` finite values (active once `min_values` are recorded,
    counting the current step's, as OLMo-core's max(2, window // 2))."""

    enabled: bool = True
    sigma_factor: float = 6.0
    window: int = 128
    min_values: int = 64
    max_consecutive: int = 10  # this many skips in a row stops the run


@dataclass
class PipelineConfig:
    """Pipeline parallelism (`torch.distributed.pipelining`): the blocks cut into `degree × stages_per_rank`
    stages, by equal layer counts or at `split_points`; each schedule run takes `microbatches` micro-batches of
    `micro_batch_size` tokens (default: all of a rank's step batch) and accumulates their gradients."""

    degree: int = 1  # ranks per pipeline; 1: off
    schedule: Literal["1F1B", "Interleaved1F1B", "GPipe", "ZBV"] = "1F1B"  # ZBV: zero-bubble, V-shaped
    stages_per_rank: int | None = None  # default 1; 2 for Interleaved1F1B and ZBV (ZBV needs exactly 2)
    microbatches: int | None = None
    split_points: list[int] = field(default_factory=list)  # first block of each stage after the first

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("degree", "stages_per_rank", "microbatches"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be positive")
        single = self.schedule in ("1F1B", "GPipe")
        require(self.local_stages == 1 or not single, "stages_per_rank", self.stages_per_rank,
                f"{self.schedule} runs one stage per rank; use Interleaved1F1B or ZBV for more")
        require(self.local_stages == 2 or self.schedule != "ZBV", "stages_per_rank",
                self.stages_per_rank, "ZBV runs exactly 2 stages per rank")
        points = self.split_points
        require(not points or (len(points) == self.n_stages - 1 and points[0] > 0
                               and all(a < b for a, b in zip(points, points[1:]))),
                "split_points", points,
                f"must be {self.n_stages - 1} increasing block indices above 0, one per stage after the first")

    @property
    def local_stages(self) -> int:
        return self.stages_per_rank or (1 if self.schedule in ("1F1B", "GPipe") else 2)

    @property
    def n_stages(self) -> int:
        return self.degree * self.local_stages

    def check(self, model: ModelConfig, rank_rows: list[int], micro_rows: int) -> None:
        """Refuse a pipeline this model and batch cannot run: `rank_rows` are one data-parallel rank's
        instances per step (one entry per batch size), `micro_rows` the instances per micro-batch."""
        if model.tie_embeddings:
            raise LmforgeError("parallel.pipeline: the model ties its embeddings (tie_embeddings), and the first "
                               "and last stages would each need the one shared matrix; untie them or run without "
                               "pipeline parallelism")
        if model.n_experts:
            raise LmforgeError("parallel.pipeline: a mixture of experts adds its router losses at every layer, "
                               "which a pipeline schedule (one loss, at the last stage) cannot carry")
        if self.split_points and self.split_points[-1] >= model.n_layers:
            raise LmforgeError(f"parallel.pipeline.split_points {self.split_points}: the model has "
                               f"{model.n_layers} blocks (0..{model.n_layers - 1})")
        if not self.split_points and model.n_layers % self.n_stages:
            raise LmforgeError(f"parallel.pipeline: {model.n_layers} layers do not divide into {self.n_stages} "
                               f"stages ({self.degree} ranks x {self.local_stages}); set split_points")
        per_run = self.microbatches or rank_rows[0] // micro_rows
        if per_run < self.degree:
            raise LmforgeError(f"parallel.pipeline: {per_run} micro-batches per schedule run is fewer than the "
                               f"{self.degree} pipeline ranks; use more (microbatches, or a larger batch)")
        for rows in rank_rows:
            if rows % (per_run * micro_rows):
                raise LmforgeError(
                    f"parallel.pipeline: a data-parallel rank's {rows} instances per step are not a multiple of "
                    f"microbatches x micro-batch instances ({per_run} x {micro_rows})")
        rounds = max(1, per_run // self.degree)
        if self.schedule == "Interleaved1F1B" and per_run % rounds:
            raise LmforgeError(f"parallel.pipeline: Interleaved1F1B needs the micro-batches per run ({per_run}) "
                               f"to be a multiple of {rounds} (micro-batches // degree)")


@dataclass
class DataDegrees:
    """`parallel.data`: how many ranks shard the weights (FSDP) and how many groups replicate them (DDP, HSDP's
    outer dimension). null: what the world leaves after the model-parallel degrees (HSDP's shard: the node's)."""

    shard: int | None = None
    replicate: int | None = None

    def __post_init__(self) -> None:
        for name in ("shard", "replicate"):
            require(getattr(self, name) is None or getattr(self, name) >= 1, name, getattr(self, name),
                    "must be positive (or null)")


@dataclass(frozen=True)
class Layout:
    """How the ranks divide, outermost first: world = pipeline x replicate x shard x context x tensor. `expert`
    ranks among the shard ranks hold different experts; `mode` is how the data-parallel ranks hold weights."""

    mode: Literal["none", "ddp", "fsdp", "hsdp"] = "none"
    pipeline: int = 1
    replicate: int = 1
    shard: int = 1
    context: int = 1
    tensor: int = 1
    expert: int = 1

    @property
    def world(self) -> int:
        return self.pipeline * self.replicate * self.shard * self.context * self.tensor

    @property
    def data(self) -> int:
        """Ranks that see different batch rows."""
        return self.replicate * self.shard

    def data_rank(self, rank: int) -> int:
        return rank // (self.context * self.tensor) % self.data

    def describe(self) -> str:
        """E.g. "fsdp, shard 2, tensor 2": the mode and the degrees above 1."""
        names = ("pipeline", "replicate", "shard", "context", "tensor", "expert")
        return ", ".join([self.mode] + [f"{n} {getattr(self, n)}" for n in names if getattr(self, n) > 1])


@dataclass
class ParallelConfig:
    data_parallel: Literal["auto", "none", "ddp", "fsdp", "hsdp"] = "auto"  # auto: fsdp when world > 1
    data: DataDegrees = field(default_factory=DataDegrees)
    tensor: int = 1  # tensor + sequence parallel degree (heads, MLP, vocabulary split; norms over sequence chunks)
    context: int = 1  # context parallel degree (each rank holds 2 of 2·context sequence chunks)
    expert: int = 1  # expert parallel degree (experts spread over this many of the shard ranks)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    ac_every: int = 2  # selective: checkpoint every n-th block
    compile: bool = False  # torch.compile each block
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        for name in ("tensor", "context", "expert"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be a positive degree")

    def layout(self, world_size: int, local_world_size: int, model: ModelConfig, sequence_length: int) -> Layout:
        """The degrees for `world_size` ranks, or an LmforgeError naming the numbers that do not divide."""
        pipeline, tp, cp, ep = self.pipeline.degree, self.tensor, self.context, self.expert
        model_parallel = pipeline * tp * cp
        if world_size % model_parallel:
            raise LmforgeError(f"world size {world_size} is not divisible by pipeline {pipeline} x tensor {tp} x "
                               f"context {cp} = {model_parallel}")
        rest = world_size // model_parallel
        mode = self._data_mode(world_size, rest * cp)
        if mode == "ddp" and tp * cp * ep > 1:
            raise LmforgeError(f"parallel.data_parallel=ddp replicates whole modules; tensor {tp}, context {cp} and "
                               f"expert {ep} parallelism need fsdp or hsdp")
        if pipeline > 1 and mode in ("ddp", "hsdp"):
            raise LmforgeError(f"parallel.pipeline.degree {pipeline} shards each stage with fsdp over the "
                               f"data-parallel ranks; data_parallel={mode} is not supported with it")
        if pipeline > 1 and cp > 1:
            raise LmforgeError(f"parallel.pipeline.degree {pipeline} with parallel.context {cp} is not supported "
                               f"(context parallelism sets each micro-batch's masks as it splits it, and a pipeline "
                               f"schedule keeps several micro-batches in flight)")
        replicate, shard = self._data_degrees(mode, rest, local_world_size // model_parallel)
        if replicate * shard != rest:
            raise LmforgeError(f"world size {world_size} != replicate {replicate} x shard {shard} x context {cp} x "
                               f"tensor {tp} x pipeline {pipeline} = {replicate * shard * model_parallel}")
        _check_model_split(model, sequence_length, tp, cp, ep, shard)
        return Layout(mode, pipeline, replicate, shard, cp, tp, ep)

    def _data_mode(self, world_size: int, data_ranks: int) -> str:
        """FSDP also averages gradients over context ranks, so those count as data ranks here."""
        if self.data_parallel == "none" and data_ranks > 1:
            raise LmforgeError(f"parallel.data_parallel=none with {data_ranks} data-parallel ranks (world size "
                               f"{world_size}); use ddp, fsdp or hsdp")
        if data_ranks == 1:
            return "none"  # nothing to shard or replicate
        return "fsdp" if self.data_parallel == "auto" else self.data_parallel

    def _data_degrees(self, mode: str, rest: int, node_rest: int) -> tuple[int, int]:
        shard, replicate = self.data.shard, self.data.replicate
        if mode == "hsdp":
            if shard is None:
                shard = rest // replicate if replicate else max(1, min(node_rest, rest))
            if rest % shard:
                raise LmforgeError(f"hsdp: {rest} data-parallel ranks are not divisible by the shard degree {shard}")
            return replicate or rest // shard, shard
        if mode == "ddp":
            return replicate or rest, shard or 1
        if mode == "fsdp" and (replicate or 1) > 1:
            raise LmforgeError(f"parallel.data.replicate {replicate} needs data_parallel hsdp or ddp (fsdp shards "
                               f"over all {rest} data-parallel ranks)")
        return replicate or 1, shard or (rest if mode == "fsdp" else 1)


def _check_model_split(model: ModelConfig, sequence_length: int, tp: int, cp: int, ep: int, shard: int) -> None:
    """Refuse degrees the model or sequence cannot be split by."""
    if tp > 1:
        for name, size in (("the model's n_heads", model.n_heads), ("the model's n_kv_heads", model.n_kv_heads),
                           ("the model's mlp_hidden_size", model.mlp_hidden_size),
                           ("the model's embedding size", model.embedding_size),
                           ("the sequence length per context rank", sequence_length // cp)):
            if size % tp:
                raise LmforgeError(f"parallel.tensor {tp} does not divide {name} {size}")
    if cp > 1 and sequence_length % (2 * cp):
        raise LmforgeError(f"data.sequence_length {sequence_length} is not divisible by 2 x parallel.context {cp} = "
                           f"{2 * cp} (each rank takes two chunks, one early and one late, to balance causal work)")
    for degree, name in ((tp, "tensor"), (cp, "context")):
        if degree > 1 and model.position == "alibi":
            raise LmforgeError(f"parallel.{name} {degree} with ALiBi is not supported (the bias is built per "
                               f"head over the whole sequence); use RoPE or parallel.{name}=1")
        if degree > 1 and model.n_experts:
            raise LmforgeError(f"parallel.{name} {degree} with a mixture of experts is not supported; split the "
                               f"experts with parallel.expert instead")
    if ep > 1:
        if not model.n_experts:
            raise LmforgeError(f"parallel.expert {ep} needs a mixture of experts (the model has n_experts 0)")
        if model.n_experts % ep:
            raise LmforgeError(f"parallel.expert {ep} does not divide the model's n_experts {model.n_experts}")
        if shard % ep:
            raise LmforgeError(f"parallel.expert {ep} does not divide the data shard degree {shard} (experts are "
                               f"spread over the ranks that shard the other weights)")


@dataclass
class CheckpointConfig:
    interval: int | None = 1000  # steps between saves; None disables step-based saves
    interval_minutes: float | None = None
    keep_last: int = 3
    permanent_interval: int | None = None  # saves at multiples of this step are never deleted
    save_final: bool = True


@dataclass
class MetricsConfig:
    log_interval: int = 10
    tensorboard: bool = True  # when the tensorboard package is installed
    wandb: bool = False
    wandb_project: str = "lmforge"
    wandb_mode: Literal["offline", "online"] = "offline"
    peak_flops: float | None = None  # per device, for MFU; default: known GPU peaks, none on CPU


@dataclass
class EnergyConfig:
    """The run's energy and its carbon, reported as OLMo and BLOOM do (`lmforge.train.energy`): measured with
    NVML on GPUs or RAPL on CPUs when readable, else `estimate_watts` times the time (labelled an estimate);
    CO2 = kWh x `pue` x `grid_kg_co2eq_per_kwh`."""

    method: Literal["auto", "nvml", "rapl", "estimate"] = "auto"  # auto: nvml on GPU, rapl on CPU, else estimate
    # kg CO2eq per kWh of the grid the run draws from: default CodeCarbon's world average (IEA, 475 g/kWh).
    grid_kg_co2eq_per_kwh: float = 0.475
    pue: float = 1.0  # data-centre power usage effectiveness: facility energy / device energy
    # Power of one process when nothing is measured; unset: 10 W per CPU thread, 400 W per GPU.
    estimate_watts: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.grid_kg_co2eq_per_kwh >= 0, "grid_kg_co2eq_per_kwh", self.grid_kg_co2eq_per_kwh,
                "must be >= 0")
        require(self.pue >= 1.0, "pue", self.pue, "must be >= 1 (facility energy over device energy)")
        require(self.estimate_watts is None or self.estimate_watts > 0, "estimate_watts", self.estimate_watts,
                "must be positive")


@dataclass
class InitFrom:
    """Stage 2 / annealing: start from a checkpoint's (or model directory's) weights."""

    path: str
    load_optimizer: bool = False


@dataclass
class TrainConfig:
    run_dir: str
    data: DataConfig  # token files, mixture, sequence_length (see docs/training-data.md)
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: str | None = None  # stored with exported models; default: the data's tokenizer
    seed: int = 0  # model initialisation (the data order has its own data.seed)
    global_batch_size: int = 16 * 512  # tokens per optimizer step over all ranks
    micro_batch_size: int = 4 * 512  # tokens per device per forward/backward
    # Batch-size warmup (OLMo 65B): [[tokens, global_batch_size], ...]; each entry's batch applies from that
    # many tokens on; every size must be a multiple of the first.
    batch_size_schedule: list[tuple[int, int]] = field(default_factory=list)
    max_steps: int | None = None
    max_tokens: int | None = None
    z_loss_multiplier: float = 1e-5
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16: autocast / FSDP bf16 params over fp32 master weights
    cpu_bf16: bool = False  # CPUs run fp32 unless asked: bf16 autocast is slow on most CPUs
    # Linear layers of the blocks in float8 with rowwise scales (torchao), on GPUs that have float8 matmuls;
    # elsewhere the run goes on without it and says so in one line.
    float8: Literal["none", "rowwise"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    skip_step: SkipStepConfig = field(default_factory=SkipStepConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    eval: InLoopEvalConfig = field(default_factory=InLoopEvalConfig)
    eval_interval: int | None = None
    init_from: InitFrom | None = None

    @property
    def sequence_length(self) -> int:
        return self.data.sequence_length

    def batch_sizes(self) -> list[tuple[int, int]]:
        """(from_tokens, global_batch_size) pairs, first at 0 tokens."""
        if not self.batch_size_schedule:
            return [(0, self.global_batch_size)]
        return [(int(t), int(b)) for t, b in self.batch_size_schedule]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        seq = self.sequence_length
        require(self.micro_batch_size > 0 and self.micro_batch_size % seq == 0, "micro_batch_size",
                self.micro_batch_size, f"must be a positive multiple of data.sequence_length ({seq})")
        sizes = self.batch_sizes()
        require(sizes[0][0] == 0, "batch_size_schedule", self.batch_size_schedule, "must start at 0 tokens")
        require(all(b[0] < a[0] for b, a in zip(sizes, sizes[1:])), "batch_size_schedule", self.batch_size_schedule,
                "token thresholds must increase")
        sizes_field = "batch_size_schedule" if self.batch_size_schedule else "global_batch_size"
        for _, size in sizes:
            require(size > 0 and size % sizes[0][1] == 0, sizes_field, size,
                    f"every batch size must be a positive multiple of the first ({sizes[0][1]})")
        require(self.max_steps is not None or self.max_tokens is not None, "max_steps", None,
                "set max_steps or max_tokens")
        for name in ("max_steps", "max_tokens", "eval_interval"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be positive")
        require(self.schedule.warmup >= 0, "schedule.warmup", self.schedule.warmup, "must be >= 0")
        require(self.metrics.log_interval > 0, "metrics.log_interval", self.metrics.log_interval, "must be positive")
        require(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", self.checkpoint.keep_last, "must be >= 1")

    def check(self, world_size: int, model: ModelConfig, local_world_size: int | None = None) -> Layout:
        """Refuse, before any compute, a config that cannot run with this model on `world_size` ranks (the
        checks that need more than the config; `validate` does the rest). Returns the parallel layout."""
        seq = self.sequence_length
        if seq > model.max_sequence_length:
            raise LmforgeError(f"data.sequence_length {seq} is longer than the model's context "
                               f"(max_sequence_length {model.max_sequence_length})")
        if self.float8 != "none" and self.precision != "bf16":
            raise LmforgeError(f"float8: {self.float8} needs precision: bf16 (float8 matmuls produce bf16), "
                               f"not {self.precision}")
        layout = self.parallel.layout(world_size, local_world_size or world_size, model, seq)
        if self.float8 != "none" and layout.tensor > 1:
            raise LmforgeError(f"float8: {self.float8} with parallel.tensor {layout.tensor} is not supported "
                               f"(torchao's float8 tensor-parallel styles are not wired in)")
        split = {"tensor": layout.tensor, "context": layout.context, "pipeline": layout.pipeline}
        if self.eval_interval and max(split.values()) > 1:
            raise LmforgeError(f"eval_interval with {' x '.join(f'{k} {v}' for k, v in split.items())} parallelism "
                               f"is not supported (the evaluators run whole sequences through one model); evaluate "
                               f"the exported checkpoint instead")
        per_step = self.micro_batch_size * layout.data
        for _, size in self.batch_sizes():
            if size % per_step:
                raise LmforgeError(
                    f"global batch of {size} tokens is not divisible by micro_batch_size x data-parallel ranks "
                    f"({self.micro_batch_size} x {layout.data} = {per_step} tokens)")
        if layout.pipeline > 1:
            self.parallel.pipeline.check(model, [size // seq // layout.data for _, size in self.batch_sizes()],
                                         self.micro_batch_size // seq)
        return layout
