"""`lmforge adapt sft|dpo|rlvr --nproc N` launches through `lmforge train --nproc`'s torchrun path: a 2-process
gloo SFT run logs the losses of the 1-process run (the same global batch, split over ranks instead of over
micro-batches), 2-process GRPO runs under FSDP and DDP log the losses of whole-row forwards, and a batch the
ranks cannot split is refused in one line before any worker starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge
from adapt_utils import CONVERSATIONS, tiny_model_dir, write_jsonl
from lmforge.cli import main

TRAINABLE = [c for c in CONVERSATIONS if any(m["role"] == "assistant" and m["content"] for m in c)]


def sft_overrides(tmp_path: Path, out: str) -> list[str]:
    if not (tmp_path / "start").exists():
        tiny_model_dir(tmp_path / "start", init_std=0.2)
        write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in TRAINABLE] * 3)
    return [f"model={tmp_path / 'start'}", f"data=[{tmp_path / 'sft.jsonl'}]", f"out={tmp_path / out}",
            "template=chatml", "max_seq_length=128", "batch_size=8", "micro_batch_size=4", "max_steps=3",
            "precision=fp32", "device=cpu", "optimizer.lr=1e-3", "loss_reduction=sum", "warmup_ratio=0"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_log_the_losses_of_one(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("{}\n")
    source = Path(lmforge.__file__).parents[1]  # the workers run the lmforge this test imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])}
    for out, nproc in (("one", []), ("two", ["--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "lmforge", "adapt", "sft", str(config),
                               *sft_overrides(tmp_path, out), *nproc], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote model directory") == 1  # rank 0 only
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 3 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-5)
    assert (tmp_path / "two" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_two_gloo_processes_share_prompts_under_fsdp_and_ddp(tmp_path):
    """GRPO forwards a prompt once per micro-batch (two forwards of the FSDP or DDP model per backward); with
    activation checkpointing each row runs whole. Groups of 3 in micro-batches
    of 2 split a group between micro-batches. The format reward (an "e" in the completion) gives the random
    model's groups different rewards, so step 1 has a loss and a gradient."""
    tiny_model_dir(tmp_path / "start")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {n} please.", "answer": str(n)} for n in range(8)])
    config = tmp_path / "rlvr.yaml"
    config.write_text("{}\n")
    source = Path(lmforge.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])}
    common = [f"model={tmp_path / 'start'}", f"prompts=[{tmp_path / 'p.jsonl'}]", "max_steps=2", "device=cpu",
              "precision=fp32", "max_prompt_tokens=64", "optimizer.lr=1e-2", "grpo.group_size=3",
              "grpo.prompts_per_step=4", "grpo.micro_batch_sequences=2", "grpo.max_new_tokens=4",
              "grpo.filter_zero_variance=false", "reward.format_pattern=e", "reward.format_reward=1.0",
              "metrics.log_interval=1", "metrics.tensorboard=false"]
    runs = {"fsdp": [], "ddp": ["parallel.data_parallel=ddp"],
            "whole_rows": ["parallel.data_parallel=ddp", "parallel.activation_checkpointing=full"]}
    rows = {}
    for name, extra in runs.items():
        done = subprocess.run([sys.executable, "-m", "lmforge", "adapt", "rlvr", str(config), *common, *extra,
                               f"run_dir={tmp_path / name}", "--nproc", "2"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    whole = rows["whole_rows"]
    assert len(whole) == 2 and all(row["grad_norm"] > 0 for row in whole)
    for name in ("fsdp", "ddp"):
        assert [row["loss"] for row in rows[name]] == pytest.approx([row["loss"] for row in whole], abs=1e-6)
        assert [row["grad_norm"] for row in rows[name]] == pytest.approx([row["grad_norm"] for row in whole],
                                                                         rel=1e-5)


@pytest.mark.parametrize("stage, argv, mention", [
    ("sft", ["batch_size=4", "micro_batch_size=4"], "micro_batch_size x ranks (4 x 2)"),
    ("rlvr", ["grpo.prompts_per_step=3"], "multiple of the number of ranks (2)"),
    ("rlvr", ["grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.micro_batch_sequences=4"],
     "micro_batch_sequences x ranks (4 x 2)"),
])
def test_a_batch_the_ranks_cannot_split_is_refused_before_launching(tmp_path, capsys, monkeypatch, stage, argv,
                                                                     mention):
    launched = []
    monkeypatch.setattr("lmforge.train.distributed.launch_torchrun", lambda *a, **k: launched.append(a) or 0)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    required = sft_overrides(tmp_path, "run")[:3] if stage == "sft" else [
        f"run_dir={tmp_path / 'run'}", f"model={tmp_path}", f"prompts=[{tmp_path / 'p.jsonl'}]"]
    assert main(["adapt", stage, str(config), *required, *argv, "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: ") and mention in err[0], err
    assert not launched
    assert main(["adapt", stage, str(config), *required, "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err
