"""Training metrics: a console line, RUN_DIR/metrics.jsonl, TensorBoard when installed, W&B when asked.

MFU = flops_per_token · tokens/s per device / peak FLOP/s per device, with FLOPs per token from
`lmforge.model.info.flops_per_token` (OLMo-core 3.0's formula: 6·(block + LM-head params) plus causal
attention counted once). Peaks are dense bf16 tensor-core numbers; on CPU there is none unless configured.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from lmforge.core.files import truncate_step_log, writing
from lmforge.train.config import MetricsConfig

PEAK_BF16_FLOPS = {  # dense, per device
    "H100 SXM": 989.5e12, "H100 NVL": 835.5e12, "H100 PCIe": 756.5e12, "H100": 989.5e12, "H200": 989.5e12,
    "B200": 2.25e15, "B300": 2.25e15, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform != "darwin" else rss / 2**30


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger."""

    def __init__(self, run_dir: str | Path, config: MetricsConfig, enabled: bool, run_config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if config.wandb:
            import wandb

            self.wandb = wandb.init(project=config.wandb_project, dir=str(run_dir), mode=config.wandb_mode,
                                    config=run_config, name=Path(run_dir).name, resume="allow")

    def truncate_after(self, step: int) -> None:
        if self.enabled:
            truncate_step_log(self.path, step)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def console_line(row: dict, max_steps: int | None) -> str:
    parts = [f"step {row['step']}" + (f"/{max_steps}" if max_steps else "")]
    parts.append(f"loss {row['loss']:.4f}")
    if row.get("z_loss") is not None:
        parts.append(f"z {row['z_loss']:.2e}")
    if row.get("moe_lb_loss") is not None:
        parts.append(f"lb {row['moe_lb_loss']:.3f} rz {row['moe_z_loss']:.2e}")
    if row.get("reward") is not None:  # an RL objective's rollouts
        parts.append(f"reward {row['reward']:.3f} acc {row['accuracy']:.3f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"gnorm {row['grad_norm']:.3f}")
    parts.append(f"{row['tokens_per_second_per_device']:,.0f} tok/s/dev")
    if row.get("mfu") is not None:
        parts.append(f"MFU {row['mfu']:.1f}%")
    parts.append(f"data {row['data_wait_pct']:.1f}%")
    parts.append(f"mem {row['memory_gib']:.2f} GiB")
    if row.get("energy_kwh") is not None:
        parts.append(f"{1000 * row['energy_kwh']:.3g} Wh")
    if row.get("skipped"):
        parts.append(f"skipped {row['skipped']}")
    return " | ".join(parts)
