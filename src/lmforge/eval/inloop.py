"""In-loop evaluation for the trainer: the offline evaluation code on a fixed small subset.

`build_inloop_evaluators(config, tokenizer)` returns callables `evaluate(model) -> {metric: value}` that the
trainer runs every `eval_interval` steps (model in eval mode, under no_grad, time excluded from tokens/s).
Tasks and documents are loaded once, so every evaluation scores exactly the same instances; the metrics are
the offline ones (`lmforge eval`), including correct PMI, which the OLMo in-loop code cannot compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

MetricsFn = Callable[..., dict[str, float]]


@dataclass
class InLoopEvalConfig:
    tasks: list[str] = field(default_factory=list)  # downstream task names
    limit: int = 100  # instances per task, always the same ones
    ppl_documents: list[str] = field(default_factory=list)  # Dolma document globs for bits per byte
    max_ppl_documents: int = 200  # per file
    batch_size: int = 16
    regime: str = "olmes"  # olmo1 (zero-shot) or olmes (5-shot, cloze and letters)


def full_precision(model):
    """Autocast off: the evaluators run in the parameters' dtype, as `lmforge eval` does, so in-loop and
    offline numbers agree (and the KV cache, allocated in that dtype, matches the attention inputs)."""
    import torch

    return torch.autocast(device_type=next(model.parameters()).device.type, enabled=False)


def build_inloop_evaluators(config: InLoopEvalConfig, tokenizer) -> list[MetricsFn]:
    from lmforge.curation.documents import ReadReport, expand_globs
    from lmforge.eval.evaluate import evaluate_tasks
    from lmforge.eval.perplexity import collect_documents, perplexity
    from lmforge.eval.tasks import load_task

    evaluators: list[MetricsFn] = []
    if config.tasks:
        tasks = [load_task(name, config.regime, config.limit) for name in config.tasks]

        def downstream(model) -> dict[str, float]:
            with full_precision(model):
                results, _ = evaluate_tasks(model, tokenizer, tasks, batch_size=config.batch_size)
            metrics = {}
            for name, r in results.items():
                metrics[f"{name}/acc"] = r["acc"]
                metrics[f"{name}/bpb"] = r["bpb"]
            return metrics

        evaluators.append(downstream)
    if config.ppl_documents:
        documents = collect_documents(expand_globs(config.ppl_documents), config.max_ppl_documents, ReadReport())

        def bits_per_byte(model) -> dict[str, float]:
            with full_precision(model):
                result = perplexity(model, tokenizer, documents, batch_size=max(1, config.batch_size // 2))
            metrics = {f"ppl/{source}/bpb": s["bits_per_byte_macro"] for source, s in result["sources"].items()}
            metrics["ppl/bpb"] = result["total"]["bits_per_byte"]
            return metrics

        evaluators.append(bits_per_byte)
    return evaluators
