"""Subcommands of `lmforge data`."""

import argparse


def register(data_sub: argparse._SubParsersAction) -> None:
    """Add subcommands to `lmforge data`."""
