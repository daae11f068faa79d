"""PII spans: email addresses, phone numbers, IP addresses (regexes; the mixer replaces or drops).

Spans cover exactly the address or number (Dolma's email spans also swallow the surrounding punctuation and
whitespace). `doc_count` is the number of PII spans, the value Dolma's mixer thresholds (drop if > 5).
Phone numbers and IPs right after "isbn"/"doi" are not PII, following Dolma's post-processing.
A phone number needs separators (`555-201-3344`, `(555) 201 3344`): a bare run of ten digits is as often an
order number or a Unix time. Dolma's regex also takes bare runs after whitespace; the option
`unseparated_phones=true` counts a run of exactly ten digits after whitespace too.
"""

from __future__ import annotations

import re

from lmforge.core.errors import LmforgeError
from lmforge.curation.taggers import Tagger, register_tagger

# Patterns start with a literal or a character class and boundaries are checked in Python: a leading
# lookbehind would stop `re` from skipping ahead to candidate positions, making every scan much slower.
_EMAIL_LOCAL = re.compile(r"[\w.%+-]+\Z")
_EMAIL_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
_EMAIL_LOCAL_CHARS = re.compile(r"[\w.%+-]")
MAX_LOCAL_PART = 64
# North American numbers end in "ddd-dddd": find that tail (a class-led pattern, fast to scan for), then
# take the longest number ending there. International numbers start with "+" (found with str.find).
_NANP_TAIL = re.compile(r"\d{3}[-.\s]\d{4}(?!\w)")
_NANP = re.compile(r"(?:\+?1[-.\s]?)?(?:\(\d{3}\)[-.\s]?|\d{3}[-.\s])\d{3}[-.\s]\d{4}\Z")
_INTERNATIONAL = re.compile(r"\+\d{1,3}[-.\s]?(?:\(\d{1,4}\)[-.\s]?)?\d{1,4}(?:[-.\s]\d{2,4}){1,4}(?!\w)")
NANP_MAX_CHARS = 20
_UNSEPARATED = re.compile(r"(?<=\s)\d{10}(?![\w])")
# Dotted quads (class-led, fast to scan for); octets 0..255 without leading zeros are checked in Python.
IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
IPV6 = re.compile(r"(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:\w])")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
_HAS_DIGIT_RUN = re.compile(r"\d{3}")
_HAS_DOTTED_DIGITS = re.compile(r"\d\.\d")
_NOT_PII_CONTEXT = ("isbn", "doi")
CONTEXT_CHARS = 30
MIN_PHONE_DIGITS = 10
MAX_PHONE_DIGITS = 15


def _preceded_by(text: str, start: int, chars: str) -> bool:
    if start == 0:
        return False
    c = text[start - 1]
    return c.isalnum() or c == "_" or c in chars


def _context_excludes(text: str, start: int) -> bool:
    before = text[max(0, start - CONTEXT_CHARS):start].lower()
    return any(word in before for word in _NOT_PII_CONTEXT)


def find_emails(text: str) -> list[list[float]]:
    spans = []
    at = text.find("@")
    while at != -1:
        local = _EMAIL_LOCAL.search(text, max(0, at - MAX_LOCAL_PART), at)
        domain = _EMAIL_DOMAIN.match(text, at + 1) if local else None
        if domain and not (local.start() > 0 and _EMAIL_LOCAL_CHARS.match(text, local.start() - 1)):
            spans.append([local.start(), domain.end(), 1.0])
            at = text.find("@", domain.end())
        else:
            at = text.find("@", at + 1)
    return spans


def find_phones(text: str, unseparated: bool = False) -> list[list[float]]:
    if not _HAS_DIGIT_RUN.search(text):
        return []
    found: list[tuple[int, int]] = [m.span() for m in _UNSEPARATED.finditer(text)] if unseparated else []
    for tail in _NANP_TAIL.finditer(text):
        m = _NANP.search(text, max(0, tail.end() - NANP_MAX_CHARS), tail.end())
        if m:
            found.append((m.start(), m.end()))
    plus = text.find("+")
    while plus != -1:
        m = _INTERNATIONAL.match(text, plus)
        if m:
            found.append((m.start(), m.end()))
        plus = text.find("+", plus + 1)
    spans: list[list[float]] = []
    for start, end in sorted(found, key=lambda se: (se[0], -se[1])):
        if spans and start < spans[-1][1]:
            continue  # overlaps a longer or earlier number
        digits = sum(c.isdigit() for c in text[start:end])
        if (MIN_PHONE_DIGITS <= digits <= MAX_PHONE_DIGITS and not _preceded_by(text, start, "+")
                and not _context_excludes(text, start)):
            spans.append([start, end, 1.0])
    return spans


def _valid_octets(quad: str) -> bool:
    return all(part == "0" or (part[0] != "0" and int(part) <= 255) for part in quad.split("."))


def find_ips(text: str) -> list[list[float]]:
    spans = []
    if _HAS_DOTTED_DIGITS.search(text):
        spans += [[m.start(), m.end(), 1.0] for m in IPV4.finditer(text)
                  if _valid_octets(m.group()) and not _preceded_by(text, m.start(), ".")
                  and not _context_excludes(text, m.start())]
    if _IPV6_HINT.search(text):
        spans += [[m.start(), m.end(), 1.0] for m in IPV6.finditer(text) if not _preceded_by(text, m.start(), ":")]
    return spans


@register_tagger("pii")
class PiiTagger(Tagger):
    attributes = ("email_address", "phone_number", "ip_address", "doc_count")

    def __init__(self, unseparated_phones: str = "false"):
        if unseparated_phones not in ("true", "false"):
            raise LmforgeError(f"pii.unseparated_phones must be true or false, got {unseparated_phones!r}")
        self.unseparated_phones = unseparated_phones == "true"

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        emails, phones, ips = find_emails(text), find_phones(text, self.unseparated_phones), find_ips(text)
        return {
            "email_address": emails,
            "phone_number": phones,
            "ip_address": ips,
            "doc_count": [[0, len(text), float(len(emails) + len(phones) + len(ips))]],
        }
