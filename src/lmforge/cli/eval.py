"""`lmforge eval MODEL ...`: downstream tasks, generative math and perplexity suites for one model directory."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--tasks", type=lambda s: [t.strip() for t in s.split(",") if t.strip()], default=[],
                   help="comma-separated task names or user task files")
    p.add_argument("--suite", choices=["olmo1", "olmes", "core"], default=None,
                   help="olmo1: the OLMo 1 paper's 9 zero-shot tasks; olmes: the OLMES 10; core: all built-in tasks")
    p.add_argument("--regime", choices=["olmo1", "olmes"], default=None,
                   help="task settings (default: the suite's, else olmes)")
    p.add_argument("--limit", type=int, default=None, help="at most N instances per task")
    p.add_argument("--ppl", nargs="+", default=[], metavar="DOCUMENT_GLOBS",
                   help="Dolma-format documents for bits per byte (quote the globs)")
    p.add_argument("--ppl-max-documents", type=int, default=None, help="score at most N documents of each --ppl file")
    p.add_argument("--all-norms", action="store_true", help="also compute PMI accuracy where it is not the rule")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override generative tasks' token budget")
    p.add_argument("--out", default=None,
                   help="write results.json, results.md, predictions/*.jsonl and a manifest here")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from lmforge.core.errors import LmforgeError
    from lmforge.eval.evaluate import EvalConfig, load_tasks, markdown_report, run_eval, write_outputs
    from lmforge.core.files import combined_hash, file_hash
    from lmforge.model.loading import load

    if not args.tasks and not args.suite and not args.ppl:
        raise LmforgeError("nothing to evaluate: give --tasks, --suite and/or --ppl")
    if args.batch_size < 1:
        raise LmforgeError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = EvalConfig(tasks=args.tasks, suite=args.suite, regime=args.regime, limit=args.limit, ppl=args.ppl,
                        ppl_max_documents=args.ppl_max_documents, batch_size=args.batch_size,
                        all_norms=args.all_norms, max_new_tokens=args.max_new_tokens)
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
    progress = not args.no_progress and sys.stderr.isatty()
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
