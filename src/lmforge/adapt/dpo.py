"""Direct preference optimisation on the one trainer: pairs of (chosen, rejected) replies to one prompt.

Per pair, with log-probabilities summed over the reply's tokens (policy π, frozen start model as reference):
- `dpo` (sigmoid): -log σ(β·[(π_c - ref_c) - (π_r - ref_r)]);
- `dpo_norm` (Tülu 3, β = 5): the same with each log-probability divided by its reply's token count;
- `simpo` (reference-free): -log σ(β·[π_c/|c| - π_r/|r|] - γ), γ = β·simpo_gamma_beta_ratio.
Rewards are β·(π - ref) (per token for `dpo_norm`, β·π/|y| for SimPO); accuracy is the share of pairs whose
chosen reward is the larger. The loss and metrics are means over the global batch's pairs.

The reference log-probabilities (the start model's, or `reference_model`'s) are computed once, in fp32, before
training and cached on disk under a name that hashes the reference's weight files and the tokenized pairs, so a
rerun (or a resume) reads them back and any change of model or data computes them afresh.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash

from lmforge.adapt.config import DPOConfig
from lmforge.adapt.data import RecordReport, preference_arrays
from lmforge.adapt.runner import load_policy, run_stage
from lmforge.adapt.sft import trim_to_labels
from lmforge.core.files import atomic_write_bytes, combined_hash
from lmforge.model.loading import LoadedModel, load, resolve_device
from lmforge.train.objective import IGNORE_INDEX

REFERENCE_DIR = "reference"


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's labelled positions, their count), in fp32."""
    logits = model(input_ids)
    token = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(labels)
    return token.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, len_chosen: torch.Tensor, len_rejected: torch.Tensor, loss: str,
                    beta: float, gamma_beta_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) from summed log-probabilities (module docstring)."""
    if loss in ("dpo_norm", "simpo"):
        policy_chosen, policy_rejected = policy_chosen / len_chosen, policy_rejected / len_rejected
        ref_chosen, ref_rejected = ref_chosen / len_chosen, ref_rejected / len_rejected
    if loss == "simpo":
        logits = policy_chosen - policy_rejected - gamma_beta_ratio
        return -F.logsigmoid(beta * logits), beta * policy_chosen.detach(), beta * policy_rejected.detach()
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    return -F.logsigmoid(beta * (chosen - rejected)), beta * chosen.detach(), beta * rejected.detach()


PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob sums, token counts) of each pair's chosen then rejected reply: one forward over both."""
    both_labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    trimmed = trim_to_labels(batch, both_labels, PAIR_COLUMNS)
    ids = torch.cat([trimmed["chosen_input_ids"], trimmed["rejected_input_ids"]]).long()
    labels = torch.cat([trimmed["chosen_labels"], trimmed["rejected_labels"]]).long()
    sums, counts = sequence_logps(model, ids, labels)
    return sums.view(2, -1), counts.view(2, -1)


class DirectPreference:
    """The DPO objective (`lmforge.train.objective.Objective`): one pair is one unit of the normaliser."""

    def __init__(self, loss: str, beta: float, gamma_beta_ratio: float = 0.0):
        self.kind, self.beta, self.gamma_beta_ratio = loss, beta, gamma_beta_ratio

    def prepare(self, model, batch):
        return batch

    def count(self, batch):
        return torch.tensor(float(batch["chosen_input_ids"].shape[0]), device=batch["chosen_input_ids"].device)

    def loss(self, model, micro):
        (policy_c, policy_r), (len_c, len_r) = pair_logps(model, micro)
        losses, reward_c, reward_r = preference_loss(
            policy_c, policy_r, micro["ref_chosen_logps"], micro["ref_rejected_logps"], len_c, len_r,
            self.kind, self.beta, self.gamma_beta_ratio)
        metrics = {"rewards/chosen": reward_c.sum(), "rewards/rejected": reward_r.sum(),
                   "rewards/margin": (reward_c - reward_r).sum(),
                   "rewards/accuracy": (reward_c > reward_r).float().sum(),
                   "logps/chosen": policy_c.detach().sum(), "logps/rejected": policy_r.detach().sum()}
        return losses.sum(), metrics

    def interval_metrics(self) -> dict[str, float]:
        return {}


@torch.no_grad()
def reference_logps(model: torch.nn.Module, arrays: dict[str, np.ndarray], rows_per_batch: int,
                    device: str | torch.device) -> np.ndarray:
    """(pairs, 2) summed log-probabilities of the chosen and rejected replies under `model`, in fp32."""
    model = model.to(device=device, dtype=torch.float32).eval()
    out = np.zeros((len(arrays["chosen_input_ids"]), 2), dtype=np.float32)
    for start in range(0, len(out), rows_per_batch):
        batch = {k: torch.from_numpy(arrays[k][start:start + rows_per_batch]).to(device) for k in PAIR_COLUMNS}
        sums, _ = pair_logps(model, batch)
        out[start:start + rows_per_batch] = sums.T.cpu().numpy()
    return out


def cached_reference_logps(config: DPOConfig, loaded: LoadedModel, arrays: dict[str, np.ndarray]) -> np.ndarray:
    key = xxhash.xxh3_64(combined_hash(loaded.weight_files).encode())
    for name in PAIR_COLUMNS:
        key.update(np.ascontiguousarray(arrays[name]).tobytes())
    path = Path(config.reference_cache or Path(config.out) / REFERENCE_DIR) / f"{key.hexdigest()}.npy"
    if path.is_file():
        print(f"reference log-probs: read {path}", file=sys.stderr)
        return np.load(path)
    print(f"reference log-probs: computing for {len(arrays['chosen_input_ids']):,} pairs", file=sys.stderr)
    values = reference_logps(loaded.model, arrays, max(config.micro_batch_size, 8), resolve_device(
        None if config.device == "auto" else config.device))
    buffer = io.BytesIO()
    np.save(buffer, values)
    atomic_write_bytes(path, buffer.getvalue())
    return values


def dpo(config: DPOConfig) -> Path:
    loaded, tokenizer = load_policy(config.model, config.template)
    report = RecordReport()
    arrays = preference_arrays(config.data, tokenizer, config.max_seq_length, config.too_long, tokenizer.pad_id,
                               report)
    if config.loss == "simpo":  # reference-free
        reference = np.zeros((len(arrays["chosen_input_ids"]), 2), dtype=np.float32)
    else:
        reference_model = load(config.reference_model) if config.reference_model else loaded
        reference = cached_reference_logps(config, reference_model, arrays)
    arrays["ref_chosen_logps"], arrays["ref_rejected_logps"] = reference[:, 0].copy(), reference[:, 1].copy()
    objective = DirectPreference(config.loss, config.beta, config.simpo_gamma_beta_ratio)
    return run_stage(config, "dpo", loaded, tokenizer, arrays, objective, report)
