"""`lmforge adapt sft / dpo / rlvr / data`: post-training (chat templates, SFT, DPO, RLVR; docs/adapt.md)."""

from __future__ import annotations

import argparse
import os

from lmforge.cli.options import add_out_flag, out_of
from lmforge.cli.rlvr import add_nproc_flag, launched, register_rlvr, register_rlvr_data, register_score


def register(sub: argparse._SubParsersAction) -> None:
    adapt = sub.add_parser("adapt", help="post-train a model: SFT, DPO, RL with verifiable rewards (docs/adapt.md)")
    stages = adapt.add_subparsers(dest="adapt_command", metavar="ADAPT_COMMAND")
    stages.required = True
    for name, help in (("sft", "supervised fine-tuning on chat records (assistant tokens only)"),
                       ("dpo", "direct preference optimisation on (prompt, chosen, rejected) records")):
        stage = stages.add_parser(name, help=help,
                                  description=f"{help}. A YAML config (see configs/adapt/) plus dotted overrides "
                                              "(e.g. out=runs/sft max_steps=10); rerunning resumes. Writes OUT/model.")
        stage.add_argument("config", help="adaptation config YAML (see configs/adapt/)")
        stage.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-5 epochs=1")
        add_nproc_flag(stage)
        stage.set_defaults(func=cmd_stage, stage=name)
    register_rlvr(stages)
    register_score(stages)

    data = stages.add_parser("data", help="build SFT, DPO or RLVR record files (JSONL) from installed data or your own")
    builders = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    builders.required = True
    # The sources are checked by the builder (importing it here would load torch for every command line).
    for name, sources, help in (("sft", "arithmetic, basic_arithmetic, gsm8k, math, jsonl", "SFT records ({messages})"),
                                ("dpo", "arithmetic, mmlu, jsonl", "DPO records ({prompt, chosen, rejected})")):
        builder = builders.add_parser(name, help=help)
        builder.add_argument("--source", required=True, help=f"where the records come from: {sources} (docs/adapt.md)")
        builder.add_argument("--input", default=None, help="input file (source jsonl, gsm8k, math)")
        builder.add_argument("--limit", type=int, default=None, help="at most this many records")
        builder.add_argument("--seed", type=int, default=0, help="which wrong answers pair with the right one")
        add_out_flag(builder, "output JSONL file")
        builder.set_defaults(func=cmd_data, kind=name)
    register_rlvr_data(builders)


def cmd_stage(args: argparse.Namespace) -> int:
    from lmforge.core.config import load_config

    if args.stage == "sft":
        from lmforge.adapt.config import SFTConfig as Config
        from lmforge.adapt.sft import sft as run
    else:
        from lmforge.adapt.config import DPOConfig as Config
        from lmforge.adapt.dpo import dpo as run
    from lmforge.train.distributed import shutdown_distributed

    config = load_config(Config, args.config, args.overrides)
    code = launched(args, args.stage, config.out, config.check_world_size)
    if code is not None:
        return code
    try:
        out = run(config)
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote model directory {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lmforge.adapt.builders import build

    out = out_of(args)
    report = build(args.kind, args.source, out, input_path=args.input, limit=args.limit, seed=args.seed)
    print(f"wrote {report.documents:,} records to {out}" + (f" ({report.skipped:,} skipped)" if report.skipped else ""))
    return 0
