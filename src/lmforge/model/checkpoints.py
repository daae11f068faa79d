"""Reading training checkpoints: the layout `lmforge train` writes, and a checkpoint's model unsharded.

    RUN_DIR/checkpoints/step00000100/
        model_and_optim/     DCP directory: .metadata + one __R_0.distcp shard per rank; keys "model.<param>"
                             and "optim.state.<param>.exp_avg|exp_avg_sq|step", "optim.param_groups.<param>.*"
        train/rank{R}.pt     per-rank state: RNG states and the data loader's state
        meta.json            step, tokens, world size, model config, skip-step window, tokenizer, ...

Writing (atomically, by all ranks) is the trainer's job (`lmforge.train.checkpoint`); reading is here because
every stage after training loads models from checkpoints.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.model.transformer import ModelConfig, Transformer

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step(\d{8})$")
META = "meta.json"
DCP_DIR = "model_and_optim"
FORMAT = "lmforge-checkpoint"
# Parameters by their model names, optimizer state flattened per parameter: no FSDP/DDP/compile prefixes.
STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def dcp_io(fn, state: dict, path: Path) -> None:
    """dcp.save/dcp.load; without a process group DCP warns that it assumes one process, which is deliberate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        if fn is not dcp.load:
            try:
                fn(state, checkpoint_id=str(path))
            except CheckpointException as e:  # a BaseException wrapping each rank's (error, stack)
                raise next(iter(e.failures.values()))[0] from None  # for the caller's `writing` guard
            return
        if not (path / ".metadata").is_file():  # checked here: DCP would log its own tracebacks first
            raise LmforgeError(f"incomplete checkpoint: {path / '.metadata'} is missing")
        try:
            fn(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # missing/truncated shards surface as assorted errors
            if isinstance(e, CheckpointException):  # a BaseException wrapping each rank's (error, stack)
                e = next(iter(e.failures.values()))[0]
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LmforgeError(f"corrupt or incomplete checkpoint weights in {path}: {detail}") from None


def step_dir_name(step: int) -> str:
    return f"step{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / META).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINTS).is_dir()


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path} is not a complete lmforge checkpoint (no {META})") from None
    except ValueError as e:  # malformed JSON or not UTF-8
        raise LmforgeError(f"corrupt {path / META}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LmforgeError(f"{path / META} is not an lmforge checkpoint")
    return meta


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, read_meta(path)["model"], prefix="model.")


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint directory, or a run directory / checkpoints folder: its checkpoint at `step`, or its latest
    complete one."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    if is_checkpoint(path):
        if step is not None and read_meta(path).get("step") != step:
            raise LmforgeError(f"{path} is the checkpoint of step {read_meta(path).get('step')}, not {step}")
        return path
    for root in (path / CHECKPOINTS, path):
        found = list_checkpoints(root)
        if not found:
            continue
        if step is None:
            return found[-1][1]
        for s, candidate in found:
            if s == step:
                return candidate
        steps = ", ".join(str(s) for s, _ in found)
        raise LmforgeError(f"{path} has no complete checkpoint of step {step} (it has steps {steps})")
    raise LmforgeError(f"no complete checkpoint in {path}")


def load_checkpoint_model(path: str | Path) -> Transformer:
    """A checkpoint's model, unsharded into one process (CPU, fp32)."""
    path = Path(path)
    model = Transformer(checkpoint_model_config(path))
    state = {"model": get_model_state_dict(model, options=STATE_OPTIONS)}
    dcp_io(dcp.load, state, path / DCP_DIR)
    set_model_state_dict(model, state["model"], options=STATE_OPTIONS)
    return model.eval()
