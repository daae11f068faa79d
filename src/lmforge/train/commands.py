"""`lmforge` subcommands of this area."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the top-level parser."""
