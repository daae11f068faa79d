"""Hugging Face interop: lmforge model directory <-> transformers `Olmo`, `Olmo2`, `Olmo3`, `Olmoe`, `Bloom`,
`Llama` or `Qwen2` directory (and `Mistral` on import: a Llama without sliding windows).

The family is decided by the model's options, not its label: a model whose options none of these
transformers classes expresses exactly (say OLMo 2 norms with ALiBi) is refused, never exported wrongly.
Writing the HF `config.json` needs no transformers install; loading it back is what the tests check.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.core.config import from_dict, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_path, atomic_write_json
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest
from lmforge.model.directory import load_state, model_from_state, write_model_dir
from lmforge.model.transformer import ModelConfig, Transformer, rope_frequencies
from lmforge.tokens.tokenizer import Tokenizer, find_tokenizer

# The options each transformers class hard-codes; a model must match one set exactly (first match wins, so a
# model without sliding windows or YaRN exports as OLMo 2, with them as Olmo 3).
NO_ROPE_SCALING = dict(yarn_factor=None, rope_linear_factor=None, llama3_rope_factor=None)
DENSE_FULL_ATTENTION = dict(n_experts=0, sliding_window=None, qkv_bias=False, **NO_ROPE_SCALING)
OLMO2_OPTIONS = dict(mlp="swiglu", norm="rmsnorm", norm_affine=True, block="reordered", qk_norm=True,
                     position="rope", bias=False, embedding_norm=False, clip_qkv=None)
# Llama, Mistral and Qwen2 take any RoPE scaling (transformers' rope_parameters express them all).
LLAMA_OPTIONS = dict(mlp="swiglu", norm="rmsnorm", norm_affine=True, block="prenorm", qk_norm=False,
                     position="rope", bias=False, embedding_norm=False, clip_qkv=None, n_experts=0,
                     sliding_window=None)
FAMILY_OPTIONS = {
    "olmo": dict(mlp="swiglu", norm="layernorm", norm_affine=False, norm_eps=1e-5, block="prenorm", qk_norm=False,
                 position="rope", bias=False, embedding_norm=False, **DENSE_FULL_ATTENTION),
    "olmo2": OLMO2_OPTIONS | DENSE_FULL_ATTENTION,
    "olmo3": OLMO2_OPTIONS | dict(n_experts=0, qkv_bias=False, rope_linear_factor=None, llama3_rope_factor=None),
    "olmoe": dict(mlp="swiglu", norm="rmsnorm", norm_affine=True, block="prenorm", qk_norm=True, position="rope",
                  bias=False, qkv_bias=False, embedding_norm=False, clip_qkv=None, sliding_window=None,
                  **NO_ROPE_SCALING),
    "bloom": dict(mlp="gelu", norm="layernorm", norm_affine=True, block="prenorm", qk_norm=False,
                  position="alibi", bias=True, embedding_norm=True, clip_qkv=None, tie_embeddings=True,
                  **DENSE_FULL_ATTENTION),
    "llama": LLAMA_OPTIONS | dict(qkv_bias=False),
    "qwen2": LLAMA_OPTIONS | dict(qkv_bias=True),
}
ARCHITECTURES = {"olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM",
                 "olmoe": "OlmoeForCausalLM", "bloom": "BloomForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
LLAMA_TYPES = ("llama", "mistral", "qwen2")  # the config.json model types read as Llama
IMPORTABLE = sorted({*ARCHITECTURES, *LLAMA_TYPES})
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer types


def hf_family(config: ModelConfig) -> str:
    mismatches = {}
    for family, options in FAMILY_OPTIONS.items():
        diff = {k: getattr(config, k) for k, v in options.items() if getattr(config, k) != v}
        if family == "bloom" and config.n_kv_heads != config.n_heads:
            diff["n_kv_heads"] = config.n_kv_heads
        if family == "olmoe" and not config.n_experts:
            diff["n_experts"] = config.n_experts
        if not diff:
            return family
        mismatches[family] = diff
    closest = min(mismatches, key=lambda f: len(mismatches[f]))
    raise LmforgeError(
        "transformers has no class for this model's options, refusing to export it: closest is "
        f"{ARCHITECTURES[closest]}, which cannot express {mismatches[closest]}"
    )


def _rope_parameters(config: ModelConfig) -> dict:
    """transformers' `rope_parameters` of the full-attention layers."""
    full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.yarn_factor is not None:
        full |= {"rope_type": "yarn", "factor": config.yarn_factor,
                 "original_max_position_embeddings": config.yarn_original_context,
                 "beta_fast": config.yarn_beta_fast, "beta_slow": config.yarn_beta_slow,
                 "attention_factor": rope_frequencies(config, scaled=True)[1]}
    elif config.rope_linear_factor is not None:
        full |= {"rope_type": "linear", "factor": config.rope_linear_factor}
    elif config.llama3_rope_factor is not None:
        full |= {"rope_type": "llama3", "factor": config.llama3_rope_factor,
                 "low_freq_factor": config.llama3_low_freq_factor, "high_freq_factor": config.llama3_high_freq_factor,
                 "original_max_position_embeddings": config.llama3_original_context}
    return full


def _olmo3_rope(config: ModelConfig) -> dict:
    return {FULL: _rope_parameters(config), SLIDING: {"rope_type": "default", "rope_theta": config.rope_theta}}


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
    if family in ("llama", "qwen2"):
        out |= dict(rope_parameters=_rope_parameters(config), head_dim=config.head_dim, mlp_bias=False)
    if family == "qwen2":
        out |= dict(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    if family == "olmo":
        out["clip_qkv"] = config.clip_qkv
    else:
        out["rms_norm_eps"] = config.norm_eps
    if family == "olmo3":
        out |= dict(rope_parameters=_olmo3_rope(config), sliding_window=config.sliding_window,
                    layer_types=[FULL if config.layer_window(i) is None else SLIDING for i in range(config.n_layers)])
        del out["rope_theta"]  # per layer type, in rope_parameters
    if family == "olmoe":
        out |= dict(num_experts=config.n_experts, num_experts_per_tok=config.moe_top_k,
                    norm_topk_prob=config.moe_norm_top_k, router_aux_loss_coef=config.moe_lb_loss_coef,
                    output_router_logits=False, clip_qkv=None)
    return out


def _llama_like_names(layer: int, prenorm: bool) -> dict[str, str]:
    p = f"model.layers.{layer}."
    # OLMo 2/3 norm each sub-layer's output; OLMoE (pre-norm) its input. OLMo 1's norms have no weights.
    norms = ("input_layernorm", "post_attention_layernorm") if prenorm else ("post_attention_layernorm",
                                                                             "post_feedforward_layernorm")
    return {
        "attn.q_proj.weight": p + "self_attn.q_proj.weight",
        "attn.k_proj.weight": p + "self_attn.k_proj.weight",
        "attn.v_proj.weight": p + "self_attn.v_proj.weight",
        "attn.o_proj.weight": p + "self_attn.o_proj.weight",
        "attn.q_proj.bias": p + "self_attn.q_proj.bias",
        "attn.k_proj.bias": p + "self_attn.k_proj.bias",
        "attn.v_proj.bias": p + "self_attn.v_proj.bias",
        "attn.q_norm.weight": p + "self_attn.q_norm.weight",
        "attn.k_norm.weight": p + "self_attn.k_norm.weight",
        "mlp.gate_proj.weight": p + "mlp.gate_proj.weight",
        "mlp.up_proj.weight": p + "mlp.up_proj.weight",
        "mlp.down_proj.weight": p + "mlp.down_proj.weight",
        "mlp.router.weight": p + "mlp.gate.weight",
        "attn_norm.weight": p + norms[0] + ".weight",
        "mlp_norm.weight": p + norms[1] + ".weight",
    }


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_name(layer: int, expert: int, projection: str) -> str:
    # The per-expert layout of the released checkpoints and of transformers' save_pretrained.
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def _bloom_names(layer: int) -> dict[str, str]:
    p = f"transformer.h.{layer}."
    names = {"attn.o_proj": "self_attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
             "mlp.down_proj": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm",
             "mlp_norm": "post_attention_layernorm"}
    return {f"{ours}.{kind}": f"{p}{theirs}.{kind}" for ours, theirs in names.items() for kind in ("weight", "bias")}


def _name_map(config: ModelConfig, family: str) -> dict[str, str]:
    """lmforge parameter name -> HF name, for every parameter except BLOOM's fused query_key_value and the
    stacked experts (one tensor per expert in HF)."""
    if family == "bloom":
        mapping = {"embed.weight": "transformer.word_embeddings.weight",
                   "embed_norm.weight": "transformer.word_embeddings_layernorm.weight",
                   "embed_norm.bias": "transformer.word_embeddings_layernorm.bias",
                   "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias"}
        per_layer = _bloom_names
    else:
        mapping = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}
        per_layer = functools.partial(_llama_like_names, prenorm=config.block == "prenorm")
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
        if ".mlp.experts." in name:
            layer, projection = int(name.split(".")[1]), name.split(".")[-1]
            hf.update({_expert_name(layer, e, projection): w.contiguous() for e, w in enumerate(tensor)})
            continue
        hf[mapping[name]] = tensor.contiguous()
    if family == "bloom":
        for i in range(config.n_layers):
            for kind in ("weight", "bias"):
                hf[f"transformer.h.{i}.self_attention.query_key_value.{kind}"] = _bloom_fuse_qkv(ours, config, i, kind)
    return family, hf


def export_hf(model: Transformer, tokenizer: Tokenizer | None, out: str | Path, inputs: list[Path] = (),
              source: dict | None = None) -> str:
    """Write a transformers directory (config, safetensors, tokenizer files, and lmforge's manifest naming the
    `inputs` it came from and their `source`) for a loaded model (see `lmforge.model.load`); returns the
    architecture."""
    family, state = to_hf_state(model)
    out = Path(out)
    with output_lock(out):
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_json(out / "config.json", _hf_config(model.config, family))
        atomic_write_json(out / "generation_config.json", {
            "eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id,
            "bos_token_id": model.config.bos_token_id})
        if tokenizer is not None:
            tokenizer.save(out)
        write_manifest(out, command="export hf", inputs=list(inputs),
                       extra={**(source or {}), "architecture": ARCHITECTURES[family]})
    return ARCHITECTURES[family]


def _olmo3_options(hf: dict, path: Path) -> dict:
    """Sliding windows and RoPE of an Olmo 3 config.json, as ModelConfig fields. Reads transformers 5's
    per-layer-type `rope_parameters` and the older `rope_theta` + `rope_scaling` (applied to full attention)."""
    n = hf["num_hidden_layers"]
    default_types = [SLIDING if (i + 1) % 4 else FULL for i in range(n)]  # transformers' default
    layer_types = hf.get("layer_types") or default_types
    options: dict = {"sliding_window": None, "yarn_factor": None}
    if SLIDING in layer_types:
        def pattern(every: int) -> list[str]:
            return [FULL if i == n - 1 or (i + 1) % every == 0 else SLIDING for i in range(n)]

        every = next((k for k in range(2, n + 1) if pattern(k) == list(layer_types)), None)
        if every is None:
            raise LmforgeError(f"{path / 'config.json'}: layer_types {layer_types} is not full attention in every "
                               "n-th layer and the last, the pattern lmforge expresses")
        options.update(sliding_window=hf.get("sliding_window") or 4096, full_attention_every=every)
    rope = hf.get("rope_parameters") or {}
    full = dict(rope.get(FULL) or (rope if FULL not in rope and SLIDING not in rope else {}))
    full |= hf.get("rope_scaling") or {}
    sliding = rope.get(SLIDING) or {}
    theta = full.get("rope_theta") or hf.get("rope_theta") or 500_000.0
    if sliding.get("rope_theta", theta) != theta or sliding.get("rope_type", "default") != "default":
        raise LmforgeError(f"{path / 'config.json'}: sliding layers with RoPE {sliding} differing from the full "
                           f"layers' theta {theta}; lmforge has one rope_theta and plain RoPE on sliding layers")
    return options | _rope_scaling_options(full, hf, path) | {"rope_theta": float(theta)}


def _rope_scaling_options(rope: dict, hf: dict, path: Path) -> dict:
    """A transformers RoPE dict (`rope_parameters`, or the older `rope_scaling`) as ModelConfig fields."""
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "yarn":
        factor = float(rope["factor"])
        options = dict(yarn_factor=factor, yarn_original_context=int(rope.get("original_max_position_embeddings")
                                                                     or hf["max_position_embeddings"] / factor),
                       yarn_beta_fast=float(rope.get("beta_fast") or 32), yarn_beta_slow=float(rope.get("beta_slow") or 1))
        if rope.get("mscale") or rope.get("mscale_all_dim"):
            raise LmforgeError(f"{path / 'config.json'}: YaRN with mscale is not supported")
        derived = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        given = rope.get("attention_factor")
        options["yarn_attention_factor"] = None if given is None or abs(given - derived) < 1e-12 else float(given)
        return options
    if rope_type == "linear":
        return {"rope_linear_factor": float(rope["factor"])}
    if rope_type == "llama3":
        return dict(llama3_rope_factor=float(rope["factor"]), llama3_low_freq_factor=float(rope["low_freq_factor"]),
                    llama3_high_freq_factor=float(rope["high_freq_factor"]),
                    llama3_original_context=int(rope["original_max_position_embeddings"]))
    if rope_type != "default":
        raise LmforgeError(f"{path / 'config.json'}: RoPE type {rope_type!r} (lmforge has default, linear, llama3 "
                           "and yarn)")
    return {}


def _llama_options(hf: dict, model_type: str, path: Path) -> dict:
    """The ModelConfig fields of a Llama, Mistral or Qwen2 config.json; what lmforge cannot express is refused."""
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise LmforgeError(f"{path / 'config.json'}: head_dim {hf['head_dim']} is not hidden_size / "
                           f"num_attention_heads ({hf['hidden_size'] // heads}), which lmforge assumes")
    window = hf.get("sliding_window") if model_type == "mistral" or hf.get("use_sliding_window") else None
    if window is not None and window < hf.get("max_position_embeddings", 0):
        raise LmforgeError(f"{path / 'config.json'}: a sliding window of {window} in every layer; lmforge's "
                           "windows leave every n-th layer and the last one full")
    for flag in ("attention_bias", "mlp_bias"):
        if model_type != "qwen2" and hf.get(flag):
            raise LmforgeError(f"{path / 'config.json'}: {flag} is not supported for {model_type}")
    rope = dict(hf.get("rope_parameters") or {}) | (hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta") or hf.get("rope_theta") or 10_000.0
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos  # Llama 3.1 lists several; the first ends a document
    return dict(family=model_type, qkv_bias=model_type == "qwen2", n_kv_heads=hf.get("num_key_value_heads") or heads,
                vocab_size=hf["vocab_size"], eos_token_id=eos, pad_token_id=_pad_token_id(hf | {"eos_token_id": eos}),
                bos_token_id=hf.get("bos_token_id"), max_sequence_length=hf.get("max_position_embeddings", 4096),
                norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                rope_theta=float(theta), **_rope_scaling_options(rope, hf, path))


def _pad_token_id(hf: dict, default: int | None = None) -> int | None:
    """HF writes `"pad_token_id": null` for models trained without padding; lmforge pads with EOS then (padding
    is masked, so the id only has to be a valid token)."""
    pad = hf.get("pad_token_id", default)
    return hf.get("eos_token_id", default) if pad is None else pad


def _from_hf_config(hf: dict, path: Path) -> tuple[str, ModelConfig]:
    from lmforge.model.presets import bloom, llama, olmo1, olmo2, olmo3, olmoe

    model_type = hf.get("model_type")
    try:
        if model_type in LLAMA_TYPES:
            return "qwen2" if model_type == "qwen2" else "llama", llama(
                hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"],
                **_llama_options(hf, model_type, path))
        if model_type == "bloom":
            config = bloom(hf["hidden_size"], hf["n_layer"], hf["n_head"], vocab_size=hf["vocab_size"],
                           eos_token_id=hf.get("eos_token_id", 2), pad_token_id=_pad_token_id(hf, 3),
                           bos_token_id=hf.get("bos_token_id"))
            config.norm_eps = hf.get("layer_norm_epsilon", 1e-5)
            return "bloom", config
        if model_type == "olmoe":
            if hf.get("clip_qkv") is not None:  # OLMoE clips after QK-norm, lmforge before
                raise LmforgeError(f"{path / 'config.json'}: OLMoE with clip_qkv is not supported")
            theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10_000.0
            return "olmoe", olmoe(
                hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_experts"],
                hf["intermediate_size"], hf["num_experts_per_tok"], vocab_size=hf["vocab_size"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
                bos_token_id=hf.get("bos_token_id"), max_sequence_length=hf.get("max_position_embeddings", 4096),
                norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
                moe_norm_top_k=bool(hf.get("norm_topk_prob", False)), rope_theta=float(theta),
                moe_lb_loss_coef=hf.get("router_aux_loss_coef", 0.01))
        if model_type in ("olmo", "olmo2", "olmo3"):
            theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
            shape = (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"])
            tokens = dict(vocab_size=hf["vocab_size"], eos_token_id=hf.get("eos_token_id"),
                          pad_token_id=_pad_token_id(hf), bos_token_id=hf.get("bos_token_id"),
                          n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                          max_sequence_length=hf.get("max_position_embeddings", 2048))
            if model_type == "olmo":
                config = olmo1(*shape, tie=hf.get("tie_word_embeddings", False), clip_qkv=hf.get("clip_qkv"), **tokens)
            elif model_type == "olmo3":
                return model_type, olmo3(*shape, norm_eps=hf.get("rms_norm_eps", 1e-5),
                                         tie_embeddings=hf.get("tie_word_embeddings", False), **tokens,
                                         **_olmo3_options(hf, path))
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
    raise LmforgeError(f"{path}: cannot import model_type {model_type!r} (supported: {', '.join(IMPORTABLE)})")


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


EXPERT_WEIGHT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _stack_experts(hf_state: dict[str, torch.Tensor], config: ModelConfig, hf_dir: Path) -> dict[str, torch.Tensor]:
    """lmforge's stacked [n_experts, out, in] expert tensors from a checkpoint's per-expert weights, or from
    transformers' in-memory layout (`experts.gate_up_proj` [E, 2·hidden, d], `experts.down_proj`)."""
    ours = {}
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        if prefix + "gate_up_proj" in hf_state and prefix + "down_proj" in hf_state:
            gate, up = hf_state[prefix + "gate_up_proj"].chunk(2, dim=1)
            stacked = {"gate_proj": gate, "up_proj": up, "down_proj": hf_state[prefix + "down_proj"]}
        else:
            names = {p: [_expert_name(i, e, p) for e in range(config.n_experts)] for p in EXPERT_PROJECTIONS}
            missing = [n for group in names.values() for n in group if n not in hf_state]
            if missing:
                raise LmforgeError(f"{hf_dir}: weights missing for {missing[:3]}")
            stacked = {p: torch.stack([hf_state[n] for n in group]) for p, group in names.items()}
        ours.update({f"blocks.{i}.mlp.experts.{p}": t.contiguous() for p, t in stacked.items()})
    return ours


def is_hf_dir(path: str | Path) -> bool:
    """A transformers model directory: its config.json names a model_type or architectures."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert a transformers directory of a supported model type (IMPORTABLE) into an lmforge model directory."""
    model, tokenizer = read_hf(hf_dir)
    return write_model_dir(model, out, tokenizer, command="import hf", inputs=sorted(Path(hf_dir).glob("*.safetensors")),
                           extra={"source": str(hf_dir), "source_kind": "hf"})


def read_hf(hf_dir: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """A transformers directory of a supported model type (IMPORTABLE) as an lmforge model (CPU) and its tokenizer."""
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
    ours: dict[str, torch.Tensor] = _stack_experts(hf_state, config, hf_dir) if config.n_experts else {}
    for name, tensor in hf_state.items():
        if name in reverse:
            ours[reverse[name]] = tensor
        elif name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
            i, kind = int(name.split(".")[2]), name.rsplit(".", 1)[1]
            heads = tensor.reshape(config.n_heads, 3, config.head_dim, *tensor.shape[1:])
            for j, n in enumerate("qkv"):
                ours[f"blocks.{i}.attn.{n}_proj.{kind}"] = heads[:, j].reshape(config.d_model, *tensor.shape[1:])
    model = model_from_state(config, ours, hf_dir, "config.json")
    tokenizer = find_tokenizer(model_dir=hf_dir, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                               bos_id=config.bos_token_id, required=False)
    return model.eval(), tokenizer
