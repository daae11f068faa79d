"""Hugging Face interop: lmforge model directory <-> transformers `Olmo`, `Olmo2` or `Bloom` directory.

The family is decided by the model's options, not its label: a model whose options none of the three
transformers classes expresses exactly (say OLMo 2 norms with ALiBi) is refused, never exported wrongly.
Writing the HF `config.json` needs no transformers install; loading it back is what the tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.core.config import from_dict, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_path, atomic_write_json
from lmforge.model.directory import load_state, save_model_dir
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokens.tokenizer import Tokenizer, find_tokenizer

# The options each transformers class hard-codes; a model must match one set exactly.
FAMILY_OPTIONS = {
    "olmo": dict(mlp="swiglu", norm="layernorm", norm_affine=False, norm_eps=1e-5, block="prenorm", qk_norm=False,
                 position="rope", bias=False, embedding_norm=False),
    "olmo2": dict(mlp="swiglu", norm="rmsnorm", norm_affine=True, block="reordered", qk_norm=True,
                  position="rope", bias=False, embedding_norm=False, clip_qkv=None),
    "bloom": dict(mlp="gelu", norm="layernorm", norm_affine=True, block="prenorm", qk_norm=False,
                  position="alibi", bias=True, embedding_norm=True, clip_qkv=None, tie_embeddings=True),
}
ARCHITECTURES = {"olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "bloom": "BloomForCausalLM"}


def hf_family(config: ModelConfig) -> str:
    mismatches = {}
    for family, options in FAMILY_OPTIONS.items():
        diff = {k: getattr(config, k) for k, v in options.items() if getattr(config, k) != v}
        if family == "bloom" and config.n_kv_heads != config.n_heads:
            diff["n_kv_heads"] = config.n_kv_heads
        if not diff:
            return family
        mismatches[family] = diff
    closest = min(mismatches, key=lambda f: len(mismatches[f]))
    raise LmforgeError(
        "transformers has no class for this model's options, refusing to export it: closest is "
        f"{ARCHITECTURES[closest]}, which cannot express {mismatches[closest]}"
    )


def _hf_config(config: ModelConfig, family: str) -> dict:
    common = dict(architectures=[ARCHITECTURES[family]], vocab_size=config.embedding_size,
                  eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                  bos_token_id=config.bos_token_id, tie_word_embeddings=config.tie_embeddings,
                  torch_dtype="float32", lmforge_model=to_dict(config))
    if family == "bloom":
        return common | dict(model_type="bloom", hidden_size=config.d_model, n_layer=config.n_layers,
                             n_head=config.n_heads, layer_norm_epsilon=config.norm_eps,
                             apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
                             attention_dropout=0.0, initializer_range=config.init_std,
                             pretraining_tp=1, slow_but_exact=False)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    out = common | dict(model_type=family, hidden_size=config.d_model, intermediate_size=config.mlp_hidden_size,
                        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                        num_key_value_heads=config.n_kv_heads, hidden_act="silu",
                        max_position_embeddings=config.max_sequence_length, rope_theta=config.rope_theta,
                        rope_parameters=rope, attention_bias=False, attention_dropout=0.0,
                        initializer_range=config.init_std)
    if family == "olmo":
        out["clip_qkv"] = config.clip_qkv
    else:
        out["rms_norm_eps"] = config.norm_eps
    return out


def _llama_like_names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {
        "attn.q_proj.weight": p + "self_attn.q_proj.weight",
        "attn.k_proj.weight": p + "self_attn.k_proj.weight",
        "attn.v_proj.weight": p + "self_attn.v_proj.weight",
        "attn.o_proj.weight": p + "self_attn.o_proj.weight",
        "attn.q_norm.weight": p + "self_attn.q_norm.weight",
        "attn.k_norm.weight": p + "self_attn.k_norm.weight",
        "mlp.gate_proj.weight": p + "mlp.gate_proj.weight",
        "mlp.up_proj.weight": p + "mlp.up_proj.weight",
        "mlp.down_proj.weight": p + "mlp.down_proj.weight",
        "attn_norm.weight": p + "post_attention_layernorm.weight",
        "mlp_norm.weight": p + "post_feedforward_layernorm.weight",
    }


def _bloom_names(layer: int) -> dict[str, str]:
    p = f"transformer.h.{layer}."
    names = {"attn.o_proj": "self_attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
             "mlp.down_proj": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm",
             "mlp_norm": "post_attention_layernorm"}
    return {f"{ours}.{kind}": f"{p}{theirs}.{kind}" for ours, theirs in names.items() for kind in ("weight", "bias")}


def _name_map(config: ModelConfig, family: str) -> dict[str, str]:
    """lmforge parameter name -> HF name, for every parameter except BLOOM's fused query_key_value."""
    if family == "bloom":
        mapping = {"embed.weight": "transformer.word_embeddings.weight",
                   "embed_norm.weight": "transformer.word_embeddings_layernorm.weight",
                   "embed_norm.bias": "transformer.word_embeddings_layernorm.bias",
                   "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias"}
        per_layer = _bloom_names
    else:
        mapping = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}
        per_layer = _llama_like_names
    for i in range(config.n_layers):
        mapping.update({f"blocks.{i}.{k}": v for k, v in per_layer(i).items()})
    return mapping


def _bloom_fuse_qkv(state: dict, config: ModelConfig, i: int, kind: str) -> torch.Tensor:
    # BLOOM interleaves per head: the fused output dim is laid out as (head, q|k|v, head_dim).
    parts = [state[f"blocks.{i}.attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
    shaped = [p.reshape(config.n_heads, config.head_dim, *p.shape[1:]) for p in parts]
    return torch.stack(shaped, dim=1).reshape(3 * config.d_model, *parts[0].shape[1:])


def to_hf_state(model: Transformer) -> tuple[str, dict[str, torch.Tensor]]:
    config = model.config
    family = hf_family(config)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        ours.pop("lm_head.weight")
    mapping = _name_map(config, family)
    hf = {}
    for name, tensor in ours.items():
        if family == "bloom" and ".attn." in name and name.split(".")[3] in ("q_proj", "k_proj", "v_proj"):
            continue
        hf[mapping[name]] = tensor.contiguous()
    if family == "bloom":
        for i in range(config.n_layers):
            for kind in ("weight", "bias"):
                hf[f"transformer.h.{i}.self_attention.query_key_value.{kind}"] = _bloom_fuse_qkv(ours, config, i, kind)
    return family, hf


def export_hf(model: Transformer, tokenizer: Tokenizer | None, out: str | Path) -> str:
    """Write a transformers directory (config, safetensors, tokenizer files) for a loaded model (see
    `lmforge.model.load`); returns the architecture."""
    family, state = to_hf_state(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", _hf_config(model.config, family))
    atomic_write_json(out / "generation_config.json", {
        "eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id,
        "bos_token_id": model.config.bos_token_id})
    if tokenizer is not None:
        tokenizer.save(out)
    return ARCHITECTURES[family]


def _pad_token_id(hf: dict, default: int | None = None) -> int | None:
    """HF writes `"pad_token_id": null` for models trained without padding; lmforge pads with EOS then (padding
    is masked, so the id only has to be a valid token)."""
    pad = hf.get("pad_token_id", default)
    return hf.get("eos_token_id", default) if pad is None else pad


def _from_hf_config(hf: dict, path: Path) -> tuple[str, ModelConfig]:
    from lmforge.model.presets import bloom, olmo1, olmo2

    model_type = hf.get("model_type")
    try:
        if model_type == "bloom":
            config = bloom(hf["hidden_size"], hf["n_layer"], hf["n_head"], vocab_size=hf["vocab_size"],
                           eos_token_id=hf.get("eos_token_id", 2), pad_token_id=_pad_token_id(hf, 3),
                           bos_token_id=hf.get("bos_token_id"))
            config.norm_eps = hf.get("layer_norm_epsilon", 1e-5)
            return "bloom", config
        if model_type in ("olmo", "olmo2"):
            theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
            shape = (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"])
            tokens = dict(vocab_size=hf["vocab_size"], eos_token_id=hf.get("eos_token_id"),
                          pad_token_id=_pad_token_id(hf), bos_token_id=hf.get("bos_token_id"),
                          n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                          max_sequence_length=hf.get("max_position_embeddings", 2048))
            if model_type == "olmo":
                config = olmo1(*shape, tie=hf.get("tie_word_embeddings", False), clip_qkv=hf.get("clip_qkv"), **tokens)
            else:
                config = olmo2(*shape, **tokens)
                config.norm_eps = hf.get("rms_norm_eps", 1e-6)
                config.tie_embeddings = hf.get("tie_word_embeddings", False)
            if theta is not None:
                config.rope_theta = float(theta)
            return model_type, config
    except KeyError as e:
        raise LmforgeError(f"{path}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a value of the wrong type, e.g. "hidden_size": "abc"
        raise LmforgeError(f"{path / 'config.json'}: bad value: {e}") from None
    raise LmforgeError(f"{path}: cannot import model_type {model_type!r} (supported: olmo, olmo2, bloom)")


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.is_file():
        return load_state(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LmforgeError(f"corrupt {index}: {e!r}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_state(directory / shard))
        return state
    raise LmforgeError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def is_hf_dir(path: str | Path) -> bool:
    """A transformers model directory: its config.json names a model_type or architectures."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert a transformers OLMo / OLMo 2 / BLOOM directory into an lmforge model directory."""
    model, tokenizer = read_hf(hf_dir)
    return save_model_dir(model, out, tokenizer)


def read_hf(hf_dir: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """A transformers OLMo / OLMo 2 / BLOOM directory as an lmforge model (CPU) and its tokenizer."""
    hf_dir = Path(hf_dir)
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{hf_dir} has no config.json") from None
    except ValueError as e:  # malformed JSON or not UTF-8
        raise LmforgeError(f"corrupt {hf_dir / 'config.json'}: {e}") from None
    if not isinstance(hf_config, dict):
        raise LmforgeError(f"{hf_dir / 'config.json'} is not a JSON object")
    family, config = _from_hf_config(hf_config, hf_dir)
    if "lmforge_model" in hf_config:  # exported by lmforge: keep the options HF does not record (init, context)
        config = from_dict(ModelConfig, hf_config["lmforge_model"], prefix="lmforge_model.")
    if config.embedding_size != hf_config.get("vocab_size"):
        raise LmforgeError(f"{hf_dir}: embedding size {hf_config.get('vocab_size')} is not a multiple of "
                           f"{config.vocab_multiple}; lmforge pads vocabularies to multiples of {config.vocab_multiple}")
    hf_state = _read_hf_weights(hf_dir)
    reverse = {v: k for k, v in _name_map(config, family).items()}
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        if name in reverse:
            ours[reverse[name]] = tensor
        elif name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
            i, kind = int(name.split(".")[2]), name.rsplit(".", 1)[1]
            heads = tensor.reshape(config.n_heads, 3, config.head_dim, *tensor.shape[1:])
            for j, n in enumerate("qkv"):
                ours[f"blocks.{i}.attn.{n}_proj.{kind}"] = heads[:, j].reshape(config.d_model, *tensor.shape[1:])
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing = sorted(expected - set(ours))
    if missing:
        raise LmforgeError(f"{hf_dir}: weights missing for {missing[:3]}")
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]
    model.load_state_dict(ours, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    tokenizer = find_tokenizer(model_dir=hf_dir, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                               bos_id=config.bos_token_id, required=False)
    return model.eval(), tokenizer
