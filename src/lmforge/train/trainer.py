"""The training loop: one CPU process up to FSDP2 across nodes, with exact resume.

One optimizer step:
  1. take the step's global batch from the loader (this rank's share; with batch-size warmup, several
     base-size loader batches),
  2. let the objective (`train/objective.py`: next-token prediction by default) prepare it and count its
     normaliser (real label tokens for next-token prediction) across ranks,
  3. forward/backward each micro-batch (under a pipeline, its schedule does) with loss = (objective's loss
     sum) · n / global count, so the gradient is that of the global batch's mean loss, whatever the split
     into micro-batches and ranks (DDP/FSDP average gradients over the n data x context ranks, hence the
     factor n; tensor ranks share one loss, and a pipeline's last stage computes it),
  4. global-norm clip, skip-step check, set the LR from the schedule, AdamW step.
Loss, grad norm and the objective's metrics come to the host once per step (the skip-step rule needs them);
everything else stays on the device (the experts' load is summed there and read at each metrics line).

Exactness: the model is initialised from the seed alone, the data order is the loader's, the LR is a pure
function of progress and everything else (optimizer moments, skip-step window, RNG, loader position) is in
the checkpoint. A run killed at any point and rerun with the same command reproduces the uninterrupted
run's losses bitwise on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from lmforge.core.config import save_config, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest
from lmforge.model.info import flops_per_token
from lmforge.model.transformer import ModelConfig, Transformer, init_weights
from lmforge.model.directory import check_tokenizer_fits
from lmforge.model.checkpoints import CHECKPOINTS, latest_checkpoint, resolve_checkpoint, step_dir_name
from lmforge.core.files import truncate_step_log
from lmforge.tokens.lineage import BATCHES_FILE
from lmforge.tokens.tokenizer import Tokenizer, find_tokenizer, tokens_tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistInfo, all_reduce_sum, broadcast_object, init_distributed
from lmforge.train.energy import EnergyMeter, energy_summary
from lmforge.train.float8 import apply_float8
from lmforge.train.metrics import MetricsLogger, console_line, memory_gib, peak_flops
from lmforge.train.objective import NextTokenPrediction, Objective
from lmforge.train.optim import SkipStep, build_optimizer, clip_grad_norm, set_lr
from lmforge.train.parallelize import parallelize, unwrap
from lmforge.train.schedule import check_schedule, lr_multiplier

class BatchLoader(Protocol):
    """What the trainer needs from the data side (`lmforge.tokens.loader.DataLoader` is one): this rank's
    share of successive global batches as dicts with "input_ids" (instances, sequence_length) and optionally
    "labels", "label_mask", "doc_lens" (intra-document masking) and "batch_start"/"epoch" (logged for
    `lmforge data inspect`); a resumable position; and a settable global batch size (batch-size warmup)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def set_global_batch_instances(self, n: int) -> None: ...


LoaderFactory = Callable[[int, DistInfo], BatchLoader]  # (global batch in tokens, dist info) -> loader
Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclasses.dataclass
class StepResult:
    step: int
    tokens: int
    loss: float
    grad_norm: float
    lr: float
    skipped: str | None
    metrics: dict[str, float]  # the objective's (z-loss, a mixture of experts' router losses, DPO rewards, ...)


class Trainer:
    def __init__(self, config: TrainConfig, loader_factory: LoaderFactory | None = None,
                 evaluators: list[Evaluator] | None = None, dist_info: DistInfo | None = None,
                 command: str = "lmforge train", checks_only: bool = False, objective: Objective | None = None):
        self.config = config
        self.command = command
        self.dist = dist_info or init_distributed(config.device)
        self.tokenizer = resolve_tokenizer(config)
        self.model_config: ModelConfig = config.model.build_config(
            load_tokenizer(self.tokenizer) if config.model.vocab_from_tokenizer and self.tokenizer else None)
        self.layout = config.check(self.dist.world_size, self.model_config, self.dist.local_world_size)
        split = max(self.layout.tensor, self.layout.context, self.layout.pipeline) > 1
        if split and objective is not None and not isinstance(objective, NextTokenPrediction):
            raise LmforgeError("tensor, context and pipeline parallelism split next-token prediction only; run "
                               "this objective under data (FSDP/DDP) or expert parallelism")
        self.dist = dataclasses.replace(self.dist, data_rank=self.layout.data_rank(self.dist.rank),
                                        data_world=self.layout.data)
        if self.tokenizer and not config.model.vocab_from_tokenizer:
            check_tokenizer_fits(load_tokenizer(self.tokenizer), self.model_config,
                                 fix="set model.vocab_from_tokenizer=true or a larger model vocab_size")
        self.run_dir = Path(config.run_dir)
        self.ckpt_root = self.run_dir / CHECKPOINTS
        self.sizes = config.batch_sizes()
        self.base_batch = self.sizes[0][1]
        self.seq_len = config.sequence_length
        self.max_steps, self.max_tokens = self._run_length()
        check_schedule(config.schedule, self._duration())
        self._check_checkpoints()
        # Data before model: missing or unusable data is refused before any compute.
        factory = loader_factory or default_loader_factory(config, self.run_dir)
        self.loader = factory(self.base_batch, self.dist)
        if checks_only:
            return
        self.loader_batch = self.base_batch // self.seq_len
        self.batch_log = None
        self.evaluators = evaluators if evaluators is not None else self._build_evaluators()
        self.device = self.dist.device
        self.use_bf16 = config.precision == "bf16" and (self.device.type == "cuda" or config.cpu_bf16)
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, config.optimizer, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.skip_step = SkipStep(config.skip_step)
        self.objective: Objective = objective or NextTokenPrediction(config.z_loss_multiplier)
        if isinstance(self.objective, NextTokenPrediction):
            self.objective.parallel = self.objective.parallel or self.parallel
        self.step = 0
        self.tokens = 0
        self.flops_per_token = flops_per_token(self.model_config, self.seq_len)
        self.peak_flops = peak_flops(self.device, config.metrics.peak_flops)
        self.metrics = MetricsLogger(self.run_dir, config.metrics, self.dist.is_main, to_dict(config))
        self.energy = EnergyMeter(config.energy, self.device, reads_node_counters=self.dist.local_rank == 0)
        self.energy_before = 0.0  # joules of the run before this process resumed it (from the checkpoint)

    # ---- setup ----------------------------------------------------------------------------------------------

    def _run_length(self) -> tuple[int, int]:
        """(steps, tokens) the run will take, following the batch-size schedule."""
        c = self.config
        steps = tokens = 0
        while (c.max_steps is None or steps < c.max_steps) and (c.max_tokens is None or tokens < c.max_tokens):
            tokens += self.batch_size_at(tokens)
            steps += 1
        return steps, tokens

    def batch_size_at(self, tokens: int) -> int:
        size = self.sizes[0][1]
        for start, s in self.sizes:
            if tokens >= start:
                size = s
        return size

    def _check_checkpoints(self) -> None:
        latest = latest_checkpoint(self.ckpt_root)
        if latest is not None:
            ckpt.check_same_model(latest, self.model_config)
        elif self.config.init_from is not None:
            source = Path(self.config.init_from.path)
            if (source / "config.json").is_file():
                from lmforge.model.directory import read_model_config

                ckpt.check_same_model(source, self.model_config, read_model_config(source))
            else:
                ckpt.check_same_model(resolve_checkpoint(source), self.model_config)

    def _build_model(self) -> torch.nn.Module:
        model = Transformer(self.model_config)
        init_weights(model, self.config.seed)  # same weights on every rank and for any world size
        model.to(self.device)
        apply_float8(model, self.config.float8, self.device, self._log)
        param_dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        self.parallel = parallelize(model, self.config.parallel, self.layout, self.dist, param_dtype)
        return self.parallel.module

    def _autocast(self):
        # FSDP casts parameters itself (MixedPrecisionPolicy); other modes compute in bf16 through autocast.
        if self.use_bf16 and self.layout.mode not in ("fsdp", "hsdp"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- state ----------------------------------------------------------------------------------------------

    def _rank_state(self) -> dict:
        state = {"python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
                 "torch_rng": torch.get_rng_state(), "data": self.loader.state_dict()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore_rank_state(self, state: dict) -> None:
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def save(self) -> Path:
        meta = {"tokens": self.tokens, "model": to_dict(self.model_config), "tokenizer": self.tokenizer,
                "skip_step": self.skip_step.state_dict(), "data": self.loader.state_dict(),
                "sequence_length": self.seq_len, "config": to_dict(self.config), "energy_joules": self._joules()}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, meta,
                                    self._rank_state(), self.dist)
        if self.dist.is_main:
            ckpt.prune_checkpoints(self.ckpt_root, self.config.checkpoint.keep_last,
                                   self.config.checkpoint.permanent_interval)
        return path

    def restore(self) -> bool:
        """Resume from the latest complete checkpoint, or start a stage-2 run from `init_from`. True if resumed."""
        if self.dist.is_main:
            ckpt.remove_partial_saves(self.ckpt_root)
        latest = latest_checkpoint(self.ckpt_root)
        if latest is not None:
            meta, rank_state = ckpt.load_checkpoint(latest, self.model, self.optimizer, self.dist)
            self.step, self.tokens = meta["step"], meta["tokens"]
            self.skip_step.load_state_dict(meta["skip_step"])
            self.energy_before = meta.get("energy_joules", 0.0)
            if rank_state is not None:
                self._restore_rank_state(rank_state)
                self.loader.load_state_dict(rank_state["data"])
            else:  # another world size: the loader's position is global, RNG streams restart from the seed
                self.loader.load_state_dict(meta["data"])
            self._log(f"resumed from {latest} (step {self.step}, {self.tokens:,} tokens)")
            return True
        init = self.config.init_from
        if init is not None:
            if init.load_optimizer:
                ckpt.load_checkpoint(resolve_checkpoint(init.path), self.model, self.optimizer, self.dist)
            else:
                ckpt.load_weights_for_init(init.path, self.model, self.model_config)
            self._log(f"initialised weights from {init.path}"
                      + (" (with its optimizer state)" if init.load_optimizer else ""))
        return False

    # ---- one step -------------------------------------------------------------------------------------------

    def _next_batch(self, batches: Iterator[dict], batch_tokens: int) -> dict:
        instances = batch_tokens // self.seq_len
        if instances != self.loader_batch:  # batch-size warmup: the loader continues at the same position
            self.loader.set_global_batch_instances(instances)
            self.loader_batch = instances
        try:
            return next(batches)
        except StopIteration:
            raise LmforgeError(f"the data ran out at step {self.step} ({self.tokens:,} tokens); "
                               f"lower max_steps/max_tokens or add data") from None

    def _sync_context(self, last: bool):
        # FSDP reduce-scatters every micro-batch, as OLMo-core does: sharded fp32 gradients accumulate, and no
        # unsharded gradient is kept between micro-batches. HSDP delays only the all-reduce across replicas.
        if self.layout.mode == "hsdp":
            self.model.set_requires_all_reduce(last)
            return contextlib.nullcontext()
        if self.layout.mode == "ddp" and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, batch: dict[str, torch.Tensor], batch_tokens: int) -> StepResult:
        c = self.config
        self.step += 1
        self.tokens += batch_tokens
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        batch = self.objective.prepare(self.model, batch)
        count = all_reduce_sum(self.objective.count(batch), self.parallel.data_group)
        scale = self.parallel.averaged_ranks / count.clamp(min=1)
        micro = c.micro_batch_size // self.seq_len
        if self.parallel.pipeline is not None:  # the schedule runs the micro-batches (next-token prediction only)
            with self.parallel.loss_context():
                loss_total, metric_totals = self.parallel.pipeline.step(batch, micro, self.objective.logits_loss,
                                                                        scale)
        else:
            loss_total, metric_totals = self._accumulate(batch, micro, scale)
        warmup_done = self._progress() > c.schedule.warmup
        clip = not c.optimizer.clip_after_warmup_only or warmup_done
        grad_norm = clip_grad_norm(self.params, c.optimizer.max_grad_norm, clip, self.parallel.pipeline_group)
        names = sorted(metric_totals)
        sums = all_reduce_sum(torch.stack([loss_total, *(metric_totals[n] for n in names)]), self.parallel.loss_group)
        values = torch.cat([sums / count.clamp(min=1), grad_norm.reshape(1).float()]).tolist()
        loss_value, norm_value, metric_values = values[0], values[-1], dict(zip(names, values[1:-1]))
        lr = c.optimizer.lr * lr_multiplier(c.schedule, self._progress(), self._duration())
        skipped = self.skip_step.check(loss_value, norm_value)
        if skipped is None:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(self.step, self.tokens, loss_value, norm_value, lr, skipped, metric_values)

    def _accumulate(self, batch: dict[str, torch.Tensor], micro: int, scale: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of each micro-batch of `micro` rows, gradients times `scale`; returns the sums
        of the objective's loss and metrics."""
        rows_total = next(iter(batch.values())).shape[0]
        loss_total = torch.zeros((), device=self.device)
        metric_totals: dict[str, torch.Tensor] = {}
        for start in range(0, rows_total, micro):
            micro_batch = {k: v[start:start + micro] for k, v in batch.items()}
            with self._sync_context(last=start + micro >= rows_total), self.parallel.loss_context():
                with self._autocast():
                    loss, metrics = self.objective.loss(self.model, micro_batch)
                (loss * scale).backward()
            loss_total += loss.detach()
            for name, value in metrics.items():
                metric_totals[name] = metric_totals.get(name, 0) + value.detach().float()
        return loss_total, metric_totals

    def _progress(self) -> int:
        return self.step if self.config.schedule.units == "steps" else self.tokens

    def _duration(self) -> int:
        return self.max_steps if self.config.schedule.units == "steps" else self.max_tokens

    # ---- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            save_config(c, self.run_dir)
            self._write_manifest(finished=False)
        resumed = self.restore()
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)
            truncate_step_log(self.run_dir / BATCHES_FILE, self.step)
        self._log(f"training {self.model_config.family} model, {sum(p.numel() for p in self.params):,} parameters, "
                  f"{self.dist.world_size} x {self.device.type} ({self.layout.describe()}), {self.max_steps} steps, "
                  f"{self.max_tokens:,} tokens" + (f", from step {self.step}" if resumed else ""))
        batches = iter(self.loader)
        last_save_time = time.monotonic()
        interval = _Interval()
        self.model.train()
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            batch_tokens = self.batch_size_at(self.tokens)
            batch = self._next_batch(batches, batch_tokens)
            interval.data_wait += time.perf_counter() - t0
            if self.dist.is_main and "batch_start" in batch:
                self._batch_log().append(self.step + 1, batch)
            result = self.train_step(batch, batch_tokens)
            interval.add(result, batch_tokens, time.perf_counter() - t0)
            if result.skipped:
                self._log(f"step {result.step}: skipped the update ({result.skipped})")
            if result.step % c.metrics.log_interval == 0 or result.step == self.max_steps:
                self._log_metrics(result, interval)
                interval = _Interval()
            if c.eval_interval and result.step % c.eval_interval == 0 and self.evaluators:
                self._evaluate()
            if self._save_due(last_save_time):
                self.save()
                last_save_time = time.monotonic()
        if c.checkpoint.save_final and latest_checkpoint(self.ckpt_root) != self.ckpt_root / step_dir_name(self.step):
            self.save()
        energy = self._energy()
        if self.dist.is_main:
            self._write_manifest(finished=True, energy=energy)
        self.metrics.close()
        if self.batch_log is not None:
            self.batch_log.close()
        if hasattr(self.loader, "close"):
            self.loader.close()
        return {"steps": self.step, "tokens": self.tokens, "skipped_steps": self.skip_step.total_skipped,
                "energy": energy}

    def _save_due(self, last_save_time: float) -> bool:
        c = self.config.checkpoint
        if self.step == self.max_steps:
            return False  # the final save happens after the loop
        due = bool(c.interval and self.step % c.interval == 0)
        if c.interval_minutes is not None:
            # One clock decides for all ranks, so they enter the collective save together.
            due = due or broadcast_object(time.monotonic() - last_save_time >= 60 * c.interval_minutes)
        return due

    def _build_evaluators(self) -> list[Evaluator]:
        if self.config.eval_interval is None:
            return []
        from lmforge.eval.inloop import build_inloop_evaluators

        if not self.tokenizer:
            raise LmforgeError("eval_interval is set but the run has no tokenizer (tokenizer: PATH)")
        return build_inloop_evaluators(self.config.eval, load_tokenizer(self.tokenizer, self.model_config))

    def _batch_log(self):
        if self.batch_log is None:
            from lmforge.tokens.lineage import BatchLog

            self.batch_log = BatchLog(self.run_dir)
        return self.batch_log

    def _evaluate(self) -> None:
        module = unwrap(self.model)
        module.eval()
        row = {"step": self.step, "tokens": self.tokens}
        with torch.no_grad(), self._autocast():
            for evaluator in self.evaluators:
                row.update({f"eval/{k}": v for k, v in evaluator(module).items()})
        module.train()
        self.metrics.log(row)
        self._log(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    def _log_metrics(self, result: StepResult, interval: "_Interval") -> None:
        tps = interval.tokens / max(interval.elapsed, 1e-9) / self.dist.world_size
        row = {
            "step": result.step, "tokens": result.tokens, "loss": result.loss,
            "lr": result.lr, "grad_norm": result.grad_norm, "tokens_per_second": tps * self.dist.world_size,
            "tokens_per_second_per_device": tps,
            "mfu": 100 * self.flops_per_token * tps / self.peak_flops if self.peak_flops else None,
            "data_wait_pct": 100 * interval.data_wait / max(interval.elapsed, 1e-9),
            "memory_gib": memory_gib(self.device), "skipped": interval.skipped,
        }
        energy = self._energy()
        row.update(energy_kwh=energy["kwh"], co2eq_kg=energy["kg_co2eq"])
        row.update(result.metrics)
        row.update(self.objective.interval_metrics())
        self.metrics.log(row)
        self._log(console_line(row, self.max_steps))

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

    def _joules(self) -> float:
        """Device energy of the whole run so far, every rank's (a collective: every rank calls it)."""
        mine = torch.tensor(self.energy.joules(), dtype=torch.float64, device=self.device)
        return self.energy_before + all_reduce_sum(mine).item()

    def _energy(self) -> dict:
        return energy_summary(self._joules(), self.config.energy, self.energy.method, self.energy.detail)

    def _write_manifest(self, finished: bool, energy: dict | None = None) -> None:
        extra = {"model": to_dict(self.model_config)}
        if energy is not None:
            extra["energy"] = energy
        write_manifest(self.run_dir, command=self.command, config=self.config,
                       counts={"steps": self.step, "tokens": self.tokens, "world_size": self.dist.world_size,
                               "skipped_steps": self.skip_step.total_skipped, "finished": finished},
                       extra=extra)


@dataclasses.dataclass
class _Interval:
    tokens: int = 0
    elapsed: float = 0.0
    data_wait: float = 0.0
    skipped: int = 0

    def add(self, result: StepResult, tokens: int, elapsed: float) -> None:
        self.tokens += tokens
        self.elapsed += elapsed
        self.skipped += result.skipped is not None


def default_loader_factory(config: TrainConfig, run_dir: Path, record: bool = True) -> LoaderFactory:
    """The token-file dataset of `config.data`; rank 0 records it in the run directory for `data inspect`."""

    def factory(global_batch_tokens: int, dist_info: DistInfo) -> BatchLoader:
        from lmforge.tokens.lineage import write_run_data_record

        dataset = config.data.build()
        if dist_info.is_main and record:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_data_record(run_dir, dataset)
        return dataset.loader(global_batch_tokens // config.sequence_length, rank=dist_info.data_rank,
                              world_size=dist_info.data_world)

    return factory


def resolve_tokenizer(config: TrainConfig) -> str | None:
    """The run's tokenizer: configured, the data's, or the copy `lmforge data tokenize` keeps in its output."""
    name = config.tokenizer or config.data.tokenizer
    if name:
        return str(Path(name).resolve()) if Path(name).exists() else name  # a path, or a name such as "olmo"
    return tokens_tokenizer(config.data.paths)


def load_tokenizer(name: str, model: ModelConfig | None = None) -> Tokenizer:
    if model is None:
        return find_tokenizer(name)
    return find_tokenizer(name, eos_id=model.eos_token_id, pad_id=model.pad_token_id, bos_id=model.bos_token_id)


def preflight(config: TrainConfig, world_size: int, local_world_size: int | None = None) -> None:
    """Make every refusal the trainer makes before compute, in this process: a launcher runs it once before
    starting workers, so a bad config or unusable data is one line, not one per worker plus torchrun's trace."""
    Trainer(config, dist_info=DistInfo(0, world_size, 0, local_world_size or world_size, torch.device("cpu")),
            checks_only=True,
            loader_factory=default_loader_factory(config, Path(config.run_dir), record=False))


def train(config: TrainConfig, **kwargs: Any) -> dict:
    """Train under the run directory's lock: taken by rank 0 only (or by `lmforge train --nproc` before it
    launched the workers), so the ranks of one run never lock each other out."""
    dist_info = kwargs.get("dist_info")
    is_main = dist_info.is_main if dist_info is not None else os.environ.get("RANK", "0") == "0"
    with output_lock(config.run_dir) if is_main else contextlib.nullcontext():
        return Trainer(config, **kwargs).fit()
