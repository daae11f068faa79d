from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge.core.config import apply_overrides, dump_yaml, load_config
from lmforge.core.errors import LmforgeError


@dataclass
class Inner:
    size: int = 8
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    flags: list[bool] = field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.95)
    inner: Inner = field(default_factory=Inner)
    limit: int | None = None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  size: 16\n")
    cfg = load_config(Outer, path, ["inner.rate=1e-3", "flags=[true,false]", "betas=[0.9,0.99]", "limit=null"])
    assert cfg == Outer(name="run", flags=[True, False], betas=(0.9, 0.99), inner=Inner(size=16, rate=1e-3))
    assert load_config(Outer, None, [dump_yaml(cfg) and "inner.kind=b"]).inner.kind == "b"


@pytest.mark.parametrize("override, message", [
    ("inner.nope=1", "unknown config key 'inner.nope'"),
    ("inner.size=abc", "'inner.size': value 'abc' is not of type int"),
    ("flags=[1]", "'flags[0]': value 1 is not of type bool"),
    ("inner.kind=c", "not one of 'a', 'b'"),
    ("novalue", "expected KEY=VALUE"),
])
def test_bad_overrides_name_key_value_and_type(override, message):
    with pytest.raises(LmforgeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(Outer, None, [override])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\ninner: [unclosed\n")
    with pytest.raises(LmforgeError, match=r"malformed YAML in .*bad.yaml line \d+"):
        load_config(Outer, path)


def test_apply_overrides_creates_nested_sections():
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
