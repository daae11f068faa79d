"""`lmforge model info|init`, `lmforge generate`, `lmforge export hf`, `lmforge import hf|gguf`."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.options import Flag, add_config_flags, add_model_source_flags, add_out_flag, config_from_args, out_of
from lmforge.core.errors import LmforgeError
from lmforge.model.sampling import SamplingConfig


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="model presets: sizes, FLOPs, memory; initialise a model directory")
    model_sub = model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")
    model_sub.required = True

    info = model_sub.add_parser("info", help="parameters, FLOPs per token and training memory of a preset")
    info.add_argument("preset", help="preset name (e.g. olmo2-1b, olmo2-tiny), a model YAML file or a model directory")
    info.add_argument("overrides", nargs="*", help="dotted overrides of the model config, e.g. d_model=256")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: the context)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--plan", metavar="tp=N,pp=N,cp=N,ep=N,dp=N,replicate=N",
                      help="per-device training memory under this parallel layout (degrees not given are 1)")
    info.add_argument("--suggest", type=int, metavar="DEVICES",
                      help="the smallest layouts of this many devices that fit --gpu-memory")
    info.add_argument("--micro-batch", type=int, default=1, metavar="N", help="sequences per device per step")
    info.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="compute precision")
    info.add_argument("--ac-every", type=int, default=2, metavar="N",
                      help="selective activation checkpointing: every N-th block")
    info.add_argument("--gpu-memory", metavar="SIZE", help="memory per device for the verdict, e.g. 80GB or 141GB")
    info.set_defaults(func=cmd_info)

    init = model_sub.add_parser("init", help="write a randomly initialised model directory")
    init.add_argument("preset", help="preset name, model YAML file or model directory")
    init.add_argument("overrides", nargs="*", help="dotted overrides of the model config, e.g. n_layers=2")
    init.add_argument("--out", required=True, help="output model directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", default=None, help="tokenizer name or path to store in the directory")
    init.set_defaults(func=cmd_init)

    gen = sub.add_parser("generate", help="generate text from a model (any saved form)")
    gen.add_argument("model", help="model directory, training run or checkpoint, or transformers directory")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="a prompt to continue (repeat for a batch)")
    prompt.add_argument("--chat", action="append", metavar="MESSAGE",
                        help="a user message, rendered with the model's chat template; the reply is printed "
                             "(repeat for a batch)")
    add_config_flags(gen, SamplingConfig, {
        "max_new_tokens": "tokens to generate at most",
        "temperature": "0 = greedy",
        "top_k": "sample among the k most likely tokens",
        "top_p": "sample among the most likely tokens holding this probability mass",
        "stop_strings": Flag("stop at any of these strings (repeatable)", flag="--stop"),
        "seed": "sampling seed",
        "token_healing": "let the model re-decide the prompt's last token (a prompt ending in a newline then "
                         "gets the indentation it would have had); --prompt only",
    })
    add_model_source_flags(gen)
    gen.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    export = sub.add_parser("export", help="export a model directory to another format")
    export_sub = export.add_subparsers(dest="export_format", metavar="FORMAT")
    export_sub.required = True
    export_hf = export_sub.add_parser("hf", help="Hugging Face transformers directory (Olmo, Olmo2, Olmo3, Olmoe, Bloom, Llama or Qwen2)")
    export_hf.add_argument("model", help="lmforge model directory, training checkpoint, or run directory (latest checkpoint)")
    add_out_flag(export_hf, "output transformers directory")
    add_model_source_flags(export_hf)
    export_hf.set_defaults(func=cmd_export_hf)

    imp = sub.add_parser("import", help="import a model from another format")
    imp_sub = imp.add_subparsers(dest="import_format", metavar="FORMAT")
    imp_sub.required = True
    import_hf = imp_sub.add_parser("hf", help="Hugging Face directory: llama, mistral, qwen2, olmo, olmo2, olmo3, "
                                   "olmoe or bloom")
    import_hf.add_argument("hf_dir")
    import_hf.add_argument("--out", required=True)
    import_hf.set_defaults(func=cmd_import_hf)
    import_gguf = imp_sub.add_parser("gguf", help="GGUF file (llama.cpp; Llama architecture, dequantized to fp32)")
    import_gguf.add_argument("gguf_file")
    import_gguf.add_argument("--out", required=True)
    import_gguf.set_defaults(func=cmd_import_gguf)


def cmd_info(args) -> None:
    from lmforge.model.info import model_info
    from lmforge.model.presets import resolve_model_config

    if args.seq_len is not None and args.seq_len < 1:
        from lmforge.core.errors import LmforgeError

        raise LmforgeError(f"--seq-len must be at least 1, got {args.seq_len}")
    config = resolve_model_config(args.preset, args.overrides)
    if args.plan or args.suggest:
        return _plan_memory(args, config)
    info = model_info(config, args.seq_len)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.preset} ({info['family']})")
    print(f"  parameters            {info['parameters']:>16,}")
    print(f"  non-embedding         {info['non_embedding_parameters']:>16,}")
    if info["active_parameters"] != info["parameters"]:
        print(f"  active per token      {info['active_parameters']:>16,}  (top-k experts; FLOPs count these)")
    print(f"  vocab / embedding     {info['vocab_size']:>8,} / {info['embedding_size']:,}")
    print(f"  FLOPs per token       {info['flops_per_token']:>16,}  (training, seq {info['seq_len']}, 6N + causal attention)")
    print("  memory for weights + grads + AdamW state:")
    for name, parts in info["memory_bytes"].items():
        detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items() if k != "total")
        print(f"    {name:<11} {parts['total'] / 2**30:10.2f} GiB  ({detail} GiB)")


def _plan_memory(args, config) -> None:
    from lmforge.core.errors import LmforgeError
    from lmforge.train import memory

    device = memory.parse_bytes(args.gpu_memory) if args.gpu_memory else None
    shape = memory.TrainingShape(micro_batch=args.micro_batch, seq_len=args.seq_len or config.max_sequence_length,
                                 precision=args.precision, ac_every=args.ac_every)
    if args.suggest:
        if device is None:
            raise LmforgeError("--suggest needs --gpu-memory (the memory of one device)")
        found = memory.suggest_layouts(config, args.suggest, shape, device)
        print("\n".join(memory.format_suggestions(found, args.suggest, device)))
    if args.plan:
        estimate = memory.estimate_memory(config, memory.ParallelPlan.parse(args.plan), shape)
        if args.json:
            print(json.dumps({"plan": str(estimate.plan), "stage": estimate.stage, "parts": estimate.parts,
                              "activations": estimate.activations, "peak": estimate.peak,
                              "verdict": memory.verdict(estimate, device) if device else None}, indent=2))
        else:
            print("\n".join(memory.format_estimate(estimate, device)))


def cmd_init(args) -> None:
    from lmforge.model.directory import init_model_dir
    from lmforge.model.presets import resolve_model_config

    config = resolve_model_config(args.preset, args.overrides)
    init_model_dir(config, args.out, args.seed, args.tokenizer,
                   provenance={"preset": args.preset, "overrides": args.overrides})
    print(f"wrote {args.out}")


def cmd_generate(args) -> None:
    from lmforge.model.generation import chat_prompt, generate_text
    from lmforge.model.loading import load, resolve_device

    config = config_from_args(SamplingConfig, args)  # checked before the model is loaded
    if args.chat and config.token_healing:
        raise LmforgeError("--token-healing continues a --prompt; a --chat prompt ends where the chat template "
                           "says the reply begins")
    loaded = load(args.model, args.step, device=resolve_device(args.device), tokenizer=args.tokenizer,
                  require_tokenizer=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    inputs = args.chat or args.prompt
    prompts = [chat_prompt(tokenizer, m) for m in args.chat] if args.chat else args.prompt
    echo = not args.chat  # a continuation reads after its prompt; a chat reply stands alone
    if args.json:
        texts = generate_text(model, tokenizer, prompts, config)
        key = "message" if args.chat else "prompt"
        print(json.dumps([{key: p, "completion": t} for p, t in zip(inputs, texts)], ensure_ascii=False))
        return
    if len(prompts) == 1:  # one prompt streams as it is generated
        sys.stdout.write(inputs[0] if echo else "")
        sys.stdout.flush()
        generate_text(model, tokenizer, prompts, config, on_text=lambda _, piece: _write_now(piece))
        sys.stdout.write("\n")
        return
    for given, text in zip(inputs, generate_text(model, tokenizer, prompts, config)):
        sys.stdout.write(f"{given}{text}\n" if echo else f"{text}\n")


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_export_hf(args) -> None:
    from lmforge.model.hf import export_hf
    from lmforge.model.loading import load

    loaded = load(args.model, args.step, tokenizer=args.tokenizer)
    out = out_of(args)
    arch = export_hf(loaded.model, loaded.tokenizer, out, inputs=[p for p in loaded.weight_files if p.is_file()],
                     source={"source": str(loaded.path), "source_kind": loaded.kind})
    print(f"wrote {out} ({arch})")


def cmd_import_hf(args) -> None:
    from lmforge.model.hf import import_hf

    import_hf(args.hf_dir, args.out)
    print(f"wrote {args.out}")


def cmd_import_gguf(args) -> None:
    from lmforge.model.gguf_file import import_gguf

    import_gguf(args.gguf_file, args.out)
    print(f"wrote {args.out}")
