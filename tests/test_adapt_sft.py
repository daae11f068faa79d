"""SFT: the loss is on assistant tokens only, normalised as configured; packed examples see only themselves;
bad records are counted with file and line; the trained model exports and generates in transformers as here."""

import json

import numpy as np
import pytest
import torch

from adapt_utils import CONVERSATIONS, tiny_model_dir, tiny_tokenizer, write_jsonl
from lmforge.adapt.data import RecordReport, pack_rows, sft_examples
from lmforge.adapt.sft import SupervisedFineTuning
from lmforge.core.errors import LmforgeError
from lmforge.model.directory import load_model_dir
from lmforge.model.transformer import document_positions

TRAINABLE = [c for c in CONVERSATIONS if any(m["role"] == "assistant" and m["content"] for m in c)]


def _examples(tmp_path, template="tulu"):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in TRAINABLE])
    return sft_examples([path], tiny_tokenizer(template), 128, "truncate", RecordReport())


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_packed_example_logits_equal_the_example_alone(tmp_path):
    model, _ = load_model_dir(tiny_model_dir(tmp_path / "m", init_std=0.2))
    examples = _examples(tmp_path)
    packed = pack_rows(examples, 128, 1, packing=True)
    assert len(packed["input_ids"]) < len(examples), "nothing was packed together"
    from lmforge.train.objective import doc_ids_from_lengths

    doc_ids = doc_ids_from_lengths(torch.from_numpy(packed["doc_lens"]))
    with torch.no_grad():
        logits = model(torch.from_numpy(packed["input_ids"]), doc_ids=doc_ids)
        k = 0  # pack_rows keeps the examples' order; a row's last document may be its padding
        for row, lens in enumerate(packed["doc_lens"]):
            start = 0
            for n in lens[lens > 0].tolist():
                if k < len(examples) and n == len(examples[k].ids):
                    alone = model(torch.tensor([examples[k].ids]))[0]
                    torch.testing.assert_close(logits[row, start:start + n], alone, atol=1e-5, rtol=1e-5)
                    k += 1
                start += n
    assert k == len(examples)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_is_assistant_token_cross_entropy_normalised_as_configured(tmp_path, packing, reduction):
    """Brute force: each example alone, -log p of every token whose position is inside an assistant turn."""
    model, _ = load_model_dir(tiny_model_dir(tmp_path / "m", init_std=0.2))
    tokenizer = tiny_tokenizer()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for messages in TRAINABLE:
            from lmforge.adapt.templates import encode_chat

            ids, trained = encode_chat(tokenizer, messages)
            log_probs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
            for t in range(1, len(ids)):
                if trained[t]:
                    total -= float(log_probs[t - 1, ids[t]])
                    tokens += 1
    expected = total / (len(TRAINABLE) if reduction == "sum" else tokens)
    rows = pack_rows(_examples(tmp_path), 128, tokenizer.pad_id, packing)
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    objective = SupervisedFineTuning(reduction)
    prepared = objective.prepare(model, batch)
    with torch.no_grad():
        loss, _ = objective.loss(model, prepared)
    count = objective.count(prepared)
    if reduction == "sum" and packing:  # sum divides by rows: packed rows hold several examples
        count = torch.tensor(float(len(TRAINABLE)))
    assert float(loss / count) == pytest.approx(expected, rel=1e-5)


def test_bad_records_are_counted_with_file_and_line(tmp_path):
    long_reply = "Hello there " * 80
    lines = [json.dumps({"messages": CONVERSATIONS[0]}), "{not json", json.dumps({"messages": [
        {"role": "user", "content": "no answer"}]}), json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"prompt": "Hello", "completion": long_reply}), json.dumps([1, 2]), ""]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = tiny_tokenizer()
    report = RecordReport()
    examples = sft_examples([str(path)], tokenizer, 64, "drop", report)
    assert len(examples) == 1 and report.skipped == 5
    reasons = [str(b) for b in report.bad_lines]
    assert reasons[0].startswith(f"{path}:2: not JSON")
    assert reasons[1] == f"{path}:3: no assistant turn"
    assert reasons[2].startswith(f"{path}:4: message 0 has unknown role 'robot'")
    assert reasons[3].startswith(f"{path}:5: too long:")
    assert reasons[4] == f"{path}:6: not a JSON object"
    # truncate keeps the long record, cut to 64 tokens, and counts it
    report = RecordReport()
    examples = sft_examples([str(path)], tokenizer, 64, "truncate", report)
    assert len(examples) == 2 and report.truncated_records == 1 and len(examples[1].ids) == 64
    with pytest.raises(LmforgeError, match="no usable records.*5 skipped"):
        (tmp_path / "worse.jsonl").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
        sft_examples([str(tmp_path / "worse.jsonl")], tokenizer, 64, "drop", RecordReport())


@pytest.mark.slow
def test_sft_then_export_then_transformers_generates_what_lmforge_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.adapt.templates import prompt_ids
    from lmforge.cli import main
    from lmforge.model.generation import SamplingConfig, generate_ids

    tiny_model_dir(tmp_path / "start", init_std=0.2)
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in TRAINABLE] * 4)
    overrides = [f"model={tmp_path / 'start'}", f"data=[{data}]", f"out={tmp_path / 'run'}", "template=chatml",
                 "max_seq_length=128", "batch_size=8", "micro_batch_size=4", "max_steps=3", "precision=fp32",
                 "device=cpu", "optimizer.lr=1e-3", "loss_reduction=mean"]
    config = tmp_path / "sft.yaml"
    config.write_text("{}\n")
    assert main(["adapt", "sft", str(config), *overrides]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["loss"] < metrics[0]["loss"]
    assert main(["export", "hf", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "hf")]) == 0
    model, tokenizer = load_model_dir(tmp_path / "run" / "model")
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    ids = prompt_ids(tokenizer, messages)
    assert ids == list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    ours = generate_ids(model, [ids], SamplingConfig(max_new_tokens=12), eos_id=None, pad_id=tokenizer.pad_id)[0]
    theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=tokenizer.pad_id)[0, len(ids):].tolist()
    assert ours == theirs and len(set(ours)) > 1
    assert np.isfinite(metrics[0]["loss"])
