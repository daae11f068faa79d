"""Answer checkers for generative math: pure functions of strings, reused as verifiable rewards in adaptation.

GSM8K: the answer is the last number in the generation (commas, `$` and a trailing period ignored), compared
numerically with the gold number. MATH: the answer is taken from the last `\\boxed{...}`, else the Minerva
phrase "final answer is X", else the last `$...$`; both sides are normalised (Minerva's
`normalize_final_answer`, then Hendrycks' `is_equiv` string canonicalisation) and compared as strings, then
by value (math_equiv.py: `\\frac{2}{4}` = `0.5`, `2\\sqrt2` = `\\sqrt8`, tuples item by item).
"""

from __future__ import annotations

import decimal
import re

from lmforge.eval import math_equiv

NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_last_number(text: str) -> str | None:
    """The last number in `text` as a canonical string ("1,000.50" -> "1000.5"), or None."""
    matches = [m for m in NUMBER.findall(text.replace("$", "")) if any(c.isdigit() for c in m)]
    if not matches:
        return None
    return canonical_number(matches[-1])


def canonical_number(text: str) -> str | None:
    """Exact decimal spelling without trailing zeros ("18.0" -> "18"); decimals, not floats, so a
    400-digit number neither overflows nor collides with its neighbours."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    exact = decimal.Context(prec=len(text) + 2, traps=[decimal.InvalidOperation])
    try:
        value = exact.create_decimal(text)
    except decimal.InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return "0" if value.is_zero() else format(exact.normalize(value), "f")


def gsm8k_answer(generation: str) -> str | None:
    """What a GSM8K generation answers: the last number it states."""
    return extract_last_number(generation)


def gsm8k_is_correct(generation: str, gold: str) -> bool:
    predicted = gsm8k_answer(generation)
    expected = canonical_number(gold.split("####")[-1])
    return predicted is not None and expected is not None and predicted == expected


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (braces balanced) or `\\boxed x`, or `\\fbox{...}`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed "):
        return rest[len("\\boxed "):].split("$")[0].strip()
    brace = rest.find("{")
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1:i]
    return None


FINAL_ANSWER = re.compile(r"final answer is\s*\$?(.*?)\$?\s*\.?\s*I hope", re.DOTALL)
DOLLARS = re.compile(r"\$([^$]+)\$")


def math_answer(generation: str) -> str | None:
    """The answer a MATH generation gives: boxed, else Minerva's "final answer is", else the last $...$."""
    boxed = last_boxed(generation)
    if boxed is not None:
        return boxed
    match = FINAL_ANSWER.search(generation)
    if match:
        return match.group(1).strip()
    spans = DOLLARS.findall(generation)
    return spans[-1] if spans else None


# Minerva (Lewkowycz et al. 2022, appendix D.1) final-answer normalisation.
SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
    "\\dots",
]
THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+")


def normalize_final_answer(answer: str) -> str:
    # \left/\right go first: Minerva's unit list removes "ft", which would turn "\left(" into "\le(".
    answer = answer.replace("\\left", "").replace("\\right", "").split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in REMOVED_EXPRESSIONS:
        answer = answer.replace(expression, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    # \frac1{\sqrt3} and \sqrt[3]{8}: Minerva's shorthand rules would brace the "{" or "[" that follows
    answer = re.sub(r"(frac)([^{])(?!\{)(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(frac)([^{])(?=\{)", "frac{\\2}", answer)
    answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", answer)
    answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if THOUSANDS.fullmatch(answer):  # 100,000 -> 100000, but the tuple 0,1 stays a tuple
        answer = answer.replace(",", "")
    return answer.strip()


def _fix_fracs(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, tail = part[0], part[1], part[2:]
        out += "{" + a + "}" + ("{" + b + "}" + tail if b != "{" else b + tail)
    return out


def _fix_slash_fraction(s: str) -> str:
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    if re.fullmatch(r"-?\d+", a) and re.fullmatch(r"\d+", b):
        return "\\frac{" + a + "}{" + b + "}"
    return s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def canonical_math(s: str) -> str:
    """Hendrycks et al.'s `strip_string`: remove layout, units and equivalent spellings."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}\s*$", "", s) if re.search(r"\d", s) else s
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_slash_fraction(s)
    return s


def math_is_equiv(predicted: str | None, gold: str | None) -> bool:
    """Whether two MATH answers are the same after Minerva normalisation and Hendrycks canonicalisation."""
    if predicted is None or gold is None:
        return False
    a = canonical_math(normalize_final_answer(predicted))
    b = canonical_math(normalize_final_answer(gold))
    return a == b or math_equiv.equivalent(a, b)


def math_is_correct(generation: str, gold: str) -> bool:
    return math_is_equiv(math_answer(generation), gold)
