"""float8 training through torchao: the blocks' linear layers compute their matmuls in float8 with rowwise
(per-row) scales, the recipe torchao keeps (tensorwise scaling was removed upstream). Applied before
activation checkpointing, compile and sharding, as torchtitan does; parameters and their names stay as they
are, so checkpoints do not depend on it. The LM head stays in bf16 (its output feeds the loss directly)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import torch
import torch.nn as nn

from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import Transformer

# float8 matmuls (torch._scaled_mm with rowwise scales) need Ada/Hopper or later.
MIN_CAPABILITY = (8, 9)


def float8_unavailable(device: torch.device) -> str | None:
    """Why this device cannot run float8 matmuls, or None."""
    if device.type != "cuda":
        return f"{device.type} has no float8 matmuls"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has " \
               f"no float8 matmuls (needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later)"
    return None


def float8_linear(module: nn.Module, fqn: str) -> bool:
    """Which linear layers to convert: those inside the blocks whose both sizes are multiples of 16 (the
    float8 matmul's requirement)."""
    return (isinstance(module, nn.Linear) and fqn.startswith("blocks.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_float8(model: Transformer, recipe: str, device: torch.device, log: Callable[[str], None],
                 emulate: bool = False) -> int:
    """Swap the blocks' linear layers for torchao's float8 ones; returns how many. Where the device has no
    float8 matmuls the run goes on in its configured precision and `log` says so once (a config can then
    serve a CPU smoke test and a GPU run); without torchao it is refused. `emulate` computes the float8
    casts in ordinary matmuls (torchao's emulation, for tests on CPU)."""
    if recipe == "none":
        return 0
    reason = None if emulate else float8_unavailable(device)
    if reason is not None:
        log(f"float8: skipped, {reason}; training without it")
        return 0
    if importlib.util.find_spec("torchao") is None:
        raise LmforgeError("float8: rowwise needs torchao (pip install 'lmforge[float8]')")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    converted = sum(float8_linear(m, name) for name, m in model.named_modules())
    convert_to_float8_training(model, config=config, module_filter_fn=float8_linear)
    log(f"float8: {converted} linear layers in float8 ({recipe} scaling)")
    return converted
