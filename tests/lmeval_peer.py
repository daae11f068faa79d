"""lm-evaluation-harness as a peer: our rendered rank-classification instances as local lm-eval tasks, scored by
its hf backend in-process, offline. Used by the parity tests and `benchmarks/bench_eval.py`.

An instance with one context becomes a plain multiple-choice row (lm-eval adds the continuations' leading space
as `target_delimiter`); WinoGrande's partial scoring (one context per option, one shared continuation) becomes a
`multiple_input` row, as lm-eval's own winogrande task builds it (`doc_to_text` gives the gold index). lm-eval
reports `acc`, `acc_norm` (our `per_char_nospace`) and `acc_bytes` (our `per_byte`); for a multiple-input task
only `acc` compares, its lengths being those of the contexts. PMI's unconditional half is a second task whose
context is "Answer:", as ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHOICE_FIELDS = {"single": ("context", "choices", "gold"), "partial": ("gold", "contexts", "continuation")}
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
num_fewshot: 0
doc_to_text: {text}
doc_to_choice: {choice}
doc_to_target: {target}
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
metadata:
  version: 0
"""
# lmforge's metric equal to each lm-eval metric, for the single-context tasks
SAME_METRIC = {"acc": "acc_none", "acc_norm": "acc_per_char_nospace", "acc_bytes": "acc_per_byte"}


def is_partial(instance) -> bool:
    return len(set(instance.contexts)) > 1


def write_task(directory: Path, name: str, instances: list, context: str | None = None) -> None:
    """`name`.yaml and `name`.jsonl in `directory`; `context` replaces every context (the unconditional task)."""
    partial = any(is_partial(i) for i in instances)
    rows = []
    for inst in instances:
        assert all(k.startswith(" ") for k in inst.continuations), inst.id  # lm-eval's target_delimiter
        if partial:
            assert len(set(inst.continuations)) == 1, inst.id
            rows.append({"contexts": inst.contexts, "continuation": inst.continuations[0][1:], "gold": inst.gold})
        else:
            rows.append({"context": context if context is not None else inst.contexts[0],
                         "choices": [k[1:] for k in inst.continuations], "gold": inst.gold})
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    text, choice, target = CHOICE_FIELDS["partial" if partial else "single"]
    (directory / f"{name}.yaml").write_text(YAML.format(name=name, data=data, text=text, choice=choice,
                                                        target=target), encoding="utf-8")


def run_lm_eval(hf_dir: Path, tasks_dir: Path, names: list[str], max_length: int, batch_size: int = 1,
                softmax_dtype: str = "float32") -> tuple[dict[str, list[list[float]]], dict[str, dict]]:
    """Per-choice log-likelihoods per task (instances in order) and lm-eval's metrics per task (fp32, no BOS).

    `softmax_dtype` is lm-eval's own option for its log_softmax over the fp32 logits. "float64" makes that
    step exact: in fp32 torch's CPU log_softmax overestimates every token's log-probability (by 8e-6 on
    average over SmolLM2's 49,152-token vocabulary), so a 50-token continuation's LL drifts by 4e-4; lmforge
    takes logsumexp, which has no such bias (`lmforge.eval.scoring.token_logprobs`)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf", tasks=names, batch_size=batch_size, device="cpu", log_samples=True,
        model_args=f"pretrained={hf_dir},dtype=float32,add_bos_token=False,softmax_dtype={softmax_dtype},"
                   f"max_length={max_length}",
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    per_choice = {}
    for name in names:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        per_choice[name] = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return per_choice, out["results"]


def compare(task_name: str, ours: dict, predictions: list[dict], theirs_ll: list[list[float]], theirs: dict,
            partial: bool) -> tuple[float, dict[str, tuple[float, float]]]:
    """Largest |ΔLL| over every choice, and (ours, lm-eval's) for each metric both compute."""
    assert len(predictions) == len(theirs_ll), task_name
    diff = max(abs(a - b) for mine, lls in zip(predictions, theirs_ll)
               for a, b in zip(mine["loglikelihoods"], lls, strict=True))
    forms = ours["formulations"]["rc"]
    metrics = ("acc",) if partial else tuple(SAME_METRIC)
    return diff, {m: (forms[SAME_METRIC[m]], theirs[f"{m},none"]) for m in metrics}
