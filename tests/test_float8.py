"""float8 (torchao, rowwise scales): which layers convert, the clean skip where there are no float8 matmuls,
and, with torchao installed, the converted model computing in float8 (torchao's emulation on CPU, the real
matmuls on a GPU) close to the unconverted one, under the same parameter names."""

import importlib.util

import pytest
import torch
from train_utils import TINY_MODEL

from lmforge.model.directory import build_model
from lmforge.train.config import ModelSpec
from lmforge.train.float8 import apply_float8, float8_linear, float8_unavailable

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'lmforge[float8]')")


def tiny_model():
    return build_model(ModelSpec(**TINY_MODEL).build_config(), seed=0)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_only_the_blocks_linear_layers_convert():
    model = tiny_model()
    picked = [name for name, m in model.named_modules() if float8_linear(m, name)]
    # 2 blocks x (q, k, v, o, up, gate, down); not the LM head (its output feeds the loss)
    assert len(picked) == 14 and all(name.startswith("blocks.") for name in picked)
    assert "lm_head" not in picked


def test_on_cpu_float8_is_skipped_in_one_line_and_nothing_changes():
    model, lines = tiny_model(), []
    before = {name: type(m) for name, m in model.named_modules()}
    assert apply_float8(model, "rowwise", torch.device("cpu"), lines.append) == 0
    assert lines == ["float8: skipped, cpu has no float8 matmuls; training without it"]
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert float8_unavailable(torch.device("cpu")) is not None


@needs_torchao
def test_emulated_float8_computes_close_to_full_precision_under_the_same_names():
    model = tiny_model()
    ids = torch.randint(2, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    reference, names = model(ids).detach(), set(model.state_dict())
    assert apply_float8(model, "rowwise", torch.device("cpu"), lambda _: None, emulate=True) == 14
    assert type(model.blocks[0].attn.q_proj).__name__ == "Float8Linear"
    logits = model(ids)
    # e4m3 keeps 3 mantissa bits: the logits move (so float8 is really in use), on this tiny model by about
    # 11%; a wrong scale (or none) would put them off by their own size.
    assert 1e-3 < relative_error(logits, reference) < 0.25
    assert set(model.state_dict()) == names
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@needs_torchao
@pytest.mark.skipif(not torch.cuda.is_available() or float8_unavailable(torch.device("cuda")) is not None,
                    reason="float8 matmuls need a CUDA GPU of compute capability 8.9 or later")
def test_float8_on_gpu_trains_like_bf16():
    """A few AdamW steps on a fixed batch: the float8 run's losses stay within 2% of the bf16 run's."""
    device = torch.device("cuda")
    overrides = {**TINY_MODEL["overrides"], "d_model": 256, "mlp_hidden_size": 512}
    ids = torch.randint(2, 256, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)

    def losses(float8):
        model = build_model(ModelSpec(preset="olmo2-tiny", overrides=overrides).build_config(), seed=0).to(device)
        if float8:
            assert apply_float8(model, "rowwise", device, lambda _: None) == 14
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    bf16, float8 = losses(False), losses(True)
    assert float8 == pytest.approx(bf16, rel=0.02)
    assert float8[-1] < float8[0]
