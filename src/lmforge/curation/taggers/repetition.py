"""Repetition spans: periodic character runs ("abcabcabcabc", "=========") and lines repeated in a document.

`repeated_sequence` spans are runs where a unit of 1..16 characters repeats back to back (a single character
at least 10 times, a longer unit at least 4 times); the score is the number of repeats. `duplicate_lines`
marks every non-blank line equal to an earlier line of the same document (deleting them keeps one copy).
Document values: `doc_max_repeats`, `doc_fraction_repeated_characters`.
"""

from __future__ import annotations

import re

from lmforge.curation.taggers import Tagger, register_tagger, text_lines

_CHAR_RUN = re.compile(r"(.)\1{9,}")
_UNIT_RUN = re.compile(r"(.{2,16}?)\1{3,}")


def repeated_sequences(text: str) -> list[list[float]]:
    spans = [[m.start(), m.end(), (m.end() - m.start()) / len(m.group(1))] for m in _CHAR_RUN.finditer(text)]
    spans += [[m.start(), m.end(), (m.end() - m.start()) / len(m.group(1))] for m in _UNIT_RUN.finditer(text)
              if len(set(m.group(1))) > 1]
    spans.sort()
    return spans


def duplicate_lines(text: str) -> list[list[float]]:
    seen: set[str] = set()
    spans = []
    for start, line in text_lines(text):
        if line.strip():
            if line in seen:
                spans.append([start, min(start + len(line) + 1, len(text)), 1.0])
            else:
                seen.add(line)
    return spans


def covered_characters(spans: list[list[float]]) -> int:
    covered = 0
    reach = 0
    for start, end, _ in sorted(spans):
        start = max(start, reach)
        if end > start:
            covered += end - start
            reach = end
    return covered


@register_tagger("repetition")
class RepetitionTagger(Tagger):
    attributes = ("repeated_sequence", "duplicate_lines", "doc_max_repeats", "doc_fraction_repeated_characters")

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        runs = repeated_sequences(text)
        lines = duplicate_lines(text)
        n = len(text)
        return {
            "repeated_sequence": runs,
            "duplicate_lines": lines,
            "doc_max_repeats": [[0, n, max((s[2] for s in runs), default=0.0)]],
            "doc_fraction_repeated_characters": [[0, n, covered_characters(runs + lines) / max(n, 1)]],
        }
