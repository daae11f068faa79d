"""Pipeline parallelism (torch.distributed.pipelining, gloo on CPU): every schedule on 2 processes, and the
pipeline composed with tensor parallelism and FSDP on 4 and 8, trains like one process on the same global
batch; checkpoints saved under one layout (PP=2, FSDP=2, tensor 2 x PP=2) resume under another with the same
losses after; configs a pipeline cannot run are refused up front.

Tolerance: rtol 1e-5 on losses and grad norms, as for data parallelism (tests/test_train_parallel.py): the
layouts differ only in the order of float32 additions; a wrong stage boundary, a lost micro-batch or a wrong
normalisation moves the loss by 1e-3 or more from the second step on. With tensor parallelism 2e-5, as in
tests/test_train_scaleout.py: its partial matmul sums move the grad norm by up to 1e-5 relative on this model
(tensor 2 alone does as much), while dropping the stages' sum from the grad norm, mis-sizing the sequence
of a later stage or leaving the pipeline out of the loss sum fails by far more.
"""

import json
import re
import shutil

import pytest
import torch
from train_utils import TINY_MODEL, array_loader_factory, random_tokens, read_metrics, run_multiprocess, tiny_config

from lmforge.core.config import ConfigError
from lmforge.core.errors import LmforgeError
from lmforge.core.manifest import read_manifest
from lmforge.model.checkpoints import CHECKPOINTS, read_meta
from lmforge.train.config import ModelSpec, PipelineConfig
from lmforge.train.distributed import DistInfo
from lmforge.train.objective import NextTokenPrediction
from lmforge.train.pipeline import ModelPart, stage_layers, stage_ranks
from lmforge.train.trainer import Trainer

RTOL = 1e-5
RTOL_TENSOR = 2e-5
# 4 blocks: 2 stages of 2 for 1F1B and GPipe, 4 stages of 1 for the schedules with 2 stages per rank.
BASE = {"checkpoint.interval": 4, "max_steps": 8, "model.overrides.n_layers": 4}
LOADER = {"mask_fraction": 0.9, "documents": True}  # uneven real tokens, document masks on every stage


def train_here(run_dir, **overrides):
    torch.set_num_threads(1)
    Trainer(tiny_config(run_dir, **{**BASE, **overrides}),
            loader_factory=array_loader_factory(random_tokens(), 32, **LOADER)).fit()
    return read_metrics(run_dir)


def column(rows, key):
    return [r[key] for r in rows]


def rewind_to_step_4(src, dst):
    """A copy of a finished run as if it had been stopped right after its step-4 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / CHECKPOINTS / "step00000008")
    rows = [r for r in read_metrics(dst) if r["step"] <= 4]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def pipeline(schedule, **more):
    return {"parallel.pipeline.degree": 2, "parallel.pipeline.schedule": schedule, **more}


@pytest.mark.slow
def test_pipeline_schedules_match_one_process_and_checkpoints_reshard_across_layouts(tmp_path):
    single = train_here(tmp_path / "single")
    assert single[-1]["loss"] < single[0]["loss"] - 0.3  # it learned something, so equality is not trivial
    runs = {
        "1F1B": pipeline("1F1B"),
        # 4 micro-batches per step in 2 schedule runs of 2: accumulation across runs as well as inside one.
        "GPipe": pipeline("GPipe", **{"parallel.pipeline.microbatches": 2}),
        "Interleaved1F1B": pipeline("Interleaved1F1B"),
        "ZBV": pipeline("ZBV"),
        "fsdp": {"parallel.data_parallel": "fsdp"},
    }
    run_multiprocess(2, [(tmp_path / name, {**BASE, **o}) for name, o in runs.items()], **LOADER)
    for name in runs:
        assert read_manifest(tmp_path / name)["counts"]["world_size"] == 2, name
        rows = read_metrics(tmp_path / name)
        assert column(rows, "step") == list(range(1, 9)), name
        assert column(rows, "loss") == pytest.approx(column(single, "loss"), rel=RTOL), name
        assert column(rows, "grad_norm") == pytest.approx(column(single, "grad_norm"), rel=RTOL), name
        assert column(rows, "z_loss") == pytest.approx(column(single, "z_loss"), rel=RTOL), name

    # Save under one layout, resume under another: PP=2 -> FSDP=2, FSDP=2 -> PP=2 (interleaved, other stage
    # boundaries), PP=2 -> 1 process; each continues exactly like the uninterrupted single-process run.
    rewind_to_step_4(tmp_path / "1F1B", tmp_path / "pp_then_fsdp")
    rewind_to_step_4(tmp_path / "fsdp", tmp_path / "fsdp_then_pp")
    rewind_to_step_4(tmp_path / "ZBV", tmp_path / "pp_then_single")
    run_multiprocess(2, [(tmp_path / "pp_then_fsdp", {**BASE, "parallel.data_parallel": "fsdp"}),
                         (tmp_path / "fsdp_then_pp", {**BASE, **pipeline("Interleaved1F1B")})], **LOADER)
    resumed = {name: read_metrics(tmp_path / name) for name in ("pp_then_fsdp", "fsdp_then_pp")}
    resumed["pp_then_single"] = train_here(tmp_path / "pp_then_single")
    for name, rows in resumed.items():
        assert column(rows, "step") == list(range(1, 9)), name
        assert column(rows[4:], "loss") == pytest.approx(column(single[4:], "loss"), rel=RTOL), name
    # The resumed runs really continued from a checkpoint of the other layout.
    assert (tmp_path / "pp_then_single" / CHECKPOINTS / "step00000004").is_dir()
    assert read_manifest(tmp_path / "pp_then_single")["counts"]["world_size"] == 1


@pytest.mark.slow
def test_pipeline_composes_with_tensor_and_fsdp_on_four_processes_and_a_save_under_tp2_pp2_resumes_under_fsdp4(
        tmp_path):
    """Tensor 2 x pipeline 2 (sequence-split hidden states between stages, vocabulary-parallel loss at the last
    stage) and pipeline 2 x FSDP 2 (each stage sharded over the data ranks) train like one process; a run saved
    under tensor 2 x pipeline 2 resumes under FSDP 4 and continues like the uninterrupted run."""
    gqa = {**BASE, "model.overrides.n_kv_heads": 2}
    single = train_here(tmp_path / "single", **gqa)
    runs = {"tensor_pipeline": {**gqa, "parallel.tensor": 2, **pipeline("1F1B")},
            "pipeline_fsdp": {**gqa, "parallel.data_parallel": "fsdp", **pipeline("Interleaved1F1B")}}
    run_multiprocess(4, [(tmp_path / name, o) for name, o in runs.items()], **LOADER)
    for name in runs:
        rows = read_metrics(tmp_path / name)
        rtol = RTOL_TENSOR if "tensor" in name else RTOL
        assert column(rows, "loss") == pytest.approx(column(single, "loss"), rel=rtol), name
        assert column(rows, "grad_norm") == pytest.approx(column(single, "grad_norm"), rel=rtol), name
    rewind_to_step_4(tmp_path / "tensor_pipeline", tmp_path / "tp_pp_then_fsdp")
    run_multiprocess(4, [(tmp_path / "tp_pp_then_fsdp", {**gqa, "parallel.data_parallel": "fsdp"})], **LOADER)
    resumed = read_metrics(tmp_path / "tp_pp_then_fsdp")
    assert column(resumed, "step") == list(range(1, 9))
    assert column(resumed[4:], "loss") == pytest.approx(column(single[4:], "loss"), rel=RTOL_TENSOR)
    # It really resumed from the other layout's checkpoint.
    saved, final = (read_meta(tmp_path / "tp_pp_then_fsdp" / CHECKPOINTS / f"step0000000{s}")["config"]["parallel"]
                    for s in (4, 8))
    assert (saved["tensor"], saved["pipeline"]["degree"], saved["data_parallel"]) == (2, 2, "auto")
    assert (final["tensor"], final["pipeline"]["degree"], final["data_parallel"]) == (1, 1, "fsdp")


@pytest.mark.slow
def test_tensor_pipeline_and_fsdp_at_once_on_eight_processes_train_like_one(tmp_path):
    """Tensor 2 x pipeline 2 x FSDP 2, interleaved (two stages per rank, each its own FSDP root over the 2 data
    ranks, its weights split over the 2 tensor ranks)."""
    gqa = {**BASE, "model.overrides.n_kv_heads": 2, "checkpoint.interval": None}
    single = train_here(tmp_path / "single", **gqa)
    run_multiprocess(8, [(tmp_path / "3d", {**gqa, "parallel.tensor": 2, **pipeline("Interleaved1F1B")})], **LOADER)
    assert read_manifest(tmp_path / "3d")["counts"]["world_size"] == 8
    rows = read_metrics(tmp_path / "3d")
    assert column(rows, "loss") == pytest.approx(column(single, "loss"), rel=RTOL_TENSOR)
    assert column(rows, "grad_norm") == pytest.approx(column(single, "grad_norm"), rel=RTOL_TENSOR)


def test_model_parts_chained_are_the_model_under_its_own_names():
    """Two stages run one after the other give the whole model's logits, with document masks; together their
    parameters are exactly the model's, by name: what makes checkpoints layout-independent."""
    from lmforge.model.directory import build_model

    config = ModelSpec(**{**TINY_MODEL, "overrides": {**TINY_MODEL["overrides"], "n_layers": 4}}).build_config()
    model = build_model(config, seed=0)
    ids = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7])
    first, last = ModelPart(model, [0, 1, 2], True, False, None), ModelPart(model, [3], False, True, None)
    torch.testing.assert_close(last(first(ids, doc_ids), doc_ids), model(ids, doc_ids=doc_ids), rtol=0, atol=0)
    names = set(first.state_dict()) | set(last.state_dict())
    assert names == set(model.state_dict())
    assert not set(first.state_dict()) & set(last.state_dict())
    assert "blocks.3.attn.q_proj.weight" in last.state_dict() and "embed.weight" in first.state_dict()


def test_stage_layers_and_ranks_by_hand():
    loop = PipelineConfig(degree=2, schedule="Interleaved1F1B")
    assert stage_layers(8, loop) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_ranks(loop) == [0, 1, 0, 1]
    v = PipelineConfig(degree=2, schedule="ZBV")
    assert stage_ranks(v) == [0, 1, 1, 0]  # rank 0 holds the first and the last stage
    uneven = PipelineConfig(degree=3, split_points=[1, 5])
    assert stage_layers(8, uneven) == [range(0, 1), range(1, 5), range(5, 8)]
    assert stage_ranks(uneven) == [0, 1, 2]


@pytest.mark.parametrize("overrides, world, message", [
    ({"model.overrides.tie_embeddings": True}, 2, "ties its embeddings"),
    ({"parallel.pipeline.schedule": "Interleaved1F1B"}, 2, "2 layers do not divide into 4 stages"),
    ({"parallel.pipeline.split_points": [2]}, 2, "the model has 2 blocks"),
    ({"parallel.pipeline.degree": 4, "parallel.pipeline.split_points": [1, 2, 3],
      "model.overrides.n_layers": 4}, 6, "world size 6 is not divisible by pipeline 4 x tensor 1 x context 1 = 4"),
    ({"parallel.pipeline.microbatches": 1}, 2, "1 micro-batches per schedule run is fewer than the 2"),
    ({"parallel.pipeline.microbatches": 3}, 2, "not a multiple of microbatches x micro-batch instances (3 x 2)"),
    ({"model.overrides.n_experts": 4, "model.overrides.moe_top_k": 2}, 2, "router losses"),
    ({"eval_interval": 10}, 2, "eval_interval with tensor 1 x context 1 x pipeline 2 parallelism is not supported"),
    ({"float8": "rowwise"}, 2, "float8: rowwise needs precision: bf16"),  # the tiny config trains in fp32
    ({"parallel.data_parallel": "ddp"}, 4, "parallel.pipeline.degree 2 shards each stage with fsdp over the "
                                           "data-parallel ranks; data_parallel=ddp is not supported"),
    ({"parallel.data_parallel": "hsdp"}, 4, "data_parallel=hsdp is not supported"),
    ({"parallel.context": 2}, 4, "parallel.pipeline.degree 2 with parallel.context 2 is not supported"),
    ({"parallel.tensor": 2, "float8": "rowwise", "precision": "bf16"}, 4,
     "float8: rowwise with parallel.tensor 2 is not supported"),
])
def test_pipelines_that_cannot_run_are_refused_before_any_compute(tmp_path, overrides, world, message):
    preflight(tiny_config(tmp_path, **{"parallel.pipeline.degree": 2}), 2)  # the same pipeline, as it can run
    preflight(tiny_config(tmp_path, **{"parallel.pipeline.degree": 2, "parallel.tensor": 2}), 4)
    config = tiny_config(tmp_path, **{"parallel.pipeline.degree": 2, **overrides})
    with pytest.raises(LmforgeError, match=re.escape(message)):
        preflight(config, world)


def test_a_pipeline_runs_next_token_prediction_only(tmp_path):
    config = tiny_config(tmp_path, **{"parallel.pipeline.degree": 2})
    preflight(config, 2, objective=NextTokenPrediction(1e-4))
    with pytest.raises(LmforgeError, match="tensor, context and pipeline parallelism split next-token prediction"):
        preflight(config, 2, objective=object())


def preflight(config, world, **kwargs):
    """The trainer's checks on `world` ranks, in this process, no model built."""
    return Trainer(config, dist_info=DistInfo(0, world, 0, world, torch.device("cpu")), checks_only=True,
                   loader_factory=array_loader_factory(random_tokens(), 32), **kwargs)


@pytest.mark.parametrize("overrides, field", [
    ({"parallel.pipeline.split_points": [0]}, "parallel.pipeline.split_points"),
    ({"parallel.pipeline.split_points": [1, 1, 2]}, "parallel.pipeline.split_points"),
    ({"parallel.pipeline.schedule": "ZBV", "parallel.pipeline.stages_per_rank": 3}, "parallel.pipeline.stages_per_rank"),
    ({"parallel.pipeline.stages_per_rank": 2}, "parallel.pipeline.stages_per_rank"),  # 1F1B: one stage per rank
    ({"parallel.pipeline.degree": 0}, "parallel.pipeline.degree"),
])
def test_pipeline_config_errors_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, **{"parallel.pipeline.degree": 2, **overrides})
    assert error.value.field == field
