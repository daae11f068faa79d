"""TRL 1.16 (the peer, in its own venv: benchmarks/peers/setup_trl.sh; override with TRL_VENV) on the same tiny model
exported to transformers and the same data: the step-1 SFT loss, and DPO loss, rewards and log-probs (with a
reference model other than the policy, so they are not trivially ln 2 and 0), equal ours within 1e-5."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from adapt_utils import CONVERSATIONS, tiny_model_dir, tiny_tokenizer, write_jsonl
from lmforge.adapt.templates import encode_chat

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = Path(os.environ.get("TRL_VENV", ROOT / ".peers" / "trl-venv"))
TRL_PYTHON = TRL_VENV / "bin" / "python"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not TRL_PYTHON.exists(), reason=f"TRL peer not installed in {TRL_VENV}")]

TRAINABLE = [c for c in CONVERSATIONS if c[-1]["role"] == "assistant" and c[-1]["content"]]
PAIRS = [{"prompt": c[:-1], "chosen": [c[-1]], "rejected": [{"role": "assistant", "content": "It is 7, thanks."}]}
         for c in TRAINABLE]


def run_trl(spec: dict) -> dict:
    result = subprocess.run([str(TRL_PYTHON), str(ROOT / "benchmarks" / "peers" / "trl_adapt.py"), json.dumps(spec)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _step1(tmp_path, stage: str, overrides: list[str]) -> dict:
    from lmforge.cli import main

    config = tmp_path / f"{stage}.yaml"
    config.write_text("{}\n")
    out = tmp_path / f"run-{stage}"
    assert main(["adapt", stage, str(config), f"out={out}", "max_seq_length=128", "max_steps=1", "precision=fp32",
                 "device=cpu", "optimizer.lr=1e-6", *overrides]) == 0
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture
def models(tmp_path):
    from lmforge.cli import main

    for name, seed in (("policy", 0), ("reference", 1)):
        tiny_model_dir(tmp_path / name, template="tulu", seed=seed, init_std=0.2)
        assert main(["export", "hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}-hf")]) == 0
    return tmp_path


def test_sft_step1_loss_equals_trl(models):
    tmp_path = models
    tokenizer = tiny_tokenizer("tulu")
    records = []
    for messages in TRAINABLE:
        ids, trained = encode_chat(tokenizer, messages)
        records.append({"input_ids": ids, "assistant_masks": [int(t) for t in trained]})
    theirs = run_trl({"stage": "sft", "mode": "step1", "model": str(tmp_path / "policy-hf"), "out": str(tmp_path / "t"),
                      "data": write_jsonl(tmp_path / "trl-sft.jsonl", records), "batch_size": len(records),
                      "max_length": 128})
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in TRAINABLE])
    ours = _step1(tmp_path, "sft", [f"model={tmp_path / 'policy'}", f"data=[{data}]", "loss_reduction=mean",
                                    f"batch_size={len(records)}", f"micro_batch_size={len(records)}"])
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


@pytest.mark.parametrize("ours_loss, trl_loss, beta", [("dpo", "sigmoid", 0.1), ("dpo_norm", "sigmoid_norm", 5.0)])
def test_dpo_step1_loss_and_rewards_equal_trl(models, ours_loss, trl_loss, beta):
    tmp_path = models
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    theirs = run_trl({"stage": "dpo", "mode": "step1", "model": str(tmp_path / "policy-hf"),
                      "ref_model": str(tmp_path / "reference-hf"), "out": str(tmp_path / "t"), "data": data,
                      "batch_size": len(PAIRS), "max_length": 128, "beta": beta, "loss_type": trl_loss})
    ours = _step1(tmp_path, "dpo", [f"model={tmp_path / 'policy'}", f"reference_model={tmp_path / 'reference'}",
                                    f"data=[{data}]", f"loss={ours_loss}", f"beta={beta}", "template=tokenizer",
                                    f"batch_size={len(PAIRS)}", f"micro_batch_size={len(PAIRS)}"])
    assert abs(theirs["loss"] - 0.6931) > 1e-3, "policy and reference agree: a weak comparison"
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert ours["logps/chosen"] == pytest.approx(theirs["logps/chosen"], abs=1e-4)
    assert ours["logps/rejected"] == pytest.approx(theirs["logps/rejected"], abs=1e-4)
    if ours_loss == "dpo":  # TRL reports unnormalised rewards β·(π - ref) for both losses; ours follow the loss
        assert ours["rewards/chosen"] == pytest.approx(theirs["rewards/chosen"], abs=1e-5)
        assert ours["rewards/rejected"] == pytest.approx(theirs["rewards/rejected"], abs=1e-5)
        assert ours["rewards/margin"] == pytest.approx(theirs["rewards/margins"], abs=1e-5)
        assert ours["rewards/accuracy"] == pytest.approx(theirs["rewards/accuracies"], abs=1e-6)
