"""The memory planner (`lmforge model info PRESET --plan ...`): layouts parsed and checked, activations equal to a
hand count of what each op saves, parameter shares equal to a hand split, and the estimate within 10% of the
peak tensor memory measured in real training steps (one process and FSDP over 2 gloo processes)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from train_utils import array_loader_factory, free_port, random_tokens, tiny_config

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.model.presets import get_preset
from lmforge.train.memory import (ParallelPlan, TrainingShape, count_activations, estimate_memory, parse_bytes,
                                  suggest_layouts)

TOLERANCE = 0.10  # the error docs/training.md states


def test_plan_parsing():
    plan = ParallelPlan.parse("tp=8,pp=4,dp=16")
    assert (plan.tp, plan.pp, plan.cp, plan.ep, plan.dp_shard, plan.dp_replicate) == (8, 4, 1, 1, 16, 1)
    assert plan.world_size == 512 and str(plan) == "tp=8,pp=4,dp=16"
    hsdp = ParallelPlan.parse("shard=4, replicate=2, cp=2, ep=8")
    assert hsdp.world_size == 16 and hsdp.fsdp == 8
    for text, message in [("tp=8,xp=2", "'xp=2' is not KEY=N"), ("tp=0", "'tp' = 0"), ("tp=two", "positive integer"),
                          ("dp=2,shard=2", "dp_shard is given twice"), ("ep=3,dp=4", "must divide dp_shard x cp")]:
        with pytest.raises(LmforgeError, match=message):
            ParallelPlan.parse(text)
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80 GiB") == 80 * 2**30
    with pytest.raises(LmforgeError, match="80 gigs"):
        parse_bytes("80 gigs")


def test_layouts_the_model_cannot_be_split_by_are_refused_with_the_numbers():
    config = get_preset("olmo2-7b")  # 32 heads, 32 layers, MLP 11008, untied
    shape = TrainingShape(seq_len=4096)
    with pytest.raises(LmforgeError, match=r"tp=3 must divide the attention heads \(32\)"):
        estimate_memory(config, ParallelPlan(tp=3), shape)
    with pytest.raises(LmforgeError, match=r"pp=64 is more stages than layers \(32\)"):
        estimate_memory(config, ParallelPlan(pp=64), shape)
    with pytest.raises(LmforgeError, match=r"ep=2 must divide the experts \(0\)"):
        estimate_memory(config, ParallelPlan(ep=2, dp_shard=2), shape)
    with pytest.raises(LmforgeError, match="tied embeddings"):
        estimate_memory(get_preset("olmo-1b"), ParallelPlan(pp=2), shape)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_activations_equal_a_hand_count_of_what_each_op_saves(kv_heads):
    # OLMo 2 block in fp32, T tokens: RMSNorm saves its input, rsqrt (T) and the normalised product; a linear its
    # input; RoPE only the shared cos/sin; SDPA (flash) q, k, v, output and log-sum-exp (T x heads); SwiGLU the
    # gate, silu(gate), up and their product. Under GQA, SDPA takes the grouped k and v as they are (`enable_gqa`),
    # so k and v count at their own width.
    config = tiny_config("x", **{"model.overrides.n_kv_heads": kv_heads}).model.build_config()
    batch, seq = 2, 32
    t, d, h, heads, kv = batch * seq, config.d_model, config.mlp_hidden_size, config.n_heads, kv_heads * config.head_dim
    # x, q, q normalised, q rotated, attention output, o_proj output, its norm, residual, MLP input, MLP product
    block = 10 * t * d + 4 * t * h + t * heads + 4 * t  # + r (T) of four norms
    block += 4 * t * kv  # k, k normalised, k rotated, v
    count = count_activations(config, (batch, seq), torch.float32)
    assert count.block == 4 * block
    assert count.block_input == 4 * t * d
    assert count.shared == 2 * 4 * batch * seq * config.head_dim  # cos and sin
    vocab = config.embedding_size
    # final norm: input, rsqrt, product, its weighted output (the LM head's input); the loss: log-probabilities,
    # log-sum-exp, targets (int64) and the valid mask (bool)
    assert count.head == 4 * (3 * t * d + t) + 4 * t * vocab + 4 * t + 8 * t + t
    assert count.logits_grad == 4 * t * vocab


def test_parameter_shares_equal_a_hand_split():
    config = get_preset("olmo2-7b")
    d, h, vocab, layers = config.d_model, config.mlp_hidden_size, config.embedding_size, config.n_layers
    matrices, norms = 4 * d * d + 3 * d * h, 4 * d  # q, k, v, o; gate, up, down | q, k, attention, MLP norms
    shape = TrainingShape(micro_batch=1, seq_len=4096)
    alone = estimate_memory(config, ParallelPlan(), shape)
    assert alone.parameters_held == vocab * d + layers * (matrices + norms) + d + vocab * d
    assert alone.parts["parameters"] == 4 * alone.parameters_held and alone.parts["optimizer"] == 8 * alone.parameters_held
    split = estimate_memory(config, ParallelPlan(tp=4, pp=4, dp_shard=8), shape)
    first = vocab * d / 4 + 8 * (matrices / 4 + norms)  # 8 layers per stage, norms replicated across TP
    last = (d + vocab * d) / 4 + 8 * (matrices / 4 + norms)
    assert last > first  # the LM head outweighs the embedding's norm-free share by the final norm
    # ... but the first stage keeps 4 micro-batches of activations (1F1B) to the last one's 1 plus the head, and
    # the stage with the larger peak is the one reported.
    assert split.stage == "first" and split.parameters_held == int(first)
    assert split.parts["gradients"] == int(4 * first / 8)  # FSDP over the 8 data-parallel ranks


def test_suggested_layouts_fit_and_need_the_least_model_parallelism():
    config = get_preset("olmo2-7b")
    shape = TrainingShape(micro_batch=2, seq_len=4096)
    found = suggest_layouts(config, 8, shape, parse_bytes("80GB"))
    assert found and all(e.plan.world_size == 8 for e, _ in found)
    degrees = [e.plan.tp * e.plan.pp * e.plan.cp for e, _ in found]
    assert degrees == sorted(degrees) and degrees[0] == 1
    assert all(e.total("full") <= 0.9 * 80e9 for e, _ in found)
    assert not suggest_layouts(config, 1, shape, parse_bytes("24GB"))  # 7B with AdamW on one 24 GB card


def test_cli_prints_every_part_and_a_verdict(capsys):
    argv = ["model", "info", "olmo2-1b", "--plan", "tp=2,dp=4", "--micro-batch", "2", "--seq-len", "4096",
            "--gpu-memory", "80GB"]
    assert main(argv) in (0, None)
    out = capsys.readouterr().out
    for part in ("parameters (fp32)", "gradients (fp32)", "optimizer (AdamW moments)", "buffers",
                 "no checkpointing", "full checkpointing", "verdict on 80 GB"):
        assert part in out
    assert main(argv + ["--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["verdict"] == "fits"
    assert main(["model", "info", "olmo2-1b", "--plan", "tp=3"]) == 2
    assert "tp=3 must divide the attention heads (16)" in capsys.readouterr().err


# ---- against measured peaks ---------------------------------------------------------------------------------
# Measured with PyTorch's MemTracker (torch.distributed._tools.mem_tracker): a TorchDispatchMode that follows every
# tensor storage the step creates or frees, byte-exact on CPU, and records the peak of their sum.

def measure_peak(run_dir: str, **overrides) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    from lmforge.train.trainer import Trainer

    config = tiny_config(run_dir, **overrides)
    trainer = Trainer(config, loader_factory=array_loader_factory(random_tokens(), config.sequence_length))
    batches = iter(trainer.loader)
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    forward_loss = trainer.objective.forward_loss

    def each_micro_batch(*args, **kwargs):  # MemTracker follows one forward per module unless reset
        tracker.reset_mod_stats()
        return forward_loss(*args, **kwargs)

    trainer.objective.forward_loss = each_micro_batch
    with tracker:
        for _ in range(2):  # the second step has the optimizer state from the first
            trainer.train_step(trainer._next_batch(batches, config.global_batch_size), config.global_batch_size)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def estimate_for(plan: ParallelPlan, **overrides) -> int:
    config = tiny_config("x", **overrides)
    shape = TrainingShape(micro_batch=config.micro_batch_size // config.sequence_length,
                          seq_len=config.sequence_length, precision="fp32",
                          activation_checkpointing=config.parallel.activation_checkpointing)
    return estimate_memory(config.model.build_config(), plan, shape).total()


LAYOUTS_ONE_PROCESS = [
    {},
    {"parallel.activation_checkpointing": "full"},
    {"parallel.activation_checkpointing": "selective", "model.overrides.n_layers": 4},
    {"micro_batch_size": 128, "global_batch_size": 512},
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", LAYOUTS_ONE_PROCESS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_estimate_within_tolerance_of_the_measured_peak(tmp_path, overrides):
    measured = measure_peak(str(tmp_path), **overrides)
    estimated = estimate_for(ParallelPlan(), **overrides)
    assert abs(estimated - measured) <= TOLERANCE * measured, (estimated, measured)


def _fsdp_worker(rank: int, world: int, port: int, out: str, overrides: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lmforge.train.distributed import shutdown_distributed

    try:
        peak = measure_peak(tempfile.mkdtemp(dir=out), **overrides)
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(peak, f)
    finally:
        shutdown_distributed()


MULTI_PROCESS_LAYOUTS = [
    (ParallelPlan(dp_shard=2), {}),
    (ParallelPlan(dp_shard=2), {"parallel.activation_checkpointing": "full"}),
    # Measured 2026-11-29: 1,383,456 estimated vs 1,595,148 bytes (-13%). Under sequence parallelism DTensor keeps
    # the all-gathered (whole-sequence) input of every column-parallel linear for the backward, where the planner
    # divides all activations by tp; with full checkpointing those inputs are recomputed and the estimate holds.
    pytest.param(ParallelPlan(tp=2), {"parallel.tensor": 2}, marks=pytest.mark.xfail(
        strict=True, reason="the planner underestimates tensor parallelism without checkpointing by 13%")),
    (ParallelPlan(tp=2), {"parallel.tensor": 2, "parallel.activation_checkpointing": "full"}),
]


@pytest.mark.slow
@pytest.mark.parametrize("plan, overrides", MULTI_PROCESS_LAYOUTS,
                         ids=lambda v: str(v) if isinstance(v, ParallelPlan) else ",".join(map(str, v.values())))
def test_two_process_estimate_within_tolerance_of_the_measured_peak(tmp_path, plan, overrides):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    estimated = estimate_for(plan, **overrides)
    for rank in range(2):
        measured = json.loads((tmp_path / f"{rank}.json").read_text())
        assert abs(estimated - measured) <= TOLERANCE * measured, (rank, estimated, measured)
