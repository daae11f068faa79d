"""`lmforge data decontaminate`: mark or remove training documents that contain evaluation paragraphs."""

from __future__ import annotations

import argparse
import json
import sys


def register(data_sub: argparse._SubParsersAction) -> None:
    """Add `decontaminate` to `lmforge data`."""
    p = data_sub.add_parser(
        "decontaminate", help="mark or remove training documents containing evaluation paragraphs (13+ words)",
        description="Build a paragraph filter from evaluation texts (built-in or user tasks, held-out documents) "
                    "and mark (Dolma attributes for the mixer) or remove training documents that contain any "
                    "of its paragraphs. Counts per source are printed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--documents", action="append", required=True, help="training document glob (repeatable)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated evaluation tasks (default: every built-in task when no --eval-documents)")
    p.add_argument("--eval-documents", action="append", default=[], help="held-out document glob (repeatable)")
    p.add_argument("--min-words", type=int, default=13, help="shortest paragraph put in the filter")
    p.add_argument("--mode", choices=["mark", "remove"], default="mark")
    p.add_argument("--name", default="decontamination", help="attribute name (mark mode)")
    p.add_argument("--out", default=None, help="output directory for clean documents (remove mode)")
    p.add_argument("--overwrite", action="store_true", help="redo shards already marked")
    p.set_defaults(func=run_decontaminate)


def run_decontaminate(args: argparse.Namespace) -> int:
    from lmforge.eval.decontaminate import DecontaminationConfig, decontaminate, format_counts
    from lmforge.eval.tasks import BUILTIN

    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    else:
        tasks = [] if args.eval_documents else sorted(BUILTIN)
    config = DecontaminationConfig(documents=args.documents, tasks=tasks, eval_documents=args.eval_documents,
                                   min_words=args.min_words, mode=args.mode, name=args.name, out=args.out,
                                   overwrite=args.overwrite)
    summary = decontaminate(config, log=lambda msg: print(msg, file=sys.stderr))
    print("\n".join(format_counts(summary)), file=sys.stderr)
    json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
