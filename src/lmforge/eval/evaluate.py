"""`lmforge eval`: score tasks and perplexity sources with one model and write the results.

All rank-classification requests of all tasks are tokenized with the model directory's tokenizer and scored in
one pass (identical pairs and shared contexts are computed once), then each task's metrics are derived:
accuracy under the regime's normalisation (all others on request), gold-continuation bits per byte and the
instance count, plus how many instances had to be truncated.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

from lmforge.core.errors import LmforgeError
from lmforge.core.progress import Progress
from lmforge.eval.config import EvalConfig
from lmforge.eval.scoring import ChoiceStats, gold_bits_per_byte, loglikelihoods, predict
from lmforge.eval.tasks import (NORMALIZATIONS, UNCOND_CONTEXT, RCInstance, Task, load_tasks as load_named_tasks,
                                resolve_tasks)

FREE_NORMALIZATIONS = tuple(n for n in NORMALIZATIONS if n != "pmi")  # need no extra forward pass


class Encoder:
    """Tokenizes contexts (with the model's BOS, EOS for an empty one) and continuations, memoised."""

    def __init__(self, tokenizer, bos_id: int | None):
        self.tokenizer, self.bos_id = tokenizer, bos_id
        self.contexts: dict[str, tuple[int, ...]] = {}
        self.continuations: dict[str, tuple[int, ...]] = {}

    def context(self, text: str) -> tuple[int, ...]:
        if text not in self.contexts:
            ids = self.tokenizer.encode(text) if text else []
            prefix = [self.bos_id] if self.bos_id is not None else ([] if ids else [self.tokenizer.eos_id])
            self.contexts[text] = tuple(prefix + ids)
        return self.contexts[text]

    def continuation(self, text: str) -> tuple[int, ...]:
        if text not in self.continuations:
            ids = tuple(self.tokenizer.encode(text))
            if not ids:
                raise LmforgeError(f"continuation {text!r} encodes to no tokens")
            self.continuations[text] = ids
        return self.continuations[text]


def needs_pmi(task: Task, all_norms: bool) -> bool:
    return all_norms or any(f.normalization == "pmi" for f in task.formulations)


def evaluate_tasks(model, tokenizer, tasks: list[Task], batch_size: int = 16, all_norms: bool = False,
                   max_new_tokens: int | None = None, progress: bool = False,
                   chat: bool = False) -> tuple[dict, dict[str, list[dict]]]:
    """Metrics per task and per-instance predictions per task."""
    from lmforge.eval.generative import generate_answers

    if chat and tokenizer.chat_template is None:  # before any scoring
        raise LmforgeError(f"--chat: tokenizer {tokenizer.source or '(in memory)'} has no chat template")

    encoder = Encoder(tokenizer, model.config.bos_token_id)
    pair_index: dict[tuple, int] = {}
    max_len = model.config.max_sequence_length

    def pair(context: str, continuation: str, where: str) -> int:
        key = (encoder.context(context), encoder.continuation(continuation))
        if len(key[1]) > max_len:
            raise LmforgeError(f"{where}: a continuation of {len(key[1])} tokens does not fit the model's "
                               f"context of {max_len} tokens")
        return pair_index.setdefault(key, len(pair_index))

    def fits(text: str) -> bool:
        return len(encoder.continuation(text)) <= max_len

    plans = []  # (task, formulation, per-instance [(cond pair ids), (uncond pair ids) | None])
    for task in tasks:
        pmi = needs_pmi(task, all_norms)
        for form in task.formulations:
            refs = []
            for inst in form.instances:
                if isinstance(inst, RCInstance):
                    cond = [pair(c, k, inst.id) for c, k in zip(inst.contexts, inst.continuations)]
                    uncond = [pair(UNCOND_CONTEXT, k, inst.id) for k in inst.continuations] if pmi else None
                    refs.append((cond, uncond))
                elif inst.reference and fits(inst.reference):  # gold solution bits per byte, when it fits
                    refs.append(([pair(inst.context, inst.reference, inst.id)], None))
                else:
                    refs.append(([], None))
            plans.append((task, form, refs))

    pairs = list(pair_index)
    bar = Progress(len(pairs), "scoring", "req", progress)
    scored = loglikelihoods(model, pairs, batch_size=batch_size, progress=bar)
    bar.close()
    lls, truncated = scored.loglikelihoods, scored.truncated

    results: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = defaultdict(list)
    for task, form, refs in plans:
        if form.name == "gen":
            budget = max_new_tokens if max_new_tokens is not None else form.max_new_tokens
            bar = Progress(len(form.instances), f"generating {task.name}", "req", progress)
            records = generate_answers(model, tokenizer, form.instances, form.checker, form.stop, budget,
                                       batch_size=batch_size, progress=bar, chat=chat)
            bar.close()
            metrics = generative_metrics(form, records, refs, lls, task.macro_over_groups)
            for r in records:
                predictions[task.name].append({"formulation": "gen", **r})
        else:
            metrics, rows = rc_metrics(task, form, refs, lls, truncated, pairs, all_norms)
            predictions[task.name].extend(rows)
        results.setdefault(task.name, {"regime": task.regime, "formulations": {}})["formulations"][form.name] = metrics
    for task in tasks:
        entry = results[task.name]
        forms = entry["formulations"]
        best = max(forms, key=lambda f: forms[f]["acc"])  # OLMES: the better of cloze and letters
        entry.update(primary_metric="acc", acc=forms[best]["acc"], best_formulation=best,
                     normalization=forms[best]["normalization"], bpb=next(iter(forms.values()))["bpb"],
                     n=forms[best]["n"], truncated=max(f["truncated"] for f in forms.values()))
    return results, dict(predictions)


def macro_or_micro(correct: list[bool], groups: list[str], macro: bool) -> float:
    if not correct:
        return float("nan")
    if not macro:
        return sum(correct) / len(correct)
    by_group: dict[str, list[bool]] = defaultdict(list)
    for c, g in zip(correct, groups):
        by_group[g].append(c)
    return sum(sum(v) / len(v) for v in by_group.values()) / len(by_group)


def rc_metrics(task: Task, form, refs, lls, truncated, pairs, all_norms: bool) -> tuple[dict, list[dict]]:
    norms = list(FREE_NORMALIZATIONS) + (["pmi"] if needs_pmi(task, all_norms) else [])
    correct: dict[str, list[bool]] = {n: [] for n in norms}
    groups, gold_lls, gold_bytes, rows, cut = [], [], [], [], 0
    for inst, (cond, uncond) in zip(form.instances, refs):
        choices = [ChoiceStats(lls[p], len(pairs[p][1]), text, lls[u] if uncond else None)
                   for p, text, u in zip(cond, inst.continuations, uncond or [None] * len(cond))]
        for n in norms:
            correct[n].append(predict(choices, n)[0] == inst.gold)
        pred, scores = predict(choices, form.normalization)
        was_cut = any(truncated[p] for p in cond)
        cut += was_cut
        groups.append(inst.group)
        gold_lls.append(choices[inst.gold].ll)
        gold_bytes.append(choices[inst.gold].bytes)
        rows.append({"formulation": form.name, "id": inst.id, "gold": inst.gold, "pred": pred,
                     "correct": pred == inst.gold, "normalization": form.normalization,
                     "loglikelihoods": [c.ll for c in choices], "scores": scores,
                     "loglikelihoods_uncond": [c.ll_uncond for c in choices] if uncond else None,
                     "tokens": [c.n_tokens for c in choices], "truncated": was_cut,
                     **({"group": inst.group} if inst.group else {})})
    metrics = {"normalization": form.normalization,
               "acc": macro_or_micro(correct[form.normalization], groups, task.macro_over_groups),
               **{f"acc_{n}": macro_or_micro(correct[n], groups, task.macro_over_groups) for n in norms},
               "bpb": gold_bits_per_byte(gold_lls, gold_bytes),
               "bpb_mean_per_instance": (sum(-ll / (math.log(2) * b) for ll, b in zip(gold_lls, gold_bytes))
                                         / len(gold_lls)) if gold_lls else float("nan"),
               "n": len(form.instances), "truncated": cut}
    if task.macro_over_groups:
        metrics["groups"] = len(set(groups))
    return metrics, rows


def generative_metrics(form, records: list[dict], refs, lls, macro: bool) -> dict:
    ref_lls = [lls[r[0][0]] for r in refs if r[0]]
    ref_bytes = [len(inst.reference.encode("utf-8")) for inst, r in zip(form.instances, refs) if r[0]]
    return {"normalization": "exact_match",
            "acc": macro_or_micro([r["correct"] for r in records], [r["group"] for r in records], macro),
            "bpb": gold_bits_per_byte(ref_lls, ref_bytes) if ref_lls else float("nan"),
            "n": len(records), "truncated": sum(r["truncated"] for r in records), "checker": form.checker}


def load_tasks(config: EvalConfig) -> list[Task]:
    if not config.tasks and not config.suite:
        return []
    names, regime = resolve_tasks(config.tasks, config.suite, config.regime)
    return load_named_tasks(names, regime, config.limit)


def run_eval(model, tokenizer, config: EvalConfig, tasks: list[Task] | None = None, model_info: dict | None = None,
             progress: bool = False) -> dict:
    """Everything `lmforge eval` reports, as one JSON-able dict (predictions under the `_predictions` key)."""
    from lmforge.curation.documents import ReadReport, expand_globs
    from lmforge.eval.perplexity import collect_documents, perplexity

    tasks = load_tasks(config) if tasks is None else tasks
    ppl_paths = expand_globs(config.ppl) if config.ppl else []
    started = time.perf_counter()
    task_results, predictions = evaluate_tasks(model, tokenizer, tasks, config.batch_size, config.all_norms,
                                               config.max_new_tokens, progress, config.chat) if tasks else ({}, {})
    task_seconds = time.perf_counter() - started
    ppl = None
    if ppl_paths:
        report = ReadReport()
        documents = collect_documents(ppl_paths, config.ppl_max_documents, report)
        if not documents:
            raise LmforgeError(f"no documents to score in {', '.join(ppl_paths)} ({report.skipped} bad lines skipped)")
        bar = Progress(len(documents), "perplexity", "doc", progress)
        ppl = perplexity(model, tokenizer, documents, max(1, config.batch_size // 2), bar, config.ppl_stride)
        bar.close()
        ppl["read_report"] = report.to_dict()
        ppl["inputs"] = ppl_paths
    instances = sum(r["n"] for t in task_results.values() for r in t["formulations"].values())
    return {
        "model": model_info or {},
        "tokenizer": {"source": getattr(tokenizer, "source", ""), "vocab_size": tokenizer.vocab_size,
                      "bos_id": model.config.bos_token_id, "eos_id": tokenizer.eos_id},
        "config": {"tasks": [t.name for t in tasks], "regime": tasks[0].regime if tasks else config.regime,
                   "limit": config.limit, "batch_size": config.batch_size, "all_norms": config.all_norms,
                   "chat": config.chat},
        "tasks": task_results,
        "task_configs": {t.name: t.config() for t in tasks},
        "perplexity": ppl,
        "timing": {"task_seconds": task_seconds, "instances": instances,
                   "instances_per_second": instances / task_seconds if task_seconds > 0 else None,
                   "total_seconds": time.perf_counter() - started},
        "_predictions": predictions,
    }


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_report(results: dict) -> str:
    lines = []
    if results["tasks"]:
        lines += ["| task | regime | formulation | normalization | accuracy | gold bpb | n | truncated |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in results["tasks"].items():
            forms = r["formulations"]
            for fname, f in forms.items():
                mark = " *" if len(forms) > 1 and fname == r["best_formulation"] else ""
                lines.append(f"| {name} | {r['regime']} | {fname}{mark} | {f['normalization']} | {fmt(f['acc'])} | "
                             f"{fmt(f['bpb'])} | {f['n']} | {f['truncated']} |")
        if any(len(r["formulations"]) > 1 for r in results["tasks"].values()):
            lines.append("\n\\* the formulation the task reports (OLMES: the better of cloze and letters)")
    ppl = results.get("perplexity")
    if ppl:
        lines += ["", "| source | bits/byte (macro over domains) | bits/byte (micro) | domains | documents | tokens "
                      "| bytes |",
                  "|---|---|---|---|---|---|---|"]
        for source, s in ppl["sources"].items():
            m = s["micro"]
            lines.append(f"| {source} | {fmt(s['bits_per_byte_macro'])} | {fmt(m['bits_per_byte'])} | "
                         f"{len(s['domains'])} | {m['documents']} | {m['tokens']} | {m['bytes']} |")
        t = ppl["total"]
        lines.append(f"| **all** | - | {fmt(t['bits_per_byte'])} | - | {t['documents']} | {t['tokens']} | "
                     f"{t['bytes']} |")
        lines += ["", "| source | domain | bits/byte | documents | tokens | bytes |", "|---|---|---|---|---|---|"]
        for source, s in ppl["sources"].items():
            for domain, d in s["domains"].items():
                lines.append(f"| {source} | {domain} | {fmt(d['bits_per_byte'])} | {d['documents']} | "
                             f"{d['tokens']} | {d['bytes']} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path, config: EvalConfig, inputs: list[str]) -> None:
    """Replace `out` as a whole (the caller holds its lock): a reader sees the previous run's results and
    predictions or this run's, never predictions of tasks this run did not evaluate."""
    from lmforge.core.files import atomic_directory, atomic_write_json, atomic_write_text, remove_stale_siblings
    from lmforge.core.manifest import write_manifest
    from lmforge.curation.documents import DocumentWriter

    remove_stale_siblings(out)
    predictions = results.pop("_predictions", {})
    with atomic_directory(out) as staging:
        for task, rows in predictions.items():
            with DocumentWriter(staging / "predictions" / f"{Path(task).name}.jsonl") as w:
                for row in rows:
                    w.write(row)
        atomic_write_json(staging / "results.json", json.loads(json.dumps(results, default=str)))
        atomic_write_text(staging / "results.md", markdown_report(results))
        counts = {"tasks": len(results["tasks"]), "instances": results["timing"]["instances"],
                  "truncated": sum(r["truncated"] for r in results["tasks"].values())}
        if results.get("perplexity"):
            counts["ppl_documents"] = results["perplexity"]["total"]["documents"]
            counts["ppl_skipped_lines"] = results["perplexity"]["read_report"]["skipped"]
        write_manifest(staging, command="lmforge eval", config=config, inputs=inputs, counts=counts)


def evaluate_model(path: str | Path, config: EvalConfig, *, step: int | None = None, tokenizer: str | None = None,
                   device: str | None = None, dtype: str = "float32", out: str | Path | None = None,
                   progress: bool = False) -> dict:
    """`lmforge eval`: load the model in any saved form (`lmforge.model.loading.load`), evaluate it, and write
    the results, predictions and a manifest to `out` when given (holding its lock from the start)."""
    import contextlib

    from lmforge.core.locks import output_lock

    with output_lock(out) if out else contextlib.nullcontext():
        return _evaluate_model(path, config, step=step, tokenizer=tokenizer, device=device, dtype=dtype, out=out,
                               progress=progress)


def _evaluate_model(path: str | Path, config: EvalConfig, *, step: int | None, tokenizer: str | None,
                    device: str | None, dtype: str, out: str | Path | None, progress: bool) -> dict:
    import torch

    from lmforge.core.files import combined_hash, file_hash
    from lmforge.model.loading import load, resolve_device

    tasks = load_tasks(config)  # before the model: bad task names and files fail fast
    device = resolve_device(device)
    loaded = load(path, step, device=device, dtype=getattr(torch, dtype), tokenizer=tokenizer,
                  require_tokenizer=True)
    model_info = {"path": str(path), "source": str(loaded.path), "kind": loaded.kind, "step": loaded.step,
                  "hash": combined_hash(loaded.weight_files), "config": loaded.model.config.__dict__,
                  "tokenizer": loaded.tokenizer.source, "tokenizer_hash": file_hash(loaded.tokenizer.source),
                  "device": device, "dtype": dtype}
    results = run_eval(loaded.model, loaded.tokenizer, config, tasks, model_info, progress=progress)
    if out:
        task_files = [f.source for t in tasks for f in t.formulations if Path(f.source).is_file()]
        ppl_files = results["perplexity"]["inputs"] if results.get("perplexity") else []
        write_outputs(results, Path(out), config, [*map(str, loaded.weight_files), *task_files, *ppl_files])
    return results
