"""End to end through the CLI on real text: Python standard-library sources -> BPE trained in the test ->
token files -> `lmforge train configs/train/quickstart.yaml` -> the loss falls; `data inspect` finds the
step's documents; `checkpoint export` writes a model directory with the tokenizer."""

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from train_utils import read_metrics

from lmforge.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "quickstart.yaml"


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    from lmforge.tokens.tokenize import TokenizeConfig, TrainTokenizerConfig, tokenize, train_tokenizer

    root = tmp_path_factory.mktemp("text")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:60]
    docs = root / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")[:8000]
            f.write(json.dumps({"id": path.name, "text": text, "source": "stdlib"}) + "\n")
    train_tokenizer(TrainTokenizerConfig(documents=[str(docs)], vocab_size=512, out=str(root / "bpe")))
    tokenize(TokenizeConfig(documents=[str(docs)], tokenizer=str(root / "bpe"), out=str(root / "tokens")))
    return root / "tokens"


def test_loss_falls_on_real_text_and_run_is_inspectable(tmp_path, tokens_dir, capsys):
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    overrides = [f"data.paths=[{tokens_dir}]", f"run_dir={run_dir}", "data.sequence_length=64",
                 "global_batch_size=1024", "micro_batch_size=512", "max_steps=40", "schedule.warmup=5",
                 "checkpoint.interval=20", "metrics.log_interval=1", "metrics.tensorboard=false"]
    assert main(["train", str(CONFIG), *overrides]) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[0]["loss"] == pytest.approx(math.log(512), abs=0.3)  # uniform at the start
    # From ~ln(512) = 6.2 nats; a model that learns nothing stays there. 40 tiny steps reach ~5.2.
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.7
    assert all(r["tokens_per_second"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "manifest.json").is_file()

    capsys.readouterr()
    assert main(["data", "inspect", "--run", str(run_dir), "--step", "7"]) == 0
    listing = capsys.readouterr().out
    assert "step 7:" in listing and ".py" in listing

    assert main(["checkpoint", "export", str(run_dir), "--out", str(tmp_path / "model")]) == 0
    from lmforge.model.directory import load_model_dir

    model, tokenizer = load_model_dir(tmp_path / "model")
    assert tokenizer is not None and model.config.vocab_size == tokenizer.vocab_size

    # `export hf` takes the run directory itself (its latest checkpoint), as `checkpoint export` does.
    transformers = pytest.importorskip("transformers")
    assert main(["export", "hf", str(run_dir), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("def main():\n    return 0")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_missing_data_is_refused_before_compute(tmp_path, capsys):
    code = main(["train", str(CONFIG), f"data.paths=[{tmp_path / 'nowhere'}]", f"run_dir={tmp_path / 'run'}",
                 "model.vocab_from_tokenizer=false"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
