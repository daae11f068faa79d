"""`lmforge eval MODEL ...`: downstream tasks, generative math and perplexity suites for one model directory."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli.options import Flag, add_config_flags, add_model_source_flags, config_from_args
from lmforge.eval.config import EvalConfig


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
    add_model_source_flags(p)
    add_config_flags(p, EvalConfig, {
        "tasks": Flag("task names or user task files, comma-separated or repeated", commas=True),
        "suite": "olmo1: the OLMo 1 paper's 9 zero-shot tasks; olmes: the OLMES 10; core: all built-in tasks",
        "regime": "task settings (default: the suite's, else olmes)",
        "limit": Flag("at most N instances per task", metavar="N"),
        "ppl": Flag("Dolma-format documents for bits per byte (quote the globs)", metavar="GLOB"),
        "ppl_max_documents": Flag("score at most N documents of each --ppl file", metavar="N"),
        "ppl_stride": Flag("tokens between perplexity windows: each window predicts N new tokens with the "
                           "rest of the context as history (default: half the context; the context: "
                           "lm-eval's disjoint windows)", metavar="N"),
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
    p.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "baselines", help="bits per byte of a unigram model and of gzip/zstd on held-out documents",
        description="What a model must beat on held-out documents: a unigram model of the training tokens "
                    "(add-one smoothed) and gzip/zstd compressing each document, as bits per byte per source "
                    "(the numbers `lmforge eval --ppl` reports for a model).")
    b.add_argument("--tokens", nargs="+", required=True, metavar="PATH",
                   help="the token directories (or .npy files, globs) the model trained on")
    b.add_argument("--ppl", nargs="+", required=True, metavar="GLOB", help="held-out Dolma-format documents")
    b.add_argument("--tokenizer", default=None, help="default: the one `lmforge data tokenize` kept with the tokens")
    b.add_argument("--out", required=True, help="write results.json and a manifest here")
    b.set_defaults(func=cmd_baselines)


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.eval.evaluate import evaluate_model, markdown_report

    results = evaluate_model(args.model, config_from_args(EvalConfig, args), step=args.step, tokenizer=args.tokenizer,
                             device=args.device, dtype=args.dtype, out=args.out, progress=args.progress)
    print(markdown_report(results), end="")
    skipped = results["perplexity"]["read_report"] if results.get("perplexity") else None
    if skipped and skipped["skipped"]:
        print(f"skipped {skipped['skipped']} unreadable lines in the --ppl documents; first: {skipped['bad_lines'][0]}",
              file=sys.stderr)
    timing = results["timing"]
    if timing["instances"]:
        print(f"\n{timing['instances']} instances in {timing['task_seconds']:.1f}s "
              f"({timing['instances_per_second']:.1f}/s)" + (f"; results in {args.out}" if args.out else ""))
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    from lmforge.eval.baselines import run_baselines

    results = run_baselines(args.tokens, args.ppl, args.out, tokenizer=args.tokenizer)
    print("| source | documents | bytes | unigram bpb | gzip bpb | zstd bpb |\n|---|---|---|---|---|---|")
    for source, row in results["sources"].items():
        print(f"| {source} | {row['documents']:,} | {row['bytes']:,} | {row['unigram_bits_per_byte']:.4f} | "
              f"{row['gzip_bits_per_byte']:.4f} | {row['zstd_bits_per_byte']:.4f} |")
    return 0
