"""`lmforge eval MODEL ...`: downstream tasks, generative math and perplexity suites for one model directory."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli.options import Flag, add_config_flags, config_from_args
from lmforge.eval.evaluate import EvalConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the top-level parser."""
    p = sub.add_parser(
        "eval", help="evaluate a model: downstream tasks (rank classification, generative math) and bits per byte",
        description="Evaluate a model directory on downstream tasks (OLMo 1 or OLMES regime) and on Dolma-format "
                    "documents (Paloma-style bits per byte per source and domain). Built-in tasks: arc_easy, "
                    "arc_challenge, boolq, copa, csqa, hellaswag, mmlu, openbookqa, piqa, sciq, socialiqa, "
                    "winogrande, gsm8k, minerva_math; a path ending in .yaml or .jsonl is a user task "
                    "(see docs/evaluation.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="model directory, training run (latest checkpoint) or checkpoint, or transformers directory")
    p.add_argument("--step", type=int, default=None, help="with a run directory: the checkpoint of this step")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's, else the run's)")
    add_config_flags(p, EvalConfig, {
        "tasks": Flag("task names or user task files, comma-separated or repeated", commas=True),
        "suite": "olmo1: the OLMo 1 paper's 9 zero-shot tasks; olmes: the OLMES 10; core: all built-in tasks",
        "regime": "task settings (default: the suite's, else olmes)",
        "limit": Flag("at most N instances per task", metavar="N"),
        "ppl": Flag("Dolma-format documents for bits per byte (quote the globs)", metavar="GLOB"),
        "ppl_max_documents": Flag("score at most N documents of each --ppl file", metavar="N"),
        "all_norms": "also compute PMI accuracy where it is not the rule",
        "max_new_tokens": Flag("override generative tasks' token budget", metavar="N"),
        "batch_size": Flag("contexts per forward pass", metavar="N"),
    })
    p.add_argument("--out", default=None,
                   help="write results.json, results.md, predictions/*.jsonl and a manifest here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar when stderr is a terminal")
    p.set_defaults(func=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from lmforge.core.errors import LmforgeError
    from lmforge.eval.evaluate import load_tasks, markdown_report, run_eval, write_outputs
    from lmforge.core.files import combined_hash, file_hash
    from lmforge.model.loading import load

    config = config_from_args(EvalConfig, args)
    tasks = load_tasks(config)  # before the model: bad task names and files fail fast
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise LmforgeError(f"device {device!r} is not usable: {e}") from None
    loaded = load(args.model, args.step, device=device, dtype=getattr(torch, args.dtype), tokenizer=args.tokenizer,
                  require_tokenizer=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    model_info = {"path": str(args.model), "source": str(loaded.path), "kind": loaded.kind, "step": loaded.step,
                  "hash": combined_hash(loaded.weight_files), "config": model.config.__dict__,
                  "tokenizer": tokenizer.source, "tokenizer_hash": file_hash(tokenizer.source), "device": device,
                  "dtype": args.dtype}
    progress = args.progress
    results = run_eval(model, tokenizer, config, tasks, model_info, progress=progress)
    table = markdown_report(results)
    if args.out:
        task_files = [f.source for t in tasks for f in t.formulations if Path(f.source).is_file()]
        ppl_files = results["perplexity"]["inputs"] if results.get("perplexity") else []
        write_outputs(results, Path(args.out), config, [*map(str, loaded.weight_files), *task_files, *ppl_files])
    print(table, end="")
    skipped = results["perplexity"]["read_report"] if results.get("perplexity") else None
    if skipped and skipped["skipped"]:
        print(f"skipped {skipped['skipped']} unreadable lines in the --ppl documents; first: {skipped['bad_lines'][0]}",
              file=sys.stderr)
    timing = results["timing"]
    if timing["instances"]:
        print(f"\n{timing['instances']} instances in {timing['task_seconds']:.1f}s "
              f"({timing['instances_per_second']:.1f}/s)" + (f"; results in {args.out}" if args.out else ""))
    return 0
