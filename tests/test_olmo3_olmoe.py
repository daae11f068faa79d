"""Olmo 3 (sliding-window attention, YaRN) and OLMoE (mixture of experts): against transformers' Olmo3ForCausalLM
and OlmoeForCausalLM, brute-force references, and the trainer."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lmforge.model.directory import build_model
from lmforge.model.generation import SamplingConfig, generate_ids
from lmforge.model.hf import export_hf, read_hf
from lmforge.model.info import count_parameters
from lmforge.model.presets import get_preset
from lmforge.model.transformer import (ATTENTION_BACKENDS, MoE, KVCache, LayerMask, attention_backend,
                                       available_attention_backends, dropless_dispatch)

sys.path.insert(0, str(Path(__file__).parent))
from train_utils import array_loader_factory, random_tokens, tiny_config  # noqa: E402

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(batch=2, length=40, seed=0):
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def _olmo3(window=6, **overrides):
    config = get_preset("olmo3-tiny")
    config.vocab_size = 1000  # a small embedding keeps building the model fast
    config.sliding_window, config.yarn_original_context = window, 16  # YaRN x8 over 16: scaled from position 16
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


# ---- Olmo 3 -------------------------------------------------------------------------------------------------

def test_olmo3_layer_pattern_is_three_sliding_then_one_full_and_the_last_full():
    config = _olmo3(n_layers=6)
    assert [config.layer_window(i) for i in range(6)] == [6, 6, 6, None, 6, None]
    assert [get_preset("olmo3-7b").layer_window(i) for i in range(8)] == [4096, 4096, 4096, None] * 2


def test_random_transformers_olmo3_imports_with_equal_logits(tmp_path):
    """transformers' own random Olmo 3 (GQA, window 5 < 40 tokens, YaRN on its full layers) -> import -> ours."""
    hf_config = transformers.Olmo3Config(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=5, rms_norm_eps=1e-6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        pad_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Olmo3ForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = read_hf(tmp_path / "hf")
    c = ours.config
    assert (c.sliding_window, c.full_attention_every, c.yarn_factor, c.yarn_original_context) == (5, 4, 4.0, 16)
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_olmo3_window_and_yarn_change_the_logits_as_transformers_does(tmp_path):
    """Parity alone could hide options both sides ignore: removing the window, or YaRN, changes our logits."""
    model = build_model(_olmo3(), seed=0).eval()
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
        for change in ({"sliding_window": None}, {"yarn_factor": None}):
            other = build_model(_olmo3(**change), seed=0).eval()
            assert (other(ids) - base).abs().max().item() > 1e-3, change


def test_generation_past_the_window_equals_transformers_and_the_cache_stays_within_the_window(tmp_path):
    config = _olmo3(window=4, init_std=0.3)  # larger weights: varied greedy continuations
    model = build_model(config, seed=0).eval()
    export_hf(model, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompts = [[11, 52, 973, 4, 88, 120], [7, 300, 45]]
    cached = generate_ids(model, prompts, SamplingConfig(max_new_tokens=12), eos_id=None, pad_id=1)
    recomputed = generate_ids(model, prompts, SamplingConfig(max_new_tokens=12, use_cache=False), eos_id=None,
                              pad_id=1)
    assert cached == recomputed
    assert len(set(cached[0])) > 3, "degenerate continuation makes the comparison weak"
    for prompt, ours in zip(prompts, cached):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1)
        assert out[0, len(prompt):].tolist() == ours
    ids = torch.tensor([[1, 1, 1] + prompts[1], prompts[0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert out[:, 6:].tolist() == [cached[1], cached[0]]
    # Greedy tokens hide small differences: the padded, windowed forward's logits equal transformers' too.
    long_ids = torch.cat([ids, out[:, 6:]], dim=1)
    long_mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], dim=1)
    positions = (long_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(long_ids, positions=positions, attention_mask=long_mask)
        theirs = hf(long_ids, attention_mask=long_mask, position_ids=positions).logits
    real = long_mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_sliding_layers_cache_at_most_the_window_and_incremental_logits_equal_a_full_forward():
    config = _olmo3(window=5)
    model = build_model(config, seed=0).eval()
    ids = _ids(length=30)
    cache = KVCache(config, 2, 30, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, s:s + n], cache=cache) for s, n in ((0, 7), (7, 1), (8, 9), (17, 13))]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4
    for layer in range(config.n_layers):
        held = cache.keys[layer].shape[2]
        assert held == (30 if config.layer_window(layer) is None else 4), (layer, held)


def _dense_reference(q, k, v, window):
    L = q.shape[2]
    query, key = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = (key <= query) & (key > query - window)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU attention paths need CUDA")])])
def test_every_available_sliding_window_backend_matches_a_dense_reference(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    backends = available_attention_backends(torch.device(device), dtype)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    reference = _dense_reference(q, k, v, window=9)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name in backends:
        out = ATTENTION_BACKENDS[name](*(t.to(device, dtype) for t in (q, k, v)), LayerMask(9, None))
        assert (out.double().cpu() - reference).abs().max().item() < tolerance, name
    assert attention_backend(q.to(device, dtype), LayerMask(9, None)) == backends[0]
    if device == "cpu":
        assert backends == ["sdpa"]


# ---- OLMoE --------------------------------------------------------------------------------------------------

def test_published_moe_counts_active_parameters_and_flops_from_them(capsys):
    from lmforge.cli import main

    counts = count_parameters(get_preset("olmoe-1b-7b"))
    assert (counts["total"], counts["active"]) == (6_919_161_856, 1_282_017_280)
    assert main(["model", "info", "olmoe-1b-7b", "--json", "--seq-len", "4096"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = get_preset("olmoe-1b-7b")
    # 6 x (active block parameters + LM head) + causal attention; the embedding is a lookup.
    active_blocks = counts["active"] - 2 * c.embedding_size * c.d_model - c.d_model
    expected = 6 * (active_blocks + c.d_model + c.embedding_size * c.d_model) + 12 * 16 * 2048 * 4097 / 2
    assert info["active_parameters"] == 1_282_017_280 and info["flops_per_token"] == int(expected)
    assert main(["model", "info", "olmoe-1b-7b"]) == 0
    assert "1,282,017,280" in capsys.readouterr().out


def _moe_layer(norm_top_k: bool) -> MoE:
    config = get_preset("olmoe-tiny")
    config.moe_norm_top_k, config.vocab_size = norm_top_k, 1000
    return build_model(config, seed=0).blocks[0].mlp.double()


@pytest.mark.parametrize("norm_top_k", [False, True])
def test_moe_layer_equals_a_token_by_token_brute_force(norm_top_k):
    moe = _moe_layer(norm_top_k)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y, stats = moe(x)
        expected = torch.zeros_like(x).reshape(-1, 128)
        for t, token in enumerate(x.reshape(-1, 128)):
            probs = (moe.router.weight @ token).softmax(-1)
            chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:moe.top_k]
            total = sum(probs[e] for e in chosen) if norm_top_k else 1.0
            for e in chosen:
                w = moe.experts
                hidden = torch.nn.functional.silu(w.gate_proj[e] @ token) * (w.up_proj[e] @ token)
                expected[t] += probs[e] / total * (w.down_proj[e] @ hidden)
    assert (y.reshape(-1, 128) - expected).abs().max().item() < 1e-10
    assert stats.counts.sum().item() == 15 * moe.top_k and stats.tokens == 15


def test_dispatch_is_replaceable_from_outside():
    """An expert-parallel wrapper swaps `MoE.dispatch`; the layer must route through it."""
    moe = _moe_layer(False)
    calls = []

    def wrapped(x, expert_ids, weights, experts):
        calls.append(expert_ids.shape)
        return dropless_dispatch(x, expert_ids, weights, experts)

    x = torch.randn(2, 3, 128, dtype=torch.float64)
    with torch.no_grad():
        before, _ = moe(x)
        moe.dispatch = wrapped
        after, _ = moe(x)
    assert calls == [(6, moe.top_k)] and torch.equal(before, after)
    assert moe.experts.gate_proj.shape == (8, 64, 128) and moe.experts.down_proj.shape == (8, 128, 64)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_random_transformers_olmoe_imports_with_equal_logits_and_auxiliary_losses(tmp_path, norm_topk_prob):
    hf_config = transformers.OlmoeConfig(
        vocab_size=384, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob,
        pad_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.OlmoeForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = read_hf(tmp_path / "hf")
    assert (ours.config.n_experts, ours.config.moe_top_k, ours.config.moe_norm_top_k) == (6, 3, norm_topk_prob)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids, output_router_logits=True)
        logits, router = ours(ids, return_router_losses=True)
    assert (logits - theirs.logits).abs().max().item() <= 1e-4
    assert abs(router.load_balancing.item() - theirs.aux_loss.item()) < 1e-5
    z = torch.stack([torch.logsumexp(r.float(), -1).pow(2).mean() for r in theirs.router_logits]).mean()
    assert abs(router.z_loss.item() - z.item()) < 1e-4 * z.item()
    assert abs(router.total.item() - (0.01 * theirs.aux_loss.item() + 0.001 * z.item())) < 1e-5


# ---- training -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, overrides", [
    ("olmo3-tiny", {"sliding_window": 8}),
    ("olmoe-tiny", {"n_experts": 4, "moe_top_k": 2, "mlp_hidden_size": 32}),
])
def test_tiny_cpu_run_lowers_the_loss_and_logs_router_metrics(tmp_path, preset, overrides):
    from lmforge.train.trainer import Trainer

    model = {"preset": preset, "overrides": {"n_layers": 2, "d_model": 64, "n_heads": 4, "mlp_hidden_size": 128,
                                             "vocab_size": 256, "eos_token_id": 0, "pad_token_id": 1,
                                             "max_sequence_length": 64, **overrides}}
    config = tiny_config(tmp_path, model=model, **{"checkpoint.interval": None, "checkpoint.save_final": False,
                                                   "parallel.activation_checkpointing": "full"})
    Trainer(config, loader_factory=array_loader_factory(random_tokens(), 32)).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    moe = preset == "olmoe-tiny"
    assert ("moe_lb_loss" in rows[-1]) == moe
    if moe:
        # Per layer, the least and most loaded expert's share of the picks brackets the balanced 1/4.
        for layer in (0, 1):
            low, high = rows[-1][f"expert_load/layer{layer}_min"], rows[-1][f"expert_load/layer{layer}_max"]
            assert 0 <= low <= 0.25 <= high <= 1
        assert rows[-1]["moe_lb_loss"] >= 2 - 1e-4  # k · Σ f·P >= k, equal when balanced (top-2)


def test_router_receives_the_gradient_of_the_auxiliary_losses():
    config = get_preset("olmoe-tiny")
    config.vocab_size = 1000
    model = build_model(config, seed=0)
    _, router = model(_ids(length=16), return_router_losses=True)
    router.total.backward()
    assert all(block.mlp.router.weight.grad.abs().sum() > 0 for block in model.blocks)


def test_training_gradient_includes_the_router_losses_token_weighted_over_micro_batches(tmp_path):
    """The trainer's first-step gradient norm equals a hand-built loss: per micro-batch, summed CE plus the
    router losses' weighted sum times the micro-batch's real tokens, over the global batch's real tokens."""
    import copy

    from lmforge.train.trainer import Trainer

    model = {"preset": "olmoe-tiny", "overrides": {"n_layers": 2, "d_model": 64, "n_heads": 4, "mlp_hidden_size": 32,
                                                   "n_experts": 4, "moe_top_k": 2, "vocab_size": 256,
                                                   "eos_token_id": 0, "pad_token_id": 1, "max_sequence_length": 64,
                                                   "moe_lb_loss_coef": 3.0, "moe_z_loss_coef": 0.5}}
    config = tiny_config(tmp_path, model=model, z_loss_multiplier=0.0, **{"optimizer.max_grad_norm": None})
    factory = array_loader_factory(random_tokens(), 32)
    trainer = Trainer(config, loader_factory=factory)
    reference = copy.deepcopy(trainer.model)
    batch = next(iter(factory(8 * 32, trainer.dist)))
    result = trainer.train_step(batch, 8 * 32)

    ids = batch["input_ids"]
    labels = torch.cat([ids[:, 1:], torch.full((len(ids), 1), -100)], dim=1)
    total = torch.zeros(())
    for rows in torch.arange(len(ids)).split(2):  # micro-batches of 2 sequences
        logits, router = reference(ids[rows], return_router_losses=True)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[rows].reshape(-1),
                                               ignore_index=-100, reduction="sum")
        total = total + ce + router.total * (labels[rows] != -100).sum()
    (total / (labels != -100).sum()).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    assert abs(result.grad_norm - norm.item()) < 1e-4 * norm.item()
    assert result.metrics["moe_lb_loss"] >= 2 - 1e-4


def test_moe_under_fsdp_per_block_with_activation_checkpointing_trains_as_ddp(tmp_path):
    """Two gloo processes: FSDP2 (per block, blocks checkpointed) and DDP see the same micro-batches, so their
    losses, grad norms and router losses agree. (One process differs: the load-balancing loss is a product of
    per-micro-batch means, and the micro-batches differ.)"""
    from train_utils import read_metrics, run_multiprocess

    model = {"preset": "olmoe-tiny", "overrides": {"n_layers": 2, "d_model": 64, "n_heads": 4, "mlp_hidden_size": 32,
                                                   "n_experts": 4, "moe_top_k": 2, "vocab_size": 256,
                                                   "eos_token_id": 0, "pad_token_id": 1, "max_sequence_length": 64}}
    common = {"model": model, "max_steps": 4, "checkpoint.interval": None, "checkpoint.save_final": False}
    run_multiprocess(2, [
        (tmp_path / "fsdp", {**common, "parallel.data_parallel": "fsdp", "parallel.activation_checkpointing": "full"}),
        (tmp_path / "ddp", {**common, "parallel.data_parallel": "ddp"}),
    ])
    fsdp, ddp = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "ddp")
    for key in ("loss", "grad_norm", "moe_lb_loss", "moe_z_loss", "expert_load/layer1_max"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in ddp], rel=1e-5), key


def test_flops_per_token_count_only_the_pairs_inside_each_window():
    from lmforge.model.info import flops_per_token

    config = _olmo3(window=3)  # layers: window 3, 3, 3, then full
    counts = count_parameters(config)
    dense = 6 * (counts["non_embedding"] - counts["lm_head"] + config.embedding_size * config.d_model)  # blocks + head
    # 5 tokens, window 3: queries see 1, 2, 3, 3, 3 keys = 12 pairs; the full layer 1+2+3+4+5 = 15.
    attention = 12 * config.n_heads * config.head_dim * (3 * 12 + 15) / 5
    assert flops_per_token(config, 5) == int(dense + attention)
