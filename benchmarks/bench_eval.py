"""Rank classification, lmforge eval vs lm-evaluation-harness: same model, instances and CPU; speed and agreement.

Default: a tiny random OLMo-2-shaped model with the OLMo tokenizer is exported to HF format; both tools score
the same rendered instances (OLMo 1 zero-shot ARC-Easy, HellaSwag, PIQA and the OLMES 5-shot ARC-Challenge
cloze prompts) with the same batch size. With `--model DIR` (an lmforge model directory, e.g. an imported GGUF)
that model is exported and scored instead, on `--tasks` under `--regime`; `--ours DIR` takes lmforge's side from
an `lmforge eval --out DIR` run of the same model, tasks, regime and limit instead of scoring it again.
lm-eval runs through local YAML tasks (`tests/lmeval_peer.py`: `simple_evaluate`, hf backend, fp32, no BOS;
WinoGrande as lm-eval's multiple-input task; PMI's unconditional half as a task whose context is "Answer:").
Reported per task: lmforge's and lm-eval's `acc` and `acc_norm` (our per_char_nospace), lmforge's accuracy
under the regime's own rule, the largest per-choice |ΔLL|; then instances/s of each and the ratio.

    .venv/bin/python benchmarks/bench_eval.py --instances 100 --batch-size 16
    .venv/bin/python benchmarks/bench_eval.py --model smollm2/model --tasks arc_easy,piqa --regime olmo1 --instances 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.eval.evaluate import evaluate_tasks
from lmforge.eval.tasks import UNCOND_CONTEXT, Task, load_task
from lmforge.model.directory import build_model, load_model_dir, save_model_dir
from lmforge.model.hf import export_hf
from lmforge.model.presets import get_preset
from lmforge.tokens.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lmeval_peer import compare, is_partial, run_lm_eval, write_task  # noqa: E402

TASKS = [("arc_easy", "olmo1"), ("hellaswag", "olmo1"), ("piqa", "olmo1"), ("arc_challenge", "olmes")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=100, help="per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="an lmforge model directory (default: a random olmo2-tiny)")
    parser.add_argument("--tasks", default=None, help="with --model: comma-separated task names")
    parser.add_argument("--regime", default="olmo1", help="with --model: the tasks' regime")
    parser.add_argument("--ours", default=None, help="with --model: an `lmforge eval --out` directory to compare")
    parser.add_argument("--softmax-dtype", default="float32", choices=("float32", "float64"),
                        help="lm-eval's log_softmax dtype; float64 removes the bias of torch's fp32 one on CPU "
                             "(tests/lmeval_peer.py), leaving only the two forward passes' fp32 differences")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    if args.model:
        model, tokenizer = load_model_dir(args.model)
        specs = [(name, args.regime) for name in (args.tasks or "arc_easy").split(",")]
    else:
        model, tokenizer = build_model(get_preset("olmo2-tiny"), seed=0), Tokenizer.load("olmo")
        save_model_dir(model, work / "model", tokenizer)
        specs = TASKS
    export_hf(model, tokenizer, work / "hf")
    max_length = model.config.max_sequence_length
    del model

    tasks = [Task(name, regime, load_task(name, regime, args.instances).formulations[:1])  # cloze only
             for name, regime in specs]
    pmi = [t.name for t in tasks if t.formulations[0].normalization == "pmi"]
    for task in tasks:
        write_task(work, task.name, task.formulations[0].instances)
        if task.name in pmi:
            write_task(work, f"{task.name}_uncond", task.formulations[0].instances, context=UNCOND_CONTEXT)
    names = [t.name for t in tasks] + [f"{n}_uncond" for n in pmi]

    start = time.perf_counter()
    peer_ll, peer = run_lm_eval(work / "hf", work, names, max_length, args.batch_size, args.softmax_dtype)
    peer_seconds = time.perf_counter() - start

    # Both timings are end to end: lm-eval's includes loading the model and its task data, so ours does too.
    start = time.perf_counter()
    if args.ours:
        results = json.loads((Path(args.ours) / "results.json").read_text(encoding="utf-8"))["tasks"]
        predictions = {t.name: [json.loads(line) for line in open(Path(args.ours) / "predictions" / f"{t.name}.jsonl",
                                                                   encoding="utf-8")] for t in tasks}
    else:
        model, tokenizer = load_model_dir(args.model or work / "model")
        tasks = [Task(t.name, t.regime, load_task(t.name, t.regime, args.instances).formulations[:1]) for t in tasks]
        results, predictions = evaluate_tasks(model, tokenizer, tasks, batch_size=args.batch_size)
    our_seconds = time.perf_counter() - start
    n_instances = sum(len(t.formulations[0].instances) for t in tasks)

    print("| task | n | lmforge acc | lm-eval acc | lmforge acc_norm | lm-eval acc_norm | lmforge, regime's rule "
          "| max \\|ΔLL\\| |")
    print("|---|---|---|---|---|---|---|---|")
    max_diff, same_acc = 0.0, True
    for task in tasks:
        partial = is_partial(task.formulations[0].instances[0])
        diff, metrics = compare(task.name, results[task.name], predictions[task.name], peer_ll[task.name],
                                peer[task.name], partial)
        if task.name in pmi:
            diff = max(diff, max(abs(a - b) for mine, lls in zip(predictions[task.name], peer_ll[f"{task.name}_uncond"])
                                 for a, b in zip(mine["loglikelihoods_uncond"], lls)))
        max_diff = max(max_diff, diff)
        same_acc &= all(abs(a - b) < 1e-12 for a, b in metrics.values())
        norm = metrics.get("acc_norm", ("-", "-"))
        form = results[task.name]["formulations"]["rc"]
        print(f"| {task.name} | {form['n']} | {metrics['acc'][0]:.4f} | {metrics['acc'][1]:.4f} | "
              + " | ".join(f"{x:.4f}" if isinstance(x, float) else x for x in norm)
              + f" | {form['acc']:.4f} ({form['normalization']}) | {diff:.1e} |")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch threads {args.threads}, "
          f"batch size {args.batch_size}, {n_instances} instances")
    print(f"lm-eval : {peer_seconds:7.2f}s  {n_instances / peer_seconds:8.1f} instances/s")
    if not args.ours:
        print(f"lmforge : {our_seconds:7.2f}s  {n_instances / our_seconds:8.1f} instances/s")
        print(f"speedup : {peer_seconds / our_seconds:.2f}x")
    print(f"max |ΔLL| {max_diff:.2e}   identical accuracies: {same_acc}")


if __name__ == "__main__":
    main()
