"""The `lmforge` command: parses arguments and hands off to the stage. No logic lives here.

Each command group (model, data, train, eval, adapt) registers its subcommands from its own module in this package;
a handler receives the parsed namespace. Flags are generated from the stage configs (`cli/options.py`), and
dotted overrides (`KEY=VALUE`) are accepted anywhere on the command line. Errors meant for users are
`LmforgeError`: one line on stderr naming the flag when a flag set the value, exit code 2 (`--debug` shows the
traceback). Ctrl-C exits 130 and SIGTERM 143, after the `finally` blocks removed the run's temporary files
(exit codes: docs/reliability.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback

from lmforge import __version__
from lmforge.cli.options import OVERRIDE, OVERRIDES_AFTER_LISTS, flag_for
from lmforge.core.config import ConfigError
from lmforge.core.errors import LmforgeError


def build_parser() -> argparse.ArgumentParser:
    from lmforge.cli import adapt as adapt_commands
    from lmforge.cli import data as data_commands
    from lmforge.cli import eval as eval_commands
    from lmforge.cli import model as model_commands
    from lmforge.cli import train as train_commands

    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="A fully open language-model workbench: curate, tokenize, pretrain, evaluate, adapt, release.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for area in (model_commands, data_commands, train_commands, eval_commands, adapt_commands):
        area.register(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; dotted overrides (KEY=VALUE) may stand anywhere, also after flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    accepts_overrides = isinstance(getattr(args, "overrides", None), list)
    stray = [item for item in extra if not (accepts_overrides and OVERRIDE.match(item))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    moved = vars(args).pop(OVERRIDES_AFTER_LISTS, [])  # overrides that followed a list flag's values
    if extra or moved:
        args.overrides.extend([*moved, *extra])
    return args


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is so cleanup runs as it does for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        result = args.func(args)
    except ConfigError as e:
        if args.debug:
            traceback.print_exc()
        flag = flag_for(args, e.field)
        print(f"lmforge: error: {flag + ': ' if flag else ''}{e}", file=sys.stderr)
        return 2
    except LmforgeError as e:
        if args.debug:
            traceback.print_exc()
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A path that cannot be read or written (a file where a directory must go, no permission, disk full):
        # the user's environment, not a bug, so one line naming the path.
        if args.debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"lmforge: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("lmforge: terminated", file=sys.stderr)
        return 143
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
