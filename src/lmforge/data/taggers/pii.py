"""PII spans: email addresses, phone numbers, IP addresses (regexes; the mixer replaces or drops).

Spans cover exactly the address or number (Dolma's email spans also swallow the surrounding punctuation and
whitespace). `doc_count` is the number of PII spans, the value Dolma's mixer thresholds (drop if > 5).
Phone numbers and IPs right after "isbn"/"doi" are not PII, following Dolma's post-processing.
"""

from __future__ import annotations

import re

from lmforge.data.taggers import Tagger, register_tagger

EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+?1[-.\s]?)?(?:\(\d{3}\)[-.\s]?|\d{3}[-.\s])\d{3}[-.\s]\d{4}"  # North American, separated
    r"|\+\d{1,3}[-.\s]?(?:\(\d{1,4}\)[-.\s]?)?\d{1,4}(?:[-.\s]\d{2,4}){1,4}"  # international, leading +
    r")(?![\w])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:\w])")
_HAS_DIGIT_RUN = re.compile(r"\d{3}")
_HAS_DOTTED_DIGITS = re.compile(r"\d\.\d")
_NOT_PII_CONTEXT = ("isbn", "doi")
CONTEXT_CHARS = 30
MIN_PHONE_DIGITS = 10
MAX_PHONE_DIGITS = 15


def _context_excludes(text: str, start: int) -> bool:
    before = text[max(0, start - CONTEXT_CHARS):start].lower()
    return any(word in before for word in _NOT_PII_CONTEXT)


def find_emails(text: str) -> list[list[float]]:
    if "@" not in text:
        return []
    return [[m.start(), m.end(), 1.0] for m in EMAIL.finditer(text)]


def find_phones(text: str) -> list[list[float]]:
    if not _HAS_DIGIT_RUN.search(text):
        return []
    spans = []
    for m in PHONE.finditer(text):
        digits = sum(c.isdigit() for c in m.group())
        if MIN_PHONE_DIGITS <= digits <= MAX_PHONE_DIGITS and not _context_excludes(text, m.start()):
            spans.append([m.start(), m.end(), 1.0])
    return spans


def find_ips(text: str) -> list[list[float]]:
    spans = []
    if _HAS_DOTTED_DIGITS.search(text):
        spans += [[m.start(), m.end(), 1.0] for m in IPV4.finditer(text) if not _context_excludes(text, m.start())]
    if text.count(":") >= 7:
        spans += [[m.start(), m.end(), 1.0] for m in IPV6.finditer(text)]
    return spans


@register_tagger("pii")
class PiiTagger(Tagger):
    attributes = ("email_address", "phone_number", "ip_address", "doc_count")

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        emails, phones, ips = find_emails(text), find_phones(text), find_ips(text)
        return {
            "email_address": emails,
            "phone_number": phones,
            "ip_address": ips,
            "doc_count": [[0, len(text), float(len(emails) + len(phones) + len(ips))]],
        }
