"""Paloma bits per byte against a brute-force float64 computation, token by token."""

import math

import pytest
import torch

from lmforge.eval.perplexity import perplexity, rolling_windows
from tests.test_eval_scoring import CharTokenizer, tiny_model

MAX_LEN = 8


def brute_force_document_nll(model, tokens: list[int], prefix: int) -> float:
    """-Σ log p(token_i | its conditioning), each token scored alone with a float64 forward.

    Token i's window is the block [kL, (k+1)L) holding it (the last block may be short); within the first
    block the conditioning is EOS + all earlier tokens; in a later block it is the L+1 tokens before the
    block's end, minus the last, up to token i (the last block keeps a full-length context)."""
    L, T = MAX_LEN, len(tokens)
    nll = []
    for i in range(T):
        if i < L:
            cond = [prefix] + tokens[:i]
        else:
            end = min((i // L + 1) * L, T)
            cond = tokens[end - L - 1:i]
        with torch.no_grad():
            logits = model(torch.tensor([cond])).double()
        nll.append(-float(torch.log_softmax(logits[0, -1], -1)[tokens[i]]))
    return math.fsum(nll)


def test_windows_predict_every_token_once():
    tokens = list(range(1, 20))
    windows = rolling_windows(0, tokens, prefix=99, max_len=MAX_LEN)
    predicted = [t for w in windows for t in w.tokens[-w.n_predicted:]]
    assert predicted == tokens
    assert all(len(w.tokens) - 1 <= MAX_LEN for w in windows)
    assert windows[0].tokens[0] == 99 and len(windows[-1].tokens) - 1 == MAX_LEN  # last keeps full context


def test_bits_per_byte_matches_brute_force_float64():
    model = tiny_model("olmo2-tiny", max_len=MAX_LEN, seed=3).double()
    tok = CharTokenizer()
    documents = [("web", "news", "Short."), ("web", "news", "A document that spans several windows!"),
                 ("web", "blogs", "exactly8"), ("web", "blogs", "héllo wörld, sixteen+"),
                 ("code", "code", "def f(x):\n    return x * 2\n")]
    result = perplexity(model, tok, documents, batch_size=3)
    totals: dict = {}
    for source, domain, text in documents:
        nll = brute_force_document_nll(model, tok.encode(text), tok.eos_id)
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
