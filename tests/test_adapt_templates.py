"""Chat templates: token ids equal transformers' `apply_chat_template` on the exported tokenizer, and the loss
mask covers exactly the assistant turns (content and end-of-turn token)."""

import pytest

from adapt_utils import CONVERSATIONS, tiny_tokenizer
from lmforge.adapt.templates import BadRecord, check_messages, encode_chat, prompt_ids
from lmforge.core.errors import LmforgeError

transformers = pytest.importorskip("transformers")

# SmolLM2-Instruct's template: a default system prompt when there is none (so not a plain ChatML).
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer(template):
    if template == "tokenizer":
        import dataclasses

        return dataclasses.replace(tiny_tokenizer("tulu"), chat_template=SMOLLM2)
    return tiny_tokenizer(template)


@pytest.mark.parametrize("template", ["tulu", "chatml", "tokenizer"])
def test_ids_equal_transformers_apply_chat_template(tmp_path, template):
    tokenizer = _tokenizer(template)
    tokenizer.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    compared = 0
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = list(theirs.apply_chat_template(messages, tokenize=True,
                                                       add_generation_prompt=generation_prompt)["input_ids"])
            if generation_prompt:
                ours = prompt_ids(tokenizer, messages)
            elif messages[-1]["role"] == "assistant":
                ours, _ = encode_chat(tokenizer, messages)
            else:
                ours = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
            assert ours == expected, (template, messages, generation_prompt)
            compared += 1
    assert compared >= 20


@pytest.mark.parametrize("template, end", [("tulu", "<|endoftext|>"), ("chatml", "<|im_end|>"),
                                           ("tokenizer", "<|im_end|>")])
def test_mask_is_the_assistant_turns_with_their_end_token(template, end):
    tokenizer = _tokenizer(template)
    messages = CONVERSATIONS[2]  # two assistant turns
    ids, trained = encode_chat(tokenizer, messages)
    assert tokenizer.decode([i for i, t in zip(ids, trained) if t]) == f"Hello{end}The answer is 7.{end}"
    # The untrained tokens are everything else, in order: the whole conversation is covered exactly once.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    # A DPO reply: only the turns from `first_trained` on.
    ids, trained = encode_chat(tokenizer, messages, first_trained=3)
    assert tokenizer.decode([i for i, t in zip(ids, trained) if t]) == f"The answer is 7.{end}"


def test_think_tags_are_plain_text():
    tokenizer = _tokenizer("chatml")
    ids, trained = encode_chat(tokenizer, CONVERSATIONS[5])
    assert tokenizer.decode([i for i, t in zip(ids, trained) if t]) == \
        "<think>reasoning</think> The answer is 42.<|im_end|>"


def test_bad_conversations_are_refused_with_a_reason():
    with pytest.raises(BadRecord, match="no assistant turn"):
        check_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(BadRecord, match="unknown role 'robot'"):
        check_messages([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(BadRecord, match="content is not a string"):
        check_messages([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}])
    with pytest.raises(BadRecord, match="non-empty list"):
        check_messages([])


def test_a_template_that_rewrites_earlier_turns_is_refused():
    import dataclasses

    # Drops every earlier assistant turn once a later one exists: no prefix property, no mask.
    rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = dataclasses.replace(tiny_tokenizer(), chat_template=rewriting)
    with pytest.raises(LmforgeError, match="cannot be located"):
        encode_chat(tokenizer, CONVERSATIONS[2])
