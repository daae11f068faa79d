"""RLVR: GRPO with verifiable rewards (`lmforge adapt rlvr CONFIG`), an objective on the one trainer.

One optimizer step (the trainer does micro-batching, gradient scaling across ranks, clipping, schedule,
optimizer, checkpoints and metrics around it):
  1. the loader gives this rank its share of the step's prompts, each repeated `group_size` times (a group's
     rows are contiguous and on one rank);
  2. `GRPO.prepare` samples one completion per row with lmforge's KV-cache generation (batched, eval mode, no
     gradient; temperature sampling seeded by (seed, rollout, rank); each distinct prompt prefilled once), scores
     them (`rewards.py`), and turns each group's rewards r_1..r_G into advantages A_i = r_i - mean(r)
     (`centered`, OlmoRL) or (r_i - mean(r)) / (std(r) + 1e-4) (`standard`, std with Bessel's correction, as TRL);
  3. `GRPO.loss` recomputes the completion tokens' log-probs log π(t) at the sampling temperature (each distinct
     prompt of a micro-batch forwarded once into a KV cache that its rows' completions attend over: prompt
     tokens are a large share of the rows, and a group repeats its prompt group_size times) and, per token,
        ratio = exp(log π - log π_old)     (π_old: the weights that sampled; = π, detached, when iterations = 1)
        L_t   = -min(ratio·A, clip(ratio, 1 - clip_low, 1 + clip_high)·A) · w + beta · KL_t
        KL_t  = exp(log π_ref - log π) - (log π_ref - log π) - 1      (Schulman's k3; π_ref: the start model)
        w     = min(exp(log π_old - log π_sampler), importance_cap)   (only with importance_cap: truncated
                importance sampling, for when the sampler's numbers differ from the learner's)
     aggregated per token over the global batch (`token`, DAPO: Σ L_t / Σ completion tokens) or per sequence
     (`sequence`, GRPO: mean over sequences of each sequence's token mean).
Groups whose rewards are all equal have zero advantage; with `filter_zero_variance` they leave the batch's
normaliser and loss (their rows stay, masked, so every rank runs the same micro-batches). With `iterations` > 1
the loader repeats each prompt batch and the rollout is reused for that many optimizer steps (PPO epochs), so
the ratio moves away from 1 and clipping acts.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.adapt.rewards import RewardConfig, RewardFunction
from lmforge.core.config import require, save_config, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.eval.scoring import logits_at
from lmforge.model.generation import generate_ids, left_padded, mask_positions
from lmforge.model.transformer import KVCache
from lmforge.model.sampling import SamplingConfig
from lmforge.tokens.dataset import DataConfig
from lmforge.tokens.tokenizer import Tokenizer
from lmforge.train.config import (CheckpointConfig, InitFrom, MetricsConfig, ModelSpec, OptimizerConfig,
                                  ParallelConfig, ScheduleConfig, SkipStepConfig, TrainConfig)
from lmforge.train.distributed import all_reduce_sum
from lmforge.train.objective import IGNORE_INDEX
from lmforge.train.parallelize import unwrap

REPORTED_RECORDS = 5  # skipped prompt records named one per line; the rest are counted
STD_EPSILON = 1e-4  # TRL's, for `standard` advantages


@dataclass
class GRPOConfig:
    group_size: int = 8  # completions sampled per prompt
    prompts_per_step: int = 8  # over all ranks
    micro_batch_sequences: int = 8  # completions per forward/backward on one device
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    advantages: Literal["centered", "standard"] = "centered"  # standard: divided by the group's reward std
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO); equal to clip_low for PPO's symmetric range
    aggregation: Literal["token", "sequence"] = "token"
    beta: float = 0.0  # KL penalty (k3) towards the start model; Tülu 3 RLVR: 0.05
    filter_zero_variance: bool = True
    importance_cap: float | None = None  # truncated importance sampling: cap on π_old / π_sampler
    iterations: int = 1  # optimizer steps per rollout (TRL num_iterations, PPO epochs)
    no_eos_penalty: float = 0.0  # subtracted from the reward of a completion cut at max_new_tokens (Tülu 3: 10)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.group_size >= 2, "grpo.group_size", self.group_size, "must be >= 2 (advantages compare a group)")
        for name in ("prompts_per_step", "micro_batch_sequences", "max_new_tokens", "iterations"):
            require(getattr(self, name) >= 1, f"grpo.{name}", getattr(self, name), "must be >= 1")
        require(0 < self.temperature < float("inf"), "grpo.temperature", self.temperature,
                "must be > 0 (a group of greedy completions has nothing to compare)")
        require(0 <= self.clip_low < 1, "grpo.clip_low", self.clip_low, "must be in [0, 1)")
        require(self.clip_high >= 0, "grpo.clip_high", self.clip_high, "must be >= 0")
        require(self.beta >= 0, "grpo.beta", self.beta, "must be >= 0")
        require(self.no_eos_penalty >= 0, "grpo.no_eos_penalty", self.no_eos_penalty, "must be >= 0")
        require(self.importance_cap is None or self.importance_cap > 0, "grpo.importance_cap", self.importance_cap,
                "must be positive")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p)

    def check_world_size(self, world_size: int) -> None:
        """Refuse prompts that `world_size` data-parallel ranks cannot share (a prompt's group stays on one rank)."""
        if self.prompts_per_step % world_size:
            raise LmforgeError(f"grpo.prompts_per_step ({self.prompts_per_step}) must be a multiple of the number "
                               f"of ranks ({world_size}): a prompt's group stays on one rank")



@dataclass
class RLVRConfig:
    run_dir: str
    model: str  # start weights and reference: an lmforge model directory (`lmforge import hf` makes one)
    prompts: list[str]  # JSONL prompt files (docs/adapt.md: {"prompt" or "messages", "answer" or "ground_truth"})
    tokenizer: str | None = None  # default: the model directory's
    prompt_format: Literal["auto", "chat", "plain"] = "auto"  # auto: the tokenizer's chat template when it has one
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted
    seed: int = 0
    max_steps: int = 100
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="constant"))
    # A policy-gradient loss is not a health signal the way a language-modelling loss is: off unless asked.
    skip_step: SkipStepConfig = field(default_factory=lambda: SkipStepConfig(enabled=False))
    precision: Literal["fp32", "bf16"] = "bf16"
    cpu_bf16: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(interval=100))
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(log_interval=1))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.prompts), "prompts", self.prompts, "give at least one JSONL prompt file")
        require(self.max_prompt_tokens >= 1, "max_prompt_tokens", self.max_prompt_tokens, "must be >= 1")
        require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")

    def check_world_size(self, world_size: int) -> None:
        """Refuse a step that `world_size` data-parallel ranks cannot split into whole groups and micro-batches."""
        g = self.grpo
        g.check_world_size(world_size)
        rows = g.prompts_per_step * g.group_size
        if rows % (g.micro_batch_sequences * world_size):
            raise LmforgeError(f"grpo.prompts_per_step x group_size ({rows}) is not divisible by "
                               f"grpo.micro_batch_sequences x ranks ({g.micro_batch_sequences} x {world_size})")

    @property
    def sequence_length(self) -> int:
        return self.max_prompt_tokens + self.grpo.max_new_tokens

    def train_config(self) -> TrainConfig:
        """The trainer's view: one "instance" is one completion (prompt + completion slot), so the global batch
        is prompts_per_step · group_size of them and a micro-batch micro_batch_sequences."""
        from lmforge.model.directory import read_model_config

        model = read_model_config(self.model)
        seq, g = self.sequence_length, self.grpo
        return TrainConfig(
            run_dir=self.run_dir, data=DataConfig(paths=list(self.prompts), sequence_length=seq),
            model=ModelSpec(overrides=to_dict(model)), tokenizer=self.tokenizer or self.model, seed=self.seed,
            global_batch_size=g.prompts_per_step * g.group_size * seq, micro_batch_size=g.micro_batch_sequences * seq,
            max_steps=self.max_steps, precision=self.precision, cpu_bf16=self.cpu_bf16, device=self.device,
            optimizer=self.optimizer, schedule=self.schedule, skip_step=self.skip_step, parallel=self.parallel,
            checkpoint=self.checkpoint, metrics=self.metrics, init_from=InitFrom(self.model))


# ------------------------------------------------------------------------------------------------- prompts

@dataclass
class PromptSet:
    ids: list[list[int]]
    answers: list[str]
    where: list[str]  # "file:line" of each prompt
    skipped: Counter = field(default_factory=Counter)  # reason -> records


ROLES = ("system", "user", "assistant")


def _record_text(record, tokenizer: Tokenizer, prompt_format: str) -> str:
    """The prompt text of one record, or ValueError saying why the record cannot be used."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    chat = prompt_format == "chat" or (prompt_format == "auto" and tokenizer.chat_template is not None)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        unknown = sorted({str(m.get("role")) for m in messages} - set(ROLES))
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}")
        if messages[-1]["role"] != "user":
            raise ValueError("the last message must be the user's")
        if not chat:
            raise ValueError("messages need a chat template (prompt_format: chat, and a tokenizer that has one)")
    elif isinstance(record.get("prompt"), str):
        if not chat:
            return record["prompt"]
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise ValueError('no "prompt" string or "messages" list')
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _record_answer(record: dict) -> str:
    answer = record.get("answer", record.get("ground_truth"))
    if isinstance(answer, list) and len(answer) == 1:  # open-instruct stores some ground truths as one-item lists
        answer = answer[0]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError('no "answer" (or "ground_truth") string or number')
    return str(answer)


def _file_lines(paths: list[str]) -> Iterator[tuple[str, str]]:
    for path in paths:
        if not Path(path).is_file():
            raise LmforgeError(f"prompt file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{line_no}", line


def read_prompts(paths: list[str], tokenizer: Tokenizer, prompt_format: str, max_prompt_tokens: int,
                 bos_id: int | None) -> PromptSet:
    """Prompt records of JSONL files; unusable records are skipped, the first few named with file and line,
    all counted by reason. None left is an error."""
    return prompt_set(_file_lines(paths), tokenizer, prompt_format, max_prompt_tokens, bos_id, ", ".join(paths))


def prompt_set(records: Iterable[tuple[str, str | dict]], tokenizer: Tokenizer, prompt_format: str,
               max_prompt_tokens: int, bos_id: int | None, what: str) -> PromptSet:
    """Prompt records given as (where, JSON line or parsed record); skipped and counted as `read_prompts`."""
    out = PromptSet([], [], [])
    reported = 0
    for where, record in records:
        try:
            if isinstance(record, str):
                try:
                    record = json.loads(record)
                except ValueError:
                    raise ValueError("not valid JSON") from None
            text = _record_text(record, tokenizer, prompt_format)
            answer = _record_answer(record)
            ids = tokenizer.encode(text)
            if bos_id is not None and (not ids or ids[0] != bos_id):
                ids = [bos_id] + ids
            if len(ids) > max_prompt_tokens:
                raise ValueError(f"prompt of {len(ids)} tokens is longer than max_prompt_tokens "
                                 f"({max_prompt_tokens})")
        except ValueError as e:
            reason = "longer than max_prompt_tokens" if "longer than" in str(e) else str(e)
            out.skipped[reason] += 1
            if reported < REPORTED_RECORDS:
                print(f"{where}: skipped: {e}", file=sys.stderr)
                reported += 1
            continue
        out.ids.append(ids)
        out.answers.append(answer)
        out.where.append(where)
    if out.skipped:
        print(f"skipped {sum(out.skipped.values())} prompt record(s): "
              + ", ".join(f"{n} {reason}" for reason, n in out.skipped.most_common()), file=sys.stderr)
    if not out.ids:
        raise LmforgeError(f"no usable prompt records in {what}")
    return out


class PromptLoader:
    """The trainer's loader: this rank's rows of each step, as prompt indices (each prompt `group_size` times,
    groups contiguous). The order is a seeded permutation per epoch (a tail shorter than a step is dropped);
    each prompt batch is yielded `iterations` times. The state is the number of batches yielded."""

    def __init__(self, n_prompts: int, grpo: GRPOConfig, seed: int, rank: int, world_size: int):
        grpo.check_world_size(world_size)
        if n_prompts < grpo.prompts_per_step:
            raise LmforgeError(f"{n_prompts} usable prompts, fewer than grpo.prompts_per_step "
                               f"({grpo.prompts_per_step})")
        self.n, self.grpo, self.seed, self.rank, self.world = n_prompts, grpo, seed, rank, world_size
        self.position = 0

    def step_prompts(self, rollout: int) -> np.ndarray:
        """The global batch of prompt indices of rollout `rollout`."""
        per_step = self.grpo.prompts_per_step
        epoch, k = divmod(rollout, self.n // per_step)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return order[k * per_step:(k + 1) * per_step]

    def __iter__(self):
        share = self.grpo.prompts_per_step // self.world
        while True:
            rollout, iteration = divmod(self.position, self.grpo.iterations)
            mine = self.step_prompts(rollout)[self.rank * share:(self.rank + 1) * share]
            rows = np.repeat(mine, self.grpo.group_size)
            sample_seed = int(np.random.SeedSequence([self.seed, rollout, self.rank]).generate_state(1)[0])
            self.position += 1
            yield {"prompt_index": torch.from_numpy(rows.astype(np.int64)),
                   "rollout": torch.full((len(rows),), rollout, dtype=torch.int64),
                   "iteration": torch.full((len(rows),), iteration, dtype=torch.int64),
                   "sample_seed": torch.full((len(rows),), sample_seed, dtype=torch.int64)}

    def set_global_batch_instances(self, n: int) -> None:
        if n != self.grpo.prompts_per_step * self.grpo.group_size:
            raise LmforgeError("RLVR has no batch-size schedule")

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


# ------------------------------------------------------------------------------------------------- GRPO

def completion_texts(tokenizer: Tokenizer, completions: list[list[int]]) -> tuple[list[str], list[bool]]:
    """What the checker reads of each completion (its text without EOS and special tokens), and whether it
    ended with EOS (False: cut at max_new_tokens)."""
    finished = [bool(c) and c[-1] == tokenizer.eos_id for c in completions]
    return [tokenizer.decode(c[:-1] if done else c, skip_special_tokens=True)
            for c, done in zip(completions, finished)], finished


def group_advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """(groups, G) rewards -> advantages: centred on the group mean, and for `standard` divided by the group's
    standard deviation (Bessel-corrected) + 1e-4."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    if kind == "standard":
        return centered / (rewards.std(-1, keepdim=True) + STD_EPSILON)
    return centered


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(label) per position at `temperature`, in fp32; 0 where the label is ignored."""
    flat = F.cross_entropy(logits.float().flatten(0, 1) / temperature, labels.flatten(), reduction="none",
                           ignore_index=IGNORE_INDEX)
    return -flat.view(labels.shape)


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                       clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(ratio·A, clip(ratio)·A) per token, whether the clip bound is the active one per token)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    loss = -torch.min(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    clipped = ((ratio < 1 - clip_low) & (a < 0)) | ((ratio > 1 + clip_high) & (a > 0))
    return loss, clipped


def left_padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width) attention mask of prompts of these lengths, left-padded to `width`."""
    return (torch.arange(width, device=lengths.device) >= width - lengths[:, None]).long()


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π || π_ref) per sampled token: exp(d) - d - 1 with d = log π_ref - log π."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


class GRPO:
    """The GRPO objective (module docstring); rollout statistics accumulate between metrics lines."""

    def __init__(self, grpo: GRPOConfig, prompts: PromptSet, reward: RewardFunction, tokenizer: Tokenizer,
                 reference: str | None = None, share_prompts: bool = True):
        self.config, self.prompts, self.reward, self.tokenizer = grpo, prompts, reward, tokenizer
        self.share_prompts = share_prompts
        self.reference_path = reference
        self.reference: torch.nn.Module | None = None
        self._rollout: tuple[int, dict[str, torch.Tensor]] | None = None
        self._stats = torch.zeros(8, dtype=torch.float64)
        self._device = torch.device("cpu")  # the model's: where the statistics are summed across ranks
        self._since: float | None = None  # the first rollout starts the clock (model loading is not sampling)

    # ---- rollout

    def prepare(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rollout, iteration = int(batch["rollout"][0]), int(batch["iteration"][0])
        if iteration > 0 and self._rollout is not None and self._rollout[0] == rollout:
            return self._rollout[1]
        module = unwrap(model)
        was_training = module.training
        module.eval()
        try:
            prepared = self._roll_out(module, batch["prompt_index"].tolist(), int(batch["sample_seed"][0]))
        finally:
            module.train(was_training)
        self._rollout = (rollout, prepared)
        return prepared

    @torch.no_grad()
    def _roll_out(self, module: torch.nn.Module, index: list[int], seed: int) -> dict[str, torch.Tensor]:
        g, tok = self.config, self.tokenizer
        self._since = self._since or time.perf_counter()
        device = self._device = next(module.parameters()).device
        prompt_ids = [self.prompts.ids[i] for i in index]
        sampling = SamplingConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                  top_p=g.top_p, seed=seed)
        sampler_logps: list[list[float]] | None = [] if g.importance_cap is not None else None
        completions = generate_ids(module, prompt_ids, sampling, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                   logprobs=sampler_logps)
        texts, finished = completion_texts(tok, completions)
        scored = self.reward(texts, [self.prompts.answers[i] for i in index], [self.prompts.where[i] for i in index])
        rewards = torch.tensor(scored.rewards, dtype=torch.float64)
        rewards = (rewards - g.no_eos_penalty * ~torch.tensor(finished)).view(-1, g.group_size)
        advantages = group_advantages(rewards, g.advantages).flatten().float()
        zero_variance = (rewards.max(-1).values == rewards.min(-1).values)
        keep = ~zero_variance.repeat_interleave(g.group_size) if g.filter_zero_variance else torch.ones(
            len(index), dtype=torch.bool)
        batch = self._rows(prompt_ids, completions, keep, device)
        batch["advantages"] = advantages.to(device)
        if sampler_logps is not None:
            batch["sampler_logps"] = self._at_labels(batch["labels"], sampler_logps)
        if g.iterations > 1:
            batch["old_logps"] = self._logps(module, batch)
        if g.beta > 0:
            batch["ref_logps"] = self._logps(self._reference(device), batch)
        lengths = [len(c) for c in completions]
        self._stats += torch.tensor([rewards.sum().item(), sum(scored.correct), len(index), sum(lengths),
                                     float(zero_variance.sum()), len(zero_variance),
                                     len(index) - sum(finished), scored.failures], dtype=torch.float64)
        return batch

    def _rows(self, prompts: list[list[int]], completions: list[list[int]], keep: torch.Tensor,
              device: torch.device) -> dict[str, torch.Tensor]:
        """Per row: its prompt (left-padded, with its length and its group's index) and its completion
        (right-padded), with labels on the completion tokens of kept rows."""
        prompt_ids, prompt_mask = left_padded(prompts, self.tokenizer.pad_id, device)
        width = max(len(c) for c in completions)
        completion_ids = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
        for row, c in enumerate(completions):
            completion_ids[row, :len(c)] = torch.tensor(c)
            if keep[row]:
                labels[row, :len(c)] = torch.tensor(c)
        return {"prompt_ids": prompt_ids, "prompt_lengths": prompt_mask.sum(-1),
                "group": torch.arange(len(prompts), device=device) // self.config.group_size,
                "completion_ids": completion_ids.to(device), "labels": labels.to(device)}

    def _at_labels(self, labels: torch.Tensor, values: list[list[float]]) -> torch.Tensor:
        out = torch.zeros(labels.shape, dtype=torch.float32)
        for row, v in enumerate(values):
            out[row, :len(v)] = torch.tensor(v)
        return out.to(labels.device).masked_fill(labels == IGNORE_INDEX, 0.0)

    def _logps(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        step = self.config.micro_batch_sequences
        return torch.cat([self._completion_logps(module, {k: v[i:i + step] for k, v in batch.items()})
                          for i in range(0, len(batch["labels"]), step)])

    def _completion_logps(self, model: torch.nn.Module, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """log π of each completion token (at the labels' positions)."""
        logits = (self._shared_prompt_logits if self.share_prompts else self._whole_row_logits)(model, micro)
        return token_logps(logits, micro["labels"], self.config.temperature)

    def _shared_prompt_logits(self, model: torch.nn.Module, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """Completion logits with each distinct prompt of the micro-batch forwarded once (left-padded, into a KV
        cache whose copies its rows' completions attend over): the prompt's gradient is the sum over its rows."""
        module = unwrap(model)
        _, group = micro["group"].unique(return_inverse=True)
        rows = torch.arange(len(group), device=group.device)
        first = torch.full((int(group.max()) + 1,), len(group), device=group.device).scatter_reduce(
            0, group, rows, "amin")
        lengths = micro["prompt_lengths"][first]
        width = int(lengths.max())
        prompt_mask = left_padding_mask(lengths, width)
        prompt_cache = KVCache(module.config, len(first), width, group.device, None)
        padded = bool((lengths < width).any())
        first_logits = model(micro["prompt_ids"][first, -width:], positions=mask_positions(prompt_mask),
                             attention_mask=prompt_mask if padded else None, cache=prompt_cache,
                             last_logits_only=True)
        completions = micro["completion_ids"]
        L = completions.shape[1]
        mask = torch.cat([prompt_mask[group], torch.ones_like(completions)], dim=1)
        positions = lengths[group][:, None] + torch.arange(L, device=group.device)
        # The last completion position predicts nothing: the LM head skips it.
        with logits_at(module, lambda hidden: hidden[:, :-1]):
            rest = model(completions, positions=positions, attention_mask=mask,
                         cache=prompt_cache.select(group, width + L))
        return torch.cat([first_logits.index_select(0, group), rest], dim=1)

    def _whole_row_logits(self, model: torch.nn.Module, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """Completion logits from one forward over each row's prompt + completion: for blocks that recompute
        their forward in the backward (activation checkpointing would append to the cache twice) or are
        compiled (a cache's length changes at every call)."""
        lengths = micro["prompt_lengths"]
        width = int(lengths.max())
        completions = micro["completion_ids"]
        ids = torch.cat([micro["prompt_ids"][:, -width:], completions], dim=1)
        mask = torch.cat([left_padding_mask(lengths, width), torch.ones_like(completions)], dim=1)
        L = completions.shape[1]
        with logits_at(unwrap(model), lambda hidden: hidden[:, width - 1:width - 1 + L]):
            return model(ids, positions=mask_positions(mask), attention_mask=mask)

    def _reference(self, device: torch.device) -> torch.nn.Module:
        """The frozen start model (loaded from its directory, so a resumed run compares with the same one)."""
        if self.reference is None:
            from lmforge.model.loading import load

            self.reference = load(self.reference_path, device=device).model.eval().requires_grad_(False)
        return self.reference

    # ---- loss

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["labels"] != IGNORE_INDEX
        return (mask.sum() if self.config.aggregation == "token" else mask.any(-1).sum()).to(torch.float32)

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_token = per_token * mask
        if self.config.aggregation == "token":
            return per_token.sum()
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()

    def loss(self, model: torch.nn.Module, micro: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.config
        labels = micro["labels"]
        mask = labels != IGNORE_INDEX
        logps = self._completion_logps(model, micro)
        old = micro["old_logps"] if "old_logps" in micro else logps.detach()
        per_token, clipped = clipped_token_loss(logps, old, micro["advantages"], g.clip_low, g.clip_high)
        if "sampler_logps" in micro:
            per_token = per_token * torch.exp(old - micro["sampler_logps"]).clamp(max=g.importance_cap)
        metrics = {"clip_fraction": self._aggregate(clipped.float(), mask).detach()}
        if g.beta > 0:
            kl = k3_kl(logps, micro["ref_logps"])
            per_token = per_token + g.beta * kl
            metrics["kl"] = self._aggregate(kl, mask).detach()
        return self._aggregate(per_token, mask), metrics

    def interval_metrics(self) -> dict[str, float]:
        (reward, correct, samples, tokens, zero_groups, groups, truncated,
         failures) = all_reduce_sum(self._stats.to(self._device)).tolist()
        elapsed = time.perf_counter() - (self._since or time.perf_counter())
        self._stats.zero_()
        self._since = time.perf_counter()
        if samples == 0:  # only reused rollouts since the last line
            return {}
        return {"reward": reward / samples, "accuracy": correct / samples, "completion_length": tokens / samples,
                "zero_variance_groups": zero_groups / groups, "truncated": truncated / samples,
                "checker_failures": failures, "samples_per_second": samples / max(elapsed, 1e-9)}


# ------------------------------------------------------------------------------------------------- the run

def rlvr(config: RLVRConfig, command: str = "lmforge adapt rlvr") -> dict:
    """Train with GRPO from `config.model`; write the run (checkpoints, metrics.jsonl) and its final weights
    as a model directory `run_dir/model`. Returns a summary."""
    from lmforge.adapt.runner import finish_ranks, is_main_rank
    from lmforge.model.directory import read_model_config
    from lmforge.model.loading import export_model_dir
    from lmforge.tokens.tokenizer import find_tokenizer
    from lmforge.train.trainer import train

    train_config = config.train_config()
    model = read_model_config(config.model)
    if config.sequence_length > model.max_sequence_length:
        raise LmforgeError(f"max_prompt_tokens + grpo.max_new_tokens = {config.sequence_length} is longer than the "
                           f"context of {config.model} ({model.max_sequence_length})")
    tokenizer = find_tokenizer(config.tokenizer, model_dir=config.model, eos_id=model.eos_token_id,
                               pad_id=model.pad_token_id, bos_id=model.bos_token_id, what=config.model)
    prompts = read_prompts(config.prompts, tokenizer, config.prompt_format, config.max_prompt_tokens,
                           model.bos_token_id)
    reward = RewardFunction(config.reward)
    objective = GRPO(config.grpo, prompts, reward, tokenizer, reference=config.model,
                     share_prompts=config.parallel.activation_checkpointing == "none" and not config.parallel.compile)

    def loader_factory(global_batch_tokens, dist_info):
        return PromptLoader(len(prompts.ids), config.grpo, config.seed, dist_info.rank, dist_info.world_size)

    try:
        trained = train(train_config, loader_factory=loader_factory, objective=objective, command=command)
    finally:
        reward.close()
    summary = {**trained, "prompts": len(prompts.ids), "skipped_prompts": dict(prompts.skipped),
               "checker_errors": reward.errors, "checker_timeouts": reward.timeouts}
    finish_ranks()
    if is_main_rank():
        save_config(config, config.run_dir, "rlvr.yaml")
        atomic_write_json(Path(config.run_dir) / "rlvr_summary.json", summary)
        summary["model_dir"] = str(export_model_dir(config.run_dir, Path(config.run_dir) / "model",
                                                    command="adapt rlvr"))
    return summary
