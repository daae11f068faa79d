"""Parameter counts, FLOPs per token and training memory of a model config, computed on the meta device."""

from __future__ import annotations

import torch

from lmforge.model.transformer import ModelConfig, Transformer


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Non-embedding = total minus the input embedding (Kaplan et al.; OLMo-core's num_non_embedding_params):
    an untied LM head is counted in it, a tied one is the embedding. `lm_head` is the untied head's share."""
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once
    embedding = model.embed.weight.numel()
    head = 0 if config.tie_embeddings else model.lm_head.weight.numel()
    # A token passes through top-k of the n experts of each MoE layer: the others' weights are inactive for it.
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    inactive = experts * (config.n_experts - config.moe_top_k) // config.n_experts if config.n_experts else 0
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "lm_head": head,
            "active": total - inactive, "active_non_embedding": total - embedding - inactive}


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, OLMo-core 3.0's formula: 6·(block + LM-head parameters) plus, per layer,
    12·n_heads·head_dim·(query-key pairs it attends)/seq_len, i.e. causal attention counted once, not twice,
    and a sliding-window layer counting only the pairs inside its window. For a mixture of experts the block
    parameters are the active ones (top-k experts per token)."""
    counts = count_parameters(config)
    matmul_params = counts["active_non_embedding"] - counts["lm_head"] + config.embedding_size * config.d_model
    pairs = sum(attended_pairs(seq_len, config.layer_window(i)) for i in range(config.n_layers))
    attention = 12 * config.n_heads * config.head_dim * pairs / seq_len
    return int(6 * matmul_params + attention)


def attended_pairs(seq_len: int, window: int | None) -> int:
    """(query, key) pairs of causal attention over seq_len tokens, each query seeing at most `window` keys."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


# Bytes per parameter for weights + gradients + AdamW's two moments.
MEMORY_LAYOUTS = {
    "fp32": {"weights": 4, "grads": 4, "adamw": 8},
    "bf16_mixed": {"weights": 4 + 2, "grads": 4, "adamw": 8},  # fp32 master + bf16 compute copy
    "bf16": {"weights": 2, "grads": 2, "adamw": 4},
}


def model_info(config: ModelConfig, seq_len: int | None = None) -> dict:
    seq_len = seq_len or config.max_sequence_length
    counts = count_parameters(config)
    memory = {
        name: {part: counts["total"] * b for part, b in layout.items()} | {"total": counts["total"] * sum(layout.values())}
        for name, layout in MEMORY_LAYOUTS.items()
    }
    return {
        "family": config.family,
        "parameters": counts["total"],
        "active_parameters": counts["active"],
        "non_embedding_parameters": counts["non_embedding"],
        "embedding_parameters": counts["embedding"],
        "vocab_size": config.vocab_size,
        "embedding_size": config.embedding_size,
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(config, seq_len),
        "memory_bytes": memory,
    }
