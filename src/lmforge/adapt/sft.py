"""Supervised fine-tuning: next-token prediction on the assistant tokens of chat records, on the one trainer.

The loss of a step is the cross-entropy summed over the global batch's trained tokens, divided by
- `mean`: those tokens' count (a per-token mean over the whole global batch), or
- `sum` (Tülu 3): the global batch's sequences (rows). open-instruct's `sum` divides each device's summed
  micro-batch loss by the gradient-accumulation steps and averages over ranks, i.e. divides by the number of
  micro-batches; with one sequence per micro-batch, as Tülu 3 trains, that is the number of sequences. Here
  it is the number of sequences whatever the micro-batch size and rank count, so a change of hardware does not
  change the gradient. Its scale grows with the tokens per sequence, hence Tülu 3's small LR (5e-6).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.adapt.config import SFTConfig
from lmforge.adapt.data import RecordReport, pack_rows, sft_examples
from lmforge.adapt.runner import load_policy, run_stage
from lmforge.eval.scoring import logits_at
from lmforge.model.transformer import cross_entropy_loss
from lmforge.train.objective import IGNORE_INDEX, NextTokenPrediction


def trim_to_labels(micro: dict[str, torch.Tensor], labels: torch.Tensor, keys: tuple[str, ...]
                   ) -> dict[str, torch.Tensor]:
    """The micro-batch without the trailing columns after its last trained position (padding: a causal model's
    loss on earlier positions does not depend on them)."""
    columns = (labels != IGNORE_INDEX).any(0).nonzero()
    keep = int(columns[-1]) + 1 if len(columns) else 1
    return {k: v[:, :keep] if k in keys else v for k, v in micro.items()}


class SupervisedFineTuning(NextTokenPrediction):
    """Next-token prediction on the batch's explicit labels; the normaliser follows `reduction`."""

    def __init__(self, reduction: str):
        super().__init__(z_loss_multiplier=None)
        self.reduction = reduction

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reduction == "sum":
            return torch.tensor(float(batch["labels"].shape[0]), device=batch["labels"].device)
        return super().count(batch)

    def forward_loss(self, model, input_ids, labels, doc_ids):
        """The LM head at the trained positions only: an SFT row trains on its assistant tokens, often a small
        share of it, and the head is the largest matmul of a small model. Under tensor or context parallelism
        (the head's output or the sequence is split across ranks) the pretraining path runs."""
        if self.parallel is not None and (self.parallel.layout.tensor > 1 or self.parallel.context is not None):
            return super().forward_loss(model, input_ids, labels, doc_ids)
        trained = labels != IGNORE_INDEX
        with logits_at(model, lambda hidden: hidden[trained]):
            logits, router = model(input_ids, doc_ids=doc_ids, return_router_losses=True)
        ce, _ = cross_entropy_loss(logits, labels[trained], IGNORE_INDEX, reduction="sum")
        return ce, None, router

    def loss(self, model, micro):
        return super().loss(model, trim_to_labels(micro, micro["labels"], ("input_ids", "labels", "doc_ids")))


def sft(config: SFTConfig) -> Path:
    loaded, tokenizer = load_policy(config.model, config.template)
    report = RecordReport()
    examples = sft_examples(config.data, tokenizer, config.max_seq_length, config.too_long, report)
    arrays = pack_rows(examples, config.max_seq_length, tokenizer.pad_id, config.packing)
    return run_stage(config, "sft", loaded, tokenizer, arrays, SupervisedFineTuning(config.loss_reduction), report)
