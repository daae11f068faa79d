"""The quickstart's plan: how big a corpus and model the time budget affords, from a throughput probe.

A few optimizer steps of each candidate shape on random tokens measure what this machine does per second;
the budget's training time then gives each shape its tokens D, and the plan takes the shape with the lowest
loss Chinchilla's fitted law predicts for (N non-embedding parameters, D tokens): L = E + A/N^a + B/D^b
(Hoffmann et al. 2022, approach 3). The law was fitted far above this scale; here it only weighs a bigger
model against fewer tokens. The corpus is sized so stage 1 reads it about once. The plan is written to
`DIR/plan.json` once, so a rerun trains exactly the same thing whatever the machine's load then.

The budget holds when the machine slows down after the probe: stage 1 runs in chunks, and before each the
quickstart asks `affordable_stage1_steps` how many steps the time left affords at the speed just measured,
after the anneals at that speed and the later stages at their planned cost scaled by the same slowdown;
stage 1 ends early when the answer runs out. The anneals are shortened the same way if they would not fit,
but always run, as does the soup. The same check uses a machine faster than the probe: stage 1 runs on past
its planned steps (up to STAGE1_MAX_STRETCH times) while the time left affords them.

Adapting SmolLM2-135M-Instruct is a fixed amount of work (a short SFT and two scorings of held-out items); its
time is estimated from the probe's FLOP rate and taken out of the budget before the rest is planned.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from lmforge.core.config import from_dict, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.model.info import count_parameters
from lmforge.model.presets import get_preset
from lmforge.model.transformer import ModelConfig, Transformer, cross_entropy_loss, init_weights
from lmforge.train.config import OptimizerConfig
from lmforge.train.optim import build_optimizer

# (d_model, n_layers): OLMo 2 blocks with 32-wide heads and a SwiGLU of 3 x d_model, as olmo2-tiny.
SHAPES = [(64, 2), (96, 3), (128, 4), (192, 4), (256, 6), (384, 6), (512, 8)]
FIXED_SHAPE = (128, 4)  # olmo2-tiny
HEAD_DIM = 32
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
MIN_TOKENS_PER_PARAMETER = 2.0  # a shape is chosen only with this many planned tokens per parameter (the smallest
# always may be): at this scale the fitted law favours parameters more than measured. At equal time on 2 cores,
# 0.63M parameters on 1.27M tokens reached 2.434 held-out bits per byte, 1.15M on 0.93M 2.446, 1.90M on 0.75M
# (0.4 per parameter) 2.556; at 3x the time 0.63M and 1.15M reached 1.992 and 2.017 (benchmarks/RESULTS.md)
SEQUENCE_LENGTH = 256
BATCH_SEQUENCES = 16  # a global batch of 4,096 tokens
MICRO_SEQUENCES = 8
TRAIN_SHARE = 0.7  # of the budget; curation, evaluation and the report take the rest
STEP_EFFICIENCY = 0.6  # of the probe's tokens/s that `lmforge train` reaches (data loading, logging, checkpoints,
# a process per chunk); measured 0.60 on a quiet 2-core machine (4,953 of the probe's 8,249 tokens/s, d_model 192)
ANNEAL_RUNS = 2  # annealed from the same stage-1 checkpoint with different data orders, then souped
ANNEAL_SHARE = 0.125  # of the training tokens, per anneal run
MIN_STAGE1_STEPS = 40
MIN_ANNEAL_STEPS = 5
BYTES_PER_TOKEN = 3.0  # a 4,096-token BPE on Python source; sizes the corpus only
KEPT_FRACTION = 0.6  # of the raw bytes, after held-out documents, filters and edits
RAW_BYTES = (1_000_000, 200_000_000)
HELDOUT_BYTES_PER_SOURCE = (20_000, 100_000)
EVAL_TOKENS_PER_INSTANCE = 60  # tokens/s per downstream instance: 100 instances at 6,000 tokens/s
MIN_EVAL_LIMIT = 10  # instances per downstream task, however slow the machine
LATER_SHARE = 0.08  # of the budget: evaluation, baselines, samples, export and the report, at the probe's speed
# (measured on a quiet 2-core machine: 18 s of a 12-minute budget, 0.03)
PROBE_SECONDS = 1.0  # timed per probed shape
BUDGET_MARGIN = 0.05  # of the budget, kept free when stage 1 decides how far it can go: the estimates of the
# stages after it are not exact, and an overrun must not cost the adapt stage its place (it may use the margin)
STAGE1_CHUNKS = 10  # `lmforge train` calls of stage 1; the budget is re-checked between them
FIRST_CHUNK_STEPS = 3  # before any check: on a machine far slower than the probe, a planned chunk overruns
STAGE1_MAX_STRETCH = 3.0  # on a machine faster than the probe, stage 1 runs on, to this many times its planned
# steps (a warmup-stable-decay schedule has no end to move; the corpus, sized for one pass, is read up to three
# times, which costs little against new data: Muennighoff et al. 2023, "Scaling Data-Constrained Language Models")

# The adapt stage's work: the SFT of configs/adapt/quickstart-sft.yaml on SmolLM2-135M-Instruct, then greedy
# answers to the held-out items before and after.
ADAPT_PRESET = "smollm2-135m"
ADAPT_CONFIG = "adapt/quickstart-sft.yaml"
ADAPT_HELDOUT = 60
ADAPT_NEW_TOKENS = 24  # room for a verbose answer before SFT (the checker reads its last number)
ADAPT_FIXED_SECONDS = 45  # dequantizing the GGUF, writing and reading 0.5 GB model directories
ADAPT_FLOP_EFFICIENCY = 3.5  # a 135M model's FLOP rate on CPU over the smallest probed shape's (measured 3.8
# and 4.1 in two quickstarts: adapting took 212 s and 255 s where 2.8 had planned 270 s and 350 s)
ADAPT_MAX_SHARE = 0.5  # of the budget; a shorter budget skips the stage and says what would fit (adapting a
# real model is half of what the quickstart shows: on a slow machine it may take half the time)


@dataclass
class Plan:
    minutes: float
    throughput: float  # tokens/s of the chosen shape, measured (or given with --throughput)
    probe: list[dict]  # per probed shape: d_model, n_layers, parameters, tokens/s, tokens, predicted loss
    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden_size: int
    parameters: int
    non_embedding_parameters: int
    sequence_length: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    stage1_steps: int
    anneal_steps: int
    anneal_runs: int
    training_tokens: int
    tokens_per_parameter: float  # training tokens / all parameters
    tokens_per_non_embedding_parameter: float
    raw_bytes: int
    heldout_bytes_per_source: int
    eval_limit: int
    seconds_per_step: float = 0.0  # planned, of stage 1 and the anneals (0: no probe, no deadline)
    later_seconds: float = 0.0  # planned for evaluation, baselines, samples, export and report
    adapt_seconds: float = 0.0  # planned for the adapt stage (0: skipped)
    adapt_note: str = ""  # why the adapt stage is skipped, when it is

    def to_json(self) -> dict:
        return asdict(self)


def shape_config(d_model: int, n_layers: int, vocab_size: int) -> ModelConfig:
    heads = max(1, d_model // HEAD_DIM)
    base = to_dict(get_preset("olmo2-tiny"))
    base.update(d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=heads, mlp_hidden_size=3 * d_model,
                vocab_size=vocab_size, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                max_sequence_length=SEQUENCE_LENGTH)
    return from_dict(ModelConfig, base)


def measure_throughput(config: ModelConfig, seconds: float = PROBE_SECONDS) -> float:
    """Tokens per second of the quickstart's optimizer step (its micro-batches' forward and backward, then the
    AdamW update), on random tokens: the fastest of the steps timed over `seconds` (at least two; one untimed
    step first). A shared machine's speed drifts by up to 2x from one second to the next; the fastest step is
    the figure that drift disturbs least, and the efficiencies above relate it to what the stages reach."""
    model = Transformer(config)
    init_weights(model, 0)
    optimizer = build_optimizer(model, OptimizerConfig(), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (BATCH_SEQUENCES, SEQUENCE_LENGTH), generator=generator)

    def step() -> float:
        start = time.perf_counter()
        for micro in ids.split(MICRO_SEQUENCES):
            ce, z = cross_entropy_loss(model(micro[:, :-1]), micro[:, 1:], z_loss_multiplier=1e-5)
            (ce + z).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    times = [step(), step()]
    while sum(times) < seconds:
        times.append(step())
    return ids.numel() / min(times)


def adapt_seconds(flops_per_second: float) -> float:
    """Estimated seconds of the adapt stage on a machine doing `flops_per_second` in the probe."""
    import yaml

    from lmforge.core.config import packaged_config
    from lmforge.model.info import flops_per_token

    sft = yaml.safe_load(packaged_config(ADAPT_CONFIG).read_text(encoding="utf-8"))
    sequence = sft["max_seq_length"]
    per_token = flops_per_token(get_preset(ADAPT_PRESET), sequence)
    training = per_token * sft["max_steps"] * sft["batch_size"] * sequence
    answering = 2 * ADAPT_HELDOUT * (sequence + ADAPT_NEW_TOKENS) * per_token / 3  # forward only, before and after
    return ADAPT_FIXED_SECONDS + (training + answering) / (flops_per_second * ADAPT_FLOP_EFFICIENCY)


def adapt_reserve(plan: Plan, slowdown: float) -> float:
    """Seconds the adapt stage takes at `slowdown` (its planned cost times that), or 0 when that is more than
    ADAPT_MAX_SHARE of the budget: the stage is then skipped, so no time is kept for it."""
    needed = plan.adapt_seconds * slowdown
    return needed if needed <= ADAPT_MAX_SHARE * plan.minutes * 60 else 0.0


def later_stages_seconds(plan: Plan, seconds_per_step: float) -> float:
    """The stages after training (adaptation included, when it will run) at their planned cost, scaled by the
    slowdown that `seconds_per_step` (measured now) shows against the plan; never less than planned."""
    slowdown = max(1.0, seconds_per_step / plan.seconds_per_step)
    return slowdown * plan.later_seconds + adapt_reserve(plan, slowdown)


def margin_seconds(plan: Plan) -> float:
    """BUDGET_MARGIN of the plan's budget, in seconds."""
    return BUDGET_MARGIN * plan.minutes * 60


def affordable_stage1_steps(plan: Plan, seconds_left: float, seconds_per_step: float) -> int:
    """Stage-1 steps the time left affords at `seconds_per_step` (measured now): what remains after the anneals
    at that speed, the later stages and BUDGET_MARGIN. A plan without a probe has no deadline."""
    if plan.seconds_per_step <= 0:
        return plan.stage1_steps
    after = plan.anneal_runs * plan.anneal_steps * seconds_per_step + later_stages_seconds(plan, seconds_per_step)
    return max(0, int((seconds_left - after - margin_seconds(plan)) / seconds_per_step))


def next_stage1_target(plan: Plan, done: int, seconds_left: float, seconds_per_step: float) -> int:
    """The step stage 1 trains to next, `done` after its first chunk: a chunk on, no further than the time left
    affords at `seconds_per_step` (measured now) but at least MIN_STAGE1_STEPS in all (a stage 1 cut shorter
    than the plan's minimum would leave nothing to anneal), and no further than STAGE1_MAX_STRETCH times the
    planned steps (the planned steps themselves without a probe); `done` itself when stage 1 should end."""
    chunk = -(-plan.stage1_steps // STAGE1_CHUNKS)
    if plan.seconds_per_step <= 0:
        return min(plan.stage1_steps, done + chunk)
    most = int(plan.stage1_steps * STAGE1_MAX_STRETCH)
    afforded = max(done + affordable_stage1_steps(plan, seconds_left, seconds_per_step),
                   min(plan.stage1_steps, MIN_STAGE1_STEPS))
    return max(done, min(most, done + chunk, afforded))


def affordable_anneal_steps(plan: Plan, seconds_left: float, seconds_per_step: float) -> int:
    """Steps per anneal (at most the plan's) the time left affords at `seconds_per_step` after the later
    stages; at least one, so the anneals and the soup always run."""
    if plan.seconds_per_step <= 0:
        return plan.anneal_steps
    spare = seconds_left - later_stages_seconds(plan, seconds_per_step)
    return max(1, min(plan.anneal_steps, int(spare / (plan.anneal_runs * seconds_per_step))))


def predicted_loss(non_embedding: int, tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / non_embedding ** c["alpha"] + c["B"] / max(tokens, 1.0) ** c["beta"]


def fixed_plan(minutes: float, vocab_size: int, steps: int, raw_bytes: int, eval_limit: int) -> Plan:
    """No probe: `steps` of stage 1 (and an eighth of that per anneal) of olmo2-tiny's shape, the one
    `configs/train/quickstart.yaml` names, so its documented commands continue the run (tests, experiments)."""
    config = shape_config(*FIXED_SHAPE, vocab_size)
    counts = count_parameters(config)
    anneal_steps = max(1, steps // 8)
    step_tokens = BATCH_SEQUENCES * SEQUENCE_LENGTH
    tokens = (steps + ANNEAL_RUNS * anneal_steps) * step_tokens
    return Plan(
        minutes=minutes, throughput=0.0, probe=[], d_model=config.d_model, n_layers=config.n_layers,
        n_heads=config.n_heads, mlp_hidden_size=config.mlp_hidden_size, parameters=counts["total"],
        non_embedding_parameters=counts["non_embedding"], sequence_length=SEQUENCE_LENGTH,
        global_batch_size=step_tokens, micro_batch_size=MICRO_SEQUENCES * SEQUENCE_LENGTH, lr=3e-3,
        warmup_steps=min(100, max(1, steps // 10)), stage1_steps=steps, anneal_steps=anneal_steps,
        anneal_runs=ANNEAL_RUNS, training_tokens=tokens, tokens_per_parameter=round(tokens / counts["total"], 2),
        tokens_per_non_embedding_parameter=round(tokens / counts["non_embedding"], 2), raw_bytes=raw_bytes,
        heldout_bytes_per_source=HELDOUT_BYTES_PER_SOURCE[0], eval_limit=eval_limit)


def probe_shapes(vocab_size: int, throughput: float | None) -> Iterator[tuple[ModelConfig, float]]:
    """(config, tokens/s) of each candidate shape in turn: measured, or `throughput` (tokens/s of the smallest
    shape) scaled to the others by FLOPs per token."""
    from lmforge.model.info import flops_per_token

    smallest_flops = flops_per_token(shape_config(*SHAPES[0], vocab_size), SEQUENCE_LENGTH)
    for d_model, n_layers in SHAPES:
        config = shape_config(d_model, n_layers, vocab_size)
        if throughput is None:
            yield config, measure_throughput(config)
        else:
            yield config, throughput * smallest_flops / flops_per_token(config, SEQUENCE_LENGTH)


def make_plan(minutes: float, vocab_size: int, seconds_spent: float, throughput: float | None = None,
              adapt: bool = True, log=print) -> Plan:
    """Probe the shapes (or take `throughput`) and size everything from the budget, less the adapt stage's
    estimated time when `adapt`. Refuses a budget too small to train anything."""
    from lmforge.model.info import flops_per_token

    shapes = probe_shapes(vocab_size, throughput)
    first_config, first_tps = next(shapes)
    budget = minutes * 60
    adapting, adapt_note = adapt_seconds(first_tps * flops_per_token(first_config, SEQUENCE_LENGTH)), ""
    if not adapt:
        adapting, adapt_note = 0.0, "skipped: --no-adapt"
    elif adapting > ADAPT_MAX_SHARE * budget:
        adapt_note = (f"skipped: adapting {ADAPT_PRESET} takes about {adapting / 60:.1f} minutes here, more than "
                      f"{ADAPT_MAX_SHARE:.0%} of the budget; give --minutes {adapting / ADAPT_MAX_SHARE / 60:.0f} "
                      "or more to include it")
        adapting = 0.0
    budget -= adapting
    train_seconds = budget * TRAIN_SHARE - seconds_spent
    probe, best = [], None
    for config, tps in itertools.chain([(first_config, first_tps)], shapes):
        d_model, n_layers = config.d_model, config.n_layers
        tokens = tps * max(train_seconds, 0.0) * STEP_EFFICIENCY
        counts = count_parameters(config)
        row = {"d_model": d_model, "n_layers": n_layers, "parameters": counts["total"],
               "non_embedding_parameters": counts["non_embedding"], "tokens_per_second": round(tps, 1),
               "tokens": int(tokens), "predicted_loss": round(predicted_loss(counts["non_embedding"], tokens), 4)}
        probe.append(row)
        log(f"  probe d_model {d_model}, {n_layers} layers: {counts['total']:,} parameters, {tps:,.0f} tokens/s "
            f"-> {int(tokens):,} tokens in {train_seconds:.0f} s, predicted loss {row['predicted_loss']:.3f}")
        if best is not None and (row["predicted_loss"] > best["predicted_loss"]
                                 or tokens < MIN_TOKENS_PER_PARAMETER * counts["total"]):
            break  # bigger shapes are slower still: fewer tokens for more parameters
        if best is None or row["predicted_loss"] < best["predicted_loss"]:
            best = row
    step_tokens = BATCH_SEQUENCES * SEQUENCE_LENGTH
    total_steps = int(best["tokens"] // step_tokens)
    anneal_steps = int(total_steps * ANNEAL_SHARE)
    stage1_steps = total_steps - ANNEAL_RUNS * anneal_steps
    if stage1_steps < MIN_STAGE1_STEPS or anneal_steps < MIN_ANNEAL_STEPS:
        needed_steps = max(MIN_ANNEAL_STEPS / ANNEAL_SHARE, MIN_STAGE1_STEPS / (1 - ANNEAL_RUNS * ANNEAL_SHARE)) + 1
        rate = probe[0]["tokens_per_second"] * STEP_EFFICIENCY
        needed = ((needed_steps * step_tokens / rate + seconds_spent) / TRAIN_SHARE + adapting) / 60
        raise LmforgeError(
            f"--minutes {minutes:g} is too short to train anything here: it leaves {max(train_seconds, 0):.0f} s "
            f"for training, {best['tokens']:,} tokens at the measured {probe[0]['tokens_per_second']:,.0f} "
            f"tokens/s of the smallest model, fewer than {MIN_STAGE1_STEPS} steps plus the anneals; "
            f"give --minutes {needed:.1f} or more")
    config = shape_config(best["d_model"], best["n_layers"], vocab_size)
    seconds_per_step = step_tokens / (best["tokens_per_second"] * STEP_EFFICIENCY)
    training_tokens = (stage1_steps + ANNEAL_RUNS * anneal_steps) * step_tokens
    raw_bytes = int(min(max(stage1_steps * step_tokens * BYTES_PER_TOKEN / KEPT_FRACTION, RAW_BYTES[0]),
                        RAW_BYTES[1]))
    return Plan(
        minutes=minutes, throughput=best["tokens_per_second"], probe=probe, d_model=config.d_model,
        n_layers=config.n_layers, n_heads=config.n_heads, mlp_hidden_size=config.mlp_hidden_size,
        parameters=best["parameters"], non_embedding_parameters=best["non_embedding_parameters"],
        sequence_length=SEQUENCE_LENGTH, global_batch_size=step_tokens,
        micro_batch_size=MICRO_SEQUENCES * SEQUENCE_LENGTH, lr=3e-3 if config.d_model <= 128 else 2e-3 if
        config.d_model <= 256 else 1e-3, warmup_steps=min(100, max(5, stage1_steps // 10)),
        stage1_steps=stage1_steps, anneal_steps=anneal_steps, anneal_runs=ANNEAL_RUNS,
        training_tokens=training_tokens, tokens_per_parameter=round(training_tokens / best["parameters"], 2),
        tokens_per_non_embedding_parameter=round(training_tokens / best["non_embedding_parameters"], 2),
        raw_bytes=raw_bytes,
        heldout_bytes_per_source=int(min(max(raw_bytes // 100, HELDOUT_BYTES_PER_SOURCE[0]),
                                         HELDOUT_BYTES_PER_SOURCE[1])),
        # Evaluation scales with the machine's speed too: instances per task from the measured throughput.
        eval_limit=int(min(max(best["tokens_per_second"] / EVAL_TOKENS_PER_INSTANCE, MIN_EVAL_LIMIT), 200)),
        seconds_per_step=round(seconds_per_step, 4), later_seconds=round(LATER_SHARE * budget, 1),
        adapt_seconds=round(adapting, 1), adapt_note=adapt_note)


def plan_from_json(data: dict) -> Plan:
    return Plan(**data)
