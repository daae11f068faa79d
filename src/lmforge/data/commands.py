"""`lmforge data ...`: curation (tag, dedup, mix, stats, decontaminate) and tokens (tokenize, train-tokenizer, inspect)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.data import curation_commands, decontaminate_commands, token_commands

    data = sub.add_parser("data", help="curate documents, tokenize them, inspect training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    curation_commands.register(data_sub)
    token_commands.register(data_sub)
    decontaminate_commands.register(data_sub)
