"""SFT and DPO training speed on CPU: lmforge's `adapt sft/dpo` against TRL's SFTTrainer / DPOTrainer (the peer, in
its own venv: benchmarks/peers/setup_trl.sh), same model (olmo2-tiny with the OLMo tokenizer, exported to
transformers for TRL), same records (the arithmetic builders'), same batch, fp32, no gradient accumulation.

    python benchmarks/bench_adapt_cpu.py [--steps 10] [--batch 16] [--threads 2] [--stages sft,dpo] [--head-ab 7]

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


def head_ab(model_dir: Path, data: str, tokenizer, repeats: int) -> None:
    """CPU time (one thread) of SFT's forward + backward on one micro-batch of 16 records: the LM head at every
    position (the pretraining path) vs at the trained positions only (`logits_at`), interleaved, medians."""
    import time

    from lmforge.adapt.data import RecordReport, pack_rows, sft_examples
    from lmforge.adapt.sft import trim_to_labels
    from lmforge.model.loading import load
    from lmforge.eval.scoring import logits_at
    from lmforge.model.transformer import cross_entropy_loss
    from lmforge.train.objective import IGNORE_INDEX

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load(model_dir).model.train()
    arrays = pack_rows(sft_examples([data], tokenizer, 64, "truncate", RecordReport())[:16], 64, tokenizer.pad_id, False)
    micro = trim_to_labels({k: torch.from_numpy(v) for k, v in arrays.items()}, torch.from_numpy(arrays["labels"]),
                           ("input_ids", "labels"))
    ids, labels = micro["input_ids"].long(), micro["labels"].long()
    trained = labels != IGNORE_INDEX

    def head_at_trained():
        with logits_at(model, lambda hidden: hidden[trained]):
            return model(ids)

    runs = {"every position": lambda: cross_entropy_loss(model(ids), labels, reduction="sum")[0],
            "trained positions": lambda: cross_entropy_loss(head_at_trained(), labels[trained], reduction="sum")[0]}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, loss in runs.items():
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            loss().backward()
            seconds[name].append(time.process_time() - start)
    median = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    print(f"SFT forward+backward, {tuple(ids.shape)} tokens, {int(trained.sum())} trained, CPU s (1 thread): "
          + ", ".join(f"head at {name} {t:.3f}" for name, t in median.items())
          + f", ratio {median['every position'] / median['trained positions']:.2f}x")
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="sft,dpo", help="which of sft, dpo to measure")
    parser.add_argument("--head-ab", type=int, default=0, metavar="N",
                        help="also time SFT's LM head at every vs the trained positions, N interleaved repeats")
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
    if args.head_ab:
        head_ab(work / "start", str(work / "sft.jsonl"), tokenizer, args.head_ab)
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
