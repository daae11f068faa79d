"""A tiny Llama GGUF file written with the `gguf` package's own writer, for import tests."""

from __future__ import annotations

import numpy as np

# Byte offsets of the float16 super-block scales in each K-quant block (ggml-common.h), so that random blocks
# get finite, small scales.
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _quantized(values: np.ndarray, qtype_name: str, rng: np.random.Generator):
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name in ("F32",):
        return values.astype(np.float32), qtype
    if qtype_name == "F16":
        return values.astype(np.float16), qtype
    if qtype_name not in K_QUANT_SCALES:
        return quantize(values.astype(np.float32), qtype), qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = values.shape[0]
    raw = rng.integers(0, 256, (rows, values.shape[1] // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype_name]:
        raw[..., offset:offset + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1), qtype


def write_tiny_gguf(path, qtype: str = "Q8_0", d_model: int = 256, n_layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, hidden: int = 256, arch: str = "llama", tokenizer: bool = True,
                    tied: bool = False, seed: int = 0, feed_forward_length: int | None = None,
                    tensor_type_override: dict | None = None) -> None:
    """Random weights (std 0.1) in `qtype` for every matrix, norms in F32; a byte-level BPE vocabulary of the 256
    bytes, a few merges and two control tokens (vocabulary 264)."""
    import gguf

    rng = np.random.default_rng(seed)
    alphabet = byte_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    tokens = alphabet + ["Ġt", "he", "Ġthe", "Ġa", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|x|>"]
    types = [1] * (len(tokens) - 4) + [3, 3, 3, 3]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(feed_forward_length or hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10_000.0)
    writer.add_rope_dimension_count(d_model // heads)
    writer.add_vocab_size(vocab)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(vocab - 4)
        writer.add_eos_token_id(vocab - 3)
        writer.add_pad_token_id(vocab - 2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    head_dim, overrides = d_model // heads, tensor_type_override or {}

    def matrix(name, rows, cols):
        data, kind = _quantized(rng.normal(0, 0.1, (rows, cols)).astype(np.float32), overrides.get(name, qtype), rng)
        writer.add_tensor(name, data, raw_dtype=kind)

    def norm(name):
        writer.add_tensor(name, (1 + rng.normal(0, 0.1, d_model)).astype(np.float32))

    matrix("token_embd.weight", vocab, d_model)
    for i in range(n_layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, d_model)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, d_model)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, d_model)
        matrix(f"blk.{i}.attn_output.weight", d_model, d_model)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", hidden, d_model)
        matrix(f"blk.{i}.ffn_up.weight", hidden, d_model)
        matrix(f"blk.{i}.ffn_down.weight", d_model, hidden)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", vocab, d_model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
