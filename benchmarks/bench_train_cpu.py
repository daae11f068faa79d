"""CPU training throughput: lmforge's trainer vs OLMo-core 3.0.0's trainer vs a plain transformers loop.

Same model shape (olmo2-tiny: d_model 128, 4 layers, 4 heads, SwiGLU hidden 512 as OLMo-core's factory rounds
it; vocabulary 8,192 by default, the size of the quickstart's BPE — with the 50k OLMo vocabulary the LM head is
~90% of the FLOPs and a step takes seconds on a small CPU), same token file of random ids, same sequence length, micro-batch and accumulation, fp32,
AdamW + grad clipping 1.0; z-loss 1e-5 and the skip-step rule in both trainers (transformers has neither).
Each trainer runs in its own process (OLMo-core in its own venv, see peers/setup_olmo_core.sh) with the same
thread count; tokens/s is measured between step ends after the warmup steps, data loading included.

    .venv/bin/python benchmarks/bench_train_cpu.py                 # prints each result and the ratios
    .venv/bin/python benchmarks/bench_train_cpu.py --rounds 2      # alternate the runs, keep each one's best
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EOS = 2
D_MODEL, N_LAYERS, N_HEADS, HIDDEN = 128, 4, 4, 512
PEER_VENV = Path(os.environ.get("OLMO_CORE_VENV", Path(__file__).resolve().parents[1] / ".peers" / "olmo-core-venv"))


def write_tokens(work: Path, num_tokens: int, vocab: int) -> Path:
    """Raw uint32 ids (OLMo-core/Dolma memmap format) plus a Dolma-style sidecar so lmforge reads it too."""
    path = work / f"random-tokens-{vocab}.npy"
    if path.is_file() and path.stat().st_size == num_tokens * 4:
        return path
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=num_tokens, dtype=np.uint32)
    tokens[2047::2048] = EOS
    tokens.tofile(path)
    with gzip.open(work / f"random-tokens-{vocab}.csv.gz", "wt") as f:
        ends = list(range(2048, num_tokens, 2048)) + [num_tokens]
        start = 0
        for i, end in enumerate(ends):
            f.write(f"{start},{end},doc{i},random,{i}\n")
            start = end
    return path


class StepClock:
    """Wall and CPU (process: all threads) time at each step end. On a shared machine tokens per CPU-second
    is the steadier number: it does not count the time other jobs hold the cores."""

    def __init__(self):
        self.times: list[tuple[float, float]] = []

    def tick(self):
        self.times.append((time.perf_counter(), time.process_time()))

    def result(self, tokens_per_step: int, warmup: int) -> dict:
        (wall0, cpu0), (wall1, cpu1) = self.times[warmup], self.times[-1]
        tokens = (len(self.times) - 1 - warmup) * tokens_per_step
        return {"tokens_per_second": tokens / (wall1 - wall0), "tokens_per_cpu_second": tokens / (cpu1 - cpu0)}


def run_lmforge(args, path: Path) -> dict:
    import torch

    from lmforge.core.config import from_dict
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    torch.manual_seed(0)
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    config = from_dict(TrainConfig, {
        "run_dir": str(Path(args.work) / "lmforge-run"),
        "data": {"paths": [str(path)], "dtype": "uint32", "sequence_length": args.seq_len},
        "model": {"preset": "olmo2-tiny", "overrides": {"vocab_size": args.vocab, "mlp_hidden_size": HIDDEN,
                                                         "eos_token_id": EOS, "pad_token_id": 1}},
        "global_batch_size": tokens_per_step, "micro_batch_size": args.micro_batch * args.seq_len,
        "max_steps": args.steps, "precision": "fp32", "device": "cpu", "z_loss_multiplier": 1e-5,
        "optimizer": {"lr": 4e-4, "weight_decay": 0.033}, "schedule": {"name": "cosine", "warmup": 2000},
        "checkpoint": {"interval": None, "save_final": False},
        "metrics": {"log_interval": 1000, "tensorboard": False},
    })
    import shutil

    shutil.rmtree(config.run_dir, ignore_errors=True)
    trainer = Trainer(config)
    clock = StepClock()
    step = trainer.train_step

    def timed_step(batch, tokens):
        result = step(batch, tokens)
        clock.tick()
        return result

    trainer.train_step = timed_step
    trainer.fit()
    return {**clock.result(tokens_per_step, args.warmup), "params": sum(p.numel() for p in trainer.params)}


def run_olmo_core(args, path: Path) -> dict:
    from olmo_core.data import NumpyDataLoaderConfig, NumpyDatasetDType, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig
    from olmo_core.optim import CosWithWarmup, OptimGroupOverride, SkipStepAdamWConfig
    from olmo_core.train import Duration, TrainerConfig, prepare_training_environment, teardown_training_environment
    from olmo_core.train.callbacks import Callback
    from olmo_core.train.train_module import TransformerTrainModuleConfig
    from olmo_core.utils import seed_all

    clock = StepClock()

    class Timer(Callback):
        def post_step(self):
            clock.tick()

    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    tokenizer = TokenizerConfig(vocab_size=args.vocab, eos_token_id=EOS, pad_token_id=1)
    model_config = TransformerConfig.llama_like(
        d_model=D_MODEL, vocab_size=args.vocab, n_layers=N_LAYERS, n_heads=N_HEADS,
        block_name=TransformerBlockType.reordered_norm, qk_norm=True, rope_theta=500_000, layer_norm_eps=1e-6)
    prepare_training_environment(seed=0, backend=None)
    try:
        seed_all(0)
        model = model_config.build(init_device="cpu")
        hidden = model.blocks["0"].feed_forward.hidden_size if hasattr(model.blocks, "keys") else model.blocks[0].feed_forward.hidden_size
        train_module = TransformerTrainModuleConfig(
            rank_microbatch_size=args.micro_batch * args.seq_len, max_sequence_length=args.seq_len,
            optim=SkipStepAdamWConfig(lr=4e-4, weight_decay=0.033, betas=(0.9, 0.95), group_overrides=[
                OptimGroupOverride(params=["embeddings.weight"], opts=dict(weight_decay=0.0))]),
            compile_model=False, dp_config=None, autocast_precision=None, z_loss_multiplier=1e-5,
            max_grad_norm=1.0, scheduler=CosWithWarmup(warmup=2000),
        ).build(model)
        dataset = NumpyFSLDatasetConfig(paths=[str(path)], sequence_length=args.seq_len, tokenizer=tokenizer,
                                        dtype=NumpyDatasetDType.uint32,
                                        work_dir=str(Path(args.work) / "olmo-core-cache")).build()
        loader = NumpyDataLoaderConfig(global_batch_size=tokens_per_step, seed=0,
                                       num_workers=args.olmo_workers).build(dataset)
        trainer = TrainerConfig(save_folder=str(Path(args.work) / "olmo-core-save"), save_overwrite=True,
                                work_dir=str(Path(args.work) / "olmo-core-work"),
                                max_duration=Duration.steps(args.steps), metrics_collect_interval=1000,
                                no_checkpoints=True, no_evals=True).build(train_module, loader)
        trainer.add_callback("bench_timer", Timer())
        trainer.fit()
        params = sum(p.numel() for p in model.parameters())
    finally:
        teardown_training_environment()
    return {**clock.result(tokens_per_step, args.warmup), "params": params, "mlp_hidden": hidden}


def run_transformers(args, path: Path) -> dict:
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    config = Olmo2Config(vocab_size=args.vocab, hidden_size=D_MODEL, intermediate_size=HIDDEN, num_hidden_layers=N_LAYERS,
                         num_attention_heads=N_HEADS, max_position_embeddings=args.seq_len, rope_theta=500_000,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                         pad_token_id=1, eos_token_id=EOS)
    model = Olmo2ForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    model.train()
    no_decay = [p for n, p in model.named_parameters() if "embed_tokens" in n]
    decay = [p for n, p in model.named_parameters() if "embed_tokens" not in n]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.033}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=4e-4, betas=(0.9, 0.95), foreach=True)
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    n_instances = len(tokens) // args.seq_len
    order = np.random.default_rng(0).permutation(n_instances)
    clock = StepClock()
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    position = 0
    for _ in range(args.steps):
        ids = order[position:position + args.micro_batch * args.grad_accum]
        position += len(ids)
        batch = torch.from_numpy(np.stack([tokens[i * args.seq_len:(i + 1) * args.seq_len] for i in ids]).astype(np.int64))
        for micro in batch.split(args.micro_batch):
            loss = model(input_ids=micro, labels=micro).loss / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        clock.tick()
    return {**clock.result(tokens_per_step, args.warmup), "params": sum(p.numel() for p in model.parameters())}


RUNNERS = {"lmforge": run_lmforge, "olmo-core": run_olmo_core, "transformers": run_transformers}


def run_child(args, which: str) -> dict | None:
    python = str(PEER_VENV / "bin" / "python") if which == "olmo-core" else sys.executable
    if which == "olmo-core" and not Path(python).is_file():
        print(f"olmo-core: no peer venv at {PEER_VENV} (run benchmarks/peers/setup_olmo_core.sh)", file=sys.stderr)
        return None
    cmd = [python, __file__, "--run", which, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"{which} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (a multiple of 128)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--olmo-workers", type=int, default=0, help="OLMo-core data-loader worker processes")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--work", default="/tmp/lmforge-bench-train")
    p.add_argument("--run", choices=list(RUNNERS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    path = write_tokens(Path(args.work), (args.steps + 8) * args.micro_batch * args.grad_accum * args.seq_len,
                        args.vocab)
    if args.run:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(RUNNERS[args.run](args, path)), flush=True)
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for which in RUNNERS:
            result = run_child(args, which)
            if result and result["tokens_per_cpu_second"] > best.get(which, {}).get("tokens_per_cpu_second", 0):
                best[which] = result
    print(f"CPU training, {args.seq_len}-token sequences, {args.micro_batch} x {args.grad_accum} micro-batches, "
          f"{args.steps} steps ({args.warmup} warmup), {args.threads} threads, fp32")
    print(f"  best of {args.rounds} round(s) by tokens per CPU-second; wall tokens/s of the same run")
    for which, result in best.items():
        print(f"  {which:13s} {result['tokens_per_cpu_second']:>8,.0f} tokens/CPU-s {result['tokens_per_second']:>8,.0f}"
              f" tokens/s   ({result['params']:,} parameters)")
    ours = best.get("lmforge")
    for which in ("olmo-core", "transformers"):
        if ours and which in best:
            print(f"  lmforge / {which}: {ours['tokens_per_cpu_second'] / best[which]['tokens_per_cpu_second']:.2f}x "
                  f"per CPU-second, {ours['tokens_per_second'] / best[which]['tokens_per_second']:.2f}x wall")


if __name__ == "__main__":
    main()
