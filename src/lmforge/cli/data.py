"""`lmforge data ...`: curation (tag, dedup, mix, stats, decontaminate) and tokens (tokenize, train-tokenizer,
inspect). Argument wiring only: the work is done by `lmforge.curation` and `lmforge.tokens`."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="curate documents, tokenize them, inspect training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    _register_curation(data_sub)
    _register_tokens(data_sub)
    _register_decontaminate(data_sub)


def _split_list(values: list[str] | None) -> list[str]:
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel processes (one shard per task)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local processes, or Ray tasks (the same command across machines)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto or ray://host:10001)")


def _print_summary(summary: dict) -> None:
    json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def _register_curation(data_sub: argparse._SubParsersAction) -> None:
    """Add subcommands to `lmforge data`."""
    tag = data_sub.add_parser(
        "tag", help="run taggers over documents, writing Dolma-layout attribute files",
        description="Run taggers over document shards. Each tagger writes attributes/<tagger>/<shard> beside "
                    "documents/ (or attributes/<experiment>/ for all). Finished shards are skipped.")
    tag.add_argument("--documents", action="append", help="document glob (repeatable; required unless listing)")
    tag.add_argument("--taggers", action="append", help="comma-separated tagger names (`--taggers list` lists them)")
    tag.add_argument("--experiment", default=None, help="write all taggers into attributes/<experiment>/")
    tag.add_argument("--tagger-module", action="append", default=[],
                     help="Python file or module defining @register_tagger classes (repeatable)")
    tag.add_argument("--tagger-option", action="append", default=[],
                     help="TAGGER.OPTION=VALUE, e.g. fasttext.model=quality.bin (repeatable)")
    tag.add_argument("--overwrite", action="store_true", help="re-tag shards that are already done")
    _add_executor_args(tag)
    tag.set_defaults(func=_cmd_tag)

    dedup = data_sub.add_parser(
        "dedup", help="exact document/URL, Bloom-filter paragraph and MinHash near-duplicate detection",
        description="Mark duplicates as attributes (attributes/<name>/): exact documents, URLs, paragraphs "
                    "(persisted Bloom filter), near-duplicate documents (MinHash+LSH). The first occurrence "
                    "in shard order is kept. The mixer decides what to drop.")
    dedup.add_argument("--documents", action="append", required=True, help="document glob (repeatable)")
    dedup.add_argument("--config", default=None, help="YAML DedupConfig (flags and overrides win)")
    dedup.add_argument("--modes", default=None, help="comma-separated subset of doc,url,paragraph,minhash")
    dedup.add_argument("--name", default=None, help="attribute name (default: dedup)")
    dedup.add_argument("--state", default=None,
                       help="directory holding the persisted dedup state (Bloom filter, hashes); pass the same "
                            "one to dedup a new crawl against earlier ones")
    dedup.add_argument("--read-only", action="store_true", help="check against the state without adding to it")
    dedup.add_argument("--expected-paragraphs", type=int, default=None, help="Bloom filter capacity")
    dedup.add_argument("--false-positive-rate", type=float, default=None, help="Bloom filter target FP rate")
    dedup.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. minhash.bands=20")
    _add_executor_args(dedup)
    dedup.set_defaults(func=_cmd_dedup)

    mix = data_sub.add_parser(
        "mix", help="filter, edit and sample documents by their attributes into new shards",
        description="Run a mixer config: streams of documents joined with their attributes, include/exclude "
                    "expressions, span replacement, sampling, output shards of a target size.")
    mix.add_argument("config", help="mixer YAML (see configs/data/*mix*.yaml and docs/curation.md)")
    mix.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. output.path=out/")
    _add_executor_args(mix)
    mix.set_defaults(func=_cmd_mix)

    stats = data_sub.add_parser(
        "stats", help="corpus analysis: counts, lengths, languages, top n-grams, duplicates, string counts",
        description="WIMBD-style analysis of document shards: JSON report plus PNG plots (with matplotlib).")
    stats.add_argument("--documents", action="append", required=True, help="document glob (repeatable)")
    stats.add_argument("--output", required=True, help="report directory")
    stats.add_argument("--count", action="append", default=[],
                       help="string to count across the corpus (repeatable; e.g. an eval question)")
    stats.add_argument("--count-file", default=None, help="file with one string to count per line")
    stats.add_argument("--top-k", type=int, default=20, help="top n-grams to report")
    stats.add_argument("--ngram", type=int, action="append", default=None, help="n-gram sizes (default 1, 2, 3)")
    stats.add_argument("--tokenizer", default=None, help="tokenizer for token counts (default: whitespace words)")
    stats.add_argument("--no-langid", action="store_true", help="skip the fastText language distribution")
    stats.add_argument("--no-plots", action="store_true", help="JSON only")
    _add_executor_args(stats)
    stats.set_defaults(func=_cmd_stats)


def _cmd_tag(args: argparse.Namespace) -> int:
    from lmforge.curation import taggers
    from lmforge.curation.taggers.runner import TagConfig, run_tag

    names = _split_list(args.taggers)
    taggers.load_tagger_modules(args.tagger_module)
    if names == ["list"]:
        print("\n".join(taggers.available_taggers()))
        return 0
    if not args.documents:
        from lmforge.core.errors import LmforgeError

        raise LmforgeError("lmforge data tag needs --documents GLOB")
    config = TagConfig(documents=args.documents, taggers=names, experiment=args.experiment,
                       tagger_modules=args.tagger_module,
                       tagger_options=taggers.parse_tagger_options(args.tagger_option),
                       workers=args.workers, executor=args.executor, address=args.address, overwrite=args.overwrite)
    summary = run_tag(config)
    _print_summary(summary)
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from lmforge.curation.dedup import load_dedup_config, run_dedup

    flags = {"documents": args.documents, "workers": args.workers, "executor": args.executor,
             "address": args.address, "read_only": args.read_only or None, "name": args.name,
             "state": args.state, "modes": _split_list([args.modes]) if args.modes else None}
    bloom = {"expected_elements": args.expected_paragraphs, "false_positive_rate": args.false_positive_rate}
    config = load_dedup_config(args.config, flags, bloom, args.overrides)
    _print_summary(run_dedup(config))
    return 0


def _cmd_mix(args: argparse.Namespace) -> int:
    from lmforge.curation.mixer import load_mixer_config, run_mix

    config = load_mixer_config(args.config, args.overrides)
    if args.workers != 1:
        config.workers = args.workers
    config.executor, config.address = args.executor, args.address
    _print_summary(run_mix(config))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from lmforge.curation.stats import StatsConfig, run_stats

    strings = list(args.count)
    if args.count_file:
        from pathlib import Path

        from lmforge.core.errors import LmforgeError

        try:
            strings += [s for s in Path(args.count_file).read_text(encoding="utf-8").splitlines() if s.strip()]
        except OSError as e:
            raise LmforgeError(f"cannot read --count-file {args.count_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise LmforgeError(f"--count-file {args.count_file} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    config = StatsConfig(documents=args.documents, output=args.output, count_strings=strings, top_k=args.top_k,
                         ngram_sizes=args.ngram or [1, 2, 3], tokenizer=args.tokenizer, langid=not args.no_langid,
                         plots=not args.no_plots, workers=args.workers, executor=args.executor,
                         address=args.address)
    tokenizer = None
    if args.tokenizer:
        from lmforge.tokens.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    summary = run_stats(config, tokenizer)
    _print_summary(summary)
    return 0


def _register_tokens(data_sub: argparse._SubParsersAction) -> None:
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
    from lmforge.core.config import from_dict

    return from_dict(cls, kwargs)


def _tokenize(args: argparse.Namespace) -> int:
    from lmforge.tokens.tokenize import TokenizeConfig, tokenize

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
    from lmforge.tokens.tokenize import TrainTokenizerConfig, train_tokenizer

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
    from lmforge.tokens.lineage import inspect_batch

    print(inspect_batch(args.run, args.step, instance=args.instance, text=args.text, as_json=args.json), end="")
    return 0


def _register_decontaminate(data_sub: argparse._SubParsersAction) -> None:
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
    from lmforge.curation.decontaminate import DecontaminationConfig, decontaminate, format_counts
    from lmforge.eval.tasks import BUILTIN, task_texts

    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    else:
        tasks = [] if args.eval_documents else sorted(BUILTIN)
    config = DecontaminationConfig(documents=args.documents, tasks=tasks, eval_documents=args.eval_documents,
                                   min_words=args.min_words, mode=args.mode, name=args.name, out=args.out,
                                   overwrite=args.overwrite)
    summary = decontaminate(config, task_texts(tasks), log=lambda msg: print(msg, file=sys.stderr))
    print("\n".join(format_counts(summary)), file=sys.stderr)
    json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
