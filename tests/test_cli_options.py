"""One validation path and one way to build a stage config: YAML <- flags <- dotted overrides, checked by the
config itself, with errors naming the field, the value, what is allowed, and the flag that set it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from lmforge.cli import main, parse_args
from lmforge.cli.options import config_from_args
from lmforge.core.config import ConfigError, load_config
from lmforge.core.executor import ExecutorConfig
from lmforge.curation.decontaminate import DecontaminationConfig
from lmforge.curation.dedup import DedupConfig
from lmforge.curation.mixer import MixerConfig
from lmforge.curation.stats import StatsConfig
from lmforge.curation.taggers.runner import TagConfig
from lmforge.model.sampling import SamplingConfig
from lmforge.tokens.tokenize import TokenizeConfig


def test_nested_problem_names_the_dotted_field_value_and_rule():
    with pytest.raises(ConfigError) as info:
        load_config(DedupConfig, None, ["minhash.threshold=2"], flags={"documents": ["x"]})
    assert (info.value.field, info.value.value) == ("minhash.threshold", 2.0)
    assert str(info.value) == "config field 'minhash.threshold' = 2.0: must be in (0, 1]"


@pytest.mark.parametrize("build, field", [
    (lambda: DedupConfig(documents=["x"], modes=["fuzzy"]), "modes"),
    (lambda: SamplingConfig(temperature=float("nan")), "temperature"),
    (lambda: StatsConfig(documents=["x"], out="o", top_k=-1), "top_k"),
    (lambda: ExecutorConfig(workers=0), "workers"),
    (lambda: DecontaminationConfig(documents=["x"], tasks=["arc_easy"], mode="remove"), "out"),
])
def test_configs_made_in_python_are_checked_too(build, field):
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == field


def test_cli_error_names_the_flag_that_set_the_value(tmp_path, capsys):
    code = main(["data", "dedup", "--documents", str(tmp_path / "*.jsonl"), "--false-positive-rate", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == ("lmforge: error: --false-positive-rate: config field 'bloom.false_positive_rate' = 2.0: "
                   "must be in (0, 1)")
    # Set by an override, the same problem has no flag to name: the field is named alone.
    code = main(["data", "dedup", "--documents", str(tmp_path / "*.jsonl"), "bloom.false_positive_rate=2"])
    assert code == 2 and capsys.readouterr().err.startswith("lmforge: error: config field 'bloom.false")


def test_overrides_anywhere_and_precedence_yaml_flags_overrides(tmp_path):
    yaml = tmp_path / "dedup.yaml"
    yaml.write_text("documents: [a]\nname: from_yaml\nmodes: [doc]\nminhash: {bands: 9}\n", encoding="utf-8")
    args = parse_args(["data", "dedup", "minhash.bands=4", "--config", str(yaml), "--name", "from_flag",
                       "minhash.rows=3", "--modes", "doc,minhash", "--workers", "2", "name=from_override"])
    config = config_from_args(DedupConfig, args, args.config)
    assert config.minhash.bands == 4 and config.minhash.rows == 3  # overrides before and after flags
    assert config.modes == ["doc", "minhash"] and config.documents == ["a"]  # flag over YAML; YAML kept
    assert config.name == "from_override"  # override over flag
    assert config.executor == ExecutorConfig(workers=2)


def test_mix_override_after_flags_reaches_the_run(tmp_path, monkeypatch):
    # Reported: `data mix CONFIG --workers 2 key=value` failed; the override must reach the mixer.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "text": "word " * (i + 1)}) + "\n" for i in range(12)))
    (tmp_path / "mix.yaml").write_text("streams:\n  - name: web\n    documents: [docs/*.jsonl]\n"
                                       "output:\n  path: out\n")
    assert main(["data", "mix", "mix.yaml", "--workers", "2", "output.max_size_in_bytes=100"]) == 0
    shards = sorted((tmp_path / "out").glob("web-*.jsonl*"))
    assert len(shards) > 1  # one shard per ~100 bytes, not the default single shard


def test_list_flags_take_several_values_and_leave_overrides_alone():
    args = parse_args(["data", "dedup", "--documents", "a", "year=2024/*.gz", "minhash.bands=4", "name=n",
                       "--documents", "c", "--modes", "doc,url", "minhash"])
    config = config_from_args(DedupConfig, args)
    # `year` is no field of the config, so `year=2024/*.gz` is a path (as Hive-style partitions are named).
    assert config.documents == ["a", "year=2024/*.gz", "c"]
    assert config.minhash.bands == 4 and config.name == "n"
    assert config.modes == ["doc", "url", "minhash"]


def test_unknown_words_are_still_refused(capsys):
    assert main(["data", "dedup", "--documents", "x", "--workers", "1", "stray"]) == 2  # where overrides go
    assert capsys.readouterr().err == "lmforge: error: bad override 'stray': expected KEY=VALUE, e.g. model.d_model=512\n"
    with pytest.raises(SystemExit):  # where no overrides go, argparse refuses it
        parse_args(["data", "inspect", "--run", "r", "--step", "1", "stray", "a=b"])
    assert "unrecognized arguments: stray a=b" in capsys.readouterr().err


@pytest.mark.parametrize("command, cls", [
    ("tag", TagConfig), ("dedup", DedupConfig), ("stats", StatsConfig), ("tokenize", TokenizeConfig),
    ("decontaminate", DecontaminationConfig),
])
def test_every_data_stage_shares_one_executor_section(command, cls):
    assert typing.get_type_hints(cls)["executor"] is ExecutorConfig
    assert not {"workers", "address"} & {f.name for f in dataclasses.fields(cls)}  # not copied per stage
    args = parse_args(["data", command, "--documents", "d", "--workers", "3", "--executor", "ray",
                       "--address", "auto", "--no-progress"])
    assert args.config_flags["executor.workers"] == "--workers"
    flags = {k: v for k, v in vars(args).items() if k.startswith("config:executor.")}
    assert flags == {"config:executor.workers": 3, "config:executor.kind": "ray",
                     "config:executor.address": "auto", "config:executor.progress": False}


def test_mix_takes_the_executor_from_yaml_and_flags(tmp_path):
    yaml = tmp_path / "mix.yaml"
    yaml.write_text("streams: [{name: web, documents: [d]}]\noutput: {path: out}\nexecutor: {workers: 4}\n",
                    encoding="utf-8")
    args = parse_args(["data", "mix", str(yaml), "--executor", "ray"])
    config = config_from_args(MixerConfig, args, args.config)
    assert config.executor == ExecutorConfig(kind="ray", workers=4)


def test_deprecated_spellings_still_work(capsys):
    args = parse_args(["data", "tokenize", "--documents", "d", "--tokenizer", "t", "--out", "o", "--quiet"])
    assert config_from_args(TokenizeConfig, args).executor.progress is False
    args = parse_args(["data", "stats", "--documents", "d", "--output", "report"])
    assert config_from_args(StatsConfig, args).out == "report"
    assert "--output is deprecated; use --out" in capsys.readouterr().err


def test_building_the_command_line_does_not_import_torch():
    # Flags come from the configs, so the configs the parser reads must stay light: `lmforge data ...` and
    # `--help` should not pay torch's import (~2 s) before doing anything.
    code = "import sys; from lmforge.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
