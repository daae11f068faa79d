"""The one model loader: every stage that reads a model (eval, generate, soup, export, adapt) calls `load`.

`load(path, step=None)` accepts any saved form of a model:
- an lmforge model directory (`config.json` + `model.safetensors`, see `model/directory.py`);
- a training checkpoint (`.../checkpoints/stepNNNNNNNN`);
- a training run directory: its checkpoint at `step`, else its latest complete one;
- a transformers directory of a supported family (converted in memory; `lmforge import hf` saves it).
The tokenizer follows the one lookup rule (`lmforge.tokens.tokenizer.find_tokenizer`): the one given, else the
model directory's, else the one the training run recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.checkpoints import (DCP_DIR, META, is_checkpoint, is_run_dir, load_checkpoint_model, read_meta,
                                       resolve_checkpoint)
from lmforge.model.directory import WEIGHTS, check_tokenizer_fits, is_model_dir, load_model_dir, write_model_dir
from lmforge.model.hf import is_hf_dir, read_hf
from lmforge.model.transformer import Transformer
from lmforge.tokens.tokenizer import Tokenizer, find_tokenizer


def resolve_device(name: str | None = None) -> str:
    """The device asked for, else CUDA when there is one, else the CPU; refused unless usable."""
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise LmforgeError(f"device {device!r} is not usable: {e}") from None
    return device


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    kind: str  # "model", "checkpoint" or "hf"
    path: Path  # the directory the weights came from (for a run: the checkpoint chosen)
    step: int | None = None  # training step, for checkpoints
    weight_files: list[Path] = field(default_factory=list)  # what to hash to identify the weights
    meta: dict = field(default_factory=dict)  # a checkpoint's meta.json


def load(path: str | Path, step: int | None = None, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, tokenizer: str | Path | None = None,
         require_tokenizer: bool = False) -> LoadedModel:
    """Load the model saved at `path` in any of its forms (module docstring), in eval mode on `device`."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"model directory not found: {path}")
    recorded = None
    if is_hf_dir(path):
        if step is not None:
            raise LmforgeError(f"{path} is a transformers directory, which has no steps")
        model, tok = read_hf(path)
        loaded = LoadedModel(model, tok, "hf", path, weight_files=sorted(path.glob("*.safetensors")))
    elif is_model_dir(path):
        if step is not None:
            raise LmforgeError(f"{path} is a model directory, which has no steps; a step selects a training run's "
                               "checkpoint")
        model, tok = load_model_dir(path)
        loaded = LoadedModel(model, tok, "model", path, weight_files=[path / WEIGHTS])
    elif is_checkpoint(path) or is_run_dir(path):
        resolved = resolve_checkpoint(path, step)
        meta = read_meta(resolved)
        model = load_checkpoint_model(resolved)
        loaded = LoadedModel(model, None, "checkpoint", resolved, step=meta.get("step"),
                             weight_files=sorted((resolved / DCP_DIR).iterdir()) + [resolved / META], meta=meta)
        recorded = meta.get("tokenizer")
    else:
        raise LmforgeError(f"{path} is not a model: expected an lmforge model directory (config.json + "
                           f"{WEIGHTS}), a training run or checkpoint, or a transformers directory")
    config = loaded.model.config
    if tokenizer is not None or loaded.tokenizer is None:
        found = find_tokenizer(tokenizer, recorded=recorded,
                               eos_id=config.eos_token_id, pad_id=config.pad_token_id, bos_id=config.bos_token_id,
                               required=require_tokenizer, what=str(path))
        check_tokenizer_fits(found, config)
        loaded.tokenizer = found
    loaded.model = loaded.model.to(device=device, dtype=dtype) if dtype is not None else loaded.model.to(device)
    return loaded


def export_model_dir(path: str | Path, out: str | Path, step: int | None = None,
                     tokenizer: str | Path | None = None, command: str = "checkpoint export") -> Path:
    """Write any saved form of a model (see `load`) as a plain model directory, with a manifest."""
    loaded = load(path, step, tokenizer=tokenizer)
    out = Path(out)
    counts = {"step": loaded.step, "tokens": loaded.meta.get("tokens", 0)} if loaded.kind == "checkpoint" else {}
    write_model_dir(loaded.model, out, loaded.tokenizer, command=command, counts=counts,
                    inputs=[p for p in loaded.weight_files if p.is_file()],
                    extra={"source": str(loaded.path), "source_kind": loaded.kind})
    return out
