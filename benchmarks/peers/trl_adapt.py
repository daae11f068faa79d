"""TRL's SFTTrainer / DPOTrainer on a transformers model directory: step-1 loss and metrics, or training speed.

Runs in the TRL venv (benchmarks/peers/setup_trl.sh), called by tests/test_adapt_trl_parity.py and
benchmarks/bench_adapt_cpu.py:
    python trl_adapt.py '{"stage": "sft"|"dpo", "mode": "step1"|"train", "model": HF_DIR, "data": JSONL, ...}'
SFT records are pre-tokenized ({"input_ids", "assistant_masks"}: lmforge's ids and masks, so the comparison is
of the losses, not of tokenization); DPO records are conversational ({prompt, chosen, rejected} message lists)
and TRL applies the chat template the directory's tokenizer carries. Prints one JSON object.
"""

import json
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(spec: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    with open(spec["data"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    dataset = Dataset.from_list(records)
    common = dict(output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
                  learning_rate=spec.get("lr", 1e-5), lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=0.0, max_steps=spec.get("steps", 1), logging_steps=1, report_to=[], use_cpu=True,
                  bf16=False, save_strategy="no", seed=0, dataloader_drop_last=True, disable_tqdm=True)
    if spec["stage"] == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(max_length=spec["max_length"], packing=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=spec["beta"], loss_type=[spec["loss_type"]], max_length=spec["max_length"],
                         precompute_ref_log_probs=False, **common)
        reference = AutoModelForCausalLM.from_pretrained(spec["ref_model"], dtype=torch.float32) \
            if spec.get("ref_model") else None
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    if spec["mode"] == "step1":
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()  # metrics are recorded under the mode (no dropout in these models)
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items() if v} \
            if hasattr(trainer, "_metrics") else {}
        return {"loss": float(loss), **metrics}
    tokens = 0

    def count_tokens(batch):
        nonlocal tokens
        tokens += int(batch["attention_mask"].sum())

    loader = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: _Counting(loader(), count_tokens)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_second": tokens / elapsed}


class _Counting:
    """A dataloader that counts the real tokens of every batch it yields."""

    def __init__(self, loader, on_batch):
        self.loader, self.on_batch = loader, on_batch

    def __iter__(self):
        for batch in self.loader:
            self.on_batch(batch)
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
