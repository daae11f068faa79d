"""Every config shipped in the package loads and validates with the dataclass it is written for, so a change to
a config's fields or rules cannot leave a shipped config (or a command in the docs that names it) broken."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.core.config import load_config, packaged_config
from lmforge.curation.mixer import MixerConfig
from lmforge.model.presets import resolve_model_config
from lmforge.tokens.dataset import DataConfig
from lmforge.train.config import TrainConfig

SHIPPED = Path(packaged_config("."))


def shipped(folder: str) -> list[Path]:
    found = sorted((SHIPPED / folder).glob("*.yaml"))
    assert found, f"no configs in {SHIPPED / folder}"
    return found


@pytest.mark.parametrize("path", shipped("train"), ids=lambda p: p.name)
def test_train_configs_load(path):
    # Recipes leave the data to the user (`data.paths=[...]`), as their header comments say.
    config = load_config(TrainConfig, path, ["data.paths=[tokens]", "run_dir=runs/x"])
    model = config.model.build_config() if not config.model.vocab_from_tokenizer else None
    if model is not None:
        config.check(world_size=1, model=model)


@pytest.mark.parametrize("path", [p for p in shipped("data") if "mix" in p.name and p.name != "mixture_example.yaml"],
                         ids=lambda p: p.name)
def test_mixer_configs_load(path):
    config = load_config(MixerConfig, path)
    assert config.streams and config.executor.workers >= 1


def test_mixture_example_loads_as_a_data_config():
    config = load_config(DataConfig, SHIPPED / "data" / "mixture_example.yaml")
    assert config.mixture


@pytest.mark.parametrize("path", shipped("model"), ids=lambda p: p.name)
def test_model_configs_load(path):
    assert resolve_model_config(str(path)).n_layers >= 1


@pytest.mark.parametrize("path", [p for p in shipped("adapt") if not p.name.startswith("rlvr")], ids=lambda p: p.name)
def test_adapt_configs_load(path):
    """SFT and DPO recipes (the RLVR ones are loaded by tests/test_adapt_rlvr.py)."""
    from lmforge.adapt.config import DPOConfig, SFTConfig

    cls = SFTConfig if "sft" in path.name else DPOConfig
    # The Tülu 3 recipes leave the start model and data to the user, as their header comments say.
    config = load_config(cls, path, ["model=start", "data=[records.jsonl]"])
    if path.name.startswith("tulu3"):
        assert config.batch_size == 128 and config.precision == "bf16"
