"""Rank-classification throughput: lmforge eval vs lm-evaluation-harness, same model, instances and CPU.

A tiny random OLMo-2-shaped model with the OLMo tokenizer is exported to HF format; both tools score the same
rendered instances (OLMo 1 zero-shot ARC-Easy, HellaSwag, PIQA and the OLMES 5-shot ARC-Challenge cloze
prompts) with the same batch size. lm-eval runs through a local YAML task per task (`simple_evaluate`,
hf backend, fp32, no BOS). Reported: instances/s of each, the ratio, and whether per-choice log-likelihoods
agree within 1e-4 and accuracies are identical.

    .venv/bin/python benchmarks/bench_eval.py --instances 100 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lmforge.eval.evaluate import evaluate_tasks
from lmforge.eval.tasks import Task, load_task
from lmforge.model.directory import build_model, load_model_dir, save_model_dir
from lmforge.model.hf import export_hf
from lmforge.model.presets import get_preset
from lmforge.tokens.tokenizer import Tokenizer

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
num_fewshot: 0
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
metadata:
  version: 0
"""
TASKS = [("arc_easy", "olmo1"), ("hellaswag", "olmo1"), ("piqa", "olmo1"), ("arc_challenge", "olmes")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=100, help="per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    config = get_preset("olmo2-tiny")
    model, tokenizer = build_model(config, seed=0), Tokenizer.load("olmo")
    save_model_dir(model, work / "model", tokenizer)
    export_hf(model, tokenizer, work / "hf")

    for name, regime in TASKS:
        instances = load_task(name, regime, args.instances).formulations[0].instances
        rows = [{"context": i.contexts[0], "choices": [k[1:] for k in i.continuations], "gold": i.gold}
                for i in instances]
        assert all(len(set(i.contexts)) == 1 and all(k.startswith(" ") for k in i.continuations) for i in instances)
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (work / f"{name}.yaml").write_text(YAML.format(name=f"peer_{name}", data=work / f"{name}.jsonl"))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    peer = simple_evaluate(model="hf", tasks=[f"peer_{n}" for n, _ in TASKS], batch_size=args.batch_size,
                           device="cpu", log_samples=True,
                           model_args=f"pretrained={work / 'hf'},dtype=float32,add_bos_token=False,"
                                      f"softmax_dtype=float32,max_length={config.max_sequence_length}",
                           task_manager=TaskManager(include_path=str(work), include_defaults=False))
    peer_seconds = time.perf_counter() - start

    # Both timings are end to end: lm-eval's includes loading the model and its task data, so ours does too.
    start = time.perf_counter()
    model, tokenizer = load_model_dir(work / "model")
    tasks = [Task(name, regime, load_task(name, regime, args.instances).formulations[:1])  # cloze only
             for name, regime in TASKS]
    ours, predictions = evaluate_tasks(model, tokenizer, tasks, batch_size=args.batch_size)
    our_seconds = time.perf_counter() - start
    n_instances = sum(len(t.formulations[0].instances) for t in tasks)

    max_diff, same_acc = 0.0, True
    for name, _ in TASKS:
        samples = sorted(peer["samples"][f"peer_{name}"], key=lambda s: s["doc_id"])
        for mine, theirs in zip(predictions[name], samples):
            lls = [float(r[0]) for r in theirs["filtered_resps"]]
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(mine["loglikelihoods"], lls)))
        their_acc = peer["results"][f"peer_{name}"]["acc,none"]
        our_acc = ours[name]["formulations"]["rc"]["acc_none"]
        same_acc &= abs(their_acc - our_acc) < 1e-12
        print(f"{name:14s} n={ours[name]['n']:4d}  acc ours {our_acc:.4f}  lm-eval {their_acc:.4f}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch threads {args.threads}, "
          f"batch size {args.batch_size}, {n_instances} instances")
    print(f"lm-eval : {peer_seconds:7.2f}s  {n_instances / peer_seconds:8.1f} instances/s")
    print(f"lmforge : {our_seconds:7.2f}s  {n_instances / our_seconds:8.1f} instances/s")
    print(f"speedup : {peer_seconds / our_seconds:.2f}x   max |ΔLL| {max_diff:.2e}   identical accuracies: {same_acc}")


if __name__ == "__main__":
    main()
