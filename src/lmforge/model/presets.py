"""Named model presets: the released OLMo 1, OLMo 2, Olmo 3, OLMoE, BLOOM, SmolLM2 and Llama 3 shapes, plus tiny
ones for CPUs.

Each preset is a function returning a `ModelConfig`; `get_preset(name)` looks one up. The published presets'
parameter counts equal the released Hugging Face checkpoints' (tests/test_model.py holds those numbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lmforge.core.config import apply_overrides, from_dict, read_yaml, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import ModelConfig

OLMO1_VOCAB = 50_280  # gpt-neox-olmo-dolma-v1_5; embedding padded to 50,304
OLMO2_VOCAB = 100_278  # dolma2 (cl100k-based); embedding padded to 100,352
BLOOM_VOCAB = 250_880


def olmo1(d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int, tie: bool, **kw) -> ModelConfig:
    defaults = dict(vocab_size=OLMO1_VOCAB, eos_token_id=50_279, pad_token_id=1, max_sequence_length=2048)
    defaults.update(kw)
    return ModelConfig(
        family="olmo", d_model=d_model, n_layers=n_layers, n_heads=n_heads, mlp_hidden_size=mlp_hidden_size,
        mlp="swiglu", norm="layernorm", norm_affine=False, norm_eps=1e-5, block="prenorm", qk_norm=False,
        position="rope", rope_theta=10_000.0, bias=False, tie_embeddings=tie, init="mitchell", **defaults,
    )


def olmo2(d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int, **kw) -> ModelConfig:
    options = dict(
        family="olmo2", d_model=d_model, n_layers=n_layers, n_heads=n_heads, mlp_hidden_size=mlp_hidden_size,
        mlp="swiglu", norm="rmsnorm", norm_affine=True, norm_eps=1e-6, block="reordered", qk_norm=True,
        position="rope", rope_theta=500_000.0, bias=False, tie_embeddings=False, init="normal", init_std=0.02,
        vocab_size=OLMO2_VOCAB, eos_token_id=100_257, pad_token_id=100_277, max_sequence_length=4096,
    )
    options.update(kw)
    return ModelConfig(**options)


def olmo3(d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int, **kw) -> ModelConfig:
    """OLMo 2's block with a 4,096-token sliding window in three of every four layers (full attention in the
    fourth and the last), and the long-context extension: YaRN x8 over the 8,192 pretraining context on the
    full-attention layers, for 65,536 positions (the released allenai/Olmo-3-1025-7B config)."""
    options = dict(family="olmo3", max_sequence_length=65_536, sliding_window=4096, full_attention_every=4,
                   yarn_factor=8.0, yarn_original_context=8192)
    options.update(kw)
    return olmo2(d_model, n_layers, n_heads, mlp_hidden_size, **options)


def olmoe(d_model: int, n_layers: int, n_heads: int, n_experts: int, expert_hidden_size: int, top_k: int,
          **kw) -> ModelConfig:
    """OLMoE: pre-norm blocks, RMSNorm (eps 1e-5), QK-norm, RoPE θ=1e4, a dropless mixture of SwiGLU experts with
    OLMoE's auxiliary-loss weights (load balancing 0.01, router z-loss 0.001)."""
    options = dict(
        family="olmoe", d_model=d_model, n_layers=n_layers, n_heads=n_heads, mlp_hidden_size=expert_hidden_size,
        mlp="swiglu", norm="rmsnorm", norm_affine=True, norm_eps=1e-5, block="prenorm", qk_norm=True,
        position="rope", rope_theta=10_000.0, bias=False, tie_embeddings=False, init="normal", init_std=0.02,
        n_experts=n_experts, moe_top_k=top_k, moe_norm_top_k=False, moe_lb_loss_coef=0.01, moe_z_loss_coef=0.001,
        vocab_size=50_304, eos_token_id=50_279, pad_token_id=1, max_sequence_length=4096,
    )
    options.update(kw)
    return ModelConfig(**options)


def bloom(d_model: int, n_layers: int, n_heads: int, **kw) -> ModelConfig:
    defaults = dict(vocab_size=BLOOM_VOCAB, eos_token_id=2, pad_token_id=3, bos_token_id=1, max_sequence_length=2048)
    defaults.update(kw)
    return ModelConfig(
        family="bloom", d_model=d_model, n_layers=n_layers, n_heads=n_heads, mlp_hidden_size=4 * d_model,
        mlp="gelu", norm="layernorm", norm_affine=True, norm_eps=1e-5, block="prenorm", qk_norm=False,
        position="alibi", bias=True, embedding_norm=True, tie_embeddings=True, init="normal", init_std=0.02,
        init_truncate=False, **defaults,
    )


def llama(d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int, **kw) -> ModelConfig:
    """Llama (and Mistral, and Qwen2 with `qkv_bias=True`): pre-norm blocks, RMSNorm with weight (eps 1e-5), no
    QK-norm, SwiGLU, RoPE, no biases."""
    options = dict(
        family="llama", d_model=d_model, n_layers=n_layers, n_heads=n_heads, mlp_hidden_size=mlp_hidden_size,
        mlp="swiglu", norm="rmsnorm", norm_affine=True, norm_eps=1e-5, block="prenorm", qk_norm=False,
        position="rope", rope_theta=10_000.0, bias=False, tie_embeddings=False, init="normal", init_std=0.02,
        vocab_size=32_000, eos_token_id=2, pad_token_id=2, bos_token_id=1, max_sequence_length=4096,
    )
    options.update(kw)
    return ModelConfig(**options)


# Tiny presets use the OLMo 1 tokenizer's vocabulary (the one lmforge can load offline); override
# `vocab_size`/`eos_token_id`/`pad_token_id` for a tokenizer of your own.
TINY_TOKENS = dict(vocab_size=OLMO1_VOCAB, eos_token_id=50_279, pad_token_id=1)

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "olmo-1b": lambda: olmo1(2048, 16, 16, 8192, tie=True),
    "olmo-7b": lambda: olmo1(4096, 32, 32, 11008, tie=False),
    "olmo2-1b": lambda: olmo2(2048, 16, 16, 8192),
    "olmo2-7b": lambda: olmo2(4096, 32, 32, 11008),
    "olmo2-13b": lambda: olmo2(5120, 40, 40, 13824),
    "olmo3-7b": lambda: olmo3(4096, 32, 32, 11008),
    "olmo3-32b": lambda: olmo3(5120, 64, 40, 27648, n_kv_heads=8),
    "olmoe-1b-7b": lambda: olmoe(2048, 16, 16, 64, 1024, 8),
    "bloom-560m": lambda: bloom(1024, 24, 16),
    # HuggingFaceTB/SmolLM2-135M(-Instruct); no BOS: its tokenizer adds none (the chat template opens turns).
    "smollm2-135m": lambda: llama(576, 30, 9, 1536, n_kv_heads=3, rope_theta=100_000.0, tie_embeddings=True,
                                  vocab_size=49_152, eos_token_id=2, pad_token_id=2, bos_token_id=None,
                                  max_sequence_length=8192),
    "llama3-8b": lambda: llama(4096, 32, 32, 14336, n_kv_heads=8, rope_theta=500_000.0, vocab_size=128_256,
                               eos_token_id=128_001, pad_token_id=128_001, bos_token_id=128_000,
                               max_sequence_length=8192),
    "olmo-tiny": lambda: olmo1(128, 4, 4, 384, tie=True, max_sequence_length=512, **TINY_TOKENS),
    "olmo2-tiny": lambda: olmo2(128, 4, 4, 384, max_sequence_length=512, **TINY_TOKENS),
    "olmo2-tiny-gqa": lambda: olmo2(128, 4, 4, 384, n_kv_heads=2, max_sequence_length=512, **TINY_TOKENS),
    "olmo3-tiny": lambda: olmo3(128, 4, 4, 384, max_sequence_length=512, sliding_window=16,
                                yarn_original_context=64, **TINY_TOKENS),
    "olmoe-tiny": lambda: olmoe(128, 2, 4, 8, 64, 2, max_sequence_length=512, **TINY_TOKENS),
    "bloom-tiny": lambda: bloom(128, 4, 4, max_sequence_length=512, **TINY_TOKENS),
    "llama-tiny": lambda: llama(128, 4, 4, 384, n_kv_heads=2, max_sequence_length=512, bos_token_id=None,
                                **TINY_TOKENS),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LmforgeError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()


def resolve_model_config(spec: str, overrides: list[str] | None = None) -> ModelConfig:
    """A model config from a preset name, a model directory, or a YAML file of `ModelConfig` fields (which may
    start from a preset with `preset: NAME`), then dotted overrides such as `n_layers=2`."""
    from lmforge.model.directory import read_model_config

    path = Path(spec)
    if path.is_dir():
        data = to_dict(read_model_config(path))
    elif path.suffix in (".yaml", ".yml"):
        data = read_yaml(path)
        preset = data.pop("preset", None)
        data = {**(to_dict(get_preset(preset)) if preset else {}), **data}
    else:
        data = to_dict(get_preset(spec))
    return from_dict(ModelConfig, apply_overrides(data, overrides or []), prefix="model.")
