"""GSM8K and MATH answer checkers (reused as verifiable rewards)."""

import pytest

from lmforge.eval.answers import (
    extract_last_number,
    gsm8k_is_correct,
    last_boxed,
    math_answer,
    math_is_correct,
    math_is_equiv,
)


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day. So the answer is 18.", "18"),
    ("The total is 1,234 dollars.", "1234"),
    ("It drops to -5 degrees", "-5"),
    ("The answer is 3.50.", "3.5"),
    ("no numbers here", None),
    ("12 apples and then 7", "7"),
])
def test_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_gsm8k_correctness():
    assert gsm8k_is_correct("Janet sells 9 eggs. 9 * 2 = 18. So the answer is 18.", "18")
    assert gsm8k_is_correct("So the answer is $1,000.", "1000")
    assert gsm8k_is_correct("So the answer is 18.0", "#### 18")
    assert not gsm8k_is_correct("So the answer is 18. Then 19", "18")
    assert not gsm8k_is_correct("I do not know", "18")


def test_boxed_extraction_balances_braces():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$ and") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{{2}+3}") == "{2}+3"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed("nothing") is None


def test_math_answer_fallbacks():
    assert math_answer(r"Therefore $\boxed{10}$.") == "10"
    assert math_answer(r"Final Answer: The final answer is $-\frac{2}{3}$. I hope it is correct.") == r"-\frac{2}{3}"
    assert math_answer(r"we get $x=4$ and so $7$") == "7"


@pytest.mark.parametrize("a,b", [
    (r"\frac12", r"\frac{1}{2}"), (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("0.5", r"\frac{1}{2}"), ("1/2", r"\frac{1}{2}"),
    (r"10\text{ inches}", "10"), (r"5^\circ", "5"), ("x = 3", "3"), (r"\left(1, 2\right)", "(1,2)"),
    ("1,000", "1000"), (r"50\%", "50"), (r"\$20", "20"), (r"\sqrt2", r"\sqrt{2}"),
])
def test_math_equivalent_spellings(a, b):
    assert math_is_equiv(a, b)


@pytest.mark.parametrize("a,b", [("2", "3"), (r"\frac{1}{3}", r"\frac{1}{2}"), ("(1,2)", "(2,1)"), (None, "1")])
def test_math_different_answers(a, b):
    assert not math_is_equiv(a, b)


def test_math_correct_on_a_minerva_style_generation():
    generation = r"The difference between 36 and 26 is $\boxed{10}$."
    assert math_is_correct(generation, "10") and not math_is_correct(generation, "11")


def test_gsm8k_numbers_beyond_float_range():
    """Numbers past float's ~1e308 are compared exactly (a reward must never raise)."""
    big = "1" + "0" * 400
    assert extract_last_number(f"So the answer is {big[:1]},{big[1:4]}{big[4:]}.") == big
    assert gsm8k_is_correct(f"So the answer is {big}.", big)
    assert not gsm8k_is_correct(f"So the answer is {big[:-1]}1.", big)
    assert gsm8k_is_correct(f"So the answer is {big}.50", f"#### {big}.5")


@pytest.mark.parametrize("a,b", [
    (r"\frac{270}{7}", r"\frac{270}7"), ("-0.5", r"-\frac12"), (r"\frac{2}{4}", r"\frac12"), (r"2\sqrt2", r"\sqrt8"),
    (r"\sqrt[3]{-8}", "-2"), ("2x+1", "1+x\\cdot2"), (r"\frac{\pi}{2}", r"\frac12\pi"), ("(0.5,4)", r"(\frac12,2^2)"),
    ("10", "10.0"), (r"\frac{\sqrt3}{3}", r"\frac1{\sqrt3}"),
])
def test_math_equal_values(a, b):
    assert math_is_equiv(a, b)


@pytest.mark.parametrize("a,b", [
    (r"\frac{270}{7}", r"\frac{27}{7}"), ("x", "y"), ("x^2", "2x"), (r"\sqrt8", "3"), ("(1,2)", "[1,2)"),
    ("(1,2)", "(1,2,3)"), (r"\infty", "1"), ("2^{100000}", "2^{100000}+1"), (r"\frac{1}{0}", r"\frac{1}{0}+1"),
])
def test_math_different_values(a, b):
    assert not math_is_equiv(a, b)


def test_math_equivalence_time_is_bounded():
    """A tower of exponents or a long answer is refused quickly, not computed (no signals: works in threads)."""
    import threading
    import time

    results = []
    thread = threading.Thread(target=lambda: results.append(
        (math_is_equiv("10^{10^{10^{10}}}", "10^{10^{10^{10}}}+1"), math_is_equiv("1+" * 150 + "1", "301"))))
    start = time.monotonic()
    thread.start()
    thread.join()
    assert results == [(False, False)] and time.monotonic() - start < 2
