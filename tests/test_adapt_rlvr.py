"""RLVR (GRPO with verifiable rewards): advantages, the clipped objective and k3 KL against hand computations and
brute force; completion log-probs against a token-by-token forward; bad prompt records and failing checkers
counted with file and line; a tiny model's reward rising on the toy task; step-1 loss against TRL's GRPOTrainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from lmforge.adapt.rewards import RewardConfig, RewardFunction
from lmforge.adapt.rlvr import (GRPO, GRPOConfig, PromptLoader, RLVRConfig, clipped_token_loss,
                                group_advantages, k3_kl, read_prompts, rlvr)
from lmforge.core.config import from_dict, to_dict
from lmforge.model.presets import get_preset
from lmforge.model.transformer import ModelConfig
from lmforge.train.objective import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = Path(os.environ.get("TRL_VENV", ROOT / ".peers" / "trl-venv")) / "bin" / "python"


def char_tokenizer():
    from lmforge.adapt.rlvr_data import toy_tokenizer

    return toy_tokenizer()


def tiny_model_config(vocab_size: int) -> ModelConfig:
    base = to_dict(get_preset("olmo2-tiny"))
    base.update(n_layers=2, d_model=64, n_heads=4, mlp_hidden_size=128, vocab_size=vocab_size, vocab_multiple=1,
                eos_token_id=0, pad_token_id=1, max_sequence_length=64)
    return from_dict(ModelConfig, base)


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    from lmforge.model.directory import build_model, write_model_dir

    tok = char_tokenizer()
    write_model_dir(build_model(tiny_model_config(tok.vocab_size), seed), path, tok, command="test")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- formulas

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    centered = group_advantages(rewards, "centered")
    assert torch.allclose(centered, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [2.25, -0.75, -0.75, -0.75]]))
    # standard: sample std (n - 1) of [1, 0, 0, 1] is sqrt(1/3); of [3, 0, 0, 0] it is 1.5
    standard = group_advantages(rewards, "standard")
    expected = torch.tensor([[0.5 / (3 ** -0.5 + 1e-4)] * 4, [0.0] * 4, [2.25 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001,
                                                                          -0.75 / 1.5001]])
    expected[0, 1:3] *= -1
    assert torch.allclose(standard, expected, atol=1e-6)


def test_clipped_objective_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.5 with advantages +1, -1, +1, +2; clip range [0.8, 1.28]
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5]])
    old = torch.zeros(1, 4)
    per_token, clipped = clipped_token_loss(ratios.log(), old, torch.tensor([1.0]), 0.2, 0.28)
    # A = +1: -min(1.5, 1.28) = -1.28 (clipped); -min(0.5, 0.8) = -0.5 (not: the clip would raise the objective)
    assert torch.allclose(per_token, torch.tensor([[-1.28, -0.5, -1.1, -0.5]]))
    assert clipped.tolist() == [[True, False, False, False]]
    per_token, clipped = clipped_token_loss(ratios.log(), old, torch.tensor([-1.0]), 0.2, 0.28)
    # A = -1: -min(-1.5, -1.28) = 1.5 (not clipped: pessimistic side); -min(-0.5, -0.8) = 0.8 (clipped)
    assert torch.allclose(per_token, torch.tensor([[1.5, 0.8, 1.1, 0.8]]))
    assert clipped.tolist() == [[False, True, False, True]]


def test_k3_kl_is_unbiased_against_float64_brute_force():
    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(5, 7, generator=gen, dtype=torch.float64).log_softmax(-1)
    reference = torch.randn(5, 7, generator=gen, dtype=torch.float64).log_softmax(-1)
    # expectation over tokens sampled from the policy of the per-token estimator = KL(policy || reference)
    expected = (policy.exp() * (policy - reference)).sum(-1)
    estimated = (policy.exp() * k3_kl(policy, reference)).sum(-1)
    assert torch.allclose(estimated, expected, atol=1e-12)
    assert (k3_kl(policy, reference) >= 0).all()
    one = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]))
    assert one.item() == pytest.approx(0.4 - math.log(0.4) - 1)


# ---------------------------------------------------------------------------------------------- the objective

def objective(tmp_path, grpo: GRPOConfig, checker: str = "gsm8k", records=None):
    from lmforge.model.directory import load_model_dir

    model_dir = tiny_model_dir(tmp_path / "model")
    model, tok = load_model_dir(model_dir)
    records = records or [{"prompt": "Answer with the number 7.", "answer": "7"},
                          {"prompt": "Answer with the number 3.", "answer": "3"}]
    prompts = read_prompts([str(write_jsonl(tmp_path / "p.jsonl", records))], tok, "plain", 32, None)
    return GRPO(grpo, prompts, RewardFunction(RewardConfig(checker=checker)), tok, reference=str(model_dir)), model


def brute_force_logps(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """Log-prob of each completion token from a forward over exactly the tokens before it, in float64."""
    out = []
    with torch.no_grad():
        for t in range(len(completion)):
            logits = model(torch.tensor([prompt + completion[:t]]))[0, -1].double() / temperature
            out.append(logits.log_softmax(-1)[completion[t]].item())
    return out


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_loss_against_token_by_token_log_probs(tmp_path, aggregation):
    grpo = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=4, temperature=0.7, beta=0.1,
                      aggregation=aggregation, filter_zero_variance=False, iterations=2)
    obj, model = objective(tmp_path, grpo)
    batch = next(iter(PromptLoader(2, grpo, seed=0, rank=0, world_size=1)))
    prepared = obj.prepare(model, batch)
    # perturb the weights so the ratio and the KL are not trivially 1 and 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, metrics = obj.loss(model, prepared)
    total, kl_total, count = 0.0, 0.0, 0
    for row in range(len(prepared["labels"])):
        positions = (prepared["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        prompt = prepared["prompt_ids"][row, -prepared["prompt_lengths"][row]:].tolist()
        completion = prepared["completion_ids"][row, positions].tolist()
        new = brute_force_logps(model, prompt, completion, 0.7)
        old = prepared["old_logps"][row, positions].tolist()
        ref = prepared["ref_logps"][row, positions].tolist()
        a = prepared["advantages"][row].item()
        terms, kls = [], []
        for n, o, r in zip(new, old, ref):
            ratio = math.exp(n - o)
            kl = math.exp(r - n) - (r - n) - 1
            terms.append(-min(ratio * a, min(max(ratio, 0.8), 1.28) * a) + 0.1 * kl)
            kls.append(kl)
        if aggregation == "token":
            total, kl_total, count = total + sum(terms), kl_total + sum(kls), count + len(terms)
        else:
            total, kl_total, count = total + sum(terms) / len(terms), kl_total + sum(kls) / len(kls), count + 1
    assert obj.count(prepared).item() == count
    assert loss.item() == pytest.approx(total, rel=1e-6, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(kl_total, rel=1e-6)
    # the old log-probs were those of the weights that sampled
    assert prepared["old_logps"][0][prepared["labels"][0] != IGNORE_INDEX].sum().item() != pytest.approx(0)


def right_padded_token_loss(model, prompts, completions, keep, advantages, old, ref, beta, temperature):
    """The GRPO token-aggregated loss from one forward per batch over "prompt + completion" rows, right-padded:
    every prompt forwarded once per row (the computation before prompts were shared)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.ones((len(prompts), width), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
    log_probs = (model(ids).float() / temperature).log_softmax(-1)
    total = torch.zeros(())
    for row, (p, c) in enumerate(zip(prompts, completions)):
        if not keep[row]:
            continue
        new = log_probs[row, torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)]
        ratio = torch.exp(new - old[row, :len(c)])
        a = advantages[row]
        delta = ref[row, :len(c)] - new
        total = total - torch.min(ratio * a, ratio.clamp(0.8, 1.28) * a).sum() + beta * (
            torch.exp(delta) - delta - 1).sum()
    return total


@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("preset, changes", [
    ("olmo2-tiny-gqa", {}),  # grouped-query attention
    ("olmo3-tiny", {"sliding_window": 4, "yarn_original_context": 16}),  # windows shorter than the prompts
    ("olmoe-tiny", {}),  # mixture of experts
    ("bloom-tiny", {}),  # ALiBi
])
def test_shared_prompts_give_the_loss_and_gradients_of_whole_rows(preset, changes, share_prompts, one_thread):
    """Groups of 3 rows in micro-batches of 4 (a group split between two), prompts of different lengths,
    completions of 1 to 6 tokens, one group's rows masked out: the summed micro-batch losses and the weights'
    gradients equal those of whole right-padded rows."""
    from lmforge.model.directory import build_model

    tok = char_tokenizer()
    config = to_dict(get_preset(preset))
    config.update(vocab_size=tok.vocab_size, vocab_multiple=1, eos_token_id=0, pad_token_id=1,
                  max_sequence_length=64, **changes)
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, config), 0)
    grpo = GRPOConfig(group_size=3, prompts_per_step=3, micro_batch_sequences=4, temperature=0.7, beta=0.1)
    obj = GRPO(grpo, None, None, tok, share_prompts=share_prompts)
    gen = torch.Generator().manual_seed(1)
    group_prompts = [tok.encode("Answer with 12."), tok.encode("Say 3."), tok.encode("What is 4 + 5?")]
    prompts = [p for p in group_prompts for _ in range(3)]
    completions = [torch.randint(2, tok.vocab_size, (n,), generator=gen).tolist() for n in (3, 1, 6, 2, 5, 4, 6, 2, 1)]
    keep = torch.tensor([True] * 3 + [False] * 3 + [True] * 3)
    batch = obj._rows(prompts, completions, keep, torch.device("cpu"))
    batch["advantages"] = torch.randn(9, generator=gen)
    batch["old_logps"] = -3 + 0.3 * torch.randn(batch["labels"].shape, generator=gen)
    batch["ref_logps"] = -3 + 0.3 * torch.randn(batch["labels"].shape, generator=gen)

    forwarded_rows = []
    hook = model.embed.register_forward_hook(lambda module, args, out: forwarded_rows.append(len(out)))
    shared = sum(obj.loss(model, {k: v[i:i + 4] for k, v in batch.items()})[0] for i in range(0, 9, 4))
    hook.remove()
    shared.backward()
    # rows 0-3 hold groups 0 and 1, rows 4-7 groups 1 and 2, row 8 group 2: each prompt pass has 2, 2, 1 rows
    assert forwarded_rows == ([2, 4, 2, 4, 1, 1] if share_prompts else [4, 4, 1])
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = right_padded_token_loss(model, prompts, completions, keep, batch["advantages"], batch["old_logps"],
                                       batch["ref_logps"], 0.1, 0.7)
    expected.backward()
    assert shared.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, p), grad in zip(model.named_parameters(), shared_grads):
        assert (grad - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-7, name


def test_zero_variance_groups_leave_the_normaliser(tmp_path):
    # a random tiny model seldom ends in the right digit: some groups have all-zero rewards
    grpo = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=2, filter_zero_variance=True)
    obj, model = objective(tmp_path, grpo)
    prepared = obj.prepare(model, next(iter(PromptLoader(2, grpo, seed=0, rank=0, world_size=1))))
    stats = obj.interval_metrics()
    kept = (prepared["labels"] != IGNORE_INDEX).any(-1).view(2, 4)
    assert (kept.all(-1) == kept.any(-1)).all()  # whole groups stay or go
    assert stats["zero_variance_groups"] == 1 - kept.all(-1).float().mean().item()
    assert obj.count(prepared).item() == (prepared["labels"] != IGNORE_INDEX).sum().item()


def test_prompt_loader_order_groups_ranks_and_resume():
    grpo = GRPOConfig(group_size=3, prompts_per_step=4, iterations=2)
    whole = PromptLoader(10, grpo, seed=1, rank=0, world_size=1)
    batches = [b for _, b in zip(range(6), whole)]
    assert [int(b["iteration"][0]) for b in batches] == [0, 1, 0, 1, 0, 1]
    assert torch.equal(batches[0]["prompt_index"], batches[1]["prompt_index"])  # one rollout, two steps
    first = batches[0]["prompt_index"].view(4, 3)
    assert (first == first[:, :1]).all() and len(set(first[:, 0].tolist())) == 4  # contiguous groups
    # the epoch's first two rollouts hold 8 distinct prompts of the 10; the third starts a new permutation
    assert len(set(batches[0]["prompt_index"].tolist()) | set(batches[2]["prompt_index"].tolist())) == 8
    ranks = [next(iter(PromptLoader(10, grpo, seed=1, rank=r, world_size=2))) for r in range(2)]
    assert torch.equal(torch.cat([r["prompt_index"] for r in ranks]), batches[0]["prompt_index"])
    resumed = PromptLoader(10, grpo, seed=1, rank=0, world_size=1)
    resumed.load_state_dict(whole.state_dict())
    assert torch.equal(next(iter(resumed))["prompt_index"], next(iter(whole))["prompt_index"])
    seeds = {int(batches[0]["sample_seed"][0]), int(batches[2]["sample_seed"][0]), int(ranks[1]["sample_seed"][0])}
    assert len(seeds) == 3  # per rollout and per rank


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_prompt_records_are_counted_with_file_and_line(tmp_path, capsys):
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 1 + 1?", "answer": "2"},
        "{not json",
        {"prompt": "What is 2 + 2?"},
        {"messages": [{"role": "robot", "content": "hi"}], "answer": "1"},
        {"prompt": "What is 1 + 1? " * 10, "answer": "2"},
        {"messages": [{"role": "user", "content": "What is 3 + 3?"}], "ground_truth": ["6"]},
        {"prompt": "What is 4 + 4?", "ground_truth": 8},
    ])
    prompts = read_prompts([str(path)], tok, "plain", 40, None)
    assert prompts.answers == ["2", "8"] and prompts.where == [f"{path}:1", f"{path}:7"]
    assert sum(prompts.skipped.values()) == 5
    err = capsys.readouterr().err
    assert f"{path}:2: skipped: not valid JSON" in err
    assert f"{path}:4: skipped: unknown role 'robot'" in err
    assert f"{path}:5: skipped: prompt of 150 tokens is longer than max_prompt_tokens (40)" in err
    assert f"{path}:6: skipped: messages need a chat template" in err
    assert "skipped 5 prompt record(s)" in err


def test_checker_that_raises_is_counted_not_fatal(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_checkers.py").write_text(textwrap.dedent("""
        def picky(completion, answer):
            if "boom" in completion:
                raise ValueError("cannot parse")
            return completion.strip() == answer
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = RewardFunction(RewardConfig(checker="my_checkers.picky", correct=10, format_pattern=r"^\s*\d",
                                         format_reward=0.5))
    try:
        scored = reward(["7", "boom", " 8"], ["7", "7", "7"], ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"])
    finally:
        reward.close()
    assert scored.rewards == [10.5, 0.0, 0.5] and scored.correct == [True, False, False]
    assert scored.failures == 1 and reward.errors == 1 and reward.timeouts == 0
    assert "p.jsonl:2: reward checker my_checkers.picky raised (ValueError: cannot parse); reward 0" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_checker_that_hangs_is_stopped_and_counted(tmp_path, monkeypatch, capsys):
    (tmp_path / "slow_checkers.py").write_text(textwrap.dedent("""
        import time
        def sometimes_hangs(completion, answer):
            if completion == "hang":
                time.sleep(600)
            return completion == answer
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = RewardFunction(RewardConfig(checker="slow_checkers.sometimes_hangs", timeout_s=1.0))
    try:
        scored = reward(["1", "hang", "1"], ["1", "1", "1"], ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"])
    finally:
        reward.close()
    assert scored.rewards == [1.0, 0.0, 1.0] and reward.timeouts == 1
    assert "p.jsonl:2: reward checker slow_checkers.sometimes_hangs timed out" in capsys.readouterr().err


def test_unknown_checker_is_refused_before_compute():
    from lmforge.core.errors import LmforgeError

    with pytest.raises(LmforgeError, match="cannot be imported"):
        RewardFunction(RewardConfig(checker="no_such_module.check"))


# ---------------------------------------------------------------------------------------------- runs

def toy_config(tmp_path, **overrides) -> RLVRConfig:
    model_dir = tiny_model_dir(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "toy.jsonl", [{"prompt": "Answer with the number 7.", "answer": "7"}] * 8)
    data = {"run_dir": str(tmp_path / "run"), "model": str(model_dir), "prompts": [str(prompts)],
            "max_prompt_tokens": 32, "max_steps": 30, "device": "cpu", "precision": "fp32",
            "optimizer": {"lr": 1e-2}, "checkpoint": {"interval": 1000, "save_final": True},
            "metrics": {"log_interval": 5, "tensorboard": False},
            "grpo": {"group_size": 8, "prompts_per_step": 4, "micro_batch_sequences": 32, "max_new_tokens": 2}}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[key] = value
    return from_dict(RLVRConfig, data)


def metrics_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_toy_task_reward_rises(tmp_path):
    config = toy_config(tmp_path)
    summary = rlvr(config)
    rows = metrics_rows(config.run_dir)
    first, last = rows[0]["reward"], rows[-1]["reward"]
    assert last > first + 0.2, [r["reward"] for r in rows]
    from lmforge.model.loading import load

    assert load(summary["model_dir"]).tokenizer is not None  # a model directory eval and generate read


@pytest.mark.slow
def test_cli_run_with_ppo_epochs_and_importance_cap(tmp_path):
    from lmforge.cli import main

    config = toy_config(tmp_path)
    (tmp_path / "rlvr.yaml").write_text(json.dumps(to_dict(config)))
    code = main(["adapt", "rlvr", str(tmp_path / "rlvr.yaml"), "max_steps=4", "grpo.iterations=2",
                 "grpo.importance_cap=2.0", "grpo.beta=0.05", "metrics.log_interval=1"])
    assert code == 0
    rows = metrics_rows(config.run_dir)
    assert [("reward" in r) for r in rows] == [True, False, True, False]  # steps 2 and 4 reuse the rollout
    assert all("kl" in r and "clip_fraction" in r for r in rows)
    assert rows[1]["kl"] > 0  # the second step's policy has moved from the reference
    assert (Path(config.run_dir) / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- TRL peer

TRL_SCRIPT = r"""
import json, sys
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

spec = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
by_prompt = {tuple(p): g for p, g in zip(spec["prompt_ids"], spec["groups"])}
reward_of = {(tuple(p), tuple(c)): r for p, g, rs in zip(spec["prompt_ids"], spec["groups"], spec["rewards"])
             for c, r in zip(g, rs)}

def rollout(prompts, trainer):
    # the completions lmforge sampled, in TRL's prompt order (a group's prompt repeats num_generations times)
    seen, prompt_ids, completion_ids = {}, [], []
    for text in prompts:
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        k = seen.get(ids, 0)
        seen[ids] = k + 1
        prompt_ids.append(list(ids))
        completion_ids.append(by_prompt[ids][k])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "logprobs": [[0.0] * len(c) for c in completion_ids]}

def reward(prompts, completions, completion_ids, **kw):
    ids = [tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return [reward_of[(p, tuple(c))] for p, c in zip(ids, completion_ids)]

g = spec["grpo"]
args = GRPOConfig(output_dir=spec["out"], per_device_train_batch_size=len(spec["prompt_ids"]) * g["group_size"],
                  num_generations=g["group_size"], max_completion_length=g["max_new_tokens"],
                  temperature=g["temperature"], beta=g["beta"], epsilon=g["clip_low"], epsilon_high=g["clip_high"],
                  loss_type=spec["loss_type"], scale_rewards=spec["scale_rewards"], learning_rate=1e-3,
                  max_steps=1, logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                  gradient_accumulation_steps=1, max_grad_norm=1.0, save_strategy="no")
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                      train_dataset=Dataset.from_list([{"prompt": p} for p in spec["prompts"]]),
                      rollout_func=rollout)
trainer.train()
log = trainer.state.log_history[0]
print(json.dumps({"loss": log["loss"], "grad_norm": log["grad_norm"], "reward": log["reward"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not TRL_PYTHON.is_file(), reason="TRL peer venv missing (benchmarks/peers/setup_trl.sh)")
@pytest.mark.parametrize("aggregation, advantages, beta", [("token", "centered", 0.0), ("sequence", "standard", 0.05)])
def test_step1_loss_matches_trl(tmp_path, monkeypatch, aggregation, advantages, beta):
    """TRL samples with its own generation code, so both trainers get the completions lmforge sampled (TRL's
    `rollout_func`) and the same rewards: what is compared is the loss and gradient computation of step 1."""
    import lmforge.adapt.rlvr as rlvr_module
    from lmforge.model.directory import load_model_dir
    from lmforge.model.hf import export_hf

    sampled = []

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        sampled.append(out)
        return out

    generate = rlvr_module.generate_ids
    monkeypatch.setattr(rlvr_module, "generate_ids", recording_generate)
    model_dir = tiny_model_dir(tmp_path / "model")
    records = [{"prompt": f"Answer with the number {n}.", "answer": str(n)} for n in (3, 5, 7, 9)]
    prompts_file = write_jsonl(tmp_path / "p.jsonl", records)
    data = {"run_dir": str(tmp_path / "run"), "model": str(model_dir), "prompts": [str(prompts_file)],
            "prompt_format": "plain", "max_prompt_tokens": 32, "max_steps": 1, "device": "cpu", "precision": "fp32",
            "optimizer": {"lr": 1e-3, "max_grad_norm": 1.0}, "metrics": {"log_interval": 1, "tensorboard": False},
            "grpo": {"group_size": 6, "prompts_per_step": 4, "micro_batch_sequences": 8, "max_new_tokens": 4,
                     "temperature": 0.9, "aggregation": aggregation, "advantages": advantages, "beta": beta,
                     "filter_zero_variance": False}}
    config = from_dict(RLVRConfig, data)
    rlvr(config)
    ours = metrics_rows(config.run_dir)[0]

    model, tok = load_model_dir(model_dir)
    export_hf(model, tok, tmp_path / "hf")
    loader = PromptLoader(4, config.grpo, seed=0, rank=0, world_size=1)
    index = next(iter(loader))["prompt_index"].view(4, 6)[:, 0].tolist()
    prompt_ids = [tok.encode(records[i]["prompt"]) for i in index]
    groups = [sampled[0][k * 6:(k + 1) * 6] for k in range(4)]
    reward = RewardFunction(RewardConfig())
    rewards = [reward([tok.decode([t for t in c if t != tok.eos_id]) for c in g], [records[i]["answer"]] * 6,
                      ["-"] * 6).rewards for g, i in zip(groups, index)]
    spec = {"hf_dir": str(tmp_path / "hf"), "out": str(tmp_path / "trl"), "prompt_ids": prompt_ids, "groups": groups,
            "rewards": rewards, "prompts": [records[i]["prompt"] for i in index], "grpo": to_dict(config.grpo),
            "loss_type": "dapo" if aggregation == "token" else "grpo",
            "scale_rewards": "none" if advantages == "centered" else "group"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "trl_grpo.py").write_text(TRL_SCRIPT)
    done = subprocess.run([str(TRL_PYTHON), str(tmp_path / "trl_grpo.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert ours["reward"] == pytest.approx(theirs["reward"], abs=1e-6)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("name", ["rlvr-tulu3-8b.yaml", "rlvr-cpu.yaml"])
def test_shipped_rlvr_configs_load(name):
    from lmforge.core.config import load_config, packaged_config

    config = load_config(RLVRConfig, packaged_config("adapt") / name)
    assert config.grpo.group_size >= 2 and config.optimizer.lr > 0
    if name == "rlvr-tulu3-8b.yaml":  # the published settings, as labelled
        assert (config.grpo.beta, config.optimizer.lr, config.reward.correct) == (0.05, 3e-7, 10.0)
