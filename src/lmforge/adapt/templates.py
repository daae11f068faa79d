"""Chat templates: a conversation becomes token ids plus the mask of the tokens trained on.

A template is Jinja, rendered as transformers renders it (`Tokenizer.apply_chat_template`: jinja2's sandbox,
`trim_blocks`, `lstrip_blocks`), so the template written into a model's `tokenizer_config.json` gives the same
ids in transformers' `apply_chat_template` as here. Named templates:

- `tulu`: OLMo 2 Instruct / Tülu 3, `<|user|>\\n...\\n<|assistant|>\\n...<eos>` (open-instruct's "tulu"), after
  the tokenizer's BOS when it has one;
- `chatml`: Olmo 3 / SmolLM2, `<|im_start|>role\\n...<|im_end|>\\n`;
- `tokenizer`: the template the start model's tokenizer carries.

The mask comes from incremental rendering, so it holds for any template that renders a conversation's prefix
as a prefix of the whole: the characters an assistant turn adds are those between the rendering of the turns
before it with the generation prompt and the rendering up to and including it. The trained tokens are those
that start inside such a span (the turn's content and its end-of-turn token; a newline the template puts after
the end of turn is not trained). Token ids are one encoding of the whole rendered text, as transformers makes
them, never a concatenation of separately encoded pieces.
"""

from __future__ import annotations

import dataclasses

from lmforge.core.errors import LmforgeError
from lmforge.tokens.tokenizer import Tokenizer

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
TULU = (_BOS +
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
        "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}")
CHATML = (_BOS +
          "{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {"tulu": TULU, "chatml": CHATML}
TEMPLATE_NAMES = (*TEMPLATES, "tokenizer")
ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that cannot be trained on; the reason is reported with its file and line, then it is skipped."""


def chat_tokenizer(tokenizer: Tokenizer, template: str) -> Tokenizer:
    """The tokenizer carrying the named template (`tokenizer`: its own), as saved with the trained model."""
    if template == "tokenizer":
        if tokenizer.chat_template is None:
            raise LmforgeError(f"template: tokenizer, but {tokenizer.source or 'the tokenizer'} has no chat template "
                               f"(choose one of {', '.join(TEMPLATES)})")
        return tokenizer
    if template not in TEMPLATES:
        raise LmforgeError(f"unknown chat template {template!r} (one of {', '.join(TEMPLATE_NAMES)})")
    return dataclasses.replace(tokenizer, chat_template=TEMPLATES[template])


def check_messages(messages, need_assistant: bool = True) -> list[dict]:
    """The messages as plain {role, content} dicts, or BadRecord saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("'messages' must be a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord(f"message {i} is not an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadRecord(f"message {i} has unknown role {role!r} (one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRecord(f"message {i} content is not a string")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise BadRecord("no assistant turn")
    return out


def render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer: Tokenizer, messages: list[dict], first_trained: int = 0) -> tuple[list[int], list[bool]]:
    """(token ids of the whole conversation, whether each token is trained on): the assistant turns from message
    `first_trained` on (a DPO reply after its prompt)."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_trained:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise LmforgeError("the chat template does not render a conversation's beginning as the beginning of "
                               "the whole (e.g. it changes earlier turns once later ones exist), so assistant turns "
                               "cannot be located for the loss mask; use template tulu or chatml")
        spans.append((len(before), len(through.rstrip("\n"))))
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    trained = [any(start <= begin < end for start, end in spans) for begin, _ in encoding.offsets]
    return encoding.ids, trained


def prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the generation prompt: what a model continues to answer (its
    BOS included when the template puts it, so callers add none)."""
    return tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True))
