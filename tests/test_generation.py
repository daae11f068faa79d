import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.directory import build_model
from lmforge.model.generation import SamplingConfig, cut_at_stop, generate_ids, next_token
from lmforge.model.presets import get_preset


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    top_k = {int(next_token(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert top_k == {0, 1}
    # top_p=0.7: 0.5 < 0.7 so token 1 is needed too; 0.5 + 0.3 >= 0.7 so token 2 is not.
    top_p = {int(next_token(logits, SamplingConfig(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert top_p == {0, 1}
    assert int(next_token(logits, SamplingConfig(), None)) == 0


def test_sampling_follows_its_seed_and_only_its_seed(one_thread):
    """Same seed: same tokens, whatever the global RNG state. Different seeds: different tokens. A sampler that
    ignores `seed` (draws from the global RNG, or from a generator seeded with a constant) fails one of the two,
    and so does greedy decoding. The random tiny model's next-token distribution is close to uniform over ~50k
    tokens, so two samples from different seeds agree at a position with probability ~1/50k."""
    model = build_model(get_preset("olmo2-tiny"), 0).eval()
    prompts = [[5, 6, 7], [9, 10]]

    def sample(seed, global_seed):
        torch.manual_seed(global_seed)  # a sampler drawing from the global RNG would follow this, not `seed`
        config = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=seed)
        return generate_ids(model, prompts, config, eos_id=None, pad_id=1)

    a = sample(3, global_seed=0)
    assert [len(row) for row in a] == [10, 10]
    assert sample(3, global_seed=12345) == a
    b = sample(4, global_seed=0)
    for row_a, row_b in zip(a, b):
        assert sum(x == y for x, y in zip(row_a, row_b)) <= 2, (row_a, row_b)


def test_stops_on_eos_and_respects_context():
    model = build_model(get_preset("olmo2-tiny"), 0).eval()
    with torch.no_grad():
        first = int(model(torch.tensor([[5, 6, 7]]))[0, -1].argmax())
    out = generate_ids(model, [[5, 6, 7]], SamplingConfig(max_new_tokens=8), eos_id=first, pad_id=1)
    assert out == [[first]]
    with pytest.raises(LmforgeError, match="longer than the model's context"):
        generate_ids(model, [[1] * 600], SamplingConfig(), pad_id=1)


def test_cut_at_stop():
    assert cut_at_stop("a\n\nQuestion: b", ["\n\n", "Question:"]) == "a"
    assert cut_at_stop("abc", ["x"]) == "abc"


ASCII_TEXTS = ["the cat sat on the mat", "a dog ran to the park", "Paris is the capital of France"] * 4


def _ascii_tokenizer():
    """Byte-level BPE that never saw a non-ASCII character: each one is split over several byte tokens."""
    from lmforge.tokens.tokenizer import train_bpe

    return train_bpe(iter(ASCII_TEXTS), vocab_size=300)


def test_text_stream_gives_whole_characters_and_holds_back_a_possible_stop_string():
    from lmforge.model.generation import TextStream

    tokenizer = _ascii_tokenizer()
    text = "café 日本 in Paris. More"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()) + 6, "the multi-byte characters should span several tokens"
    # é is 2 bytes, 日 and 本 3 each, one token per byte: each character comes out with its last byte.
    stream = TextStream(tokenizer.decode, eos_id=tokenizer.eos_id)
    assert [stream.push(t) for t in ids] + [stream.finish()] == [
        "c", "a", "f", "", "é", " ", "", "", "日", "", "", "本", " ", "i", "n", " ", "Paris", ".", " ", "M", "o", "r",
        "e", ""]
    stream = TextStream(tokenizer.decode, stop_strings=["Paris."], eos_id=tokenizer.eos_id)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == "café 日本 in "  # cut where the stop string begins
    assert not any("\ufffd" in p for p in pieces)
    assert all("P" not in p for p in pieces)  # "Paris" could begin the stop string: held back, never sent
    eos_stream = TextStream(tokenizer.decode, eos_id=tokenizer.eos_id)
    assert [eos_stream.push(t) for t in tokenizer.encode("ab")] + [eos_stream.push(tokenizer.eos_id),
                                                                    eos_stream.push(5)] == ["a", "b", "", ""]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_text_equals_the_whole_generation(one_thread, seed):
    """Random tiny model sampling over byte tokens (broken characters likely): the streamed pieces join to
    what decoding all generated ids at the end gives (EOS dropped, cut at the stop string)."""
    from lmforge.model.generation import generate_text

    tokenizer = _ascii_tokenizer()
    config = get_preset("olmo2-tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    model = build_model(config, seed=0).eval()
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=seed, stop_strings=["e "])
    streamed: list[list[str]] = [[], []]
    texts = generate_text(model, tokenizer, ["the cat", "é"], sampling, on_text=lambda row, p: streamed[row].append(p))
    prompts = [tokenizer.encode("the cat"), tokenizer.encode("é")]
    for row, ids in enumerate(generate_ids(model, prompts, sampling, tokenizer.eos_id, tokenizer.pad_id,
                                           tokenizer.decode)):
        expected = cut_at_stop(tokenizer.decode([t for t in ids if t != tokenizer.eos_id]), ["e "])
        assert texts[row] == "".join(streamed[row]) == expected
        assert len(streamed[row]) > 1 or len(ids) <= 1, "the text came out only at the end"


def test_a_repeated_prompt_is_prefilled_once_and_samples_as_without_a_cache(one_thread):
    """GRPO repeats each prompt once per completion: the prefill runs on the distinct prompts only, and the rows
    sample the tokens that recomputing every row's whole sequence at every step (no cache) samples. Weights of
    std 0.5 make the next-token distributions peaked (a near-uniform one samples the same token from any row's
    logits)."""
    config = get_preset("olmo2-tiny")
    config.init_std = 0.5
    model = build_model(config, 0).eval()
    prompts = [[5, 6, 7]] * 3 + [[9, 10]] * 3 + [[11]]
    rows_seen = []
    hook = model.embed.register_forward_hook(lambda module, args, out: rows_seen.append(len(out)))
    cached = generate_ids(model, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3), pad_id=1)
    hook.remove()
    assert rows_seen[0] == 3 and set(rows_seen[1:]) == {7}
    recomputed = generate_ids(model, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3,
                                                             use_cache=False), pad_id=1)
    assert cached == recomputed
    assert len({tuple(row) for row in cached[:3]}) > 1  # a group's rows sample their own tokens


PYTHON_TEXTS = ["def f(x):\n    return x\n", "def g(a, b):\n    if a:\n        return b\n    return a\n",
                "import os\n\n\nclass C:\n    def m(self):\n        pass\n"] * 8


def test_token_healing_lets_the_first_token_restate_the_prompt_end(one_thread):
    """Byte-level BPE merges a newline with the indentation after it, so "def f(x):\\n" ends on the token of a
    bare newline. Healing takes that token back; the first new token is then the best one (greedy) among those
    whose text begins with "\\n", found here by decoding every token; the completion leaves that "\\n" out, and a
    stop string is looked for after it."""
    from lmforge.model.generation import generate_text, heal_prompts
    from lmforge.tokens.tokenizer import train_bpe

    tokenizer = train_bpe(iter(PYTHON_TEXTS), vocab_size=300)
    assert tokenizer.token_to_id("Ċ") is not None and tokenizer.token_to_id("ĊĠĠĠ") is not None
    prompt = tokenizer.encode("def f(x):\n")
    assert tokenizer.decode(prompt[-1:]) == "\n"
    specials = set(tokenizer.hf.get_added_tokens_decoder())
    newline_first = [i for i in range(tokenizer.vocab_size)
                     if i not in specials and tokenizer.decode([i]).startswith("\n")]
    assert len(newline_first) >= 3

    healed, healing = heal_prompts(tokenizer, [prompt, prompt[:1], [prompt[0], tokenizer.eos_id]])
    assert healed == [prompt[:-1], prompt[:1], [prompt[0], tokenizer.eos_id]]  # one token, a special: left whole
    assert healing.texts == ["\n", "", ""] and sorted(healing.allowed[0]) == newline_first
    assert healing.allowed[1:] == [None, None]

    config = get_preset("olmo2-tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    config.init_std = 0.5
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt[:-1]]))[0, -1]
    first = newline_first[int(logits[newline_first].argmax())]
    assert int(logits.argmax()) not in newline_first, "the unconstrained choice should differ for this test to bite"
    later = generate_ids(model, [prompt[:-1] + [first]], SamplingConfig(max_new_tokens=5), tokenizer.eos_id,
                         tokenizer.pad_id)[0]
    expected = tokenizer.decode([t for t in [first] + later if t != tokenizer.eos_id])[1:]
    sampling = SamplingConfig(max_new_tokens=6, token_healing=True)
    assert generate_text(model, tokenizer, ["def f(x):\n"], sampling) == [expected]
    stopped = SamplingConfig(max_new_tokens=6, token_healing=True, stop_strings=["\n"])
    assert generate_text(model, tokenizer, ["def f(x):\n"], stopped) == [cut_at_stop(expected, ["\n"])]
    assert generate_text(model, tokenizer, ["def f(x):\n"], SamplingConfig(max_new_tokens=6)) != [expected]
