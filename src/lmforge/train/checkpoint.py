"""Saving and resuming sharded, atomic, resharding checkpoints with `torch.distributed.checkpoint` (DCP).

The layout, and reading a checkpoint's model, are in `lmforge.model.checkpoints`.

Every rank writes into `.step00000100.tmp/`; after a barrier rank 0 renames it to `step00000100/`, the one
atomic act. A kill at any moment leaves either the old set of checkpoints or the old set plus a complete new
one; leftover temporary directories are removed at the next start (and by the run directory's lock). A full
disk ends the save with one `OutputWriteError` naming the checkpoint. DCP saves parameters by their model names
(no FSDP/DDP/compile prefixes) and reshards on load, so a run resumes on a different number of ranks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.core.config import to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, remove_temps, temp_name, writing
from lmforge.tokens.tokenizer import pad_vocab_size
from lmforge.model.transformer import ModelConfig
from lmforge.model.checkpoints import (DCP_DIR, FORMAT, META, STATE_OPTIONS, checkpoint_model_config, dcp_io,
                                       list_checkpoints, read_meta, resolve_checkpoint, step_dir_name)
from lmforge.train.distributed import DistInfo, barrier



def remove_partial_saves(root: str | Path) -> None:
    if Path(root).is_dir():
        remove_temps(root)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict, rank_state: dict, dist_info: DistInfo) -> Path:
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / temp_name(final.name)
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": get_model_state_dict(model, options=STATE_OPTIONS),
             "optim": get_optimizer_state_dict(model, optimizer, options=STATE_OPTIONS)}
    with writing(final, tmp):
        dcp_io(dcp.save, state, tmp / DCP_DIR)
        (tmp / "train").mkdir(exist_ok=True)
        torch.save(rank_state, tmp / "train" / f"rank{dist_info.rank}.pt")
    barrier()
    if dist_info.is_main:
        atomic_write_json(tmp / META, {"format": FORMAT, "version": 1, "step": step,
                                       "world_size": dist_info.world_size, **meta})
        _fsync_dir(tmp)
        if final.exists():  # a save of the same step survived an earlier crash after the rename
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(root: str | Path, keep_last: int, permanent_interval: int | None) -> None:
    """Delete all but the newest `keep_last`, never touching steps at multiples of `permanent_interval`."""
    removable = [(s, p) for s, p in list_checkpoints(root)
                 if not (permanent_interval and s % permanent_interval == 0)]
    for _, path in removable[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def check_same_model(path: str | Path, config: ModelConfig, source_config: ModelConfig | None = None) -> None:
    """Refuse a checkpoint whose parameter shapes cannot be the configured model's."""
    theirs = to_dict(source_config or checkpoint_model_config(path))
    ours = to_dict(config)
    shape_fields = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "mlp", "norm", "norm_affine",
                    "qk_norm", "bias", "embedding_norm", "tie_embeddings", "position", "vocab_multiple")
    differing = [f for f in shape_fields if theirs.get(f) != ours.get(f)]
    if _embedding_size(theirs) != _embedding_size(ours):
        differing.append("vocab_size")
    if differing:
        details = ", ".join(f"{f}: {theirs.get(f)} vs {ours.get(f)}" for f in differing)
        raise LmforgeError(f"checkpoint {path} holds another model ({details}; checkpoint vs config)")


def _embedding_size(model: dict) -> int:
    m = model["vocab_multiple"]
    return pad_vocab_size(model["vocab_size"], m)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    dist_info: DistInfo) -> tuple[dict, dict | None]:
    """Load model (and optimizer) state in place, resharding as needed. Returns (meta, this rank's state or
    None when the checkpoint was written by a different number of ranks)."""
    path = Path(path)
    meta = read_meta(path)
    state = {"model": get_model_state_dict(model, options=STATE_OPTIONS)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=STATE_OPTIONS)
    dcp_io(dcp.load, state, path / DCP_DIR)
    set_model_state_dict(model, state["model"], options=STATE_OPTIONS)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=STATE_OPTIONS)
    rank_file = path / "train" / f"rank{dist_info.rank}.pt"
    rank_state = None
    if meta["world_size"] == dist_info.world_size and rank_file.is_file():
        try:
            rank_state = torch.load(rank_file, weights_only=False)
        except Exception as e:  # unpickling garbage raises whatever the bytes happen to trigger
            raise LmforgeError(f"corrupt {rank_file}: {e}") from None
    return meta, rank_state


def load_weights_for_init(path: str | Path, model: torch.nn.Module, config: ModelConfig) -> None:
    """Stage 2: copy weights from a checkpoint or a model directory into `model` (any parallel wrapping)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from lmforge.model.directory import load_model_dir, read_model_config

        check_same_model(path, config, read_model_config(path))
        source, _ = load_model_dir(path)
        set_model_state_dict(model, source.state_dict(), options=StateDictOptions(full_state_dict=True,
                                                                                   broadcast_from_rank0=False))
        return
    resolved = resolve_checkpoint(path)
    check_same_model(resolved, config)
    state = {"model": get_model_state_dict(model, options=STATE_OPTIONS)}
    dcp_io(dcp.load, state, resolved / DCP_DIR)
    set_model_state_dict(model, state["model"], options=STATE_OPTIONS)


