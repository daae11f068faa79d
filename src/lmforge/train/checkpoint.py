"""Sharded, atomic, resharding checkpoints with `torch.distributed.checkpoint` (DCP).

    RUN_DIR/checkpoints/step00000100/
        model_and_optim/     DCP directory: .metadata + one __R_0.distcp shard per rank; keys "model.<param>"
                             and "optim.state.<param>.exp_avg|exp_avg_sq|step", "optim.param_groups.<param>.*"
        train/rank{R}.pt     per-rank state: RNG states and the data loader's state
        meta.json            step, tokens, world size, model config, skip-step window, tokenizer, ...

Every rank writes into `.tmp-step00000100/`; after a barrier rank 0 renames it to `step00000100/`, the one
atomic act. A kill at any moment leaves either the old set of checkpoints or the old set plus a complete new
one; leftover `.tmp-*` directories are removed at the next start. DCP saves parameters by their model names
(no FSDP/DDP/compile prefixes) and reshards on load, so a run resumes on a different number of ranks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.config import from_dict, to_dict
from lmforge.errors import LmforgeError
from lmforge.manifest import atomic_write_json
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train.distributed import DistInfo, barrier

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step(\d{8})$")
META = "meta.json"
DCP_DIR = "model_and_optim"
FORMAT = "lmforge-checkpoint"


_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp(fn, state: dict, path: Path) -> None:
    """dcp.save/dcp.load; without a process group DCP warns that it assumes one process, which is deliberate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        if fn is not dcp.load:
            fn(state, checkpoint_id=str(path))
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


def remove_partial_saves(root: str | Path) -> None:
    root = Path(root)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-"):
                shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict, rank_state: dict, dist_info: DistInfo) -> Path:
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": get_model_state_dict(model, options=_OPTIONS),
             "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIONS)}
    _dcp(dcp.save, state, tmp / DCP_DIR)
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
    return (model["vocab_size"] + m - 1) // m * m


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    dist_info: DistInfo) -> tuple[dict, dict | None]:
    """Load model (and optimizer) state in place, resharding as needed. Returns (meta, this rank's state or
    None when the checkpoint was written by a different number of ranks)."""
    path = Path(path)
    meta = read_meta(path)
    state = {"model": get_model_state_dict(model, options=_OPTIONS)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    _dcp(dcp.load, state, path / DCP_DIR)
    set_model_state_dict(model, state["model"], options=_OPTIONS)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTIONS)
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
    state = {"model": get_model_state_dict(model, options=_OPTIONS)}
    _dcp(dcp.load, state, resolved / DCP_DIR)
    set_model_state_dict(model, state["model"], options=_OPTIONS)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints folder (its latest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    if (path / META).is_file():
        return path
    for root in (path / CHECKPOINTS, path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise LmforgeError(f"no complete checkpoint in {path}")


def load_full_model(path: str | Path) -> Transformer:
    """A checkpoint's model, unsharded into one process (CPU, fp32)."""
    path = resolve_checkpoint(path)
    config = checkpoint_model_config(path)
    model = Transformer(config)
    state = {"model": get_model_state_dict(model, options=_OPTIONS)}
    _dcp(dcp.load, state, path / DCP_DIR)
    set_model_state_dict(model, state["model"], options=_OPTIONS)
    return model.eval()


def export_checkpoint(path: str | Path, out: str | Path, tokenizer: str | None = None) -> Path:
    """Write the plain model directory (config.json + model.safetensors + tokenizer) that eval/generate read."""
    from lmforge.model.directory import save_model_dir
    from lmforge.tokenizer import Tokenizer

    resolved = resolve_checkpoint(path)
    meta = read_meta(resolved)
    model = load_full_model(resolved)
    tokenizer_name = tokenizer or meta.get("tokenizer")
    tok = None
    if tokenizer_name:
        c = model.config
        tok = Tokenizer.load(tokenizer_name, eos_id=c.eos_token_id, pad_id=c.pad_token_id, bos_id=c.bos_token_id)
    out = Path(out)
    save_model_dir(model, out, tok)
    from lmforge.manifest import write_manifest

    write_manifest(out, command="checkpoint export", inputs=[resolved / META],
                   counts={"step": meta["step"], "tokens": meta.get("tokens", 0)},
                   extra={"checkpoint": str(resolved)})
    return out
