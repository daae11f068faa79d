"""Subcommands of `lmforge data` about tokens: tokenize, train-tokenizer, inspect."""

from __future__ import annotations

import argparse
import sys


def register(data_sub: argparse._SubParsersAction) -> None:
    """Add subcommands to `lmforge data`."""
    p = data_sub.add_parser(
        "tokenize", help="tokenize Dolma documents into token memmaps (.npy) with per-document sidecars",
        description="Encode each document's text, append EOS (BOS optional) and write flat uint16/uint32 token "
                    "files plus a Parquet sidecar per file (id, source, start, end, line). Resumable: finished "
                    "shards are skipped on rerun.",
    )
    p.add_argument("--documents", required=True, nargs="+", metavar="GLOB", help="Dolma document shards")
    p.add_argument("--tokenizer", required=True, metavar="NAME_OR_PATH",
                   help="'olmo', a tokenizer.json, or a directory holding one")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (one core each)")
    p.add_argument("--bos", action="store_true", help="prepend BOS to each document (EOS when the tokenizer has none)")
    p.add_argument("--max-tokens-per-file", type=int, default=1 << 30, metavar="N",
                   help="start a new token file when the next document would exceed N tokens (default 2^30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_tokenize)

    p = data_sub.add_parser(
        "train-tokenizer", help="train a byte-level BPE tokenizer on a document sample",
        description="Byte-level BPE with HF tokenizers on a seeded sample of documents. The vocabulary is padded "
                    "to a multiple of 128 and reserves EOS, PAD and the PII mask tokens.",
    )
    p.add_argument("--documents", required=True, nargs="+", metavar="GLOB", help="Dolma document shards")
    p.add_argument("--vocab-size", required=True, type=int, metavar="N", help="target vocabulary size")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (tokenizer.json, manifest.json)")
    p.add_argument("--sample-docs", type=int, default=100_000, metavar="N", help="documents to train on")
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N", help="minimum pair count for a merge")
    p.set_defaults(func=_train_tokenizer)

    p = data_sub.add_parser(
        "inspect", help="show the documents that made up a training batch",
        description="From a run directory's data.json and batches.jsonl, list every instance of the batch at a "
                    "step and the documents (id, source, shard:line, token span) it was cut from.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--step", required=True, type=int, metavar="N", help="training step (as the trainer logged it)")
    p.add_argument("--instance", type=int, metavar="I", help="only the I-th instance of the batch (0-based)")
    p.add_argument("--text", action="store_true", help="also print the decoded text of each document span")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_inspect)


def _config(cls, **kwargs):
    from lmforge.config import from_dict

    return from_dict(cls, kwargs)


def _tokenize(args: argparse.Namespace) -> int:
    from lmforge.data.tokenize import TokenizeConfig, tokenize

    config = _config(TokenizeConfig, documents=args.documents, tokenizer=args.tokenizer, out=args.out,
                     workers=args.workers, bos=args.bos, max_tokens_per_file=args.max_tokens_per_file)
    summary = tokenize(config, progress=not args.quiet)
    counts = summary["counts"]
    print(f"tokenized {counts['documents']} documents into {counts['tokens']} tokens "
          f"({counts['token_files']} files, {counts['shards_already_done']} of {counts['shards']} shards already done)")
    for name, stats in sorted(summary["sources"].items()):
        print(f"  {name}: {stats['documents']} documents, {stats['tokens']} tokens")
    _report_skips(counts.get("skipped_empty_documents", 0), counts["skipped_bad_lines"], summary["bad_lines"])
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from lmforge.data.tokenize import TrainTokenizerConfig, train_tokenizer

    config = _config(TrainTokenizerConfig, documents=args.documents, vocab_size=args.vocab_size, out=args.out,
                     sample_docs=args.sample_docs, seed=args.seed, min_frequency=args.min_frequency)
    summary = train_tokenizer(config)
    counts = summary["counts"]
    print(f"trained a {counts['vocab_size']}-token BPE tokenizer on {counts['sampled_documents']} documents "
          f"-> {args.out}/tokenizer.json")
    _report_skips(0, counts["skipped_bad_lines"], summary["bad_lines"])
    return 0


def _report_skips(empty: int, bad: int, bad_lines: list[str]) -> None:
    if empty:
        print(f"skipped {empty} empty documents", file=sys.stderr)
    if bad:
        print(f"skipped {bad} unreadable lines (invalid UTF-8, malformed JSON, missing id/text); first ones:",
              file=sys.stderr)
        for line in bad_lines[:10]:
            print(f"  {line}", file=sys.stderr)


def _inspect(args: argparse.Namespace) -> int:
    from lmforge.train.data_lineage import inspect_batch

    print(inspect_batch(args.run, args.step, instance=args.instance, text=args.text, as_json=args.json), end="")
    return 0
