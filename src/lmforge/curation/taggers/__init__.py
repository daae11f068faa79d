"""Taggers: named functions from a document to attribute spans. They never modify documents.

A tagger returns `{attribute: [[start, end, score], ...]}`; offsets are Unicode code-point offsets into
`text`, document-level values are one span `[0, len(text), value]`. The tag stage stores them as
`"<tagger>__<attribute>"` in Dolma-layout attribute files.

Writing your own (see docs/curation.md):

    from lmforge.curation.taggers import Tagger, register_tagger

    @register_tagger("shouting")
    class Shouting(Tagger):
        attributes = ("upper_fraction",)

        def tag(self, doc):
            text = doc["text"]
            upper = sum(c.isupper() for c in text)
            return {"upper_fraction": [[0, len(text), upper / max(len(text), 1)]]}

and run `lmforge data tag --tagger-module my_taggers.py --taggers shouting ...`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import ClassVar, Iterator

from lmforge.core.errors import LmforgeError

Spans = list[list[float]]
# Long documents are measured window by window, so no tagger holds a list of all the words or lines of a
# 50 MB text. Windows end right after a newline (or any whitespace, for word statistics), which every
# built-in rule treats as a boundary, so the values equal those of the whole text in one piece.
WINDOW_CHARS = 1 << 20
LINE_END = re.compile("\n")
WHITESPACE = re.compile(r"\s")
BUILTIN_MODULES = ("gopher", "c4", "pii", "language", "repetition", "code", "classifier")

_REGISTRY: dict[str, type["Tagger"]] = {}


class Tagger:
    """Base class. `attributes` lists the attribute names the tagger can emit (`*` matches any suffix),
    which lets the mixer reject a misspelled key in a filter instead of silently matching nothing."""

    name: ClassVar[str] = ""
    attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options):
        if options:
            raise LmforgeError(f"tagger {self.name!r} takes no options (got {', '.join(sorted(options))})")

    def tag(self, doc: dict) -> dict[str, Spans]:
        raise LmforgeError(f"tagger {self.name!r} does not implement tag()")


def register_tagger(name: str):
    """Class decorator: make a Tagger subclass available under `name`."""

    def wrap(cls: type[Tagger]) -> type[Tagger]:
        if not (isinstance(cls, type) and issubclass(cls, Tagger)):
            raise LmforgeError(f"@register_tagger({name!r}) must decorate a subclass of lmforge.curation.taggers.Tagger")
        if "__" in name or not name.replace("_", "").isalnum():
            raise LmforgeError(f"bad tagger name {name!r}: use letters, digits and single underscores")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(f"lmforge.curation.taggers.{module}")


def available_taggers() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def tagger_class(name: str) -> type[Tagger]:
    _load_builtins()
    if name not in _REGISTRY:
        raise LmforgeError(f"unknown tagger {name!r}; available taggers: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_tagger(name: str, options: dict | None = None) -> Tagger:
    try:
        return tagger_class(name)(**(options or {}))
    except TypeError as e:
        raise LmforgeError(f"bad options for tagger {name!r}: {e}") from None


def load_tagger_modules(modules: list[str]) -> None:
    """Import user modules (a `.py` path or a dotted module name) so their @register_tagger classes register."""
    for module in modules:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise LmforgeError(f"tagger module not found: {module}")
            name = f"lmforge_user_taggers_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            try:
                spec.loader.exec_module(mod)
            except Exception as e:
                del sys.modules[name]
                raise LmforgeError(f"cannot import tagger module {module}: {type(e).__name__}: {e}") from None
        else:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise LmforgeError(f"cannot import tagger module {module!r}: {e}") from None


def parse_tagger_options(items: list[str]) -> dict[str, dict[str, str]]:
    """`["fasttext.model=x.bin", "fasttext.k=3"]` -> {"fasttext": {"model": "x.bin", "k": "3"}}."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        tagger, dot, option = key.partition(".")
        if not sep or not dot or not tagger or not option:
            raise LmforgeError(f"bad tagger option {item!r}: expected TAGGER.OPTION=VALUE, e.g. fasttext.model=q.bin")
        options.setdefault(tagger, {})[option] = value
    return options


def one_window(text: str) -> bool:
    return len(text) <= WINDOW_CHARS


def text_windows(text: str, boundary: re.Pattern = LINE_END) -> Iterator[tuple[int, str]]:
    """(offset, piece) of consecutive pieces of `text` of at least WINDOW_CHARS characters (the last may be
    shorter), each but the last ending right after a match of `boundary`; a short text is one piece."""
    start, n = 0, len(text)
    while n - start > WINDOW_CHARS:
        cut = boundary.search(text, start + WINDOW_CHARS - 1)
        if cut is None:
            break
        yield start, text[start:cut.end()]
        start = cut.end()
    if start < n or n == 0:
        yield start, text[start:] if start else text


def line_windows(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(offset, window, its lines): `text.split("\\n")` a window at a time; the lines of all the windows, in
    order, are those of the whole text."""
    for offset, piece in text_windows(text):
        lines = piece.split("\n")
        if offset + len(piece) < len(text):
            lines.pop()  # the window ends right after a newline; the next one starts with the line after it
        yield offset, piece, lines


def text_lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset, line) of every line of `text.split("\\n")`, a window at a time."""
    for offset, _, lines in line_windows(text):
        for line in lines:
            yield offset, line
            offset += len(line) + 1


def doc_span(text: str, value: float) -> Spans:
    return [[0, len(text), float(value)]]
