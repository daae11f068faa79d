"""DPO: the losses against hand-computed values, ln 2 when the policy is the reference, the reference cache keyed
by model and data, bad pairs counted."""

import json
import math

import numpy as np
import pytest
import torch

from adapt_utils import tiny_model_dir, tiny_tokenizer, write_jsonl
from lmforge.adapt.data import RecordReport, preference_arrays, preference_messages
from lmforge.adapt.dpo import DirectPreference, preference_loss, reference_logps
from lmforge.adapt.templates import BadRecord
from lmforge.model.directory import load_model_dir

PAIRS = [{"prompt": "What is 12 + 30?", "chosen": "It is 42.", "rejected": "It is 7."},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
          "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "How are you? I am fine, thanks."},
         {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
          "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}]}]


def _sigmoid_loss(x):
    return math.log(1 + math.exp(-x))


def test_losses_equal_hand_computed_values():
    pc, pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-6.0]), torch.tensor([-8.0])
    lc, lr = torch.tensor([2.0]), torch.tensor([4.0])
    # dpo: beta 0.1 * ((-5 + 6) - (-9 + 8)) = 0.2
    loss, chosen, rejected = preference_loss(pc, pr, rc, rr, lc, lr, "dpo", 0.1)
    assert float(loss) == pytest.approx(_sigmoid_loss(0.2)) == pytest.approx(0.598138869, abs=1e-7)
    assert (float(chosen), float(rejected)) == pytest.approx((0.1, -0.1))
    # dpo_norm: beta 5 * ((-2.5 + 3) - (-2.25 + 2)) = 5 * 0.75 = 3.75
    loss, chosen, rejected = preference_loss(pc, pr, rc, rr, lc, lr, "dpo_norm", 5.0)
    assert float(loss) == pytest.approx(_sigmoid_loss(3.75), rel=1e-6)
    assert (float(chosen), float(rejected)) == pytest.approx((2.5, -1.25))
    # simpo: beta 2 * (-2.5 + 2.25) - gamma (2 * 0.5 = 1) = -1.5
    loss, chosen, rejected = preference_loss(pc, pr, rc, rr, lc, lr, "simpo", 2.0, 0.5)
    assert float(loss) == pytest.approx(_sigmoid_loss(-1.5), rel=1e-6)
    assert (float(chosen), float(rejected)) == pytest.approx((-5.0, -4.5))


@pytest.mark.parametrize("kind", ["dpo", "dpo_norm"])
def test_loss_is_ln2_when_the_policy_is_the_reference(tmp_path, kind):
    model, _ = load_model_dir(tiny_model_dir(tmp_path / "m", init_std=0.2))
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    arrays = preference_arrays([data], tiny_tokenizer(), 64, "drop", 1, RecordReport())
    reference = reference_logps(model, arrays, 2, "cpu")
    assert np.all(reference < 0) and not np.allclose(reference[:, 0], reference[:, 1])
    batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = (torch.from_numpy(reference[:, i].copy()) for i in (0, 1))
    objective = DirectPreference(kind, 5.0)
    with torch.no_grad():
        loss, metrics = objective.loss(model, batch)
    count = float(objective.count(batch))
    assert count == 3 and float(loss) / count == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/margin"]) == pytest.approx(0.0, abs=1e-5)
    # The reference log-probs are the replies' tokens only: brute force for the first pair's chosen reply.
    from lmforge.adapt.templates import encode_chat

    prompt, chosen, _ = preference_messages(PAIRS[0])
    ids, trained = encode_chat(tiny_tokenizer(), prompt + chosen, first_trained=len(prompt))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    expected = sum(float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids)) if trained[t])
    assert float(reference[0, 0]) == pytest.approx(expected, rel=1e-5)


def test_bad_pairs_are_refused():
    with pytest.raises(BadRecord, match="identical"):
        preference_messages({"prompt": "Hi", "chosen": "Same", "rejected": "Same"})
    with pytest.raises(BadRecord, match="no 'chosen' and 'rejected'"):
        preference_messages({"prompt": "Hi", "chosen": "x"})
    with pytest.raises(BadRecord, match="rejected must be assistant turns"):
        preference_messages({"prompt": "Hi", "chosen": "x", "rejected": [{"role": "user", "content": "y"}]})
    assert preference_messages(PAIRS[2]) == ([{"role": "user", "content": "Hi"}],
                                             [{"role": "assistant", "content": "Hello there"}],
                                             [{"role": "assistant", "content": "No"}])


@pytest.mark.slow
def test_dpo_run_caches_reference_logps_by_model_and_data(tmp_path):
    from lmforge.cli import main

    tiny_model_dir(tmp_path / "start", init_std=0.2)
    records = PAIRS * 3 + [{"prompt": "Hi", "chosen": "x", "rejected": "x"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    config = tmp_path / "dpo.yaml"
    config.write_text("{}\n")
    args = ["adapt", "dpo", str(config), f"model={tmp_path / 'start'}", f"data=[{data}]", f"out={tmp_path / 'run'}",
            "max_seq_length=64", "batch_size=4", "micro_batch_size=2", "max_steps=2", "precision=fp32",
            "device=cpu", "optimizer.lr=1e-3", "loss=dpo", "beta=0.1"]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy = reference
    assert metrics[0]["rewards/accuracy"] == 0.0 and "rewards/margin" in metrics[1]
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert manifest["counts"]["skipped_records"] == 1
    assert manifest["counts"]["skipped_by_reason"] == {"chosen and rejected are identical": 1}
    cached = list((tmp_path / "run" / "reference").glob("*.npy"))
    assert len(cached) == 1
    # A second run on other data computes a second cache entry; the same data reuses the first.
    data2 = write_jsonl(tmp_path / "pairs2.jsonl", PAIRS[:2] * 4)
    args2 = [a.replace(str(tmp_path / "run"), str(tmp_path / "run2")).replace(data, data2) for a in args]
    args2.append(f"reference_cache={tmp_path / 'run' / 'reference'}")
    assert main(args2) == 0
    assert len(list((tmp_path / "run" / "reference").glob("*.npy"))) == 2
    before = cached[0].stat().st_mtime_ns
    args3 = [a.replace(str(tmp_path / "run"), str(tmp_path / "run3")) for a in args]
    assert main([*args3, f"reference_cache={tmp_path / 'run' / 'reference'}"]) == 0
    assert cached[0].stat().st_mtime_ns == before
    assert len(list((tmp_path / "run" / "reference").glob("*.npy"))) == 2
