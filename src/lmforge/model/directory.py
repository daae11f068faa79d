"""The model directory, the unit every stage reads: `config.json` + `model.safetensors` (+ tokenizer files).

`config.json` holds `{"format": "lmforge-model", "version": 1, "model": <ModelConfig fields>}`. The safetensors
file holds the parameters by their `Transformer` names in fp32 (or the dtype saved); a tied LM head is stored
once, under `embed.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.core.config import from_dict, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_path, atomic_write_json
from lmforge.core.locks import output_lock
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokens.tokenizer import Tokenizer, find_tokenizer

FORMAT = "lmforge-model"
WEIGHTS = "model.safetensors"


def save_model_dir(model: Transformer, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write the model directory under its lock (callers that add a manifest hold it across both)."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    with output_lock(directory):
        with atomic_path(directory / WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_json(directory / "config.json", {"format": FORMAT, "version": 1, "model": to_dict(model.config)})
        if tokenizer is not None:
            tokenizer.save(directory)
    return directory


def is_model_dir(path: str | Path) -> bool:
    """Has a config.json: an lmforge model directory, or one `read_model_config` explains why it is not."""
    return (Path(path) / "config.json").is_file()


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise LmforgeError(f"model directory not found: {directory}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{directory} is not a model directory: no config.json") from None
    except ValueError as e:  # malformed JSON or not UTF-8
        raise LmforgeError(f"corrupt {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        hint = " (a Hugging Face directory? use `lmforge import hf` first)" if isinstance(data, dict) and "architectures" in data else ""
        raise LmforgeError(f"{path} is not an lmforge model config{hint}")
    return from_dict(ModelConfig, data["model"], prefix="model.")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LmforgeError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LmforgeError(f"corrupt weights file {path}: {e}") from None


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Build the model from `config.json`, load its weights, and the tokenizer when the directory has one."""
    directory = Path(directory)
    config = read_model_config(directory)
    model = model_from_state(config, load_state(directory / WEIGHTS), directory / WEIGHTS, "config.json")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    tokenizer = find_tokenizer(model_dir=directory, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                               bos_id=config.bos_token_id, required=False)
    check_tokenizer_fits(tokenizer, config)
    return model.eval(), tokenizer


def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a model of `config` stores (a tied head is the embedding: not listed)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], where: str | Path,
                     against: str) -> Transformer:
    """A model of `config` holding `state`'s tensors (CPU, eval mode), built on the meta device so that nothing
    is initialised only to be overwritten; a tied head is the embedding (a stored copy is ignored). Tensors
    missing, left over or of the wrong shape are refused, naming the weights (`where`) and what gave the
    config (`against`)."""
    shapes = state_shapes(config)
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise LmforgeError(f"weights in {where} do not match {against}: missing {missing[:3]}"
                           f"{f' ({len(missing)} in all)' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise LmforgeError(f"weights in {where}: {name} has shape {tuple(state[name].shape)}, {against} "
                               f"implies {shape}")
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        state = {**state, "lm_head.weight": state["embed.weight"]}
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if config.position == "alibi":  # a non-persistent buffer, still on the meta device
        from lmforge.model.transformer import alibi_slopes

        model.alibi_slopes = alibi_slopes(config.n_heads)
    return model.eval()


def check_tokenizer_fits(tokenizer: Tokenizer | None, config: ModelConfig, fix: str = "") -> None:
    """Token ids past the embedding would crash inside it: refuse such a pair up front (`fix` says how)."""
    if tokenizer is not None and tokenizer.vocab_size > config.embedding_size:
        raise LmforgeError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's "
                           f"embedding has {config.embedding_size} rows" + (f"; {fix}" if fix else ""))


def init_model_dir(config: ModelConfig, out: str | Path, seed: int = 0, tokenizer: str | None = None,
                   provenance: dict | None = None) -> Path:
    """A freshly initialised model directory (with the tokenizer, when given) and its manifest."""
    tok = Tokenizer.load(tokenizer) if tokenizer else None
    if tok is not None:
        check_tokenizer_fits(tok, config, fix=f"set vocab_size={tok.vocab_size}")
    return write_model_dir(build_model(config, seed), out, tok, command="model init",
                           config={**(provenance or {}), "seed": seed, "model": config})


def write_model_dir(model: torch.nn.Module, out: str | Path, tokenizer: Tokenizer | None, *, command: str,
                    **manifest: Any) -> Path:
    """A model directory and its manifest (`manifest`: `write_manifest`'s config, inputs, counts, extra), written
    under the directory's lock: what every command that makes a model directory writes."""
    from lmforge.core.manifest import write_manifest

    with output_lock(out):
        save_model_dir(model, out, tokenizer)
        write_manifest(out, command=command, **manifest)
    return Path(out)


def build_model(config: ModelConfig, seed: int, device: str | torch.device = "cpu") -> Transformer:
    """A freshly initialised model; the weights depend on `seed` only."""
    from lmforge.model.transformer import init_weights

    model = Transformer(config)
    init_weights(model, seed)
    return model.to(device)
