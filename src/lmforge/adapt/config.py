"""Adaptation configs: what SFT, DPO and RLVR share (`AdaptConfig`), and each stage's own options.

Sizes count examples, as open-instruct's do (not tokens, as pretraining's): `batch_size` sequences (SFT rows,
DPO pairs, RLVR prompts) per optimizer step over all ranks, `micro_batch_size` per forward/backward on one
device. Every row is padded to `max_seq_length`. The defaults are Tülu 3 8B's published settings
(`configs/adapt/`); the optimizer, schedule, precision, parallelism, checkpoints and metrics are the
trainer's (`lmforge.train`), built by `train_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lmforge.adapt.templates import TEMPLATE_NAMES
from lmforge.core.config import require, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import ModelConfig
from lmforge.tokens.dataset import DataConfig
from lmforge.train.config import (CheckpointConfig, InitFrom, MetricsConfig, ModelSpec, OptimizerConfig,
                                  ParallelConfig, ScheduleConfig, SkipStepConfig, TrainConfig)


def _adam(lr: float) -> OptimizerConfig:
    # open-instruct: HF AdamW defaults, no weight decay, no gradient clipping.
    return OptimizerConfig(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=None)


@dataclass
class AdaptConfig:
    model: str  # the start: a model directory, training run or checkpoint, or a transformers directory
    data: list[str]  # JSONL record files (docs/adapt.md)
    out: str  # run directory; the trained model is written to <out>/model
    template: str = "tulu"  # tulu, chatml, or tokenizer (the start model's own)
    max_seq_length: int = 4096
    too_long: Literal["truncate", "drop"] = "truncate"  # what to do with a record longer than max_seq_length
    batch_size: int = 128  # examples per optimizer step over all ranks
    micro_batch_size: int = 1  # examples per forward/backward on one device
    epochs: int = 2
    max_steps: int | None = None  # stop earlier than `epochs` would
    warmup_ratio: float = 0.03  # linear warmup over this share of the steps, then linear decay to 0
    seed: int = 0  # data order
    precision: Literal["fp32", "bf16"] = "bf16"
    cpu_bf16: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    optimizer: OptimizerConfig = field(default_factory=lambda: _adam(5e-6))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(log_interval=1, tensorboard=False))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.data), "data", self.data, "give one or more JSONL files")
        require(self.template in TEMPLATE_NAMES, "template", self.template, f"one of {', '.join(TEMPLATE_NAMES)}")
        require(self.max_seq_length >= 2, "max_seq_length", self.max_seq_length, "must be >= 2")
        require(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1")
        require(self.batch_size >= 1 and self.batch_size % self.micro_batch_size == 0, "batch_size",
                self.batch_size, f"must be a positive multiple of micro_batch_size ({self.micro_batch_size})")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")

    def check_world_size(self, world_size: int) -> None:
        """Refuse a batch that `world_size` data-parallel ranks cannot split into whole micro-batches."""
        if self.batch_size % (self.micro_batch_size * world_size):
            raise LmforgeError(f"batch_size {self.batch_size} is not divisible by micro_batch_size x ranks "
                               f"({self.micro_batch_size} x {world_size})")

    def steps(self, examples: int) -> int:
        """Optimizer steps: `epochs` passes over the examples in full batches (a batch may span two epochs)."""
        steps = max(1, examples * self.epochs // self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def train_config(self, model: ModelConfig, start: str, tokenizer: str, steps: int) -> TrainConfig:
        """The trainer's config for this stage: the start model's shape and weights, rows of max_seq_length."""
        seq = self.max_seq_length
        return TrainConfig(
            run_dir=self.out, data=DataConfig(paths=list(self.data), sequence_length=seq, seed=self.seed),
            model=ModelSpec(preset="olmo2-tiny", overrides=to_dict(model)), tokenizer=tokenizer, seed=self.seed,
            global_batch_size=self.batch_size * seq, micro_batch_size=self.micro_batch_size * seq, max_steps=steps,
            z_loss_multiplier=0.0, precision=self.precision, cpu_bf16=self.cpu_bf16, device=self.device,
            optimizer=self.optimizer, parallel=self.parallel, checkpoint=self.checkpoint, metrics=self.metrics,
            schedule=ScheduleConfig(name="linear", units="steps", warmup=math.ceil(self.warmup_ratio * steps),
                                    final_lr_fraction=0.0),
            skip_step=SkipStepConfig(enabled=False), init_from=InitFrom(path=start))


@dataclass
class SFTConfig(AdaptConfig):
    # sum: summed over tokens, divided by the global batch's sequences (Tülu 3; open-instruct's `sum` with one
    # sequence per device micro-batch); mean: divided by the global batch's trained tokens. docs/adapt.md.
    loss_reduction: Literal["sum", "mean"] = "sum"
    packing: bool = False  # several examples per row, attention and positions kept inside each


@dataclass
class DPOConfig(AdaptConfig):
    max_seq_length: int = 2048
    epochs: int = 1
    warmup_ratio: float = 0.1
    optimizer: OptimizerConfig = field(default_factory=lambda: _adam(5e-7))
    loss: Literal["dpo", "dpo_norm", "simpo"] = "dpo_norm"
    beta: float = 5.0
    simpo_gamma_beta_ratio: float = 0.3  # SimPO's target margin over beta
    reference_cache: str | None = None  # directory of cached reference log-probs; default <out>/reference
    reference_model: str | None = None  # the reference, when not the start model (same tokenizer)

    def validate(self) -> None:
        super().validate()
        require(self.beta > 0, "beta", self.beta, "must be positive")
