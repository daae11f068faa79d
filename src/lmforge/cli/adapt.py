"""`lmforge adapt ...`: adaptation (RLVR here; SFT and DPO join this group)."""

from __future__ import annotations

import argparse

from lmforge.cli.rlvr import register_rlvr, register_rlvr_data


def register(sub: argparse._SubParsersAction) -> None:
    adapt = sub.add_parser("adapt", help="adapt a model: RL with verifiable rewards")
    adapt_sub = adapt.add_subparsers(dest="adapt_command", metavar="ADAPT_COMMAND")
    adapt_sub.required = True
    register_rlvr(adapt_sub)
    data = adapt_sub.add_parser("data", help="build adaptation datasets")
    data_sub = data.add_subparsers(dest="adapt_data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    register_rlvr_data(data_sub)
