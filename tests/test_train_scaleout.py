"""Tensor (+ sequence), context and expert parallelism on CPU (gloo): each layout trains like one process on the
same global batch; layouts that cannot split the model or the world are refused before any process starts,
with the numbers.

Tolerance: rtol 2e-5 on losses and grad norms over 6 steps, fp32. The layouts differ from one process only in
the order of float32 additions (partial matmul sums over tensor ranks, keys gathered in another order,
gradients summed over ranks), a few 1e-7 relative per step carried through AdamW; a real defect (a head or
KV head on the wrong rank, a chunk with the wrong positions or document mask, a token sent to the wrong
expert, a gradient averaged twice) moves the loss by 1e-3 or more within the first steps.
"""

import pytest
import torch
from train_utils import array_loader_factory, random_tokens, read_metrics, run_multiprocess, tiny_config

from lmforge.core.errors import LmforgeError
from lmforge.core.manifest import read_manifest
from lmforge.train.config import Layout, ParallelConfig
from lmforge.train.trainer import Trainer

RTOL = 2e-5
# GQA (2 KV heads for 4 query heads), QK-norm over the whole projection, sliding windows in every other layer.
DENSE = {"max_steps": 6, "checkpoint.interval": None, "model.overrides.n_kv_heads": 2,
         "model.overrides.n_layers": 2, "model.overrides.sliding_window": 12, "model.overrides.full_attention_every": 2}
MOE = {"max_steps": 6, "checkpoint.interval": None, "micro_batch_size": 32, "model.preset": "olmoe-tiny",
       "model.overrides.n_experts": 4, "model.overrides.moe_top_k": 2, "model.overrides.mlp_hidden_size": 32}


def train_here(run_dir, documents, **overrides):
    torch.set_num_threads(1)
    Trainer(tiny_config(run_dir, **overrides),
            loader_factory=array_loader_factory(random_tokens(), 32, documents=documents)).fit()
    return read_metrics(run_dir)


def assert_same_run(rows, reference):
    assert len(rows) == len(reference) == 6
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference], rel=RTOL), key
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.2  # it learned, so agreement is not trivial


@pytest.mark.slow
def test_tensor_context_and_expert_parallel_on_two_processes_train_like_one(tmp_path):
    dense = train_here(tmp_path / "dense", documents=True, **DENSE)
    moe = train_here(tmp_path / "moe", documents=True, **MOE)
    runs = {"tensor": {**DENSE, "parallel.tensor": 2}, "context": {**DENSE, "parallel.context": 2},
            "expert": {**MOE, "parallel.expert": 2}}
    run_multiprocess(2, [(tmp_path / name, overrides) for name, overrides in runs.items()], documents=True)
    for name in runs:
        assert read_manifest(tmp_path / name)["counts"]["world_size"] == 2, name
        assert_same_run(read_metrics(tmp_path / name), moe if name == "expert" else dense)


@pytest.mark.slow
def test_compositions_on_four_processes_train_like_one(tmp_path):
    """Tensor x FSDP, context x tensor, and experts split over 2 of 4 shard ranks (FSDP over the other 2)."""
    dense = train_here(tmp_path / "dense", documents=True, **DENSE)
    moe = train_here(tmp_path / "moe", documents=True, **MOE)
    runs = {"tensor_fsdp": {**DENSE, "parallel.tensor": 2, "parallel.data_parallel": "fsdp"},
            "context_tensor": {**DENSE, "parallel.context": 2, "parallel.tensor": 2},
            "expert_fsdp": {**MOE, "parallel.expert": 2}}
    run_multiprocess(4, [(tmp_path / name, overrides) for name, overrides in runs.items()], documents=True)
    for name in runs:
        assert read_manifest(tmp_path / name)["counts"]["world_size"] == 4, name
        assert_same_run(read_metrics(tmp_path / name), moe if name == "expert_fsdp" else dense)


def preflight_here(world, **overrides):
    """What `lmforge train --nproc WORLD` checks in the launcher, before any worker starts."""
    from lmforge.train.distributed import DistInfo

    config = tiny_config("unused", **overrides)
    trainer = Trainer(config, dist_info=DistInfo(0, world, 0, world, torch.device("cpu")), checks_only=True,
                      loader_factory=array_loader_factory(random_tokens(1000), 32))
    return trainer.layout


@pytest.mark.parametrize("world, overrides, message", [
    (6, {"parallel.tensor": 4}, "world size 6 is not divisible by pipeline 1 x tensor 4 x context 1 = 4"),
    (8, {"parallel.tensor": 8}, "parallel.tensor 8 does not divide the model's n_heads 4"),
    (4, {"parallel.tensor": 4, "model.overrides.n_kv_heads": 2},
     "parallel.tensor 4 does not divide the model's n_kv_heads 2"),
    (4, {"parallel.tensor": 4, "model.overrides.mlp_hidden_size": 130},
     "parallel.tensor 4 does not divide the model's mlp_hidden_size 130"),
    (8, {"parallel.tensor": 4, "parallel.context": 2, "data.sequence_length": 36, "micro_batch_size": 72,
         "global_batch_size": 288},
     "parallel.tensor 4 does not divide the sequence length per context rank 18"),
    (3, {"parallel.context": 3}, "data.sequence_length 32 is not divisible by 2 x parallel.context 3 = 6"),
    (2, {"parallel.tensor": 2, "model.preset": "bloom-tiny"}, "parallel.tensor 2 with ALiBi is not supported"),
    (2, {"parallel.context": 2, **{k: v for k, v in MOE.items() if k.startswith("model.")}},
     "parallel.context 2 with a mixture of experts is not supported"),
    (2, {"parallel.expert": 2}, "parallel.expert 2 needs a mixture of experts (the model has n_experts 0)"),
    (3, {"parallel.expert": 3, "global_batch_size": 3 * 64, **{k: v for k, v in MOE.items() if k.startswith("model.")}},
     "parallel.expert 3 does not divide the model's n_experts 4"),
    (2, {"parallel.expert": 4, **{k: v for k, v in MOE.items() if k.startswith("model.")}},
     "parallel.expert 4 does not divide the data shard degree 2"),
    (8, {"parallel.data_parallel": "hsdp", "parallel.data.shard": 4, "parallel.data.replicate": 4},
     "world size 8 != replicate 4 x shard 4 x context 1 x tensor 1 x pipeline 1 = 16"),
    (4, {"parallel.data_parallel": "hsdp", "parallel.data.shard": 3},
     "hsdp: 4 data-parallel ranks are not divisible by the shard degree 3"),
    (4, {"parallel.data.replicate": 2}, "parallel.data.replicate 2 needs data_parallel hsdp or ddp"),
    (4, {"parallel.data_parallel": "ddp", "parallel.tensor": 2}, "ddp replicates whole modules"),
    (2, {"parallel.context": 2, "eval_interval": 10}, "eval_interval with tensor 1 x context 2 x pipeline 1 parallelism"),
    (4, {"parallel.tensor": 2, "micro_batch_size": 96, "data.sequence_length": 32},
     "not divisible by micro_batch_size x data-parallel ranks (96 x 2 = 192 tokens)"),
])
def test_layouts_that_do_not_divide_are_refused_before_launch_naming_the_numbers(world, overrides, message):
    with pytest.raises(LmforgeError) as refused:
        preflight_here(world, **overrides)
    assert message in str(refused.value)


def test_degrees_fill_the_world_and_each_rank_reads_its_data_coordinate_of_the_mesh():
    """The data rank each rank loads batch rows for is its coordinate along (replicate, shard) in the mesh's
    row-major order (pipeline, replicate, shard, context, tensor), read here from a reshaped arange."""
    layout = preflight_here(16, **{"parallel.tensor": 2, "parallel.context": 2, "parallel.data_parallel": "hsdp",
                                   "parallel.data.shard": 2, "global_batch_size": 16 * 32})
    assert layout == Layout("hsdp", pipeline=1, replicate=2, shard=2, context=2, tensor=2)
    grid = torch.arange(16).view(1, 2, 2, 2, 2)
    for r in range(2):
        for s in range(2):
            for rank in grid[:, r, s].flatten().tolist():
                assert layout.data_rank(rank) == 2 * r + s
    assert preflight_here(4, **{"parallel.tensor": 2}) == Layout("fsdp", shard=2, tensor=2)
    assert preflight_here(2, **{"parallel.tensor": 2}) == Layout("none", tensor=2)  # no data-parallel ranks left
    assert preflight_here(2, **{"parallel.context": 2}) == Layout("fsdp", context=2)  # FSDP averages over chunks
    assert preflight_here(1) == Layout("none")
    assert ParallelConfig().layout(8, 8, tiny_config("x").model.build_config(), 32).describe() == "fsdp, shard 8"


@pytest.mark.parametrize("heading, n_commands", [("## Scale-out", 4), ("## Pipeline parallelism", 3)])
def test_the_documented_scale_out_commands_give_valid_layouts(heading, n_commands):
    """Each `lmforge train ... --nproc` command of docs/training.md's scale-out and pipeline sections loads and
    passes the launcher's checks for its world size (nproc x nnodes), with the degrees it names."""
    import re
    import shlex
    from pathlib import Path

    from lmforge.cli import parse_args
    from lmforge.core.config import load_config
    from lmforge.train.config import TrainConfig

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split(heading)[1].split("\n## ")[0]
    commands = [line for line in section.splitlines() if line.startswith("lmforge train ")]
    assert len(commands) == n_commands
    for line in commands:
        args = parse_args(shlex.split(line)[1:])
        config = load_config(TrainConfig, root / args.config, args.overrides)
        layout = config.check(args.nproc * int(args.nnodes), config.model.build_config(), args.nproc)
        named = dict(re.findall(r"parallel\.(tensor|context|expert|pipeline)(?:\.degree)?=(\d+)", line))
        assert {k: getattr(layout, k) for k in named} == {k: int(v) for k, v in named.items()}, line
        assert layout.world == args.nproc * int(args.nnodes)
