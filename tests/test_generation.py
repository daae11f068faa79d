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


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is fastest, and stays fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
