"""Shared pieces of the adaptation tests: a tiny byte-level BPE tokenizer, a tiny model directory carrying a chat
template, and varied conversations."""

from __future__ import annotations

import functools
import json

from lmforge.adapt.templates import chat_tokenizer
from lmforge.model.directory import build_model, save_model_dir
from lmforge.model.presets import get_preset
from lmforge.tokens.tokenizer import train_bpe

TEXTS = ["Hello there, how are you? I am fine, thanks. What is 12 + 30? It is 42. The answer is 7.",
         "Ünïcödé ✓ 日本語 — emojis 🙂 and <think>reasoning</think> tags. Be brief. System says hi."]


@functools.lru_cache(maxsize=None)
def _base_tokenizer():
    return train_bpe(iter(TEXTS * 40), 300, special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_tokenizer(template: str = "tulu"):
    return chat_tokenizer(_base_tokenizer(), template)


def tiny_model_dir(path, template: str = "tulu", seed: int = 0, init_std: float = 0.02):
    """A 2-layer OLMo 2 model directory (vocabulary = the tiny tokenizer's) with the chat template in its
    tokenizer config."""
    tokenizer = tiny_tokenizer(template)
    config = get_preset("olmo2-tiny")
    config.n_layers, config.d_model, config.n_heads, config.mlp_hidden_size = 2, 64, 4, 128
    config.vocab_size, config.max_sequence_length = tokenizer.vocab_size, 128
    config.eos_token_id, config.pad_token_id = tokenizer.eos_id, tokenizer.pad_id
    config.init_std = init_std
    save_model_dir(build_model(config, seed), path, tokenizer)
    return path


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "And 7?"}, {"role": "assistant", "content": "The answer is 7."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "Ünïcödé ✓ 日本語 🙂"}, {"role": "assistant", "content": "✓ 日本語"}],
    [{"role": "user", "content": "Think first"},
     {"role": "assistant", "content": "<think>reasoning</think> The answer is 42."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": " leading and trailing spaces "},
     {"role": "assistant", "content": "  spaces  "}],
    [{"role": "user", "content": "line one\nline two\n\n"}, {"role": "assistant", "content": "\nnewlines\n"}],
    [{"role": "user", "content": "<|im_start|> literal markers <|user|>"}, {"role": "assistant", "content": "ok"}],
    [{"role": "system", "content": "System says hi."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
     {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}],
    [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."},
     {"role": "user", "content": "Bye"}],
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)
