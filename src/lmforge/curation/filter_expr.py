"""The mixer's filter language: small, typed, parsed here (never `eval`), compiled to closures.

    gopher__word_count < 50 or gopher__word_count > 100000
    langid__en >= 0.5 and not any(c4__has_lorem_ipsum)
    count(pii__email_address) + count(pii__phone_number) > 5
    frac(dedup__duplicate_paragraphs) > 0.3 and doc.source == "web"

Values: numbers, strings ('..' or ".."), `true`/`false`. Names:
  `<tagger>__<attribute>`  the score of the attribute's first span (0 when it has no span)
  `text_length`            characters in the document's text
  `doc.<field>[.<field>]`  a document field, e.g. `doc.source`, `doc.metadata.lang` (missing: comparisons false)
Functions of an attribute: score (first span), count (spans), sum / max / min (of scores, 0 when empty),
chars (characters covered, overlaps counted once), frac (chars / text_length), any (has a span: a condition).
Operators: `+ - * /`, `< <= > >= == !=`, `not`, `and`, `or`, parentheses. Numbers compare numerically
(`1 == 1.0`). A filter must be a condition; a misspelled attribute is an error when the attribute files
declare their keys (lmforge writes them in each attribute directory's manifest).

Dolma JSONPath filters such as `$.attributes[?(@.k && @.k[0] && @.k[0][2] >= 0.5)]` are accepted by
`compile_jsonpath`: `@.k` is "the key is present" (Dolma's rule: `"k": []` holds), `@.k[i][j]` is field j (0 start, 1 end, 2 score) of span i.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable

from lmforge.core.errors import LmforgeError

NUM, STR, BOOL, FIELD = "number", "string", "condition", "document field"
FUNCTIONS = ("score", "count", "sum", "max", "min", "chars", "frac", "any")
KEYWORDS = ("and", "or", "not", "true", "false")

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<jsonref>@(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|==|!=|&&|\|\||[-+*/<>(),!\[\]])
""", re.VERBOSE)


@dataclass
class Token:
    kind: str
    text: str
    pos: int


class Context:
    """What a filter sees for one document."""

    __slots__ = ("attributes", "doc", "text_length")

    def __init__(self, attributes: dict, doc: dict):
        self.attributes = attributes
        self.doc = doc
        self.text_length = len(doc.get("text", ""))


Compiled = Callable[[Context], Any]


def _tokenize(source: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if not m:
            raise _error(source, pos, f"unexpected character {source[pos]!r}")
        if m.lastgroup != "ws":
            tokens.append(Token(m.lastgroup, m.group(), pos))
        pos = m.end()
    tokens.append(Token("end", "", len(source)))
    return tokens


def _error(source: str, pos: int, message: str) -> LmforgeError:
    return LmforgeError(f"filter {source!r}: {message} at column {pos + 1}")


def _covered(spans: list) -> float:
    total, reach = 0.0, float("-inf")
    for start, end, *_ in sorted(spans):
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total


def _attribute_function(name: str, key: str) -> tuple[Compiled, str]:
    def spans(ctx: Context) -> list:
        return ctx.attributes.get(key) or []

    table: dict[str, tuple[Compiled, str]] = {
        "score": (lambda ctx: (spans(ctx) or [[0, 0, 0.0]])[0][2], NUM),
        "count": (lambda ctx: len(spans(ctx)), NUM),
        "sum": (lambda ctx: sum(s[2] for s in spans(ctx)), NUM),
        "max": (lambda ctx: max((s[2] for s in spans(ctx)), default=0.0), NUM),
        "min": (lambda ctx: min((s[2] for s in spans(ctx)), default=0.0), NUM),
        "chars": (lambda ctx: _covered(spans(ctx)), NUM),
        "frac": (lambda ctx: _covered(spans(ctx)) / max(ctx.text_length, 1), NUM),
        "any": (lambda ctx: bool(spans(ctx)), BOOL),
    }
    return table[name]


def _doc_field(path: list[str]) -> Compiled:
    def get(ctx: Context) -> Any:
        value: Any = ctx.doc
        for part in path:
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value

    return get


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Parser:
    def __init__(self, source: str, known_keys: list[str] | None, jsonpath: bool = False):
        self.source = source
        self.tokens = _tokenize(source)
        self.i = 0
        self.known_keys = known_keys
        self.jsonpath = jsonpath
        self.keys_used: set[str] = set()

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self, text: str | None = None, kind: str | None = None) -> Token | None:
        tok = self.tok
        if (text is not None and tok.text == text and tok.kind in ("op", "name")) or (kind and tok.kind == kind):
            self.i += 1
            return tok
        return None

    def expect(self, text: str) -> Token:
        tok = self.take(text)
        if tok is None:
            found = repr(self.tok.text) if self.tok.kind != "end" else "the end"
            raise _error(self.source, self.tok.pos, f"expected {text!r} but found {found}")
        return tok

    def check_key(self, key: str, pos: int) -> None:
        self.keys_used.add(key)
        if self.known_keys is None:
            return
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in self.known_keys):
            return
        close = difflib.get_close_matches(key, [k for k in self.known_keys if "*" not in k], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise _error(self.source, pos, f"unknown attribute {key!r} (not declared by the stream's attribute "
                                       f"files){hint}")

    # condition := and_expr ('or' and_expr)*
    def parse(self) -> Compiled:
        fn, kind = self.disjunction()
        if self.tok.kind != "end":
            raise _error(self.source, self.tok.pos, f"unexpected {self.tok.text!r}")
        if kind != BOOL:
            raise _error(self.source, 0, f"the filter is a {kind}, not a condition (compare it, e.g. `... > 0.5`)")
        return fn

    def _logical(self, op_words: tuple[str, ...], sub: Callable, combine: str) -> tuple[Compiled, str]:
        left, kind = sub()
        while True:
            tok = self.tok
            if not any(self.take(w) for w in op_words):
                return left, kind
            right, rkind = sub()
            for k, t in ((kind, tok), (rkind, tok)):
                if k != BOOL:
                    raise _error(self.source, t.pos, f"{t.text!r} needs conditions on both sides, got a {k}")
            if combine == "or":
                left = (lambda a, b: lambda ctx: a(ctx) or b(ctx))(left, right)
            else:
                left = (lambda a, b: lambda ctx: a(ctx) and b(ctx))(left, right)
            kind = BOOL

    def disjunction(self) -> tuple[Compiled, str]:
        return self._logical(("or", "||"), self.conjunction, "or")

    def conjunction(self) -> tuple[Compiled, str]:
        return self._logical(("and", "&&"), self.negation, "and")

    def negation(self) -> tuple[Compiled, str]:
        tok = self.tok
        if self.take("not") or self.take("!"):
            inner, kind = self.negation()
            if kind != BOOL:
                raise _error(self.source, tok.pos, f"'not' needs a condition, got a {kind}")
            return (lambda f: lambda ctx: not f(ctx))(inner), BOOL
        return self.comparison()

    def comparison(self) -> tuple[Compiled, str]:
        left, lkind = self.additive()
        tok = self.tok
        if tok.kind == "op" and tok.text in _COMPARE:
            self.i += 1
            right, rkind = self.additive()
            op = _COMPARE[tok.text]
            if lkind == BOOL or rkind == BOOL:
                raise _error(self.source, tok.pos, f"cannot compare a condition with {tok.text!r}")
            if STR in (lkind, rkind) and tok.text not in ("==", "!="):
                raise _error(self.source, tok.pos, f"strings can only be compared with == or !=, not {tok.text!r}")

            def compare(ctx: Context, a=left, b=right, op=op) -> bool:
                x, y = a(ctx), b(ctx)
                if x is None or y is None:
                    return False
                if _numeric(x) != _numeric(y):
                    return op is _COMPARE["!="]
                return op(x, y)

            return compare, BOOL
        return left, lkind

    def additive(self) -> tuple[Compiled, str]:
        return self._arith(("+", "-"), self.multiplicative)

    def multiplicative(self) -> tuple[Compiled, str]:
        return self._arith(("*", "/"), self.unary)

    def _arith(self, ops: tuple[str, ...], sub: Callable) -> tuple[Compiled, str]:
        left, kind = sub()
        while self.tok.kind == "op" and self.tok.text in ops:
            tok = self.tok
            self.i += 1
            right, rkind = sub()
            if kind != NUM or rkind != NUM:
                raise _error(self.source, tok.pos, f"{tok.text!r} needs numbers on both sides")
            left = {
                "+": lambda a, b: lambda ctx: a(ctx) + b(ctx),
                "-": lambda a, b: lambda ctx: a(ctx) - b(ctx),
                "*": lambda a, b: lambda ctx: a(ctx) * b(ctx),
                "/": lambda a, b: lambda ctx: (lambda d: a(ctx) / d if d else 0.0)(b(ctx)),
            }[tok.text](left, right)
        return left, kind

    def unary(self) -> tuple[Compiled, str]:
        tok = self.tok
        if self.take("-"):
            inner, kind = self.unary()
            if kind != NUM:
                raise _error(self.source, tok.pos, "unary '-' needs a number")
            return (lambda f: lambda ctx: -f(ctx))(inner), NUM
        return self.atom()

    def atom(self) -> tuple[Compiled, str]:
        tok = self.tok
        if tok.kind == "end":
            raise _error(self.source, tok.pos, "expected a value but the filter ended")
        if self.take(kind="number"):
            value = float(tok.text)
            return (lambda ctx: value), NUM
        if self.take(kind="string"):
            value = bytes(tok.text[1:-1], "utf-8").decode("unicode_escape")
            return (lambda ctx: value), STR
        if self.take("("):
            inner = self.disjunction()
            self.expect(")")
            return inner
        if self.jsonpath and tok.kind == "jsonref":
            return self.jsonref()
        if tok.kind == "name":
            self.i += 1
            return self.name(tok)
        raise _error(self.source, tok.pos, f"expected a value but found {tok.text!r}")

    def name(self, tok: Token) -> tuple[Compiled, str]:
        text = tok.text
        if text in ("true", "false"):
            value = text == "true"
            return (lambda ctx: value), BOOL
        if text in KEYWORDS:
            raise _error(self.source, tok.pos, f"expected a value but found {text!r}")
        if text == "text_length":
            return (lambda ctx: ctx.text_length), NUM
        if text.startswith("doc."):
            return _doc_field(text.split(".")[1:]), FIELD
        if self.take("("):
            if text not in FUNCTIONS:
                raise _error(self.source, tok.pos, f"unknown function {text!r}; functions: {', '.join(FUNCTIONS)}")
            arg = self.tok
            if arg.kind != "name" or "." in arg.text or arg.text in KEYWORDS:
                raise _error(self.source, arg.pos, f"{text}() takes an attribute name")
            self.i += 1
            self.expect(")")
            self.check_key(arg.text, arg.pos)
            return _attribute_function(text, arg.text)
        if "." in text:
            raise _error(self.source, tok.pos, f"unknown name {text!r} (document fields are written doc.<field>)")
        self.check_key(text, tok.pos)
        return _attribute_function("score", text)

    def jsonref(self) -> tuple[Compiled, str]:
        """`@.key` (present), or `@.key[i][j]` (field j of span i, None when absent)."""
        tok = self.tok
        self.i += 1
        key = tok.text[2:]
        self.check_key(key, tok.pos)
        indices = []
        while self.take("["):
            number = self.take(kind="number")
            if number is None or not number.text.isdigit():
                raise _error(self.source, self.tok.pos, "expected a non-negative integer index")
            indices.append(int(number.text))
            self.expect("]")
        if not indices:  # as in Dolma, the key's presence: `"k": []` holds
            return (lambda ctx: ctx.attributes.get(key) is not None), BOOL
        if len(indices) == 1:
            i = indices[0]
            return (lambda ctx: len(ctx.attributes.get(key) or []) > i), BOOL
        if len(indices) != 2 or indices[1] > 2:
            raise _error(self.source, tok.pos, "a span field is written @.key[span][0|1|2]")
        i, j = indices

        def field(ctx: Context) -> Any:
            spans = ctx.attributes.get(key) or []
            return spans[i][j] if len(spans) > i else None

        return field, NUM


def compile_filter(source: str, known_keys: list[str] | None = None) -> Compiled:
    """Compile a filter expression to `fn(Context) -> bool`; errors name the column."""
    return _filter_parser(source, known_keys)[0]


def _filter_parser(source: str, known_keys: list[str] | None) -> tuple[Compiled, _Parser]:
    if not isinstance(source, str) or not source.strip():
        raise LmforgeError(f"filter must be a non-empty string, got {source!r}")
    parser = _Parser(source, known_keys)
    return parser.parse(), parser


def attribute_keys(source: str, jsonpath: bool = False) -> set[str]:
    """The attribute keys a (valid) filter reads."""
    if jsonpath:
        return _jsonpath_parser(source, None)[1].keys_used
    return _filter_parser(source, None)[1].keys_used


_JSONPATH = re.compile(r"^\$@?\.attributes\[\?\((?P<body>.*)\)\]$", re.DOTALL)


def compile_jsonpath(source: str, known_keys: list[str] | None = None) -> Compiled:
    """Compile a Dolma JSONPath filter `$.attributes[?( ... )]` (it matches when its condition holds)."""
    return _jsonpath_parser(source, known_keys)[0]


def _jsonpath_parser(source: str, known_keys: list[str] | None) -> tuple[Compiled, _Parser]:
    m = _JSONPATH.match(source.strip()) if isinstance(source, str) else None
    if not m:
        raise LmforgeError(f"JSONPath filter {source!r}: expected the form $.attributes[?(<condition>)]")
    parser = _Parser(m.group("body"), known_keys, jsonpath=True)
    try:
        return parser.parse(), parser
    except LmforgeError as e:
        raise LmforgeError(f"JSONPath {e}") from None


def jsonpath_span_key(path: str) -> str:
    """`$.attributes.pii__email_address` -> `pii__email_address` (Dolma span_replacement syntax)."""
    m = re.fullmatch(r"\$\.attributes\.([A-Za-z_][A-Za-z0-9_]*)", path.strip())
    if not m:
        raise LmforgeError(f"span {path!r}: expected an attribute name or $.attributes.<name>")
    return m.group(1)
