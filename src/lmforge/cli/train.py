"""`lmforge train`, `lmforge checkpoint export`, `lmforge soup`."""

from __future__ import annotations

import argparse
import os

from lmforge.cli.options import add_model_source_flags, add_out_flag, out_of
from lmforge.core.errors import LmforgeError


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="pretrain (or anneal) a model from a training config",
        description="Train from a YAML config plus dotted overrides (e.g. optimizer.lr=1e-3 run_dir=runs/a). "
                    "Rerunning the same command resumes from the run's latest complete checkpoint. Under "
                    "torchrun (or with --nproc) the same command trains data-parallel.")
    train.add_argument("config", help="training config YAML (see configs/train/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_steps=100 optimizer.lr=3e-4")
    train.add_argument("--nproc", type=int, default=None,
                       help="launch this many processes on this node through torchrun")
    train.add_argument("--nnodes", default="1", help="with --nproc: number of nodes (or MIN:MAX for elastic)")
    train.add_argument("--rdzv-endpoint", default=None, help="with --nproc on several nodes: HOST:PORT")
    train.add_argument("--rdzv-id", default="lmforge", help="with --nproc on several nodes: a job id")
    train.add_argument("--max-restarts", type=int, default=0,
                       help="with --nproc: restart crashed workers this many times (they resume by themselves)")
    train.set_defaults(func=cmd_train)

    checkpoint = sub.add_parser("checkpoint", help="training checkpoints: list, export to a model directory")
    ck_sub = checkpoint.add_subparsers(dest="checkpoint_command", metavar="CHECKPOINT_COMMAND")
    ck_sub.required = True
    export = ck_sub.add_parser("export", help="write a checkpoint as a model directory (config.json + safetensors)")
    export.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    add_out_flag(export, "output model directory")
    add_model_source_flags(export)
    export.set_defaults(func=cmd_checkpoint_export)
    listing = ck_sub.add_parser("list", help="complete checkpoints of a run")
    listing.add_argument("run_dir")
    listing.set_defaults(func=cmd_checkpoint_list)

    soup = sub.add_parser("soup", help="average checkpoints of one model into a model directory")
    soup.add_argument("checkpoints", nargs="+", help="checkpoints, run directories or model directories")
    soup.add_argument("--out", required=True, help="output model directory")
    soup.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint (normalised)")
    soup.add_argument("--tokenizer", default=None, help="tokenizer to store (default: the first input's)")
    soup.set_defaults(func=cmd_soup)


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc is not None and args.nproc < 1:
        raise LmforgeError(f"--nproc must be at least 1, got {args.nproc}")
    from lmforge.core.config import load_config
    from lmforge.train.config import TrainConfig

    config = load_config(TrainConfig, args.config, args.overrides)
    if args.nproc is not None and "TORCHELASTIC_RUN_ID" not in os.environ:
        from lmforge.train.distributed import launch_torchrun
        from lmforge.train.trainer import preflight

        min_nodes = int(str(args.nnodes).split(":")[0])
        preflight(config, world_size=args.nproc * min_nodes, local_world_size=args.nproc)
        return launch_torchrun(["train", args.config, *args.overrides], nproc=args.nproc, run_dir=config.run_dir,
                               nnodes=args.nnodes, max_restarts=args.max_restarts, rdzv_endpoint=args.rdzv_endpoint,
                               rdzv_id=args.rdzv_id)
    from lmforge.train.distributed import shutdown_distributed
    from lmforge.train.trainer import train

    try:
        summary = train(config, command=" ".join(["lmforge", "train", args.config, *args.overrides]))
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {summary['steps']} steps, {summary['tokens']:,} tokens"
              f" ({summary['skipped_steps']} updates skipped); checkpoints in {config.run_dir}/checkpoints")
        energy = summary["energy"]
        print(f"energy {energy['kwh']:.3g} kWh, {energy['kg_co2eq']:.3g} kg CO2eq ({energy['detail']})")
    return 0


def cmd_checkpoint_export(args: argparse.Namespace) -> int:
    from lmforge.model.loading import export_model_dir

    out = export_model_dir(args.checkpoint, out_of(args), step=args.step, tokenizer=args.tokenizer)
    print(f"wrote model directory {out}")
    return 0


def cmd_checkpoint_list(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.model.checkpoints import CHECKPOINTS, list_checkpoints, read_meta

    if not Path(args.run_dir).is_dir():
        raise LmforgeError(f"run directory not found: {args.run_dir}")
    checkpoints = list_checkpoints(Path(args.run_dir) / CHECKPOINTS)
    if not checkpoints:
        raise LmforgeError(f"no complete checkpoints in {Path(args.run_dir) / CHECKPOINTS}")
    for step, path in checkpoints:
        meta = read_meta(path)
        print(f"{path}\tstep {step}\t{meta.get('tokens', 0):,} tokens\tworld size {meta['world_size']}")
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from lmforge.train.soup import soup

    out = soup(args.checkpoints, args.out, weights=args.weights, tokenizer=args.tokenizer)
    print(f"wrote model directory {out} (average of {len(args.checkpoints)} checkpoints)")
    return 0
