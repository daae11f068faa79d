"""AdamW with OLMo's parameter groups, global-norm gradient clipping across shards, and the skip-step rule."""

from __future__ import annotations

import math
from collections import deque

import torch
from torch.distributed.tensor import DTensor

from lmforge.core.errors import LmforgeError
from lmforge.train.config import OptimizerConfig, SkipStepConfig
from lmforge.train.distributed import all_reduce_sum


def parameter_groups(model: torch.nn.Module, config: OptimizerConfig) -> list[dict]:
    """Two groups: decayed, and not decayed (embeddings unless asked; norms and biases when asked)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name.split(".")[-2:] == ["embed", "weight"]
        is_norm_or_bias = param.ndim < 2
        skip = (is_embedding and not config.decay_embeddings) or (is_norm_or_bias and not config.decay_norm_and_bias)
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    fused = config.fused if config.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        parameter_groups(model, config), lr=config.lr, betas=tuple(config.betas), eps=config.eps,
        weight_decay=config.weight_decay, fused=fused or None, foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float | None, clip: bool = True,
                   stage_group=None) -> torch.Tensor:
    """L2 norm of all gradients as one vector, across FSDP shards and ranks, and across the pipeline stages of
    `stage_group` when given (each holds other parameters); scales them to `max_norm` if larger and `clip`.
    Returns the norm before clipping (a 0-d tensor on the gradients' device). Gradients on different device
    meshes (experts split over an expert group, the rest over FSDP x tensor ranks) are normed per mesh, since
    DTensor ops do not mix meshes."""
    by_mesh: dict = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for params in by_mesh.values() or [[]]:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # a partial sum over shards
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if stage_group is not None:
        total = all_reduce_sum(total.float() ** 2, stage_group).sqrt()
    if clip and max_norm:
        for params in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


class SkipStep:
    """OLMo-core's `SkipStepOptimizer.get_step_factor` on the host: skip the update unless loss - mean <=
    sigma_factor·std and grad norm - mean <= sigma_factor·std, mean and std (unbiased) over the previous
    `window` values, once `min_values` are recorded counting this step's (OLMo-core: max(2, window // 2)).
    Finite values enter the window whether or not the step was skipped, so a lasting level shift is accepted
    after a while.

    Non-finite values differ from OLMo-core on purpose: they are always skipped and never recorded. OLMo-core
    takes a NaN step during its first window // 2 steps (the check is not active yet), and afterwards records
    the NaN, which makes mean and std NaN and skips every step until it leaves the window (128 steps)."""

    def __init__(self, config: SkipStepConfig):
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.grad_norms: deque[float] = deque(maxlen=config.window)
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Reason to skip this step, or None to take it. Raises after too many skips in a row."""
        if not self.config.enabled:
            return None
        reason = None
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            reason = f"non-finite loss {loss} or grad norm {grad_norm}"
        else:
            if len(self.losses) + 1 >= max(2, self.config.min_values):
                for name, value, window in (("loss", loss, self.losses), ("grad norm", grad_norm, self.grad_norms)):
                    mean, std = _mean_std(window)
                    if not value - mean <= self.config.sigma_factor * std:
                        limit = mean + self.config.sigma_factor * std
                        reason = f"{name} {value:.4g} > mean + {self.config.sigma_factor:g} sigma = {limit:.4g}"
                        break
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
        if reason is None:
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.config.max_consecutive:
            raise LmforgeError(
                f"stopping: {self.consecutive} optimizer steps in a row were skipped (last: {reason}); the run "
                f"has diverged or the data is broken. Lower the LR or resume from an earlier checkpoint "
                f"(skip_step.max_consecutive={self.config.max_consecutive})")
        return reason

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.losses.extend(state["losses"])
        self.grad_norms.extend(state["grad_norms"])
        self.consecutive = state["consecutive"]
        self.total_skipped = state["total_skipped"]


def _mean_std(values: deque[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var)
