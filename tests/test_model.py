import math

import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.directory import build_model, load_model_dir, save_model_dir
from lmforge.model.info import count_parameters, flops_per_token
from lmforge.model.presets import get_preset
from lmforge.model.transformer import ModelConfig, Transformer, alibi_slopes, cross_entropy_loss

# Parameter counts of the released Hugging Face checkpoints (from their config.json shapes; e.g.
# allenai/OLMo-1B-hf, OLMo-7B-hf, OLMo-2-0425-1B, OLMo-2-1124-7B, OLMo-2-1124-13B, bigscience/bloom-560m, and
# Olmo 3 7B/32B and OLMoE-1B-7B with the embedding padded as the released checkpoints pad it).
RELEASED_PARAMETERS = {
    "olmo-1b": 1_176_764_416,
    "olmo-7b": 6_888_095_744,
    "olmo2-1b": 1_484_916_736,
    "olmo2-7b": 7_298_617_344,
    "olmo2-13b": 13_716_198_400,
    # transformers' Olmo3Config / OlmoeConfig(intermediate_size=1024) at these shapes, counted on the meta device
    "olmo3-7b": 7_298_617_344,
    "olmo3-32b": 32_234_279_936,
    "olmoe-1b-7b": 6_919_161_856,
    "bloom-560m": 559_214_592,
    # HuggingFaceTB/SmolLM2-135M (as the issue and transformers count it) and meta-llama/Meta-Llama-3-8B
    "smollm2-135m": 134_515_008,
    "llama3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("preset", sorted(RELEASED_PARAMETERS))
def test_published_presets_match_released_parameter_counts(preset):
    assert count_parameters(get_preset(preset))["total"] == RELEASED_PARAMETERS[preset]


def test_published_preset_shapes():
    olmo1_7b, olmo2_7b = get_preset("olmo-7b"), get_preset("olmo2-7b")
    assert olmo1_7b.mlp_hidden_size == 11008 and olmo1_7b.embedding_size == 50_304
    assert olmo2_7b.embedding_size == 100_352 and olmo2_7b.rope_theta == 500_000
    assert get_preset("olmo-1b").tie_embeddings and not olmo2_7b.tie_embeddings


def test_vocab_is_padded_to_multiple_of_128():
    assert ModelConfig(vocab_size=1000).embedding_size == 1024
    assert ModelConfig(vocab_size=1024).embedding_size == 1024


def test_non_embedding_parameters_by_hand():
    """Non-embedding = everything but the input embedding: an untied LM head counts (Kaplan et al., OLMo-core's
    num_non_embedding_params), a tied one is the embedding. OLMo 2 1B: per layer q, k, v, o (4·d²), SwiGLU
    (3·d·h) and four norms (attention, MLP, q, k: 4·d), a final norm (d), an untied head (V·d)."""
    d, layers, hidden, vocab = 2048, 16, 8192, 100_352
    blocks = layers * (4 * d * d + 3 * d * hidden + 4 * d) + d
    olmo2 = count_parameters(get_preset("olmo2-1b"))
    assert olmo2["non_embedding"] == blocks + vocab * d == 1_279_395_840
    assert olmo2["total"] == olmo2["non_embedding"] + vocab * d
    olmo1 = count_parameters(get_preset("olmo-1b"))  # tied; non-parametric layer norms
    assert olmo1["non_embedding"] == layers * (4 * d * d + 3 * d * hidden) == 1_073_741_824
    assert olmo1["total"] == olmo1["non_embedding"] + 50_304 * d


def test_flops_per_token_formula_by_hand():
    c = get_preset("olmo2-tiny")
    seq = 64
    d, blocks = c.d_model, c.n_layers * (4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden_size + 4 * c.d_model) + c.d_model
    dense = 6 * (blocks + c.embedding_size * d)
    attention = 12 * c.n_layers * c.n_heads * c.head_dim * (seq + 1) / 2
    assert flops_per_token(c, seq) == int(dense + attention)


def test_alibi_slopes_match_paper_for_8_heads():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


def _reference_attention_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Float64 forward with explicit softmax attention, written independently of the model's code path."""
    c = model.config
    m = Transformer(c).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    B, L = ids.shape
    x = m.embed(ids)
    if m.embed_norm is not None:
        x = m.embed_norm(x)
    pos = torch.arange(L, dtype=torch.float64)
    for block in m.blocks:
        a = block.attn

        def attend(h):
            q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            q = q.view(B, L, c.n_heads, c.head_dim).transpose(1, 2)
            k = k.view(B, L, c.n_kv_heads, c.head_dim).transpose(1, 2).repeat_interleave(c.n_heads // c.n_kv_heads, 1)
            v = v.view(B, L, c.n_kv_heads, c.head_dim).transpose(1, 2).repeat_interleave(c.n_heads // c.n_kv_heads, 1)
            scores = torch.zeros(B, c.n_heads, L, L, dtype=torch.float64)
            if c.position == "rope":
                inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
                ang = pos[:, None] * inv[None, :]
                cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

                def rot(t):
                    half = c.head_dim // 2
                    return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

                q, k = rot(q), rot(k)
            else:
                slopes = alibi_slopes(c.n_heads).double()
                scores = scores + slopes[None, :, None, None] * (pos[None, :] - pos[:, None])[None, None]
            scores = scores + q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
            scores = scores.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
            return a.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, c.d_model))

        if c.block == "reordered":
            x = x + block.attn_norm(attend(x))
            x = x + block.mlp_norm(block.mlp(x))
        else:
            x = x + attend(block.attn_norm(x))
            x = x + block.mlp(block.mlp_norm(x))
    return m.lm_head(m.final_norm(x))


@pytest.mark.parametrize("preset", ["olmo-tiny", "olmo2-tiny", "olmo2-tiny-gqa", "bloom-tiny"])
def test_forward_matches_float64_reference(preset):
    model = build_model(get_preset(preset), seed=0).eval()
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).double()
        ref = _reference_attention_forward(model, ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_intra_document_masking_equals_separate_documents():
    model = build_model(get_preset("olmo2-tiny"), seed=0).eval()
    a = torch.randint(0, 5000, (1, 10), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 5000, (1, 7), generator=torch.Generator().manual_seed(3))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 10 + [1] * 7])
    positions = torch.tensor([list(range(10)) + list(range(7))])
    with torch.no_grad():
        together = model(packed, positions=positions, doc_ids=doc_ids)
        alone = torch.cat([model(a), model(b)], dim=1)
        unmasked = model(packed)
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(unmasked[:, 10:], alone[:, 10:], atol=1e-3)


def test_init_is_deterministic_by_seed_and_follows_scheme():
    c = get_preset("olmo2-tiny")
    a, b, other = build_model(c, 7), build_model(c, 7), build_model(c, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.embed.weight, other.embed.weight)
    w = a.blocks[0].attn.q_proj.weight
    assert abs(w.std().item() - 0.02) < 0.003 and w.abs().max().item() <= 0.06 + 1e-6
    m1 = build_model(get_preset("olmo-tiny"), 0)
    out = m1.blocks[1].attn.o_proj.weight  # mitchell: 1/sqrt(2 d (layer+1)), truncated at 3 sigma
    expected = 1 / math.sqrt(2 * 128 * 2)
    assert abs(out.std().item() / expected - 1) < 0.15 and out.abs().max().item() <= 3 * expected + 1e-6


def test_cross_entropy_and_z_loss_against_manual():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 0] = -100
    ce, z = cross_entropy_loss(logits, labels, z_loss_multiplier=1e-2)
    logp = logits.double().log_softmax(-1)
    valid = labels != -100
    manual = -(logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][valid]).mean()
    manual_z = 1e-2 * (torch.logsumexp(logits.double(), -1)[valid] ** 2).mean()
    assert abs(ce.item() - manual.item()) < 1e-6 and abs(z.item() - manual_z.item()) < 1e-7


def test_model_directory_round_trip_and_corrupt_weights(tmp_path):
    model = build_model(get_preset("olmo-tiny"), 0)
    save_model_dir(model, tmp_path / "m")
    loaded, tokenizer = load_model_dir(tmp_path / "m")
    assert tokenizer is None and loaded.lm_head.weight is loaded.embed.weight
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LmforgeError, match="corrupt weights"):
        load_model_dir(tmp_path / "m")
    with pytest.raises(LmforgeError, match="not found"):
        load_model_dir(tmp_path / "missing")


def test_alibi_bf16_agrees_with_fp32_at_long_context():
    """ALiBi's bias from relative distance: bf16 logits stay within 1 of fp32 at 2,304 tokens (a bias from absolute
    key positions rounds ~1000-sized values to 8 bits: 6.9 here, 16 on other weights)."""
    config = get_preset("bloom-tiny")
    config.max_sequence_length, config.vocab_size, config.n_layers = 2304, 512, 2
    config.init_std = 0.2  # sharper attention than the 0.02 init, as trained weights have
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, 512, (1, 2304), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).double()
        low = model.to(torch.bfloat16)(ids).double()
    assert (reference - low).abs().max().item() < 1.0


def test_z_loss_with_minus_infinity_logits_against_float64():
    """Masked vocabulary entries (-inf logits, even the first column) give finite CE, z-loss and gradients equal
    to a float64 logsumexp reference."""
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, 0] = logits[1, [0, 2, 5]] = logits[2, 6] = float("-inf")
    labels = torch.tensor([3, 1, 0])
    multiplier = 1e-2
    ours = logits.clone().requires_grad_(True)
    ce, z = cross_entropy_loss(ours, labels, z_loss_multiplier=multiplier)
    (ce + z).backward()
    reference = logits.double().requires_grad_(True)
    lse = torch.logsumexp(reference, dim=-1)
    ce_ref = (lse - reference.gather(1, labels[:, None]).squeeze(1)).mean()
    z_ref = multiplier * (lse ** 2).mean()
    (ce_ref + z_ref).backward()
    assert torch.isfinite(ce) and torch.isfinite(z) and torch.isfinite(ours.grad).all()
    assert abs(ce.item() - ce_ref.item()) < 1e-5 and abs(z.item() - z_ref.item()) < 1e-6
    assert torch.allclose(ours.grad.double(), reference.grad, atol=1e-6)
