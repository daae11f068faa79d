"""Value equivalence of two MATH answers: `\\frac{270}7` = `\\frac{270}{7}`, `-0.5` = `-\\frac12`, `2\\sqrt2` = `\\sqrt8`.

A small LaTeX-subset parser (numbers, letters and Greek variables, `+ - * / ^`, `\\frac`, `\\sqrt[n]`, `\\pi`,
`\\sin`..`\\ln`, braces, parentheses, implicit products) evaluates both answers in complex doubles at three fixed
points of their variables; equal values at every point (relative 1e-9) means equivalent — the polynomial
identity test, not `sympy.simplify`. Tuples and intervals compare item by item with the same brackets.

Time is bounded without signals or threads, so it holds in worker processes and threads alike: answers over
200 characters are not parsed, exponents above 10^4 in magnitude are refused, and a wall-clock deadline
(`DEADLINE_SECONDS`) is checked at every token. Anything outside the subset is "not equivalent".
"""

from __future__ import annotations

import cmath
import math
import random
import re
import time

MAX_CHARS = 200
MAX_EXPONENT = 1e4
DEADLINE_SECONDS = 0.5
POINTS = 3
TOLERANCE = 1e-9

TOKEN = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|\S")
FUNCTIONS = {"\\sin": cmath.sin, "\\cos": cmath.cos, "\\tan": cmath.tan, "\\ln": cmath.log, "\\log": cmath.log10,
             "\\exp": cmath.exp}
GREEK = {"\\alpha", "\\beta", "\\gamma", "\\delta", "\\theta", "\\lambda", "\\mu", "\\phi", "\\omega", "\\sigma"}
PRODUCTS = {"*", "\\cdot", "\\times"}
CLOSERS = {"(": ")", "[": "]", "{": "}"}


class Unsupported(Exception):
    """The answer is outside the parsed subset, too large, or out of time."""


class Expression:
    """One answer parsed into a function of its variables."""

    def __init__(self, text: str, deadline: float):
        self.tokens = TOKEN.findall(text)
        self.deadline = deadline
        self.variables: set[str] = set()
        self.pos = 0
        self.tree = self.sum()
        if self.pos != len(self.tokens):
            raise Unsupported(text)

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        if time.monotonic() > self.deadline:
            raise Unsupported("out of time")
        token = self.peek()
        if token is None:
            raise Unsupported("unexpected end")
        self.pos += 1
        return token

    def expect(self, token: str) -> None:
        if self.take() != token:
            raise Unsupported(f"expected {token}")

    def sum(self):
        terms = [("+", self.product())]
        while self.peek() in ("+", "-"):
            terms.append((self.take(), self.product()))
        return ("sum", terms)

    def product(self):
        factors = [("*", self.signed())]
        while True:
            token = self.peek()
            if token in PRODUCTS or token == "/":
                self.take()
                factors.append(("/" if token == "/" else "*", self.signed()))
            elif self.starts_atom(token):
                factors.append(("*", self.power()))
            else:
                return ("product", factors)

    def signed(self):
        if self.peek() in ("+", "-"):
            sign = self.take()
            inner = self.signed()
            return ("neg", inner) if sign == "-" else inner
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == "^":
            self.take()
            return ("pow", base, self.argument())
        return base

    @staticmethod
    def starts_atom(token: str | None) -> bool:
        if token is None:
            return False
        return token[0].isdigit() or token[0] == "." or token.isalpha() or token in ("(", "{") or (
            token.startswith("\\") and token not in PRODUCTS)

    def argument(self):
        """A LaTeX macro argument: a braced group, else one digit, letter or command."""
        token = self.peek()
        if token == "{":
            return self.atom()
        if token is not None and token[0].isdigit():
            self.take()
            if len(token) > 1:  # \frac27: the argument is the first digit, the rest stays for what follows
                self.tokens.insert(self.pos, token[1:])
            return ("number", float(token[0]))
        return self.atom()

    def atom(self):
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return ("number", float(token))
        if token in CLOSERS and token != "[":
            inner = self.sum()
            self.expect(CLOSERS[token])
            return inner
        if token == "\\frac":
            return ("product", [("*", self.argument()), ("/", self.argument())])
        if token == "\\sqrt":
            root = ("number", 2.0)
            if self.peek() == "[":
                self.take()
                root = self.sum()
                self.expect("]")
            return ("root", self.argument(), root)
        if token == "\\pi":
            return ("number", math.pi)
        if token in FUNCTIONS:
            return ("call", token, self.power())
        if (len(token) == 1 and token.isalpha()) or token in GREEK:
            self.variables.add(token)
            return ("variable", token)
        raise Unsupported(token)


def evaluate(node, point: dict[str, complex]) -> complex:
    kind = node[0]
    if kind == "number":
        return complex(node[1])
    if kind == "variable":
        return point[node[1]]
    if kind == "neg":
        return -evaluate(node[1], point)
    if kind == "sum":
        return sum((evaluate(t, point) if op == "+" else -evaluate(t, point)) for op, t in node[1])
    if kind == "product":
        value = complex(1)
        for op, factor in node[1]:
            x = evaluate(factor, point)
            value = value * x if op == "*" else value / x
        return value
    if kind == "pow":
        base, exponent = evaluate(node[1], point), evaluate(node[2], point)
        if abs(exponent) > MAX_EXPONENT:
            raise Unsupported("exponent too large")
        return base ** exponent
    if kind == "root":
        degree = evaluate(node[2], point)
        radicand = evaluate(node[1], point)
        if degree.imag == 0 and degree.real % 2 == 1 and radicand.imag == 0:  # real odd root: \sqrt[3]{-8} = -2
            return complex(math.copysign(abs(radicand.real) ** (1 / degree.real), radicand.real))
        return radicand ** (1 / degree)
    if kind == "call":
        return FUNCTIONS[node[1]](evaluate(node[2], point))
    raise Unsupported(kind)


def split_items(text: str) -> tuple[str, list[str], str]:
    """`(1,2)` -> ("(", ["1", "2"], ")"); the brackets are kept only when they enclose the whole answer."""
    opener, closer = "", ""
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]":
        depth = 0
        for i, ch in enumerate(text):
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth == 0 and i < len(text) - 1:
                break
        else:
            opener, closer, text = text[0], text[-1], text[1:-1]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return opener, items, closer


def values_equal(a: complex, b: complex) -> bool:
    if not (cmath.isfinite(a) and cmath.isfinite(b)):
        return False
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))


def equivalent(a: str, b: str) -> bool:
    """Whether two canonical MATH answers have the same value (tuples: item by item)."""
    if len(a) > MAX_CHARS or len(b) > MAX_CHARS:
        return False
    deadline = time.monotonic() + DEADLINE_SECONDS
    open_a, items_a, close_a = split_items(a)
    open_b, items_b, close_b = split_items(b)
    if (open_a, close_a, len(items_a)) != (open_b, close_b, len(items_b)):
        return False
    try:
        for x, y in zip(items_a, items_b):
            first, second = Expression(x, deadline), Expression(y, deadline)
            names = sorted(first.variables | second.variables)
            rng = random.Random(0)
            for _ in range(POINTS):
                point = {name: complex(rng.uniform(0.5, 2.5), 0) for name in names}
                if time.monotonic() > deadline or not values_equal(evaluate(first.tree, point),
                                                                   evaluate(second.tree, point)):
                    return False
    except (Unsupported, ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return False
    return True
