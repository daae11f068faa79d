"""Data parallelism on CPU (gloo): FSDP2 and DDP on 2 processes train like 1 process on the same global batch;
gradient accumulation does not change the result; a run resumes on a different number of processes.

Tolerance: rtol 1e-5 on losses and grad norms. The runs differ only in the order of float32 additions (the
gradient is summed over two ranks' halves instead of within one backward), about 1e-7 relative per step,
carried through 8 AdamW steps; a real defect (a wrong normalisation, a rank seeing the wrong rows, an
unsynchronised gradient) moves the loss by 1e-3 or more from the second step on.
"""

import shutil

import pytest
import torch

from lmforge.model.checkpoints import CHECKPOINTS
from lmforge.train.trainer import Trainer
from train_utils import array_loader_factory, random_tokens, read_metrics, run_multiprocess, tiny_config

RTOL = 1e-5
BASE = {"checkpoint.interval": 4, "max_steps": 8}


def train_here(run_dir, **overrides):
    torch.set_num_threads(1)
    Trainer(tiny_config(run_dir, **{**BASE, **overrides}),
            loader_factory=array_loader_factory(random_tokens(), 32)).fit()
    return read_metrics(run_dir)


def column(rows, key):
    return [r[key] for r in rows]


def rewind_to_step_4(src, dst):
    """A copy of a finished run as if it had been stopped right after its step-4 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / CHECKPOINTS / "step00000008")
    rows = read_metrics(dst)
    (dst / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows if r["step"] <= 4))


def test_two_process_fsdp_ddp_hsdp_match_one_process_and_resume_across_world_sizes(tmp_path):
    single = train_here(tmp_path / "single")
    rewind_to_step_4(tmp_path / "single", tmp_path / "single_then_two")
    run_multiprocess(2, [
        (tmp_path / "fsdp", {**BASE, "parallel.data_parallel": "fsdp"}),
        (tmp_path / "ddp", {**BASE, "parallel.data_parallel": "ddp"}),
        (tmp_path / "hsdp", {**BASE, "parallel.data_parallel": "hsdp", "parallel.hsdp_shard_size": 1}),
        (tmp_path / "single_then_two", {**BASE, "parallel.data_parallel": "fsdp"}),
    ])
    fsdp, ddp, hsdp = (read_metrics(tmp_path / name) for name in ("fsdp", "ddp", "hsdp"))
    assert len(single) == len(fsdp) == len(ddp) == len(hsdp) == 8
    for other in (fsdp, ddp, hsdp):
        assert column(other, "loss") == pytest.approx(column(single, "loss"), rel=RTOL)
        assert column(other, "grad_norm") == pytest.approx(column(single, "grad_norm"), rel=RTOL)
        assert column(other, "tokens") == column(single, "tokens")
    assert single[-1]["loss"] < single[0]["loss"] - 0.3  # it learned something, so equality is not trivial

    # 1 -> 2 processes: resumed from the 1-process step-4 checkpoint, continues like the 1-process run.
    resumed = read_metrics(tmp_path / "single_then_two")
    assert column(resumed, "step") == list(range(1, 9))
    assert column(resumed, "loss") == pytest.approx(column(single, "loss"), rel=RTOL)
    # 2 -> 1 process.
    rewind_to_step_4(tmp_path / "fsdp", tmp_path / "two_then_single")
    resumed = train_here(tmp_path / "two_then_single")
    assert column(resumed, "loss") == pytest.approx(column(single, "loss"), rel=RTOL)


def test_gradient_accumulation_4x1_equals_1x4_with_uneven_masks(tmp_path):
    def run(name, micro):
        torch.set_num_threads(1)
        config = tiny_config(tmp_path / name, **{**BASE, "checkpoint.interval": None, "checkpoint.save_final": False,
                                                 "global_batch_size": 4 * 32, "micro_batch_size": micro * 32})
        Trainer(config, loader_factory=array_loader_factory(random_tokens(), 32, mask_fraction=0.9)).fit()
        return read_metrics(tmp_path / name)

    one_by_four, four_by_one = run("1x4", 4), run("4x1", 1)
    assert column(four_by_one, "loss") == pytest.approx(column(one_by_four, "loss"), rel=RTOL)
    assert column(four_by_one, "grad_norm") == pytest.approx(column(one_by_four, "grad_norm"), rel=RTOL)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    from lmforge.model.loading import load

    plain = train_here(tmp_path / "plain", max_steps=4, **{"checkpoint.interval": None})
    for mode in ("full", "selective"):
        rows = train_here(tmp_path / mode, max_steps=4, **{"checkpoint.interval": None,
                                                           "parallel.activation_checkpointing": mode})
        assert column(rows, "loss") == column(plain, "loss")  # recomputation is exact on CPU
    # Checkpoints keep the model's parameter names: the wrapped run's checkpoint loads into a plain model.
    assert set(load(tmp_path / "full").model.state_dict()) == set(load(tmp_path / "plain").model.state_dict())
