"""Adaptation records (JSONL) and their token arrays.

Records, one JSON object a line (`docs/adapt.md`; open-instruct's and TRL's conversational formats):
- SFT: `{"messages": [{"role", "content"}, ...]}`, or `{"prompt": ..., "completion": ...}` where each is a
  string (a user turn, an assistant turn) or a list of messages.
- DPO: `{"prompt" or "messages": the conversation so far, "chosen": ..., "rejected": ...}`; chosen and
  rejected are a string (one assistant turn) or a list of messages, which may repeat the prompt's messages
  first (open-instruct keeps whole conversations there: the prompt is then their common beginning).

A record that cannot be used (bad JSON, no assistant turn, an unknown role, chosen equal to rejected, too
long for `max_seq_length` under `too_long: drop`) is skipped, counted, and reported with its file and line;
a run with nothing left to train on stops with one line (exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from lmforge.adapt.templates import BadRecord, check_messages, encode_chat
from lmforge.core.errors import LmforgeError
from lmforge.curation.documents import ReadReport, TruncatedInput, iter_lines
from lmforge.train.objective import IGNORE_INDEX

TooLong = Literal["truncate", "drop"]


@dataclass
class RecordReport(ReadReport):
    """Records read, skipped (the first ones kept verbatim with file and line) and truncated to fit."""

    truncated_records: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, path: str, line: int, reason: str) -> None:
        super().skip(path, line, reason)
        kind = reason.split(":")[0].split(" (")[0]
        self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def counts(self) -> dict:
        return {"records": self.documents, "skipped_records": self.skipped,
                "truncated_records": self.truncated_records, "skipped_by_reason": dict(self.reasons)}

    def summary(self) -> list[str]:
        """Lines for the console: counts, then each reported bad line as `file:line: reason`."""
        lines = [f"{self.documents:,} records used, {self.skipped:,} skipped, "
                 f"{self.truncated_records:,} truncated to fit"]
        return lines + [f"  skipped {bad}" for bad in self.bad_lines[:20]]


def read_records(paths: list[str], report: RecordReport) -> Iterator[tuple[str, int, dict]]:
    """(file, line, record) for each JSON object of the JSONL files (plain, .gz or .zst); bad lines are skipped."""
    for path in paths:
        if not Path(path).is_file():
            raise LmforgeError(f"data file not found: {path}")
        try:
            for number, raw in iter_lines(path):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as e:
                    report.skip(path, number, f"not JSON ({e})")
                    continue
                if not isinstance(record, dict):
                    report.skip(path, number, "not a JSON object")
                    continue
                yield path, number, record
        except TruncatedInput as e:
            report.truncate(e, strict=False)


def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def sft_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return check_messages(record["messages"])
    if "prompt" in record and "completion" in record:
        return check_messages(_as_messages(record["prompt"], "user") + _as_messages(record["completion"], "assistant"))
    raise BadRecord("no 'messages' (or 'prompt' and 'completion')")


def preference_messages(record: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen reply messages, rejected reply messages) of a DPO record."""
    if "chosen" not in record or "rejected" not in record:
        raise BadRecord("no 'chosen' and 'rejected'")
    chosen = check_messages(_as_messages(record["chosen"], "assistant"), need_assistant=False)
    rejected = check_messages(_as_messages(record["rejected"], "assistant"), need_assistant=False)
    if "prompt" in record or "messages" in record:
        prompt = record["prompt"] if "prompt" in record else record["messages"]
        prompt = check_messages(_as_messages(prompt, "user"), need_assistant=False)
    else:  # open-instruct: whole conversations, the prompt is everything before the last message
        prompt = chosen[:-1]
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[:len(prompt)] == prompt and len(reply) > len(prompt):
            reply[:] = reply[len(prompt):]
        if not reply or any(m["role"] != "assistant" for m in reply):
            raise BadRecord(f"{name} must be assistant turns after the prompt")
    if chosen == rejected:
        raise BadRecord("chosen and rejected are identical")
    return prompt, chosen, rejected


def next_token_targets(ids: list[int], trained: list[bool]) -> np.ndarray:
    """Position t's target: the token at t+1 when it is trained on, else IGNORE_INDEX."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if len(ids) > 1:
        labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return labels


def fit(ids: list[int], trained: list[bool], max_len: int, too_long: TooLong) -> tuple[list[int], list[bool], bool]:
    """The example cut to `max_len` tokens (truncate) or BadRecord (drop, or nothing trained is left)."""
    if len(ids) <= max_len:
        return ids, trained, False
    if too_long == "drop":
        raise BadRecord(f"too long: {len(ids)} tokens > max_seq_length {max_len}")
    ids, trained = ids[:max_len], trained[:max_len]
    if not any(trained[1:]):
        raise BadRecord(f"too long: {len(ids)} tokens, no trained token within max_seq_length {max_len}")
    return ids, trained, True


@dataclass
class Example:
    ids: list[int]
    labels: np.ndarray


def sft_examples(paths: list[str], tokenizer, max_len: int, too_long: TooLong,
                 report: RecordReport) -> list[Example]:
    examples = []
    for path, line, record in read_records(paths, report):
        try:
            ids, trained = encode_chat(tokenizer, sft_messages(record))
            ids, trained, cut = fit(ids, trained, max_len, too_long)
        except BadRecord as e:
            report.skip(path, line, str(e))
            continue
        if not any(trained[1:]):
            report.skip(path, line, "no assistant token to train on")
            continue
        report.documents += 1
        report.truncated_records += cut
        examples.append(Example(ids, next_token_targets(ids, trained)))
    return _nonempty(examples, paths, report)


def _nonempty(examples: list, paths: list[str], report: RecordReport) -> list:
    if not examples:
        first = f"; first: {report.bad_lines[0]}" if report.bad_lines else ""
        raise LmforgeError(f"no usable records in {', '.join(paths)} ({report.skipped} skipped{first})")
    return examples


def pack_rows(examples: list[Example], seq_len: int, pad_id: int, packing: bool) -> dict[str, np.ndarray]:
    """Rows of `seq_len` tokens: one example each, right-padded; or (packing) as many whole examples as fit, in
    order, with `doc_lens` so attention and positions stay inside each example (padding is one more doc)."""
    rows: list[list[Example]] = []
    used = seq_len + 1
    for example in examples:
        if not packing or used + len(example.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example.ids)
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    doc_lens = np.zeros((len(rows), max(len(r) for r in rows) + 1), dtype=np.int64)
    for i, row in enumerate(rows):
        at = 0
        for j, example in enumerate(row):
            n = len(example.ids)
            input_ids[i, at:at + n], labels[i, at:at + n], doc_lens[i, j] = example.ids, example.labels, n
            at += n
        if at < seq_len:
            doc_lens[i, len(row)] = seq_len - at
    arrays = {"input_ids": input_ids, "labels": labels}
    if packing:
        arrays["doc_lens"] = doc_lens
    return arrays


def preference_arrays(paths: list[str], tokenizer, max_len: int, too_long: TooLong, pad_id: int,
                      report: RecordReport) -> dict[str, np.ndarray]:
    """Rows of pairs: chosen and rejected conversations (prompt + reply) right-padded to `max_len`, with
    labels on the reply's tokens only."""
    pairs = []
    for path, line, record in read_records(paths, report):
        try:
            prompt, chosen, rejected = preference_messages(record)
            sides, cut = [], False
            for reply in (chosen, rejected):
                ids, trained = encode_chat(tokenizer, prompt + reply, first_trained=len(prompt))
                ids, trained, side_cut = fit(ids, trained, max_len, too_long)
                sides.append((ids, next_token_targets(ids, trained)))
                cut |= side_cut
            if sides[0][0] == sides[1][0]:
                raise BadRecord("chosen and rejected are identical once tokenized")
        except BadRecord as e:
            report.skip(path, line, str(e))
            continue
        report.documents += 1
        report.truncated_records += cut
        pairs.append(sides)
    _nonempty(pairs, paths, report)
    arrays = {}
    for k, side in enumerate(("chosen", "rejected")):
        ids = np.full((len(pairs), max_len), pad_id, dtype=np.int64)
        labels = np.full((len(pairs), max_len), IGNORE_INDEX, dtype=np.int64)
        for i, pair in enumerate(pairs):
            row_ids, row_labels = pair[k]
            ids[i, :len(row_ids)], labels[i, :len(row_ids)] = row_ids, row_labels
        arrays[f"{side}_input_ids"], arrays[f"{side}_labels"] = ids, labels
    return arrays
