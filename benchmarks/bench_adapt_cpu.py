"""SFT and DPO training speed on CPU: lmforge's `adapt sft/dpo` against TRL's SFTTrainer / DPOTrainer (the peer, in
its own venv: benchmarks/peers/setup_trl.sh), same model (olmo2-tiny with the OLMo tokenizer, exported to
transformers for TRL), same records (the arithmetic builders'), same batch, fp32, no gradient accumulation.

    python benchmarks/bench_adapt_cpu.py [--steps 10] [--batch 16] [--threads 2] [--stages sft,dpo]

Tokens/s counts real (non-padding) tokens of the training steps only: TRL's from the attention masks of the
batches it trains on, timed around `trainer.train()`; lmforge's from the step times in metrics.jsonl and the
records' mean length (both see `steps x batch` records of the same data). DPO counts both replies' tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = Path(os.environ.get("TRL_VENV", ROOT / ".peers" / "trl-venv")) / "bin" / "python"


def ours(stage: str, work: Path, data: str, steps: int, batch: int, extra: list[str]) -> float:
    from lmforge.cli import main

    config = work / f"{stage}.yaml"
    config.write_text("{}\n")
    out = work / f"ours-{stage}"
    assert main(["adapt", stage, str(config), f"model={work / 'start'}", f"data=[{data}]", f"out={out}",
                 "max_seq_length=64", f"batch_size={batch}", f"micro_batch_size={batch}", f"max_steps={steps}",
                 "precision=fp32", "device=cpu", "optimizer.lr=1e-5", "checkpoint.interval=null", *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in rows[:1]) + sum(
        (b["tokens"] - a["tokens"]) / b["tokens_per_second"] for a, b in zip(rows, rows[1:]))
    return seconds


def mean_tokens(stage: str, data: str, tokenizer) -> float:
    from lmforge.adapt.data import RecordReport, preference_arrays, sft_examples

    if stage == "sft":
        return float(np.mean([len(e.ids) for e in sft_examples([data], tokenizer, 64, "truncate", RecordReport())]))
    arrays = preference_arrays([data], tokenizer, 64, "truncate", tokenizer.pad_id, RecordReport())
    pad = tokenizer.pad_id
    return float(((arrays["chosen_input_ids"] != pad).sum(1) + (arrays["rejected_input_ids"] != pad).sum(1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="sft,dpo", help="which of sft, dpo to measure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lmforge.adapt.builders import build
    from lmforge.cli import main as cli
    from lmforge.model.loading import load

    work = Path(tempfile.mkdtemp(prefix="bench_adapt_"))
    assert cli(["model", "init", "olmo2-tiny", "--tokenizer", "olmo", "--out", str(work / "start")]) == 0
    start = load(work / "start", require_tokenizer=True)
    from lmforge.adapt.templates import chat_tokenizer
    from lmforge.model.directory import save_model_dir

    tokenizer = chat_tokenizer(start.tokenizer, "tulu")
    save_model_dir(start.model, work / "start", tokenizer)  # the template travels to TRL through the export
    assert cli(["export", "hf", str(work / "start"), "--out", str(work / "start-hf")]) == 0
    for kind in ("sft", "dpo"):
        build(kind, "arithmetic", work / f"{kind}.jsonl")
    # TRL's SFT input: lmforge's ids and masks (the same tokens); its DPO input: the conversational records.
    from lmforge.adapt.data import preference_messages, sft_messages
    from lmforge.adapt.templates import encode_chat

    with open(work / "sft.jsonl") as f, open(work / "trl-sft.jsonl", "w") as g:
        for line in f:
            ids, trained = encode_chat(tokenizer, sft_messages(json.loads(line)))
            g.write(json.dumps({"input_ids": ids, "assistant_masks": [int(t) for t in trained]}) + "\n")
    with open(work / "dpo.jsonl") as f, open(work / "trl-dpo.jsonl", "w") as g:
        for line in f:
            prompt, chosen, rejected = preference_messages(json.loads(line))
            g.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    print(f"CPU threads {args.threads}, {args.steps} steps of {args.batch} records, olmo2-tiny + OLMo tokenizer")
    for stage, extra, trl_extra in (("sft", ["loss_reduction=mean"], {}),
                                    ("dpo", ["loss=dpo", "beta=0.1"], {"beta": 0.1, "loss_type": "sigmoid"})):
        if stage not in args.stages.split(","):
            continue
        data = str(work / f"{stage}.jsonl")
        seconds = ours(stage, work, data, args.steps, args.batch, extra)
        our_tps = args.steps * args.batch * mean_tokens(stage, data, tokenizer) / seconds
        spec = {"stage": stage, "mode": "train", "model": str(work / "start-hf"),
                "data": str(work / f"trl-{stage}.jsonl"),
                "out": str(work / f"trl-{stage}"), "batch_size": args.batch, "max_length": 64, "steps": args.steps,
                "threads": args.threads, "lr": 1e-5, **trl_extra}
        peer = [str(TRL_PYTHON), str(ROOT / "benchmarks" / "peers" / "trl_adapt.py"), json.dumps(spec)]
        result = subprocess.run(peer, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        theirs = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{stage}: lmforge {our_tps:,.0f} tokens/s, TRL {theirs['tokens_per_second']:,.0f} tokens/s, "
              f"ratio {our_tps / theirs['tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
