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
from conftest import requires_olmo_tokenizer

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
    plan = read(out, "plan.json")["plan"]
    assert f"{plan['parameters']:,} parameters" in report and f"{plan['training_tokens']:,} training tokens" in report
    lineage = (out / "logs" / "lineage.txt").read_text().strip()
    assert "## Lineage" in report and lineage and lineage[:300] in report
    assert len(read(out, "samples.json")["samples"]) == 4

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
