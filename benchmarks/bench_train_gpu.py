"""lmforge's trainer throughput on one device: steady-state tokens/s and MFU of `lmforge train`'s own loop on
random tokens, the counterpart of OLMo-core's `olmo_core_bench.py` (same sequence length, micro-batch,
accumulation, z-loss 1e-5, AdamW + clipping, bf16 and per-block compile on GPU). `benchmarks/gpu_check.sh`
runs both in one call and prints the ratio.

    .venv/bin/python benchmarks/bench_train_gpu.py                          # olmo2-1b, seq 4096, 4 x 2, cuda
    .venv/bin/python benchmarks/bench_train_gpu.py --float8                 # float8 rowwise (needs torchao)
    .venv/bin/python benchmarks/bench_train_gpu.py --device cpu --preset olmo2-tiny --override vocab_size=512 \\
        --seq-len 64 --micro-batch 2 --grad-accum 1 --steps 4 --warmup 1 --no-compile   # the CPU dry run

It prints one line `RESULT {json}`: tokens/s per device (between step ends after the warmup steps, each end
after a CUDA sync), MFU (OLMo-core 3.0's formula, as the trainer logs it), step time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench_train_cpu import EOS, write_tokens


def run(args) -> dict:
    import torch
    import yaml

    from lmforge.core.config import from_dict
    from lmforge.model.presets import get_preset
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    # The token file's document ends are EOS (bench_train_cpu's); the rest as configured.
    overrides = {"max_sequence_length": max(args.seq_len, 64), "eos_token_id": EOS, "pad_token_id": 1}
    for item in args.override:
        field, value = item.split("=", 1)
        overrides[field] = yaml.safe_load(value)
    vocab = overrides.get("vocab_size", get_preset(args.preset).vocab_size)
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    path = write_tokens(Path(args.work), (args.steps + 4) * tokens_per_step, vocab)
    cuda = args.device == "cuda"
    config = from_dict(TrainConfig, {
        "run_dir": str(Path(args.work) / "lmforge-run"),
        "data": {"paths": [str(path)], "dtype": "uint32", "sequence_length": args.seq_len},
        "model": {"preset": args.preset, "overrides": overrides},
        "global_batch_size": tokens_per_step, "micro_batch_size": args.micro_batch * args.seq_len,
        "max_steps": args.steps, "precision": "bf16" if cuda else "fp32", "device": args.device,
        "float8": "rowwise" if args.float8 else "none", "z_loss_multiplier": 1e-5,
        "optimizer": {"lr": 4e-4, "weight_decay": 0.033}, "schedule": {"name": "cosine", "warmup": 2000},
        "parallel": {"compile": args.compile}, "skip_step": {"enabled": True},
        "checkpoint": {"interval": None, "save_final": False},
        "metrics": {"log_interval": 1000, "tensorboard": False},
    })
    shutil.rmtree(config.run_dir, ignore_errors=True)
    trainer = Trainer(config)
    ends: list[float] = []
    step = trainer.train_step

    def timed_step(batch, tokens):
        result = step(batch, tokens)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return result

    trainer.train_step = timed_step
    trainer.fit()
    warmup = min(args.warmup, len(ends) - 2)
    elapsed = ends[-1] - ends[warmup]
    tps = (len(ends) - 1 - warmup) * tokens_per_step / elapsed
    return {
        "trainer": "lmforge", "preset": args.preset, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
        "float8": args.float8, "compile": args.compile, "steps": len(ends), "timed_steps": len(ends) - 1 - warmup,
        "params": sum(p.numel() for p in trainer.params), "tokens_per_second": tps,
        "step_time_s": elapsed / (len(ends) - 1 - warmup),
        "mfu_pct": 100 * trainer.flops_per_token * tps / trainer.peak_flops if trainer.peak_flops else None,
        "max_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="olmo2-1b")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE", help="a model field")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8, help="steps left out of the timing (compile, allocator)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--float8", action="store_true")
    p.add_argument("--work", default="/tmp/lmforge-bench-gpu")
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps must be at least 3 (one warmup step and two timed step ends)")
    print("RESULT " + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
