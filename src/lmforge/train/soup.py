"""Model soups: a (weighted) average of the parameters of several checkpoints of one model, as OLMo 2 averages
its stage-2 runs. Inputs may be checkpoints, run directories (their latest checkpoint) or model directories."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.core.config import to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest
from lmforge.model.directory import save_model_dir
from lmforge.model.loading import load
from lmforge.model.transformer import Transformer


def soup(paths: list[str], out: str | Path, weights: list[float] | None = None, tokenizer: str | None = None) -> Path:
    if len(paths) < 2:
        raise LmforgeError("a soup needs at least two checkpoints")
    if weights is None:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise LmforgeError(f"{len(weights)} weights for {len(paths)} checkpoints")
    if not all(0 <= w < float("inf") for w in weights) or sum(weights) <= 0:  # `0 <= w` is False for NaN too
        raise LmforgeError("weights must be finite, non-negative and not all zero")
    total = sum(weights)
    weights = [w / total for w in weights]
    averaged: dict[str, torch.Tensor] = {}
    first: Transformer | None = None
    first_tokenizer = None
    for path, weight in zip(paths, weights):
        loaded = load(path, tokenizer=tokenizer if first is None else None)
        model = loaded.model
        if first is None:
            first, first_tokenizer = model, loaded.tokenizer
        elif to_dict(model.config) != to_dict(first.config):
            raise LmforgeError(f"{path} holds a different model from {paths[0]}; only one model's checkpoints mix")
        for name, tensor in model.state_dict().items():
            acc = averaged.setdefault(name, torch.zeros(tensor.shape, dtype=torch.float64))
            acc.add_(tensor.double(), alpha=weight)
    first.load_state_dict({k: v.to(torch.float32) for k, v in averaged.items()})
    out = Path(out)
    with output_lock(out):
        save_model_dir(first, out, first_tokenizer)
        write_manifest(out, command="soup", config={"checkpoints": [str(p) for p in paths], "weights": weights},
                       counts={"checkpoints": len(paths)})
    return out
