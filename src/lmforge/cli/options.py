"""Flags generated from config dataclasses: the field decides the flag's spelling, type, choices and default.

A command lists the config fields it exposes as flags (with their help); every other field is reachable with a
dotted override (`minhash.bands=20`) anywhere on the command line. Flags left out keep the YAML's or the
dataclass's value, so a config is built one way: YAML <- flags <- overrides (`lmforge.core.config.load_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from lmforge.core.config import load_config
from lmforge.core.errors import LmforgeError

DEST_PREFIX = "config:"


@dataclass
class Flag:
    help: str
    flag: str | None = None  # default: --field-name (the last part of the dotted path)
    commas: bool = False  # a list flag that also splits "a,b" into two items
    metavar: str | None = None
    deprecated: tuple[str, ...] = ()  # old spellings, hidden, that print a deprecation line


def _field_type(cls: type, path: str) -> tuple[Any, Any]:
    """(annotation, default) of the field at dotted `path` of dataclass `cls`."""
    *parents, name = path.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = dataclasses.MISSING
    return typing.get_type_hints(cls)[name], default


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) is typing.Union or (hasattr(types, "UnionType") and get_origin(tp) is types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _scalar(tp: Any):
    return tp if tp in (int, float, str) else str


def _comma_split(item_type):
    def parse(text: str) -> list:
        return [item_type(part.strip()) for part in text.split(",") if part.strip()]
    return parse


class _Deprecated(argparse.Action):
    def __init__(self, *args, new: str, **kwargs):
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lmforge: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        current = getattr(namespace, self.dest, None)
        if isinstance(values, list):
            values = (list(current) if isinstance(current, list) else []) + values
        setattr(namespace, self.dest, values)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, fields: dict[str, Flag | str],
                     overrides: bool = False) -> None:
    """Add a flag for each dotted field path of `cls` in `fields`; with `overrides`, also KEY=VALUE overrides."""
    spellings = {}
    override_roots = {f.name for f in dataclasses.fields(cls)} if overrides else set()
    for path, spec in fields.items():
        spec = Flag(spec) if isinstance(spec, str) else spec
        tp, default = _field_type(cls, path)
        tp = _strip_optional(tp)
        flag = spec.flag or "--" + path.rsplit(".", 1)[-1].replace("_", "-")
        shown = "" if default in (dataclasses.MISSING, None, [], False) else f" (default: {default})"
        if default is dataclasses.MISSING:
            shown = " (required)"
        kwargs: dict[str, Any] = {"dest": DEST_PREFIX + path, "default": argparse.SUPPRESS,
                                  "help": spec.help + shown}
        if tp is not bool and get_origin(tp) is not typing.Literal:
            kwargs["metavar"] = spec.metavar or path.rsplit(".", 1)[-1].upper()
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) in (list, tuple):
            item = _scalar((get_args(tp) or (str,))[0])
            kwargs.update(action=_ExtendFlat, nargs="+", convert=_comma_split(item) if spec.commas else
                          (lambda text, f=item: [f(text)]), override_roots=override_roots)
        elif get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(get_args(tp))
        else:
            kwargs["type"] = _scalar(tp)
        parser.add_argument(flag, **kwargs)
        for old in spec.deprecated:  # value flags only (a deprecated switch is spelled out where it is needed)
            old_kwargs = {k: v for k, v in kwargs.items() if k not in ("action", "convert", "override_roots")}
            parser.add_argument(old, action=_Deprecated, new=flag, **{**old_kwargs, "help": argparse.SUPPRESS})
        spellings[path] = flag
    if overrides:
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="dotted config overrides, anywhere on the command line (e.g. minhash.bands=20)")
    known = dict(parser.get_default("config_flags") or {})
    parser.set_defaults(config_flags={**known, **spellings})


OVERRIDE = re.compile(r"^([A-Za-z_]\w*)(\.\w+)*=")
OVERRIDES_AFTER_LISTS = "overrides_after_lists"


class _ExtendFlat(argparse.Action):
    """A list flag, repeatable and taking several values: `--documents a b --documents c` gives [a, b, c]
    (and `--taggers a,b` [a, b] for comma lists). Argparse would swallow a dotted override that follows it, so
    a value that is an override of this config (KEY=VALUE whose KEY starts with one of its fields) is set
    aside as one; a path such as `year=2024/*.gz` is not, as `year` is no field."""

    def __init__(self, *args, convert, override_roots: set[str], **kwargs):
        self.convert, self.override_roots = convert, override_roots
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values:
            match = OVERRIDE.match(value)
            if match and match.group(1) in self.override_roots:
                setattr(namespace, OVERRIDES_AFTER_LISTS, [*getattr(namespace, OVERRIDES_AFTER_LISTS, []), value])
            else:
                try:
                    items.extend(self.convert(value))
                except ValueError:
                    raise argparse.ArgumentError(self, f"invalid value: {value!r}") from None
        setattr(namespace, self.dest, items)


def flag_values(args: argparse.Namespace) -> dict:
    """The generated flags the user gave, as a nested dict of config fields."""
    nested: dict = {}
    for key, value in vars(args).items():
        if not key.startswith(DEST_PREFIX):
            continue
        *parents, name = key[len(DEST_PREFIX):].split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return nested


def config_from_args(cls: type, args: argparse.Namespace, path: str | None = None, **fixed: Any):
    """Build `cls` the one way: YAML at `path` <- flags given <- `fixed` values <- dotted overrides."""
    flags = flag_values(args)
    flags.update(fixed)
    return load_config(cls, path, getattr(args, "overrides", None) or [], flags=flags)


def flag_for(args: argparse.Namespace, field: str) -> str | None:
    """The flag that set config `field` on this command line, if a flag did."""
    if DEST_PREFIX + field not in vars(args):
        return None
    return (getattr(args, "config_flags", None) or {}).get(field)


def add_out_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """`--out DIR`, the one spelling of an output; a trailing positional OUT still works, with a deprecation line."""
    parser.add_argument("--out", default=None, metavar="DIR", help=help)
    parser.add_argument("out_positional", nargs="?", default=None, metavar="OUT", help=argparse.SUPPRESS)


def out_of(args: argparse.Namespace) -> str:
    if args.out_positional is not None:
        print("lmforge: a positional OUT is deprecated; use --out OUT", file=sys.stderr)
        if args.out is not None and args.out != args.out_positional:
            raise LmforgeError(f"two outputs given: {args.out_positional} and --out {args.out}")
        return args.out_positional
    if args.out is None:
        raise LmforgeError("give the output directory with --out DIR")
    return args.out


def add_model_source_flags(parser: argparse.ArgumentParser) -> None:
    """`--step` and `--tokenizer` of every command that reads a saved model (`lmforge.model.loading.load`)."""
    parser.add_argument("--step", type=int, default=None, help="with a run directory: the checkpoint of this step")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's, else the run's)")
