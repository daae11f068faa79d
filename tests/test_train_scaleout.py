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
