"""CPU GRPO throughput: `lmforge adapt rlvr` vs TRL 1.16's GRPOTrainer, in completions (samples) per second.

Same model (olmo2 shape, d_model 256, 4 layers, SwiGLU 1024, the toy task's 30-token character vocabulary;
exported to transformers' Olmo2ForCausalLM for TRL), same prompts ("Answer with the number N."), same reward
(last number equals N), same GRPO settings (group 8, 4 prompts per step, up to 32 new tokens, temperature 1,
token-level loss, clip 0.2/0.28, beta 0, one optimizer step per rollout, AdamW 1e-4), fp32, one process each
with the same thread count. Each side samples its own completions (its own generation code with a KV cache),
so completion lengths are printed too. Samples/s is measured between the end of step 1 and the last step.

    .venv/bin/python benchmarks/bench_rlvr_cpu.py            # needs .peers/trl-venv (peers/setup_trl.sh)
    .venv/bin/python benchmarks/bench_rlvr_cpu.py --share-ab 9 --steps 0   # only the prompt-sharing A/B

`--share-ab N` times (CPU s, one thread, N interleaved repeats, medians) the completion log-probs' forward +
backward of one micro-batch of the benchmark's shape (4 prompts of 25 tokens x 8 completions of 20): whole
"prompt + completion" rows right-padded, as before prompts were shared, vs each prompt forwarded once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = Path(os.environ.get("TRL_VENV", ROOT / ".peers" / "trl-venv"))
GROUP, PROMPTS, NEW_TOKENS, LR = 8, 4, 32, 1e-4

TRL_RUN = r"""
import json, re, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

hf_dir, prompts_file, out, steps, group, prompts_per_step, new_tokens, lr = sys.argv[1:9]
records = [json.loads(line) for line in open(prompts_file)]
answer = {r["prompt"]: r["answer"] for r in records}
NUMBER = re.compile(r"-?[\d,]*\.?\d+")

def reward(prompts, completions, **kw):
    out = []
    for p, c in zip(prompts, completions):
        found = NUMBER.findall(c.replace("$", ""))
        out.append(float(bool(found) and found[-1].replace(",", "").rstrip(".") == answer[p]))
    return out

class Clock(TrainerCallback):
    def __init__(self):
        self.ends = []
    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())

torch.set_num_threads(int(sys.argv[9]))
clock = Clock()
group, prompts_per_step = int(group), int(prompts_per_step)
args = GRPOConfig(output_dir=out, per_device_train_batch_size=group * prompts_per_step, num_generations=group,
                  max_completion_length=int(new_tokens), temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.28,
                  loss_type="dapo", scale_rewards="none", learning_rate=float(lr), max_steps=int(steps),
                  logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0, save_strategy="no",
                  gradient_accumulation_steps=1, max_grad_norm=1.0, lr_scheduler_type="constant")
trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), reward_funcs=reward,
                      args=args, processing_class=AutoTokenizer.from_pretrained(hf_dir),
                      train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in records]), callbacks=[clock])
trainer.train()
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
samples = (len(clock.ends) - 1) * group * prompts_per_step
print(json.dumps({"samples_per_second": samples / (clock.ends[-1] - clock.ends[0]),
                  "completion_length": sum(lengths) / len(lengths)}))
"""


def setup(work: Path) -> tuple[Path, Path, Path]:
    from lmforge.adapt.rlvr_data import toy_records, toy_tokenizer, write_records
    from lmforge.core.config import from_dict, to_dict
    from lmforge.model.directory import build_model, load_model_dir, write_model_dir
    from lmforge.model.hf import export_hf
    from lmforge.model.presets import get_preset
    from lmforge.model.transformer import ModelConfig

    tok = toy_tokenizer()
    base = to_dict(get_preset("olmo2-tiny"))
    base.update(n_layers=4, d_model=256, n_heads=4, mlp_hidden_size=1024, vocab_size=tok.vocab_size,
                vocab_multiple=1, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, max_sequence_length=128)
    model_dir = work / "model"
    write_model_dir(build_model(from_dict(ModelConfig, base), 0), model_dir, tok, command="bench")
    model, tok = load_model_dir(model_dir)
    export_hf(model, tok, work / "hf")
    prompts = write_records(toy_records(400, seed=0), work / "prompts.jsonl")
    return model_dir, work / "hf", prompts


def share_ab(model_dir: Path, repeats: int) -> None:
    import statistics

    import torch

    from lmforge.adapt.rlvr import GRPO, GRPOConfig, token_logps
    from lmforge.model.directory import load_model_dir
    from lmforge.train.objective import IGNORE_INDEX

    torch.set_num_threads(1)
    model, tok = load_model_dir(model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = [tok.encode(f"Answer with the number {n}.") for n in range(PROMPTS) for _ in range(GROUP)]
    completions = [torch.randint(2, tok.vocab_size, (20,), generator=gen).tolist() for _ in prompts]
    grpo = GRPOConfig(group_size=GROUP, prompts_per_step=PROMPTS, micro_batch_sequences=GROUP * PROMPTS)
    objective = GRPO(grpo, None, None, tok)
    batch = objective._rows(prompts, completions, torch.ones(len(prompts), dtype=torch.bool), torch.device("cpu"))
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), tok.pad_id)
    labels = torch.full((len(prompts), width), IGNORE_INDEX)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        labels[row, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
    ways = {"whole rows": lambda: token_logps(model(ids), labels, 1.0),
            "prompts shared": lambda: objective._completion_logps(model, batch)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, logps in ways.items():
            start = time.process_time()
            logps().sum().backward()
            times[name].append(time.process_time() - start)
            model.zero_grad()
    whole, shared = (statistics.median(times[name]) for name in ways)
    print(f"completion log-probs, forward + backward of {len(prompts)} rows: whole rows {whole:.4f}, prompts "
          f"shared {shared:.4f} CPU s (1 thread), ratio {whole / shared:.2f}x", flush=True)


def run_lmforge(work: Path, model_dir: Path, prompts: Path, steps: int, threads: int) -> dict:
    import torch

    from lmforge.adapt.rlvr import RLVRConfig, rlvr
    from lmforge.core.config import from_dict

    torch.set_num_threads(threads)
    config = from_dict(RLVRConfig, {
        "run_dir": str(work / f"lmforge-run-{time.time_ns()}"), "model": str(model_dir), "prompts": [str(prompts)],
        "prompt_format": "plain", "max_prompt_tokens": 32, "max_steps": steps, "device": "cpu", "precision": "fp32",
        "optimizer": {"lr": LR, "max_grad_norm": 1.0}, "checkpoint": {"interval": None},
        "metrics": {"log_interval": 1, "tensorboard": False},
        "grpo": {"group_size": GROUP, "prompts_per_step": PROMPTS, "micro_batch_sequences": GROUP * PROMPTS,
                 "max_new_tokens": NEW_TOKENS, "filter_zero_variance": False}})
    from lmforge.adapt import rlvr as rlvr_module

    ends = []
    original = rlvr_module.GRPO.interval_metrics

    def timed(self):
        ends.append(time.perf_counter())
        return original(self)

    rlvr_module.GRPO.interval_metrics = timed  # called once per step at log_interval 1, after the update
    rlvr(config, command="bench")  # the final save and export come after the last step's clock
    rows = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    samples = (len(ends) - 1) * GROUP * PROMPTS
    return {"samples_per_second": samples / (ends[-1] - ends[0]),
            "completion_length": sum(r["completion_length"] for r in rows) / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "out" / "bench_rlvr"))
    parser.add_argument("--share-ab", type=int, default=0, metavar="N",
                        help="also time the completion log-probs with whole rows vs shared prompts, N repeats")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, hf_dir, prompts = setup(work)
    if args.share_ab:
        share_ab(model_dir, args.share_ab)
    if args.steps < 1:
        return
    ours = run_lmforge(work, model_dir, prompts, args.steps, args.threads)
    print(f"lmforge: {ours['samples_per_second']:.2f} samples/s (mean completion {ours['completion_length']:.1f} "
          f"tokens)", flush=True)
    if not (TRL_VENV / "bin" / "python").is_file():
        print(f"TRL venv missing ({TRL_VENV}); run benchmarks/peers/setup_trl.sh for the comparison")
        return
    script = work / "trl_grpo.py"
    script.write_text(TRL_RUN)
    done = subprocess.run([str(TRL_VENV / "bin" / "python"), str(script), str(hf_dir), str(prompts),
                           str(work / "trl-out"), str(args.steps), str(GROUP), str(PROMPTS), str(NEW_TOKENS),
                           str(LR), str(args.threads)], capture_output=True, text=True, env={**os.environ,
                                                                                              "PYTHONPATH": ""})
    if done.returncode:
        sys.exit(f"TRL run failed:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"TRL 1.16: {theirs['samples_per_second']:.2f} samples/s (mean completion "
          f"{theirs['completion_length']:.1f} tokens)")
    print(f"ratio lmforge / TRL: {ours['samples_per_second'] / theirs['samples_per_second']:.2f}x")


if __name__ == "__main__":
    main()
