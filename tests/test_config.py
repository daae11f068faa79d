import re
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from lmforge.core.config import apply_overrides, dump_yaml, load_config, save_config
from lmforge.core.errors import LmforgeError
from lmforge.eval.inloop import InLoopEvalConfig
from lmforge.model.transformer import ModelConfig
from lmforge.tokens.dataset import DataConfig, SourceConfig
from lmforge.tokens.instance_filter import InstanceFilterConfig
from lmforge.train.config import (
    CheckpointConfig,
    DataDegrees,
    EnergyConfig,
    InitFrom,
    MetricsConfig,
    ModelSpec,
    OptimizerConfig,
    ParallelConfig,
    PipelineConfig,
    ScheduleConfig,
    SkipStepConfig,
    TrainConfig,
)


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
    assert_same_leaves(cfg, Outer(name="run", flags=[True, False], betas=(0.9, 0.99), inner=Inner(size=16, rate=1e-3)))


def leaves(value, path="<root>"):
    """(path, type, value) for every leaf of a config: a dropped, renamed, retyped (tuple->list, int->float,
    float->str) or changed field shows up as a difference at its own path."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = [(path, type(value).__name__, None)]
        for f in dataclasses.fields(value):
            out += leaves(getattr(value, f.name), f"{path}.{f.name}")
        return out
    if isinstance(value, (list, tuple)):
        out = [(path, type(value).__name__, len(value))]
        for i, v in enumerate(value):
            out += leaves(v, f"{path}[{i}]")
        return out
    if isinstance(value, dict):
        out = [(path, "dict", tuple(value))]
        for k, v in value.items():
            out += leaves(v, f"{path}.{k}")
        return out
    return [(path, type(value).__name__, value)]


def assert_same_leaves(loaded, original):
    got, want = leaves(loaded), leaves(original)
    for g, w in zip(got, want):
        assert g == w, f"{w[0]}: loaded {g[2]!r} ({g[1]}), saved {w[2]!r} ({w[1]})"
    assert len(got) == len(want)
    assert loaded == original


def assert_no_field_at_default(config, path="<root>", exempt=frozenset()):
    """Every field differs from its default, so losing any field on the way through YAML changes the config."""
    for f in dataclasses.fields(config):
        if f.name in exempt:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            assert_no_field_at_default(value, f"{path}.{f.name}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        assert value != default, f"{path}.{f.name} is at its default {default!r}; the round trip cannot see it"


def non_default_outer():
    return Outer(name="round trip: 'quoted' # not a comment", flags=[True, False, True], betas=(0.5, 1e-5),
                 inner=Inner(size=3, rate=1e-5, kind="b"), limit=0)


def non_default_model_config():
    return ModelConfig(d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=1000, mlp_hidden_size=200,
                       mlp="gelu", norm="layernorm", norm_affine=False, norm_eps=1e-5, block="prenorm",
                       qk_norm=False, position="alibi", rope_theta=10_000.5, bias=True, embedding_norm=True,
                       tie_embeddings=True, clip_qkv=8.0, max_sequence_length=257, init="mitchell",
                       init_std=0.006, init_truncate=False, eos_token_id=0, pad_token_id=2, bos_token_id=3,
                       vocab_multiple=64, family="custom", sliding_window=7, full_attention_every=2,
                       yarn_original_context=100, yarn_beta_fast=16.0, yarn_beta_slow=2.0, yarn_attention_factor=1.5,
                       moe_top_k=3, moe_norm_top_k=True, moe_lb_loss_coef=0.02, moe_z_loss_coef=0.0,
                       qkv_bias=True, llama3_low_freq_factor=0.5, llama3_high_freq_factor=3.0,
                       llama3_original_context=99)


# Experts need SwiGLU without biases and YaRN needs RoPE, which the config above leaves; this one moves the
# two fields it cannot and gives back those three.
NEEDS_SWIGLU_ROPE = {"n_experts": 4, "yarn_factor": 2.0}


def non_default_moe_yarn_model_config():
    return dataclasses.replace(non_default_model_config(), mlp="swiglu", bias=False, position="rope",
                               **NEEDS_SWIGLU_ROPE)


# The other RoPE scalings exclude YaRN (one scaling at most): each gets a config of its own.
def non_default_linear_rope_model_config():
    return dataclasses.replace(non_default_moe_yarn_model_config(), yarn_factor=None, rope_linear_factor=3.0)


def non_default_llama3_rope_model_config():
    return dataclasses.replace(non_default_moe_yarn_model_config(), yarn_factor=None, llama3_rope_factor=3.0)


ALL_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))
EXEMPT = {non_default_model_config: frozenset(NEEDS_SWIGLU_ROPE) | {"rope_linear_factor", "llama3_rope_factor"},
          non_default_moe_yarn_model_config: frozenset({"mlp", "bias", "position", "rope_linear_factor",
                                                        "llama3_rope_factor"}),
          non_default_linear_rope_model_config: ALL_MODEL_FIELDS - {"rope_linear_factor"},
          non_default_llama3_rope_model_config: ALL_MODEL_FIELDS - {"llama3_rope_factor"}}


def non_default_train_config():
    return TrainConfig(
        run_dir="runs/round-trip",
        data=DataConfig(paths=["tokens/a", "tokens/b/*.npy"],
                        mixture={"web": SourceConfig(paths=["web/"], share=0.75), "code": SourceConfig()},
                        mixture_tokens=123_456_789, max_repetition=2.5, sequence_length=128, seed=11,
                        dtype="uint16",
                        instance_filter=InstanceFilterConfig(enabled=True, min_period=2, max_period=9, max_count=7),
                        document_boundaries=True, tokenizer="tok/tokenizer.json", prefetch_batches=5),
        model=ModelSpec(preset="olmo2-tiny-gqa",
                        overrides={"n_layers": 3, "rope_theta": 1e4, "clip_qkv": None, "mlp": "gelu"},
                        vocab_from_tokenizer=True),
        tokenizer="tok/",
        seed=5,
        global_batch_size=4096,
        micro_batch_size=1024,
        batch_size_schedule=[(0, 1024), (1_000_000, 2048), (5_000_000, 4096)],
        max_steps=77,
        max_tokens=10**12,
        z_loss_multiplier=3e-6,
        precision="fp32",
        cpu_bf16=True,
        float8="rowwise",
        device="cuda",
        optimizer=OptimizerConfig(lr=1.5e-3, betas=(0.8, 0.999), eps=1e-10, weight_decay=0.033,
                                  decay_embeddings=True, decay_norm_and_bias=False, max_grad_norm=None,
                                  clip_after_warmup_only=True, fused=False),
        schedule=ScheduleConfig(name="wsd", units="tokens", warmup=100, final_lr_fraction=0.0, decay=50, duration=2000),
        skip_step=SkipStepConfig(enabled=False, sigma_factor=3.5, window=16, min_values=8, max_consecutive=2),
        parallel=ParallelConfig(data_parallel="hsdp", data=DataDegrees(shard=4, replicate=2), tensor=2, context=3,
                                expert=4, activation_checkpointing="selective",
                                ac_every=3, compile=True,
                                pipeline=PipelineConfig(degree=2, schedule="ZBV", stages_per_rank=2, microbatches=4,
                                                        split_points=[1, 2, 3])),
        checkpoint=CheckpointConfig(interval=None, interval_minutes=30.5, keep_last=5, permanent_interval=1000,
                                    save_final=False),
        metrics=MetricsConfig(log_interval=1, tensorboard=False, wandb=True, wandb_project="p", wandb_mode="online",
                              peak_flops=9.89e14),
        energy=EnergyConfig(method="rapl", grid_kg_co2eq_per_kwh=0.057, pue=1.1, estimate_watts=35.0),
        eval=InLoopEvalConfig(tasks=["arc_easy", "hellaswag"], limit=50, ppl_documents=["docs/*.jsonl.gz"],
                              max_ppl_documents=20, batch_size=4, regime="olmo1"),
        eval_interval=250,
        init_from=InitFrom(path="runs/stage1/checkpoints/step00000100", load_optimizer=True),
    )


@pytest.mark.parametrize("make", [non_default_outer, non_default_model_config, non_default_moe_yarn_model_config,
                                  non_default_linear_rope_model_config, non_default_llama3_rope_model_config,
                                  non_default_train_config])
def test_save_then_load_gives_back_every_field(tmp_path, make):
    original = make()
    assert_no_field_at_default(original, exempt=EXEMPT.get(make, frozenset()))
    path = save_config(original, tmp_path)
    assert path == tmp_path / "config.yaml"
    # The file is plain YAML holding every field (not, say, a pickled object or a partial dump).
    on_disk = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert list(on_disk) == [f.name for f in dataclasses.fields(original)]
    assert yaml.safe_load(dump_yaml(original)) == on_disk
    loaded = load_config(type(original), path)
    assert loaded is not original
    assert_same_leaves(loaded, original)


def test_saved_config_takes_overrides_on_top(tmp_path):
    original = non_default_train_config()
    path = save_config(original, tmp_path, name="run.yaml")
    loaded = load_config(TrainConfig, path, ["optimizer.lr=2e-5", "init_from=null", "schedule.units=steps"])
    assert loaded.optimizer.lr == 2e-5 and isinstance(loaded.optimizer.lr, float)
    assert loaded.init_from is None
    assert loaded.schedule.units == "steps"
    assert loaded == dataclasses.replace(
        original, optimizer=dataclasses.replace(original.optimizer, lr=2e-5), init_from=None,
        schedule=dataclasses.replace(original.schedule, units="steps"))
    assert load_config(TrainConfig, path) == original  # the overrides did not touch the file


@pytest.mark.parametrize("override, message", [
    ("inner.nope=1", "config field 'inner.nope' = 1: unknown config key (valid keys here: kind, rate, size)"),
    ("inner.size=abc", "config field 'inner.size' = 'abc': is not of type int"),
    ("flags=[1]", "config field 'flags[0]' = 1: is not of type bool"),
    ("inner.kind=c", "config field 'inner.kind' = 'c': must be one of 'a', 'b'"),
    ("novalue", "expected KEY=VALUE"),
])
def test_bad_overrides_name_key_value_and_type(override, message):
    with pytest.raises(LmforgeError, match=re.escape(message)):
        load_config(Outer, None, [override])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\ninner: [unclosed\n")
    with pytest.raises(LmforgeError, match=r"malformed YAML in .*bad.yaml line \d+"):
        load_config(Outer, path)


def test_apply_overrides_creates_nested_sections():
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
