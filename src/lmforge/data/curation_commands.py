"""Subcommands of `lmforge data` for curation: tag, dedup, mix, stats (logic lives in the stage modules)."""

from __future__ import annotations

import argparse
import json
import sys


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


def register(data_sub: argparse._SubParsersAction) -> None:
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
    from lmforge.data import taggers
    from lmforge.data.taggers.runner import TagConfig, run_tag

    names = _split_list(args.taggers)
    taggers.load_tagger_modules(args.tagger_module)
    if names == ["list"]:
        print("\n".join(taggers.available_taggers()))
        return 0
    if not args.documents:
        from lmforge.errors import LmforgeError

        raise LmforgeError("lmforge data tag needs --documents GLOB")
    config = TagConfig(documents=args.documents, taggers=names, experiment=args.experiment,
                       tagger_modules=args.tagger_module,
                       tagger_options=taggers.parse_tagger_options(args.tagger_option),
                       workers=args.workers, executor=args.executor, address=args.address, overwrite=args.overwrite)
    summary = run_tag(config)
    _print_summary(summary)
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from lmforge.data.dedup import load_dedup_config, run_dedup

    flags = {"documents": args.documents, "workers": args.workers, "executor": args.executor,
             "address": args.address, "read_only": args.read_only or None, "name": args.name,
             "state": args.state, "modes": _split_list([args.modes]) if args.modes else None}
    bloom = {"expected_elements": args.expected_paragraphs, "false_positive_rate": args.false_positive_rate}
    config = load_dedup_config(args.config, flags, bloom, args.overrides)
    _print_summary(run_dedup(config))
    return 0


def _cmd_mix(args: argparse.Namespace) -> int:
    from lmforge.data.mixer import load_mixer_config, run_mix

    config = load_mixer_config(args.config, args.overrides)
    if args.workers != 1:
        config.workers = args.workers
    config.executor, config.address = args.executor, args.address
    _print_summary(run_mix(config))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from lmforge.data.stats import StatsConfig, run_stats

    strings = list(args.count)
    if args.count_file:
        from pathlib import Path

        from lmforge.errors import LmforgeError

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
    summary = run_stats(config)
    _print_summary(summary)
    return 0
