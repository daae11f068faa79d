"""C4 cleaning rules (Raffel et al. 2020, section 2.2) as spans and flags; the mixer removes or drops.

Line rules give one span per offending line, newline included, so deleting the spans deletes the lines:
`lines_with_no_ending_punctuation` (stripped line does not end in . ? ! or a closing quote),
`lines_with_too_few_words` (< 5 words, the paper's number; Dolma uses 3), `lines_with_javascript`.
Document flags `has_naughty_word`, `has_lorem_ipsum`, `has_curly_brace` are `[0, len, 1.0]` when set.
`sentence_count` counts sentences in the lines that survive the line rules (C4 drops pages with < 3).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from lmforge.curation.taggers import Tagger, line_windows, register_tagger

MIN_WORDS_PER_LINE = 5
END_MARKS = (".", "?", "!", '"', "\u201d")
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d)\]]*(?=\s|$)")
_WORD = re.compile(r"\w+")


@lru_cache(maxsize=1)
def naughty_words() -> tuple[frozenset[str], dict[str, list[tuple[str, re.Pattern]]]]:
    """(single-token entries, first token -> boundary regexes of the multi-token entries starting with it)."""
    path = Path(__file__).with_name("resources") / "naughty_words_en.txt"
    entries = [w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
    tokens = frozenset(w for w in entries if _WORD.fullmatch(w))
    phrases: dict[str, list[tuple[str, re.Pattern]]] = {}
    for entry in entries:
        if not _WORD.fullmatch(entry):
            first = (_WORD.findall(entry) or [""])[0]
            phrases.setdefault(first, []).append((entry, re.compile(r"(?<!\w)" + re.escape(entry) + r"(?!\w)")))
    return tokens, phrases


def has_naughty_word(lower: str) -> bool:
    # C4 matches bad words between non-word characters; tokenising on \w+ gives the same boundaries.
    tokens, phrases = naughty_words()
    # The set of \w+ runs, computed cheaply: whitespace tokens that are all alphanumeric are runs already;
    # only the others (punctuation attached) go through the regex.
    pieces = set(lower.split())
    words = {p for p in pieces if p.isalnum()}
    words.update(_WORD.findall(" ".join(p for p in pieces if not p.isalnum())))
    if not tokens.isdisjoint(words):
        return True
    candidates = [p for first in words.intersection(phrases) for p in phrases[first]] + phrases.get("", [])
    return any(entry in lower and pattern.search(lower) for entry, pattern in candidates)


def c4_attributes(text: str) -> dict[str, list[list[float]]]:
    no_punct: list[list[float]] = []
    few_words: list[list[float]] = []
    javascript: list[list[float]] = []
    naughty = lorem = False
    sentences = lines = 0
    # Window by window (`taggers.text_windows`): windows end at a newline, which no rule crosses.
    for offset, piece, piece_lines in line_windows(text):
        lower = piece.lower()
        naughty = naughty or has_naughty_word(lower)
        lorem = lorem or "lorem ipsum" in lower
        any_javascript = "javascript" in lower
        kept: list[str] = []
        start = offset
        for line in piece_lines:
            end = min(start + len(line) + 1, len(text))
            stripped = line.strip()
            bad = False
            if not stripped.endswith(END_MARKS):
                no_punct.append([start, end, 1.0])
                bad = True
            if len(stripped.split(None, MIN_WORDS_PER_LINE)) < MIN_WORDS_PER_LINE:  # maxsplit: no long lists
                few_words.append([start, end, 1.0])
                bad = True
            if any_javascript and "javascript" in stripped.lower():
                javascript.append([start, end, 1.0])
                bad = True
            if not bad:
                kept.append(stripped)
            start = end
        lines += len(piece_lines)
        sentences += len(_SENTENCE_END.findall("\n".join(kept)))
    n = len(text)
    return {
        "lines_with_no_ending_punctuation": no_punct,
        "lines_with_too_few_words": few_words,
        "lines_with_javascript": javascript,
        "has_naughty_word": [[0, n, 1.0]] if naughty else [],
        "has_lorem_ipsum": [[0, n, 1.0]] if lorem else [],
        "has_curly_brace": [[0, n, 1.0]] if "{" in text else [],
        "sentence_count": [[0, n, float(sentences)]],
        "line_count": [[0, n, float(lines)]],
    }


@register_tagger("c4")
class C4Tagger(Tagger):
    attributes = ("lines_with_no_ending_punctuation", "lines_with_too_few_words", "lines_with_javascript",
                  "has_naughty_word", "has_lorem_ipsum", "has_curly_brace", "sentence_count", "line_count")

    def tag(self, doc: dict) -> dict:
        return c4_attributes(doc["text"])
