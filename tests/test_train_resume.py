"""Faults and checkpoints: kill -9 mid-run and during a save, then rerun the same command; checkpoint
retention; refusing another model's checkpoint; stage-2 init, export and soups."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import requires_olmo_tokenizer
from train_utils import array_loader_factory, random_tokens, read_metrics, tiny_config

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.model.checkpoints import CHECKPOINTS, list_checkpoints
from lmforge.model.loading import load
from lmforge.train.trainer import Trainer

SCRIPT = Path(__file__).parent / "train_utils.py"
RUN = {"max_steps": 24, "checkpoint.interval": 3, "checkpoint.keep_last": 2}


def args_for(overrides: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def command(run_dir, *extra) -> list[str]:
    return [sys.executable, str(SCRIPT), str(run_dir), *args_for(RUN), *extra]


def train_here(run_dir, **overrides):
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(run_dir, **{**RUN, **overrides}),
                      loader_factory=array_loader_factory(random_tokens(), 32))
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train_here(run_dir)
    return run_dir, [r["loss"] for r in read_metrics(run_dir)]


def wait_for_step(run_dir: Path, process: subprocess.Popen, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= step:
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the run")


def test_kill_9_mid_run_then_rerun_gives_identical_losses(tmp_path, reference):
    _, expected = reference
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(run_dir), stderr=subprocess.DEVNULL)
    wait_for_step(run_dir, process, 8)  # past the step-6 checkpoint, before the end
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert list_checkpoints(run_dir / CHECKPOINTS), "no checkpoint before the kill"
    subprocess.run(command(run_dir), check=True, stderr=subprocess.DEVNULL)
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 25))
    assert losses == expected  # bitwise on CPU


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, reference):
    _, expected = reference
    run_dir = tmp_path / "run"
    process = subprocess.run(command(run_dir, "--kill-during-save", "2"), stderr=subprocess.DEVNULL)
    assert process.returncode == -signal.SIGKILL
    root = run_dir / CHECKPOINTS
    assert [s for s, _ in list_checkpoints(root)] == [3]
    assert (root / ".step00000006.tmp").is_dir()  # the half-finished save
    model = load(root / "step00000003").model
    assert model.config.d_model == 64
    subprocess.run(command(run_dir), check=True, stderr=subprocess.DEVNULL)
    assert not (root / ".step00000006.tmp").exists()
    assert [r["loss"] for r in read_metrics(run_dir)] == expected


def test_retention_keeps_last_k_and_permanent_ones(tmp_path):
    train_here(tmp_path, **{"max_steps": 10, "checkpoint.interval": 1, "checkpoint.keep_last": 2,
                            "checkpoint.permanent_interval": 4})
    assert [s for s, _ in list_checkpoints(tmp_path / CHECKPOINTS)] == [4, 8, 9, 10]


def test_time_based_saves(tmp_path):
    train_here(tmp_path, **{"max_steps": 3, "checkpoint.interval": None, "checkpoint.interval_minutes": 1e-9,
                            "checkpoint.keep_last": 5, "checkpoint.save_final": False})
    assert [s for s, _ in list_checkpoints(tmp_path / CHECKPOINTS)] == [1, 2]  # the last step: no final save


def test_checkpoint_of_another_model_is_refused(tmp_path, reference):
    run_dir, _ = reference
    with pytest.raises(LmforgeError, match=r"holds another model \(d_model: 64 vs 32"):
        Trainer(tiny_config(run_dir, **{"model.overrides.d_model": 32}), loader_factory=None)
    with pytest.raises(LmforgeError, match="holds another model"):
        Trainer(tiny_config(tmp_path / "stage2", **{"model.overrides.n_layers": 3, "init_from": {"path": str(run_dir)}}),
                loader_factory=None)


def test_stage2_starts_from_checkpoint_weights_with_linear_decay_to_zero(tmp_path, reference):
    run_dir, _ = reference
    source = load(run_dir).model
    anneal = {"init_from": {"path": str(run_dir)}, "max_steps": 4, "checkpoint.interval": None,
              "schedule": {"name": "linear", "warmup": 0, "final_lr_fraction": 0.0}, "optimizer.lr": 1e-3}
    captured = {}
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(tmp_path / "anneal", **anneal), loader_factory=array_loader_factory(random_tokens(seed=5), 32))
    original = trainer.train_step

    def capture(batch, tokens):
        if trainer.step == 0:
            captured["start"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return original(batch, tokens)

    trainer.train_step = capture
    trainer.fit()
    for name, tensor in source.state_dict().items():
        assert torch.equal(captured["start"][name], tensor), name
    rows = read_metrics(tmp_path / "anneal")
    assert [r["lr"] for r in rows] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert rows[0]["step"] == 1  # a fresh run: counters restart


def test_export_and_soup(tmp_path, reference):
    from lmforge.cli import main
    from lmforge.model.directory import load_model_dir

    run_dir, _ = reference
    checkpoints = list_checkpoints(run_dir / CHECKPOINTS)
    assert main(["checkpoint", "export", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    exported, _ = load_model_dir(tmp_path / "exported")
    latest = load(checkpoints[-1][1]).model
    for name, tensor in latest.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor)
    a, b = (str(p) for _, p in checkpoints[-2:])
    assert main(["soup", a, b, "--out", str(tmp_path / "soup"), "--weights", "1", "3"]) == 0
    souped, _ = load_model_dir(tmp_path / "soup")
    wa, wb = load(a).model.state_dict(), load(b).model.state_dict()
    for name, tensor in souped.state_dict().items():
        expected = (0.25 * wa[name].double() + 0.75 * wb[name].double()).float()
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
    assert main(["soup", a, "--out", str(tmp_path / "bad")]) == 2


def test_stage2_from_an_exported_model_directory(tmp_path, reference):
    from lmforge.cli import main

    run_dir, _ = reference
    assert main(["checkpoint", "export", str(run_dir), "--out", str(tmp_path / "model")]) == 0
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(tmp_path / "stage2", **{"init_from": {"path": str(tmp_path / "model")}}),
                      loader_factory=array_loader_factory(random_tokens(), 32))
    assert trainer.restore() is False  # a fresh run, initialised from the weights
    source = load(run_dir).model.state_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, source[name]), name


@requires_olmo_tokenizer
def test_resume_drops_the_batch_lineage_rows_logged_after_the_checkpoint(tmp_path):
    # Found by the fault campaign: a resumed run re-logged the steps after its checkpoint in batches.jsonl.
    from test_bad_input import write_train_config

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "text": f"document {i} " + "words go here " * 20}) + "\n"
                            for i in range(40)))
    config = write_train_config(docs, tmp_path)
    args = ["train", str(config), "max_steps=4", "checkpoint.interval=2", "checkpoint.keep_last=5"]
    assert main(args) == 0
    uninterrupted = (tmp_path / "run" / "batches.jsonl").read_text()
    assert [json.loads(line)["step"] for line in uninterrupted.splitlines()] == [1, 2, 3, 4]
    shutil.rmtree(tmp_path / "run" / CHECKPOINTS / "step00000004")  # as if killed after step 4, before its save
    assert main(args) == 0
    assert (tmp_path / "run" / "batches.jsonl").read_text() == uninterrupted
