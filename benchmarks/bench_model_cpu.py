"""CPU throughput of the model against transformers, same config and weights, same run.

1. forward+backward tokens/s of a preset (default olmo2-tiny) vs transformers' class for it;
2. generation tokens/s with the KV cache vs transformers' `generate` (greedy, no EOS stop).

    .venv/bin/python benchmarks/bench_model_cpu.py [--preset olmo2-tiny] [--batch 8] [--seq 256]

Prints each measurement and the ratio ours / transformers (goal >= 1.0). Runs alternate (ours, theirs) and
the median of the repeats is reported, so a background load hurts both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def timed_pair(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately so that background load hurts both alike."""
    ours(), theirs()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="olmo2-tiny")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from lmforge.model.directory import build_model
    from lmforge.model.generation import SamplingConfig, generate_ids
    from lmforge.model.hf import export_hf
    from lmforge.model.presets import get_preset
    from lmforge.model.transformer import cross_entropy_loss

    transformers.logging.set_verbosity_error()
    config = get_preset(args.preset)
    if args.vocab_size:
        config.vocab_size = args.vocab_size
    ours = build_model(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, None, f"{tmp}/hf")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", attn_implementation="sdpa")
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step_ours():
        ours.zero_grad(set_to_none=True)
        loss, _ = cross_entropy_loss(ours(inputs), labels)
        loss.backward()

    def step_theirs():
        theirs.zero_grad(set_to_none=True)
        logits = theirs(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()

    ours.train(), theirs.train()
    tokens = args.batch * args.seq
    t_ours, t_theirs = timed_pair(step_ours, step_theirs, args.repeats)
    print(f"forward+backward {args.preset} (vocab {vocab}) batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads")
    print(f"  lmforge       {tokens / t_ours:10.0f} tokens/s")
    print(f"  transformers  {tokens / t_theirs:10.0f} tokens/s")
    print(f"  ratio         {t_theirs / t_ours:10.2f}x")

    ours.eval(), theirs.eval()
    prompts = torch.randint(0, vocab, (args.gen_batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)

    def gen_ours():
        generate_ids(ours, prompts.tolist(), sampling, eos_id=None, pad_id=0)

    def gen_theirs():
        with torch.no_grad():
            theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    new = args.gen_batch * args.new_tokens
    g_ours, g_theirs = timed_pair(gen_ours, gen_theirs, max(2, args.repeats // 2))
    print(f"generation greedy, {args.gen_batch} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens")
    print(f"  lmforge       {new / g_ours:10.0f} tokens/s")
    print(f"  transformers  {new / g_theirs:10.0f} tokens/s")
    print(f"  ratio         {g_theirs / g_ours:10.2f}x")


if __name__ == "__main__":
    main()
