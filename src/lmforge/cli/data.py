"""`lmforge data ...`: curation (tag, dedup, mix, stats, decontaminate) and tokens (tokenize, train-tokenizer,
inspect). Argument wiring only: flags are generated from each stage's config (`cli/options.py`) and the work
is done by `lmforge.curation` and `lmforge.tokens`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.cli.options import Flag, add_config_flags, config_from_args, flag_values
from lmforge.core.errors import LmforgeError

DOCUMENTS = Flag("Dolma document globs (quote them)", metavar="GLOB")
EXECUTOR = {
    "executor.workers": Flag("parallel processes, one shard per task", metavar="N"),
    "executor.kind": Flag("local processes, or Ray tasks (the same command across machines)", flag="--executor"),
    "executor.address": Flag("Ray cluster address (e.g. auto or ray://host:10001)"),
    "executor.progress": "a progress bar when stderr is a terminal",
}
INPUT = {
    "input.strict": "a truncated compressed input, or a shard of an lmforge output directory without its "
                    "completion mark, is an error (exit 2) instead of a warning",
}


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="curate documents, tokenize them, inspect training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    _register_curation(data_sub)
    _register_tokens(data_sub)


def _print_summary(summary: dict) -> None:
    json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    _warn_about_inputs(summary)


def _warn_about_inputs(summary: dict) -> None:
    """One line per truncated input and one for the shards left out for want of a completion mark."""
    from lmforge.curation.documents import incomplete_shards_message

    for truncation in summary.get("truncated", []):
        print(f"lmforge: warning: {truncation}; every complete line before it was kept (--strict makes this an "
              "error)", file=sys.stderr)
    if summary.get("incomplete_shards"):
        print(f"lmforge: warning: {incomplete_shards_message(summary['incomplete_shards'])}", file=sys.stderr)


def _register_curation(data_sub: argparse._SubParsersAction) -> None:
    from lmforge.curation.decontaminate import DecontaminationConfig
    from lmforge.curation.dedup import DedupConfig
    from lmforge.curation.mixer import MixerConfig
    from lmforge.curation.stats import StatsConfig
    from lmforge.curation.taggers.runner import TagConfig

    tag = data_sub.add_parser(
        "tag", help="run taggers over documents, writing Dolma-layout attribute files",
        description="Run taggers over document shards. Each tagger writes attributes/<tagger>/<shard> beside "
                    "documents/ (or attributes/<experiment>/ for all). Finished shards are skipped.")
    add_config_flags(tag, TagConfig, {
        "documents": DOCUMENTS,
        "taggers": Flag("tagger names, comma-separated or repeated (`--taggers list` lists them)", commas=True),
        "experiment": "write all taggers into attributes/<experiment>/",
        "tagger_modules": Flag("Python file or module defining @register_tagger classes (repeatable)",
                               flag="--tagger-module"),
        "overwrite": "re-tag shards that are already done",
        **INPUT,
        "max_document_bytes": Flag("do not tag documents over N bytes of text: they get only "
                                   "<tagger>__document_too_large and are counted (0: no limit)", metavar="N"),
        **EXECUTOR,
    }, overrides=True)
    tag.add_argument("--tagger-option", action="append", default=[], metavar="TAGGER.OPTION=VALUE",
                     help="an option of one tagger, e.g. fasttext.model=quality.bin (repeatable)")
    tag.set_defaults(func=cmd_tag)

    dedup = data_sub.add_parser(
        "dedup", help="exact document/URL, Bloom-filter paragraph, MinHash near-duplicate and repeated-substring "
                      "detection",
        description="Mark duplicates as attributes (attributes/<name>/): exact documents, URLs, paragraphs "
                    "(persisted Bloom filter), near-duplicate clusters (MinHash+LSH, verified pairs), repeated "
                    "substrings (suffix array). The first occurrence in source order is kept. The mixer decides "
                    "what to drop.")
    dedup.add_argument("--config", default=None, help="YAML DedupConfig (flags and overrides win)")
    add_config_flags(dedup, DedupConfig, {
        "documents": DOCUMENTS,
        "modes": Flag("subset of doc,url,paragraph,minhash,substring (comma-separated)", commas=True),
        "name": "attribute name",
        "state": "directory holding the persisted dedup state (Bloom filter, hashes); pass the same one to dedup "
                 "a new crawl against earlier ones",
        "read_only": "check against the state without adding to it",
        "bloom.expected_elements": Flag("Bloom filter capacity", flag="--expected-paragraphs"),
        "bloom.false_positive_rate": "Bloom filter target false-positive rate",
        **INPUT,
        **EXECUTOR,
    }, overrides=True)
    dedup.set_defaults(func=cmd_dedup)

    mix = data_sub.add_parser(
        "mix", help="filter, edit and sample documents by their attributes into new shards",
        description="Run a mixer config: streams of documents joined with their attributes, include/exclude "
                    "expressions, span replacement, sampling, output shards of a target size.")
    mix.add_argument("config", help="mixer YAML (see configs/data/*mix*.yaml and docs/curation.md)")
    add_config_flags(mix, MixerConfig, {"seed": "seed of the sampling", **INPUT, **EXECUTOR}, overrides=True)
    mix.set_defaults(func=cmd_mix)

    stats = data_sub.add_parser(
        "stats", help="corpus analysis: counts, lengths, languages, top n-grams, duplicates, string counts",
        description="WIMBD-style analysis of document shards: JSON report plus PNG plots (with matplotlib).")
    add_config_flags(stats, StatsConfig, {
        "documents": DOCUMENTS,
        "out": Flag("report directory", deprecated=("--output",)),
        "count_strings": Flag("strings to count across the corpus (repeatable; e.g. an eval question)",
                              flag="--count"),
        "top_k": "top n-grams to report",
        "ngram_sizes": Flag("n-gram sizes", flag="--ngram"),
        "tokenizer": "tokenizer for token counts (default: whitespace words)",
        "langid": "the fastText language distribution",
        "plots": "PNG plots beside the JSON",
        **INPUT,
        **EXECUTOR,
    }, overrides=True)
    stats.add_argument("--count-file", default=None, help="file with one string to count per line")
    stats.set_defaults(func=cmd_stats)

    decon = data_sub.add_parser(
        "decontaminate", help="mark or remove training documents containing evaluation paragraphs (13+ words)",
        description="Build a paragraph filter from evaluation texts (built-in or user tasks, held-out documents) "
                    "and mark (Dolma attributes for the mixer) or remove training documents that contain any "
                    "of its paragraphs. Counts per source are printed.")
    add_config_flags(decon, DecontaminationConfig, {
        "documents": Flag("training document globs (repeatable)", metavar="GLOB"),
        "tasks": Flag("evaluation tasks, comma-separated (default: every built-in task when no --eval-documents)",
                      commas=True),
        "eval_documents": Flag("held-out document globs (repeatable)", metavar="GLOB"),
        "min_words": "shortest paragraph put in the filter",
        "mode": "mark (attributes for the mixer) or remove (clean copies in --out)",
        "name": "attribute name (mark mode)",
        "out": "output directory for the clean documents (remove mode)",
        "overwrite": "redo shards already marked",
        **EXECUTOR,
    }, overrides=True)
    decon.set_defaults(func=cmd_decontaminate)


def cmd_tag(args: argparse.Namespace) -> int:
    from lmforge.curation import taggers
    from lmforge.curation.taggers.runner import TagConfig, run_tag

    given = flag_values(args)
    taggers.load_tagger_modules(given.get("tagger_modules", []))
    if given.get("taggers") == ["list"]:
        print("\n".join(taggers.available_taggers()))
        return 0
    config = config_from_args(TagConfig, args, tagger_options=taggers.parse_tagger_options(args.tagger_option))
    _print_summary(run_tag(config))
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from lmforge.curation.dedup import DedupConfig, run_dedup

    _print_summary(run_dedup(config_from_args(DedupConfig, args, args.config)))
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from lmforge.curation.mixer import MixerConfig, run_mix

    _print_summary(run_mix(config_from_args(MixerConfig, args, args.config)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from lmforge.curation.stats import StatsConfig, run_stats

    fixed = {}
    if args.count_file:
        try:
            lines = Path(args.count_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise LmforgeError(f"cannot read --count-file {args.count_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise LmforgeError(f"--count-file {args.count_file} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        fixed["count_strings"] = flag_values(args).get("count_strings", []) + [s for s in lines if s.strip()]
    config = config_from_args(StatsConfig, args, **fixed)
    tokenizer = None
    if config.tokenizer:
        from lmforge.tokens.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(config.tokenizer)
    _print_summary(run_stats(config, tokenizer))
    return 0


def cmd_decontaminate(args: argparse.Namespace) -> int:
    from lmforge.curation.decontaminate import DecontaminationConfig, decontaminate, format_counts
    from lmforge.eval.tasks import BUILTIN, task_texts

    given = flag_values(args)
    fixed = {} if "tasks" in given or "eval_documents" in given else {"tasks": sorted(BUILTIN)}
    config = config_from_args(DecontaminationConfig, args, **fixed)
    summary = decontaminate(config, task_texts(config.tasks), log=lambda msg: print(msg, file=sys.stderr))
    print("\n".join(format_counts(summary)), file=sys.stderr)
    _print_summary(summary)
    return 0


def _register_tokens(data_sub: argparse._SubParsersAction) -> None:
    from lmforge.tokens.tokenize import TokenizeConfig, TrainTokenizerConfig

    p = data_sub.add_parser(
        "tokenize", help="tokenize Dolma documents into token memmaps (.npy) with per-document sidecars",
        description="Encode each document's text, append EOS (BOS optional) and write flat uint16/uint32 token "
                    "files plus a Parquet sidecar per file (id, source, start, end, line). Resumable: finished "
                    "shards are skipped on rerun. Runs on local processes or Ray, like every data stage.")
    add_config_flags(p, TokenizeConfig, {
        "documents": DOCUMENTS,
        "tokenizer": Flag("'olmo', a tokenizer.json, or a directory holding one", metavar="NAME_OR_PATH"),
        "out": Flag("output directory", metavar="DIR"),
        "bos": "prepend BOS to each document (EOS when the tokenizer has none)",
        "max_tokens_per_file": Flag("start a new token file when the next document would exceed N tokens",
                                    metavar="N"),
        **INPUT,
        **EXECUTOR,
    }, overrides=True)
    p.add_argument("--quiet", dest="config:executor.progress", action="store_false", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the spelling before --no-progress
    p.set_defaults(func=cmd_tokenize)

    p = data_sub.add_parser(
        "train-tokenizer", help="train a byte-level BPE tokenizer on a document sample",
        description="Byte-level BPE with HF tokenizers on a seeded sample of documents. The vocabulary is padded "
                    "to a multiple of 128 and reserves EOS, PAD and the PII mask tokens.")
    add_config_flags(p, TrainTokenizerConfig, {
        "documents": DOCUMENTS,
        "vocab_size": Flag("target vocabulary size", metavar="N"),
        "out": Flag("output directory (tokenizer.json, manifest.json)", metavar="DIR"),
        "sample_docs": Flag("documents to train on", metavar="N"),
        "seed": "seed of the document sample",
        "min_frequency": Flag("minimum pair count for a merge", metavar="N"),
    }, overrides=True)
    p.set_defaults(func=cmd_train_tokenizer)

    p = data_sub.add_parser(
        "inspect", help="show the documents that made up a training batch",
        description="From a run directory's data.json and batches.jsonl, list every instance of the batch at a "
                    "step and the documents (id, source, shard:line, token span) it was cut from.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--step", required=True, type=int, metavar="N", help="training step (as the trainer logged it)")
    p.add_argument("--instance", type=int, metavar="I", help="only the I-th instance of the batch (0-based)")
    p.add_argument("--text", action="store_true", help="also print the decoded text of each document span")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_inspect)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from lmforge.tokens.tokenize import TokenizeConfig, tokenize

    summary = tokenize(config_from_args(TokenizeConfig, args))
    counts = summary["counts"]
    print(f"tokenized {counts['documents']} documents into {counts['tokens']} tokens "
          f"({counts['token_files']} files, {counts['shards_already_done']} of {counts['shards']} shards already done)")
    for name, stats in sorted(summary["sources"].items()):
        print(f"  {name}: {stats['documents']} documents, {stats['tokens']} tokens")
    _report_skips(counts.get("skipped_empty_documents", 0), counts["skipped_bad_lines"], summary["bad_lines"])
    _warn_about_inputs(summary)
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from lmforge.tokens.tokenize import TrainTokenizerConfig, train_tokenizer

    config = config_from_args(TrainTokenizerConfig, args)
    summary = train_tokenizer(config)
    counts = summary["counts"]
    print(f"trained a {counts['vocab_size']}-token BPE tokenizer on {counts['sampled_documents']} documents "
          f"-> {config.out}/tokenizer.json")
    _report_skips(0, counts["skipped_bad_lines"], summary["bad_lines"])
    _warn_about_inputs(summary)
    return 0


def _report_skips(empty: int, bad: int, bad_lines: list[str]) -> None:
    if empty:
        print(f"skipped {empty} empty documents", file=sys.stderr)
    if bad:
        print(f"skipped {bad} unreadable lines (invalid UTF-8, malformed JSON, missing id/text); first ones:",
              file=sys.stderr)
        for line in bad_lines[:10]:
            print(f"  {line}", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> int:
    from lmforge.tokens.lineage import inspect_batch

    print(inspect_batch(args.run, args.step, instance=args.instance, text=args.text, as_json=args.json), end="")
    return 0
