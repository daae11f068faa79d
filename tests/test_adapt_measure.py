"""`evaluate_on_items` / `lmforge adapt score`: each item's greedy answer (checked against an argmax loop over full
forwards, no KV cache, one prompt at a time) scored by the RLVR checker; counts, mean reward, skipped records."""

import json

import torch

from lmforge.adapt.measure import evaluate_on_items
from lmforge.cli import main
from test_adapt_rlvr import char_tokenizer, tiny_model_dir, write_jsonl

MAX_NEW = 6


def greedy_by_hand(model, ids: list[int], eos_id: int) -> list[int]:
    out = []
    for _ in range(MAX_NEW):
        token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        out.append(token)
        if token == eos_id:
            break
    return out


def test_items_are_answered_greedily_and_scored_by_the_checker(tmp_path, monkeypatch, capsys):
    from lmforge.model.directory import load_model_dir

    model_dir = tiny_model_dir(tmp_path / "model", seed=3)
    model, _ = load_model_dir(model_dir)
    tok = char_tokenizer()
    prompts = ["What is 1 + 2?", "What is 13 + 4?", "Answer with the number 7.", "What is 9 + 9?", "What?",
               "Answer with the number 12345."]  # different lengths: left padding within a batch of 4
    expected = []
    for p in prompts:
        completion = greedy_by_hand(model, tok.encode(p), tok.eos_id)
        text = tok.decode(completion[:-1] if completion[-1:] == [tok.eos_id] else completion, skip_special_tokens=True)
        expected.append(text)
    (tmp_path / "exact.py").write_text("def match(completion, answer):\n    return completion == answer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    right = [0, 2, 3, 5]  # items whose answer is the model's own greedy text
    items = [{"prompt": p, "answer": e if i in right else e + "#"} for i, (p, e) in enumerate(zip(prompts, expected))]
    scores = evaluate_on_items(model_dir, items, checker="exact.match", max_new_tokens=MAX_NEW, batch_size=4)
    assert scores.completions == expected
    assert (scores.correct, scores.total, scores.mean_reward) == (4, 6, 4 / 6)
    assert scores.rewards == [1.0 if i in right else 0.0 for i in range(6)]

    path = write_jsonl(tmp_path / "items.jsonl", ["{not json", *items[:3]])
    capsys.readouterr()
    assert main(["adapt", "score", str(model_dir), "--prompts", str(path), "--checker", "exact.match",
                 "--max-new-tokens", str(MAX_NEW), "--limit", "2", "--out", str(tmp_path / "scored.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert f"{path}:1: skipped: not valid JSON" in err
    assert out.strip().endswith("1/2 correct (0.500), mean reward 0.500")
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in scored] == expected[:2] and [r["reward"] for r in scored] == [1.0, 0.0]


def test_score_renders_prompts_with_the_template_asked_for(tmp_path, capsys):
    """`--template chatml` puts the question in a ChatML user turn followed by the assistant's (the toy vocabulary
    spells "user" and "assistant"); without it the toy model, which has no template, reads the bare question."""
    model_dir = tiny_model_dir(tmp_path / "model", seed=3)
    path = write_jsonl(tmp_path / "items.jsonl", [{"prompt": "What is 1 + 2?", "answer": "3"}])
    for template, turns in ((None, False), ("chatml", True)):
        capsys.readouterr()
        assert main(["adapt", "score", str(model_dir), "--prompts", str(path), "--max-new-tokens", "2",
                     *(["--template", template] if template else [])]) == 0
        prompt = capsys.readouterr().out.split("--- prompt\n")[1].split("\n--- answer")[0]
        assert ("user" in prompt and "assistant" in prompt) == turns, prompt
