"""`make quickstart` end to end on a reduced budget: every artifact, the report's numbers against their files,
the Hugging Face export in transformers, and a rerun that skips every stage and changes no byte. Plus the
refusals of bad input, which come before any training, and the corpus split."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_olmo_tokenizer, requires_smollm2

from lmforge.curation.documents import DocumentWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["funnel.png", "loss_lr.png", "throughput.png", "bits_per_byte.png", "downstream.png"]
# A fixed plan (no probe): 1.5 minutes at 6,000 tokens/s of the smallest shape, the least the plan accepts.
ARGS = ["--minutes", "1.5", "--throughput", "6000", "--no-adapt"]


def quickstart(out: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.recipes.quickstart", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def resolve(data, key: str):
    """The report's key notation, read independently: dots between parts, integers index lists."""
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def read(out: Path, name: str):
    text = (out / name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()] if name.endswith(".jsonl") \
        else json.loads(text)


def number(cell: str) -> tuple[float, float]:
    """A table cell's number and half a unit of its last shown digit."""
    text = cell.replace(",", "").strip()
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text), 0.5 * 10 ** -decimals + 1e-12


def tables(markdown: str) -> list[list[list[str]]]:
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def table_with(markdown: str, header: list[str]) -> list[list[str]]:
    for table in tables(markdown):
        if table[0][:len(header)] == header:
            return table[1:]
    raise AssertionError(f"no table with header {header}")


@requires_olmo_tokenizer
@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    first = quickstart(out, *ARGS)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "Traceback" not in first.stderr
    last = first.stdout.strip().splitlines()[-4:]
    assert last[0].startswith("held-out bits per byte: ") and last[-1].startswith(f"report: {out / 'report.md'}")
    report = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    plan = read(out, "plan.json")["plan"]

    # Figures: real PNGs that decode, linked from the Markdown and inlined byte for byte in the HTML.
    import matplotlib.image

    for name in FIGURES:
        data = (out / "figures" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        height, width = matplotlib.image.imread(out / "figures" / name).shape[:2]
        assert height > 100 and width > 100
        assert f"](figures/{name})" in report
        assert base64.b64encode(data).decode() in page
    assert page.count("<img") == len(FIGURES) and 'src="figures/' not in page  # self-contained

    # The headline table: every number equals its file's value at the stated key.
    rows = table_with(report, ["what", "value", "file", "key"])
    assert len(rows) >= 10
    for what, cell, file_cell, key_cell in rows:
        name = re.search(r"\(([^)]+)\)", file_cell).group(1)
        expected = resolve(read(out, name), key_cell.strip("`"))
        shown, tolerance = number(cell)
        assert abs(shown - expected) <= tolerance, (what, cell, expected)

    # Bits per byte per source: each model's results and the baselines' file.
    baselines = read(out, "baselines/results.json")["sources"]
    models = {"stage 1": "eval-stage1", "anneal-1": "eval-anneal-1", "anneal-2": "eval-anneal-2", "soup": "eval"}
    bpb_rows = table_with(report, ["source", *models, "unigram", "gzip", "zstd"])
    assert {r[0] for r in bpb_rows} == set(baselines)
    for row in bpb_rows:
        source = row[0]
        for cell, directory in zip(row[1:], models.values()):
            ppl = read(out, f"{directory}/results.json")["perplexity"]
            expected = ppl["total" if source == "total" else "sources"]
            expected = expected["bits_per_byte"] if source == "total" else expected[source]["micro"]["bits_per_byte"]
            shown, tolerance = number(cell)
            assert abs(shown - expected) <= tolerance, (source, directory)
        for cell, baseline in zip(row[5:], ("unigram", "gzip", "zstd")):
            shown, tolerance = number(cell)
            assert abs(shown - baselines[source][f"{baseline}_bits_per_byte"]) <= tolerance

    # The funnel: documents and bytes left after each filter, from the mixer's counts.
    streams = read(out, "mixed/documents/manifest.json")["counts"]["streams"]
    funnel = table_with(report, ["source", "step", "documents left", "bytes left"])
    for source, s in streams.items():
        steps = [r for r in funnel if r[0] == source]
        assert number(steps[0][2])[0] == s["read"] and number(steps[0][3])[0] == s["text_bytes_in"]
        assert number(steps[-1][2])[0] == s["written"] and number(steps[-1][3])[0] == s["text_bytes_out"]
        docs, size = s["read"], s["text_bytes_in"]
        for step, (expression, dropped) in zip(steps[1:-1], s["excluded_by_filter"].items()):
            docs, size = docs - dropped["documents"], size - dropped["text_bytes"]
            assert step[1] == f"- {expression}".replace("|", "\\|")
            assert (number(step[2])[0], number(step[3])[0]) == (docs, size)

    # Energy per run from its manifest; the total row is their sum.
    energy = table_with(report, ["run", "steps", "tokens", "last loss", "last tokens/s", "kWh", "kg CO2eq"])
    kwh = 0.0
    for row in energy[:-1]:
        manifest = read(out, f"{row[0]}/manifest.json")
        assert number(row[1])[0] == manifest["counts"]["steps"] and number(row[2])[0] == manifest["counts"]["tokens"]
        shown, tolerance = number(row[5])
        assert abs(shown - manifest["energy"]["kwh"]) <= tolerance
        assert manifest["energy"]["method"] in ("rapl", "estimate")
        kwh += manifest["energy"]["kwh"]
    assert abs(number(energy[-1][5])[0] - kwh) <= 1e-6
    assert "method **" in report and "kg CO2eq" in report

    # Downstream accuracy and its chance level, from results.json and the predictions.
    results = read(out, "eval/results.json")["tasks"]
    downstream = table_with(report, ["task", "accuracy", "chance", "instances"])
    assert [r[0] for r in downstream] == list(results)
    for task, acc, chance, n in downstream:
        predictions = read(out, f"eval/predictions/{task}.jsonl")
        expected_chance = sum(1 / len(p["loglikelihoods"]) for p in predictions) / len(predictions)
        assert abs(number(acc)[0] - results[task]["acc"]) <= number(acc)[1]
        assert abs(number(chance)[0] - expected_chance) <= number(chance)[1]
        assert number(n)[0] == len(predictions)

    # The plan's numbers as the plan file has them; the lineage section is still there.
    assert f"{plan['parameters']:,} parameters" in report and f"{plan['training_tokens']:,} training tokens" in report
    lineage = (out / "logs" / "lineage.txt").read_text().strip()
    assert "## Lineage" in report and lineage and lineage[:300] in report
    samples = read(out, "samples.json")["samples"]
    assert len(samples) == 4 and all(0 <= s["code_lines"] <= s["python_lines"] <= s["lines"] for s in samples)
    assert "SmolLM2-135M-Instruct was not adapted in this run: skipped: --no-adapt." in report

    # Stage 1 stopped where the budget said: the run trained the steps budget.json records, in chunks.
    budget = read(out, "budget.json")
    assert read(out, "run/manifest.json")["counts"]["steps"] == budget["stage1_steps"]
    assert budget["ended_early"] == (budget["stage1_steps"] < plan["stage1_steps"])
    assert 1 <= budget["anneal_steps"] <= plan["anneal_steps"]
    for name in ("anneal-1", "anneal-2"):
        assert read(out, f"{name}/manifest.json")["counts"]["steps"] == budget["anneal_steps"]
    tokens = sum(read(out, f"{name}/manifest.json")["counts"]["tokens"] for name in ("run", "anneal-1", "anneal-2"))
    assert budget["training_tokens"] == tokens and budget["tokens_per_parameter"] == round(tokens / plan["parameters"], 2)
    assert last[1].startswith(f"model: {plan['parameters']:,} parameters trained on {tokens:,} tokens")

    # The Hugging Face export loads in transformers and computes lmforge's logits.
    import torch
    import transformers

    from lmforge.model.loading import load

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ours = load(str(out / "model"))
    ids = torch.tensor([ours.tokenizer.encode("import os\nprint(os.getcwd())\n")])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours.model(ids), atol=1e-4)

    # A rerun skips every stage, says so, and changes no byte.
    before = snapshot(out)
    again = quickstart(out, *ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    stage_lines = [line for line in again.stdout.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert stage_lines and all(line.endswith("skipped") for line in stage_lines), stage_lines
    assert len(stage_lines) == len(list((out / "stages").glob("*.json")))
    assert snapshot(out) == before
    assert again.stdout.strip().splitlines()[-4:] == last


def test_bad_input_is_refused_before_training(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "1", "text": ""}\nnot json\n')
    cases = [
        (["--documents", str(tmp_path / "nothing-*.jsonl")], "matches no file"),
        (["--documents", str(empty)], "no usable text in 1 file(s) (1 bad lines skipped"),
        (["--minutes", "0.5"], "--minutes 0.5 is too short"),
        (["--minutes", "1.2", "--throughput", "500"], "--minutes 1.2 is too short to train anything here"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        done = quickstart(out, *args, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr and not (out / "run").exists()
    # A directory planned with other options is not silently continued with new ones.
    out = tmp_path / "planned"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"options": {"minutes": 12.0}, "plan": {}}))
    done = quickstart(out, "--minutes", "5", timeout=120)
    assert done.returncode == 2 and "planned with other options (minutes 12.0 -> 5.0" in done.stderr


def test_user_documents_are_split_by_id_and_keep_their_sources(tmp_path):
    from lmforge.recipes.corpus import HELD_OUT_EVERY, user_documents

    import xxhash

    path = tmp_path / "docs.jsonl.gz"
    docs = [{"id": f"d{i}", "text": f"document number {i} " * 5, **({"source": "web"} if i % 2 else {})}
            for i in range(200)]
    with DocumentWriter(path) as writer:
        for doc in docs:
            writer.write(doc)
    train, heldout, counts = user_documents([str(path)], raw_bytes=10**9, heldout_bytes=10**9)
    held_ids = {d["id"] for d in docs if xxhash.xxh3_64_intdigest(d["id"].encode()) % HELD_OUT_EVERY == 0}
    assert {d["id"] for d in heldout} == held_ids and held_ids
    assert {d["id"] for d in train} == {d["id"] for d in docs} - held_ids
    assert {d["source"] for d in train} == {"web", "docs"}  # no `source`: the file's name
    assert counts["web"]["documents"] + counts["docs"]["documents"] == len(train)
    small, _, _ = user_documents([str(path)], raw_bytes=6000, heldout_bytes=10**9)
    assert 0 < len(small) < len(train) and [d["id"] for d in small] == [d["id"] for d in train[:len(small)]]


def test_the_budget_ends_stage1_early_when_the_machine_slows_down():
    """Hand-worked: the anneals at the measured speed, the later stages at their planned cost times the
    slowdown and the margin (5% of 10 minutes: 30 s) come off the time left; the rest buys stage-1 steps at the
    measured speed."""
    from lmforge.recipes.plan import affordable_anneal_steps, affordable_stage1_steps, fixed_plan

    plan = fixed_plan(10, 4096, 100, 10**6, 10)
    plan.anneal_runs, plan.anneal_steps, plan.later_seconds, plan.adapt_seconds = 2, 10, 30.0, 20.0
    plan.seconds_per_step = 1.0
    # Twice as slow as planned: anneals 20 x 2 s, later stages (30 + 20) x 2, margin 30: 170 s of the 200 left.
    assert affordable_stage1_steps(plan, 200.0, 2.0) == 15
    assert affordable_stage1_steps(plan, 169.0, 2.0) == 0
    # Faster than planned: no credit for the later stages (slowdown at least 1): 20 x 0.5 + 50 + 30 = 90 s.
    assert affordable_stage1_steps(plan, 200.0, 0.5) == 220
    # The anneals, when stage 1 already took too long: (200 - 100) s at 2 s per step over 2 anneals = 25 steps,
    # at most the plan's 10, at least one.
    assert affordable_anneal_steps(plan, 200.0, 2.0) == 10
    assert affordable_anneal_steps(plan, 120.0, 2.0) == 5
    assert affordable_anneal_steps(plan, 50.0, 2.0) == 1
    plan.seconds_per_step = 0.0  # no probe, no deadline
    assert affordable_stage1_steps(plan, 0.0, 5.0) == plan.stage1_steps
    assert affordable_anneal_steps(plan, 0.0, 5.0) == plan.anneal_steps


def test_stage1_runs_on_past_its_plan_when_the_machine_is_faster():
    """Hand-worked, on the plan above: chunks of a tenth of the 100 planned steps, as far as the time left
    affords, and no further than STAGE1_MAX_STRETCH (3) times the plan."""
    from lmforge.recipes.plan import fixed_plan, next_stage1_target

    plan = fixed_plan(10, 4096, 100, 10**6, 10)
    plan.anneal_runs, plan.anneal_steps, plan.later_seconds, plan.adapt_seconds = 2, 10, 30.0, 20.0
    plan.seconds_per_step = 1.0
    assert next_stage1_target(plan, 3, 200.0, 0.5) == 13
    assert next_stage1_target(plan, 100, 200.0, 0.5) == 110  # past the plan: 220 steps are affordable
    assert next_stage1_target(plan, 195, 200.0, 0.5) == 205
    assert next_stage1_target(plan, 295, 200.0, 0.5) == 300  # the stretch's end
    assert next_stage1_target(plan, 300, 200.0, 0.5) == 300
    # 10 + 50 s go to the anneals and later stages, 30 s (5% of 10 minutes) is the margin.
    assert next_stage1_target(plan, 100, 92.0, 0.5) == 104
    assert next_stage1_target(plan, 100, 62.0, 0.5) == 100
    assert next_stage1_target(plan, 50, 139.0, 2.0) == 50  # slower: the time left is spoken for, stage 1 ends
    assert next_stage1_target(plan, 3, 139.0, 2.0) == 13  # but not before the plan's minimum of 40 steps
    assert next_stage1_target(plan, 33, 139.0, 2.0) == 40
    plan.seconds_per_step = 0.0  # no probe: the planned steps, in chunks
    assert next_stage1_target(plan, 95, 0.0, 5.0) == 100
    assert next_stage1_target(plan, 100, 1e6, 0.1) == 100


def test_the_adapt_stage_is_skipped_when_the_slowdown_leaves_no_time_for_it(tmp_path):
    from lmforge.core.files import atomic_write_json
    from lmforge.recipes.plan import fixed_plan, later_stages_seconds
    from lmforge.recipes.quickstart import Quickstart, parse_args

    atomic_write_json(tmp_path / "stages" / "corpus.json", {"seconds": 190.0})  # from an interrupted run
    stage = Quickstart(parse_args(["--out", str(tmp_path), "--minutes", "5"]))
    plan = fixed_plan(5, 4096, 40, 10**6, 10)
    plan.seconds_per_step, plan.adapt_seconds, plan.later_seconds = 1.0, 100.0, 50.0
    atomic_write_json(tmp_path / "plan.json", {"options": stage.options(), "plan": plan.to_json()})
    # 3x slower: adapting takes 300 s, more than 50% of the 300 s budget, so no time is kept for it either.
    atomic_write_json(tmp_path / "budget.json", {"slowdown": 3.0})
    assert stage.adapt_does_not_fit() == ("skipped: this machine runs 3.0 times slower than the probe planned "
                                          "for; adapting would take about 5.0 minutes, more than 50% of the budget")
    assert later_stages_seconds(plan, 3.0) == 150.0
    # 1.1x slower: 110 s would fit in 50%, but of the 110 s left the later stages need 55.
    atomic_write_json(tmp_path / "budget.json", {"slowdown": 1.1})
    assert stage.adapt_does_not_fit() == ("skipped: this machine runs 1.1 times slower than the probe planned "
                                          "for; adapting would take about 1.8 minutes, and 0.9 are left for it")
    assert later_stages_seconds(plan, 1.1) == pytest.approx(55.0 + 110.0)
    stage.earlier_seconds = 0.0  # 300 s left
    assert stage.adapt_does_not_fit() == ""
    # At the planned speed, with the earlier stages over their time: 100 s fit in the 90 s left after the later
    # stages' 50 plus the margin (5% of 300 s: 15 s); in 75 s they do not.
    atomic_write_json(tmp_path / "budget.json", {"slowdown": 1.0})
    stage.earlier_seconds = 160.0
    assert stage.adapt_does_not_fit() == ""
    stage.earlier_seconds = 175.0
    assert stage.adapt_does_not_fit() == ("skipped: the stages before it took longer than planned; adapting would "
                                          "take about 1.7 minutes, and 1.2 are left for it")


def test_the_budget_counts_each_finished_stage_once(tmp_path):
    """An earlier run's stages count by their markers; this run's by the clock alone (a stage it finishes also
    writes a marker, which must not count a second time)."""
    from lmforge.core.files import atomic_write_json
    from lmforge.recipes.quickstart import Quickstart, parse_args

    atomic_write_json(tmp_path / "stages" / "corpus.json", {"seconds": 100.0})  # from an interrupted run
    stage = Quickstart(parse_args(["--out", str(tmp_path), "--minutes", "10"]))
    atomic_write_json(tmp_path / "stages" / "tag.json", {"seconds": 200.0})  # finished in this run
    assert 600 - 100 - 5 < stage.seconds_left() <= 600 - 100


def test_the_adapt_stage_is_planned_inside_the_budget():
    from lmforge.recipes.plan import ADAPT_MAX_SHARE, make_plan

    quiet = lambda *a: None  # noqa: E731
    without = make_plan(12, 4096, 0.0, throughput=20_000, adapt=False, log=quiet)
    adapting = make_plan(12, 4096, 0.0, throughput=20_000, adapt=True, log=quiet)
    assert without.adapt_seconds == 0 and without.adapt_note == "skipped: --no-adapt"
    assert 0 < adapting.adapt_seconds <= ADAPT_MAX_SHARE * 12 * 60 and adapting.adapt_note == ""
    # The rest of the budget is planned as before, on what the adaptation leaves.
    assert adapting.later_seconds == pytest.approx(without.later_seconds * (1 - adapting.adapt_seconds / 720), abs=0.1)
    assert adapting.probe[0]["tokens"] < without.probe[0]["tokens"]
    # A budget the adaptation would mostly eat skips it and says what would fit.
    short = make_plan(5, 4096, 0.0, throughput=2_000, adapt=True, log=quiet)
    assert short.adapt_seconds == 0 and short.adapt_note.startswith("skipped: adapting smollm2-135m takes about")
    assert "give --minutes" in short.adapt_note


def test_the_plan_takes_no_shape_with_fewer_than_two_tokens_per_parameter(monkeypatch):
    """The speeds one probe measured (a run on the 2-core VM): the fitted law's lowest loss is d_model 128's,
    but its 1.94M tokens are 1.02 per parameter; the plan takes d_model 96 (2.40M tokens for 1.15M parameters)
    and probes no bigger shape."""
    from lmforge.recipes import plan as plan_module

    measured = {64: 17_909.0, 96: 12_959.0, 128: 10_488.0, 192: 4_990.0}
    monkeypatch.setattr(plan_module, "measure_throughput", lambda config: measured[config.d_model])
    plan = plan_module.make_plan(12, 4096, 0.0, log=lambda *_: None)
    assert [row["d_model"] for row in plan.probe] == [64, 96, 128]
    losses = [row["predicted_loss"] for row in plan.probe]
    assert losses[2] < losses[1] < losses[0]  # the law alone would take d_model 128
    assert (plan.d_model, plan.n_layers, plan.parameters) == (96, 3, 1_147_104)
    assert plan.probe[2]["tokens"] < 2 * plan.probe[2]["parameters"]


def test_python_lines_counts_the_lines_that_keep_a_sample_valid_python():
    from lmforge.recipes.quickstart import python_lines

    # Hand-checked: the call's bracket stays open over two lines (valid so far), "foo bar" is not Python, and
    # the last line, cut mid-way, is not counted. Of the 6 valid lines, 2 are blank.
    completion = "    return x\n\n\ndef g(y):\n    return (y +\n        1)\nfoo bar\nx = 1"
    assert python_lines("def f(x):\n", completion) == {"lines": 7, "python_lines": 6, "code_lines": 4}
    assert python_lines("def f(x):\n", " for\n\ned.\n") == {"lines": 3, "python_lines": 0, "code_lines": 0}
    # A prompt that ends mid-line: the completion's first line finishes the prompt's (a docstring: no code).
    assert python_lines('class Stack:\n    """', 'A stack."""\n    def push(self, x):\n') == \
        {"lines": 2, "python_lines": 2, "code_lines": 1}
    # A docstring's lines inside a method, before its closing quotes, are Python so far, but not code.
    assert python_lines('class Stack:\n', '    def push(self, x):\n        """Push x.\n\n        Returns None.\n'
                        '        """\n        return None\n    foo bar\n') == {"lines": 7, "python_lines": 6,
                                                                         "code_lines": 2}
    # Comment lines are valid Python and no code.
    assert python_lines("def read_file(path):\n", "#\n# Codec API\n#\n") == {"lines": 3, "python_lines": 3,
                                                                               "code_lines": 0}


def test_the_adaptation_section_shows_the_files_numbers(tmp_path):
    from lmforge.recipes.report import Doc, adaptation_section

    doc = Doc()
    adaptation_section(doc, tmp_path, None, {"note": "skipped: --no-adapt"})
    assert "not adapted in this run: skipped: --no-adapt." in doc.markdown()

    def answers(accuracy: float, completions: list[str]) -> dict:
        items = [{"prompt": f"Calculate {i} + 1 =", "answer": str(i + 1), "completion": c,
                  "chat": f"<|im_start|>user\nCalculate {i} + 1 =<|im_end|>\n<|im_start|>assistant\n",
                  "reward": float(c == str(i + 1))} for i, c in enumerate(completions)]
        return {"items_scored": len(items), "accuracy": accuracy, "mean_reward": accuracy, "items": items}

    (tmp_path / "adapt" / "sft").mkdir(parents=True)
    (tmp_path / "adapt" / "before.json").write_text(json.dumps(answers(0.25, ["To | calculate", "2", "x", "y"])))
    (tmp_path / "adapt" / "after.json").write_text(json.dumps(answers(0.75, ["1", "2", "3", "5"])))
    (tmp_path / "adapt" / "sft" / "manifest.json").write_text(json.dumps({"counts": {"steps": 12}}))
    doc = Doc()
    adaptation_section(doc, tmp_path, None, {})
    report = doc.markdown()
    rows = table_with(report, ["model", "accuracy", "mean reward", "items", "file"])
    assert [(r[1], r[2], r[3]) for r in rows] == [("0.250", "0.250", "4"), ("0.750", "0.750", "4")]
    assert rows[1][0] == "after 12 SFT steps"
    assert "<|im_start|>user\nCalculate 0 + 1 =<|im_end|>\n<|im_start|>assistant\nTo | calculate\n" in report
    answers_table = table_with(report, ["question", "gold", "before", "after"])
    assert answers_table[0] == ["Calculate 0 + 1 =", "1", "To \\| calculate", "1"]


@requires_smollm2
@pytest.mark.slow
def test_the_adapt_stage_scores_smollm2_before_and_after_sft(tmp_path):
    """The quickstart's adapt stage on the real model (one SFT step): held-out items stay out of the SFT
    records, each answer's reward is 1 exactly when its last number is the gold answer (checked here with a
    regex), and the report's section shows the files' numbers with its figure."""
    pytest.importorskip("gguf", reason="GGUF import needs the gguf package")
    from lmforge.adapt.rlvr_data import basic_arithmetic_records
    from lmforge.core.files import atomic_write_json
    from lmforge.recipes.plan import ADAPT_HELDOUT, fixed_plan
    from lmforge.recipes.quickstart import Quickstart, parse_args
    from lmforge.recipes.report import Doc, _pyplot, adaptation_section

    out = tmp_path / "qs"
    stage = Quickstart(parse_args(["--out", str(out), "--adapt-steps", "1"]))
    plan = fixed_plan(5, 4096, 40, 10**6, 10)
    atomic_write_json(out / "plan.json", {"options": stage.options(), "plan": plan.to_json()})
    assert stage.adapt_stage() is None

    records = basic_arithmetic_records()
    held_out = records[14::15]  # every 15th item, never trained on
    assert read(out, "adapt/heldout.jsonl") == held_out
    trained = [r["messages"][0]["content"] for r in read(out, "adapt/train.jsonl")]
    assert len(trained) == len(records) - len(held_out) and not set(trained) & {r["prompt"] for r in held_out}
    for name in ("before", "after"):
        scored = read(out, f"adapt/{name}.json")
        assert scored["items_scored"] == ADAPT_HELDOUT
        for item, record in zip(scored["items"], held_out):
            assert item["chat"] == f"<|im_start|>user\n{record['prompt']}<|im_end|>\n<|im_start|>assistant\n"
            numbers = re.findall(r"-?\d+(?:\.\d+)?", item["completion"].replace(",", ""))
            assert item["reward"] == float(bool(numbers) and float(numbers[-1]) == float(record["answer"]))
        assert scored["accuracy"] == pytest.approx(sum(i["reward"] for i in scored["items"]) / ADAPT_HELDOUT)
    assert read(out, "adapt/sft/manifest.json")["counts"]["steps"] == 1
    assert not (out / "adapt" / "sft" / "checkpoints").exists() and (out / "adapt" / "sft" / "model").is_dir()

    doc = Doc()
    adaptation_section(doc, out, _pyplot(), {})
    rows = table_with(doc.markdown(), ["model", "accuracy", "mean reward", "items", "file"])
    for row, name in zip(rows, ("before", "after")):
        scored = read(out, f"adapt/{name}.json")
        assert abs(number(row[1])[0] - scored["accuracy"]) <= number(row[1])[1]
        assert abs(number(row[2])[0] - scored["mean_reward"]) <= number(row[2])[1]
    assert (out / "figures" / "adapt.png").read_bytes().startswith(PNG_SIGNATURE)
