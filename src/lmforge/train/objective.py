"""What one optimizer step minimises. The trainer owns everything around it (micro-batching, gradient
scaling across ranks, clipping, skip-step, schedule, optimizer, checkpoints, metrics); an objective says
how a micro-batch becomes a loss. Pretraining uses next-token prediction; adaptation (SFT on masked
labels, DPO, GRPO) plugs its own objective into the same trainer.

The contract, for gradients that do not depend on how a step is split into micro-batches and ranks:
  loss of the step = (sum over the global batch of `loss` sums) / (sum over ranks of `count`),
and each reported metric is likewise its global sum divided by the global count.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lmforge.model.transformer import RouterLosses, cross_entropy_loss
from lmforge.train.distributed import all_reduce_sum
from lmforge.train.parallelize import Parallelized

IGNORE_INDEX = -100


class Objective(Protocol):
    def prepare(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Once per step, before the micro-batches, with the current weights (an RL objective samples here).
        Every tensor of the returned batch has the batch's rows as its first dimension."""
        ...

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's share of the step's normaliser (label tokens, pairs, sequences)."""
        ...

    def loss(self, model: torch.nn.Module, micro: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the loss over the micro-batch, sums of the metrics to report as global means)."""
        ...

    def interval_metrics(self) -> dict[str, float]:
        """Metrics accumulated since the last metrics line (called on every rank, so it may communicate)."""
        ...


def next_token_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets of each position: the batch's "labels", or the next input token (none at the last position),
    with positions outside "label_mask" ignored."""
    if "labels" in batch:
        labels = batch["labels"].long()
    else:
        ids = batch["input_ids"].long()
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]
    if "label_mask" in batch:
        labels = labels.masked_fill(~batch["label_mask"].bool(), IGNORE_INDEX)
    return labels


def doc_ids_from_lengths(doc_lens: torch.Tensor) -> torch.Tensor:
    """(instances, seq) document index of each position, from each instance's document lengths (0-padded)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row), device=row.device), row)
                        for row in doc_lens.long()])


class NextTokenPrediction:
    """Cross-entropy on the next token (plus z-loss, plus a mixture of experts' router losses weighted by the
    micro-batch's label tokens, i.e. their token-weighted mean over the global batch)."""

    def __init__(self, z_loss_multiplier: float | None, parallel: Parallelized | None = None):
        self.z_loss_multiplier = z_loss_multiplier
        # Under context parallelism a rank sees sequence chunks, under tensor parallelism a vocabulary slice;
        # the trainer hands over its layout when none is given.
        self.parallel = parallel
        self.expert_counts: torch.Tensor | None = None  # (MoE layers, experts) picks since the last metrics line

    def prepare(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prepared = {"input_ids": batch["input_ids"].long(), "labels": next_token_labels(batch)}
        if "doc_lens" in batch:
            prepared["doc_ids"] = doc_ids_from_lengths(batch["doc_lens"])
        return prepared

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum().to(torch.float32)

    def forward_loss(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, RouterLosses | None]:
        """(sum of CE, sum of z-loss) over the real label tokens on this rank, and the router losses (None when
        dense)."""
        if self.parallel is None:
            logits, router = model(input_ids, doc_ids=doc_ids, return_router_losses=True)
            ce, z = cross_entropy_loss(logits, labels, IGNORE_INDEX, self.z_loss_multiplier, reduction="sum")
            return ce, z, router
        input_ids, labels, inputs = self.parallel.split_sequence(input_ids, labels, doc_ids)
        logits, router = model(input_ids, **inputs, return_router_losses=True)
        ce, z = self.parallel.loss(logits, labels, IGNORE_INDEX, self.z_loss_multiplier)
        return ce, z, router

    def loss(self, model: torch.nn.Module, micro: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = micro["labels"]
        ce, z, router = self.forward_loss(model, micro["input_ids"], labels, micro.get("doc_ids"))
        return self._total(labels, ce, z, router)

    def logits_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loss` from a micro-batch's logits (a pipeline's last stage computes them; no router losses there)."""
        ce, z = self.parallel.loss(logits, labels, IGNORE_INDEX, self.z_loss_multiplier)
        return self._total(labels, ce, z, None)

    def _total(self, labels: torch.Tensor, ce: torch.Tensor, z: torch.Tensor | None, router: RouterLosses | None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = ce + z if z is not None else ce
        metrics = {}
        if z is not None:
            metrics["z_loss"] = z.detach()
        if router is not None:
            tokens = (labels != IGNORE_INDEX).sum()
            loss = loss + router.total * tokens
            metrics["moe_lb_loss"] = router.load_balancing.detach() * tokens
            metrics["moe_z_loss"] = router.z_loss.detach() * tokens
            counts = router.expert_counts.detach()
            self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
        return loss, metrics

    def interval_metrics(self) -> dict[str, float]:
        if self.expert_counts is None:
            return {}
        load = expert_load(all_reduce_sum(self.expert_counts, self.parallel.loss_group if self.parallel else None))
        self.expert_counts = None
        return load


def expert_load(counts: torch.Tensor) -> dict[str, float]:
    """Per MoE layer, the smallest and largest share of the router's picks that one expert got (1/n_experts
    each when balanced), from (layers, experts) pick counts."""
    share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    low, high = share.min(-1).values.tolist(), share.max(-1).values.tolist()
    row = {}
    for layer, (a, b) in enumerate(zip(low, high)):
        row[f"expert_load/layer{layer}_min"], row[f"expert_load/layer{layer}_max"] = a, b
    return row
