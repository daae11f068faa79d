"""GGUF import: a llama.cpp model file as an lmforge model directory.

The `gguf` package (the GGML project's own reader) parses the file and dequantizes its tensors; this module maps
the metadata to a `ModelConfig` (Llama architecture), the embedded BPE vocabulary to a `tokenizers` file with
its chat template, and the tensors to lmforge's names. llama.cpp stores the query and key projections with each
head's rotary halves interleaved; they are permuted back (as transformers' GGUF loader does). Everything is read
and checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.directory import model_from_state, state_shapes, write_model_dir
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokens.tokenizer import Tokenizer

ARCHITECTURES = ("llama",)
# Tensor types dequantized (what `gguf.quants.dequantize` implements and the tests exercise); others are refused.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "Q8_K")
TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE with merges
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
PER_LAYER = {"attn_norm": "attn_norm.weight", "ffn_norm": "mlp_norm.weight", "attn_q": "attn.q_proj.weight",
             "attn_k": "attn.k_proj.weight", "attn_v": "attn.v_proj.weight", "attn_output": "attn.o_proj.weight",
             "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight"}
GLOBAL = {"token_embd.weight": "embed.weight", "output_norm.weight": "final_norm.weight",
          "output.weight": "lm_head.weight"}
# Pre-tokenizer splits llama.cpp names (`tokenizer.ggml.pre`) beyond GPT-2's: SmolLM splits digits one by one.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise LmforgeError("reading GGUF needs the `gguf` package (pip install gguf)") from None
    if not path.is_file():
        raise LmforgeError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct or numpy errors on a damaged file
        raise LmforgeError(f"{path}: not a readable GGUF file (truncated or corrupt: {e})") from None


class _Metadata:
    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise LmforgeError(f"{self.path}: GGUF metadata lacks {key!r}")
        return value


def gguf_config(meta: _Metadata, tensor_names: set[str], vocab_size: int) -> ModelConfig:
    from lmforge.model.presets import llama

    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise LmforgeError(f"{meta.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    d_model, heads = int(meta.require(f"{arch}.embedding_length")), int(meta.require(f"{arch}.attention.head_count"))
    rope_dim = meta.get(f"{arch}.rope.dimension_count")
    if rope_dim is not None and heads and int(rope_dim) != d_model // heads:
        raise LmforgeError(f"{meta.path}: RoPE over {rope_dim} of {d_model // heads} head dimensions is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type") or "none"
    scaling_options = {}
    if scaling == "linear":
        scaling_options = {"rope_linear_factor": float(meta.require(f"{arch}.rope.scaling.factor"))}
    elif scaling == "yarn":
        factor = float(meta.require(f"{arch}.rope.scaling.factor"))
        scaling_options = {"yarn_factor": factor,
                           "yarn_original_context": int(meta.require(f"{arch}.rope.scaling.original_context_length"))}
    elif scaling != "none":
        raise LmforgeError(f"{meta.path}: RoPE scaling {scaling!r} is not supported (none, linear, yarn)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    try:
        return llama(d_model, int(meta.require(f"{arch}.block_count")), heads,
                     int(meta.require(f"{arch}.feed_forward_length")),
                     n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
                     # GGUF stores float32: 1e-5 reads back as 9.9999997e-06; its shortest decimal is the intended one
                     norm_eps=float(f'{meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5):.7g}'),
                     rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
                     max_sequence_length=int(meta.get(f"{arch}.context_length", 4096)),
                     vocab_size=vocab_size, vocab_multiple=128 if vocab_size % 128 == 0 else 1,
                     tie_embeddings="output.weight" not in tensor_names,
                     eos_token_id=eos, pad_token_id=pad if pad is not None else eos,
                     # BOS is part of the model's input only when the tokenizer adds it
                     bos_token_id=bos if meta.get("tokenizer.ggml.add_bos_token", False) else None,
                     **scaling_options)
    except LmforgeError as e:
        raise LmforgeError(f"{meta.path}: metadata gives an invalid model: {e}") from None


def gguf_tokenizer(meta: _Metadata) -> Tokenizer:
    """The embedded vocabulary as a `tokenizers` byte-level BPE, its control tokens special, with the chat template."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise LmforgeError(f"{meta.path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    model = meta.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise LmforgeError(f"{meta.path}: tokenizer model {model!r} is not supported (supported: "
                           f"{', '.join(TOKENIZER_MODELS)})")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre == "smollm":
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = byte_level
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or []
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, kind in zip(tokens, types) if kind == CONTROL])
    hf.add_tokens([AddedToken(t, normalized=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise LmforgeError(f"{meta.path}: the GGUF tokenizer names no EOS token (tokenizer.ggml.eos_token_id)")
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    bos = meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token", False) else None
    return Tokenizer(hf=hf, eos_id=int(eos), pad_id=int(pad), bos_id=bos, source=str(meta.path),
                     chat_template=meta.get("tokenizer.chat_template"))


def _unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of each head's query/key output rows: GGUF interleaves the rotary pairs
    (row 2i, 2i+1), transformers' layout puts the halves one after the other (row i, i + head_dim/2)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _lmforge_name(name: str, path: Path) -> str:
    if name in GLOBAL:
        return GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in PER_LAYER and parts[3] == "weight":
        return f"blocks.{parts[1]}.{PER_LAYER[parts[2]]}"
    raise LmforgeError(f"{path}: tensor {name!r} has no place in a Llama model")


def _dequantized(tensor, path: Path) -> torch.Tensor:
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise LmforgeError(f"{path}: tensor {tensor.name} has type {kind}, which lmforge cannot dequantize "
                           f"(supported: {', '.join(TENSOR_TYPES)})")
    shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
    try:
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    except (ValueError, NotImplementedError) as e:
        raise LmforgeError(f"{path}: tensor {tensor.name} ({kind}) cannot be read: {e}") from None
    return torch.from_numpy(values.copy())


def read_gguf(path: str | Path) -> tuple[Transformer, Tokenizer]:
    """A GGUF file as an lmforge model (CPU, fp32) and its tokenizer."""
    path = Path(path)
    reader = _reader(path)
    meta = _Metadata(reader, path)
    tokenizer = gguf_tokenizer(meta)
    names = {t.name for t in reader.tensors}
    config = gguf_config(meta, names, len(meta.get("tokenizer.ggml.tokens")))
    expected = state_shapes(config)  # checked per tensor before it is dequantized, by its GGUF name
    state = {}
    for tensor in reader.tensors:
        name = _lmforge_name(tensor.name, path)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if name not in expected or shape != expected[name]:
            implied = expected.get(name, "no such tensor")
            raise LmforgeError(f"{path}: tensor {tensor.name} has shape {shape}, the metadata implies {implied}")
        weight = _dequantized(tensor, path)
        if name.endswith("attn.q_proj.weight"):
            weight = _unpermute_rotary(weight, config.n_heads)
        elif name.endswith("attn.k_proj.weight"):
            weight = _unpermute_rotary(weight, config.n_kv_heads)
        state[name] = weight
    return model_from_state(config, state, path, "the metadata"), tokenizer


def import_gguf(path: str | Path, out: str | Path) -> Path:
    """Convert a GGUF file into an lmforge model directory (with its tokenizer and chat template)."""
    model, tokenizer = read_gguf(path)
    return write_model_dir(model, out, tokenizer, command="import gguf", inputs=[path],
                           extra={"source": str(path), "source_kind": "gguf"})
