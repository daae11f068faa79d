"""Paloma bits per byte against a brute-force float64 computation, token by token, for several strides."""

import math

import pytest
import torch

from lmforge.eval.perplexity import perplexity, rolling_windows
from lmforge.tokens import tokenizer as tokenizer_module
from test_eval_scoring import CharTokenizer, tiny_model

MAX_LEN = 8
DOCUMENTS = [("web", "news", "Short."), ("web", "news", "A document that spans several windows!"),
             ("web", "blogs", "exactly8"), ("web", "blogs", "héllo wörld, sixteen+"),
             ("code", "code", "def f(x):\n    return x * 2\n")]


def brute_force_document_nll(model, tokens: list[int], prefix: int, stride: int) -> float:
    """-Σ log p(token_i | its stated conditioning), each token scored alone with a float64 forward.

    Tokens 0..L-1 are conditioned on the prefix and all earlier tokens. After them, tokens come in blocks of
    `stride` (the last may be short); a token of the block ending at `end` is conditioned on the tokens from
    end - L - 1 up to itself (the L + 1 tokens before the block's end, minus the last)."""
    L, T = MAX_LEN, len(tokens)
    nll = []
    for i in range(T):
        if i < L:
            cond = [prefix] + tokens[:i]
        else:
            end = min(L + ((i - L) // stride + 1) * stride, T)
            cond = tokens[end - L - 1:i]
        assert 1 <= len(cond) <= L
        with torch.no_grad():
            logits = model(torch.tensor([cond])).double()
        nll.append(-float(torch.log_softmax(logits[0, -1], -1)[tokens[i]]))
    return math.fsum(nll)


@pytest.mark.parametrize("stride", [1, 3, MAX_LEN // 2, MAX_LEN])
def test_windows_predict_every_token_once(stride):
    sequence = [99] + list(range(1, 20))
    windows = rolling_windows(0, 19, max_len=MAX_LEN, stride=stride)
    predicted = [t for w in windows for t in sequence[w.start:w.end][-w.n_predicted:]]
    assert predicted == sequence[1:]
    assert all(w.length - 1 <= MAX_LEN for w in windows)
    assert windows[0].start == 0 and all(w.length - 1 == MAX_LEN for w in windows[1:])  # full contexts
    assert all(w.n_predicted == stride for w in windows[1:-1])


@pytest.mark.parametrize("stride", [1, 3, MAX_LEN // 2, MAX_LEN])
def test_bits_per_byte_matches_brute_force_float64(stride, monkeypatch):
    # Documents are encoded in pieces of 5+ characters, so the multi-piece encoding is exercised too.
    monkeypatch.setattr(tokenizer_module, "MAX_PIECE_CHARS", 5)
    model = tiny_model("olmo2-tiny", max_len=MAX_LEN, seed=3).double()
    tok = CharTokenizer()
    result = perplexity(model, tok, DOCUMENTS, batch_size=3, stride=stride)
    assert (result["stride"], result["context"]) == (stride, MAX_LEN)
    totals: dict = {}
    for source, domain, text in DOCUMENTS:
        nll = brute_force_document_nll(model, tok.encode(text), tok.eos_id, stride)
        entry = totals.setdefault((source, domain), [0.0, 0])
        entry[0] += nll
        entry[1] += len(text.encode("utf-8"))
    for (source, domain), (nll, nbytes) in totals.items():
        got = result["sources"][source]["domains"][domain]
        assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-9)
        assert got["bytes"] == nbytes
    web = [totals[("web", d)] for d in ("news", "blogs")]
    assert result["sources"]["web"]["bits_per_byte_macro"] == pytest.approx(
        sum(n / (math.log(2) * b) for n, b in web) / 2, rel=1e-9)
    assert result["sources"]["web"]["micro"]["bits_per_byte"] == pytest.approx(
        sum(n for n, _ in web) / (math.log(2) * sum(b for _, b in web)), rel=1e-9)
    all_nll = sum(n for n, _ in totals.values())
    all_bytes = sum(b for _, b in totals.values())
    assert result["total"]["bits_per_byte"] == pytest.approx(all_nll / (math.log(2) * all_bytes), rel=1e-9)


def test_documents_shorter_than_the_context_do_not_depend_on_the_stride():
    model = tiny_model("olmo2-tiny", max_len=MAX_LEN, seed=3)
    short = [d for d in DOCUMENTS if len(d[2].encode()) <= MAX_LEN]
    results = [perplexity(model, CharTokenizer(), short, stride=s)["total"] for s in (1, 3, None, MAX_LEN)]
    assert all(r == results[0] for r in results)  # one window each: bit-identical
    long = perplexity(model, CharTokenizer(), DOCUMENTS, stride=1)["total"]["nll_nats"]
    assert long != perplexity(model, CharTokenizer(), DOCUMENTS, stride=MAX_LEN)["total"]["nll_nats"]


def test_stride_defaults_to_half_the_context_and_is_checked():
    from lmforge.core.errors import LmforgeError
    from lmforge.eval.perplexity import window_stride

    assert (window_stride(None, 8), window_stride(None, 1), window_stride(100, 8)) == (4, 1, 8)
    with pytest.raises(LmforgeError):
        window_stride(0, 8)
