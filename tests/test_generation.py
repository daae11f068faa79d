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


def test_sampling_is_deterministic_by_seed():
    model = build_model(get_preset("olmo2-tiny"), 0).eval()
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    a = generate_ids(model, [[5, 6, 7]], sampling, pad_id=1)
    b = generate_ids(model, [[5, 6, 7]], sampling, pad_id=1)
    assert a == b


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
