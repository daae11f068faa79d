import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.directory import build_model, load_model_dir, save_model_dir
from lmforge.model.generation import SamplingConfig, generate_ids
from lmforge.model.hf import export_hf, import_hf
from lmforge.model.presets import get_preset

transformers = pytest.importorskip("transformers")

# olmo3-tiny: sliding window 16 < the 40 tokens compared, YaRN x8 over 64 positions on its full layer.
FAMILIES = {"olmo-tiny": "OlmoForCausalLM", "olmo2-tiny": "Olmo2ForCausalLM",
            "olmo2-tiny-gqa": "Olmo2ForCausalLM", "olmo3-tiny": "Olmo3ForCausalLM", "olmoe-tiny": "OlmoeForCausalLM",
            "bloom-tiny": "BloomForCausalLM", "llama-tiny": "LlamaForCausalLM"}


def _exported(tmp_path, preset, init_std=None):
    config = get_preset(preset)
    if init_std is not None:  # larger weights give varied greedy continuations, a sharper generation test
        config.init, config.init_std = "normal", init_std
    model = build_model(config, seed=0).eval()
    save_model_dir(model, tmp_path / "ours")
    export_hf(model, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return model, hf


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, preset):
    model, hf = _exported(tmp_path, preset)
    assert type(hf).__name__ == FAMILIES[preset]
    ids = torch.randint(0, 50_000, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_import_of_export_is_bit_identical(tmp_path, preset):
    model, _ = _exported(tmp_path, preset)
    import_hf(tmp_path / "hf", tmp_path / "back")
    back, _ = load_model_dir(tmp_path / "back")
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unexpressible_model_is_refused(tmp_path):
    config = get_preset("olmo2-tiny")
    config.position = "alibi"
    save_model_dir(build_model(config, 0), tmp_path / "m")
    with pytest.raises(LmforgeError, match="cannot express"):
        export_hf(build_model(config, 0), None, tmp_path / "hf")


@pytest.mark.parametrize("preset", ["olmo-tiny", "olmo2-tiny", "bloom-tiny"])
def test_greedy_generation_cache_recompute_and_transformers_agree(tmp_path, preset):
    model, hf = _exported(tmp_path, preset, init_std=0.3)
    prompts = [[11, 52, 973, 4, 88, 1200], [7, 3000, 45]]
    sampling = SamplingConfig(max_new_tokens=10)
    cached = generate_ids(model, prompts, sampling, eos_id=None, pad_id=1)
    recomputed = generate_ids(model, prompts, SamplingConfig(max_new_tokens=10, use_cache=False), eos_id=None, pad_id=1)
    assert cached == recomputed
    assert len(set(cached[0])) > 3, "degenerate continuation makes the comparison weak"
    for prompt, ours in zip(prompts, cached):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=1)
        assert out[0, len(prompt):].tolist() == ours
    # A left-padded batch in transformers gives the same tokens as ours.
    ids = torch.tensor([[1, 1, 1] + prompts[1], prompts[0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert out[:, 6:].tolist() == [cached[1], cached[0]]


@pytest.mark.parametrize("preset", ["olmo2-tiny", "bloom-tiny"])
def test_import_of_a_config_without_pad_token(tmp_path, preset):
    """`"pad_token_id": null` (many HF checkpoints): the imported directory loads, pads with EOS, same logits."""
    import json

    model, hf = _exported(tmp_path, preset)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.pop("lmforge_model", None)
    config["pad_token_id"] = None
    path.write_text(json.dumps(config))
    import_hf(tmp_path / "hf", tmp_path / "back")
    back, _ = load_model_dir(tmp_path / "back")
    assert back.config.pad_token_id == config["eos_token_id"]
    ids = torch.randint(0, 50_000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("form", ["model", "hf"])
def test_weights_that_do_not_fit_the_config_are_one_error_naming_them(tmp_path, form):
    """Every reader builds the model through one function: a config whose shapes the weights do not have is
    refused by name (a transformers directory used to fail inside load_state_dict with a traceback)."""
    import json

    from lmforge.model.hf import read_hf

    model = build_model(get_preset("llama-tiny"), seed=0)
    save_model_dir(model, tmp_path / "model")
    export_hf(model, None, tmp_path / "hf")
    config_path = tmp_path / form / "config.json"
    config = json.loads(config_path.read_text())
    if form == "model":
        config["model"]["mlp_hidden_size"] += 8
    else:
        del config["lmforge_model"]
        config["intermediate_size"] += 8
    config_path.write_text(json.dumps(config))
    read = load_model_dir if form == "model" else read_hf
    with pytest.raises(LmforgeError, match=r"weights in .*: blocks\.0\.mlp\.\w+_proj\.weight has shape .* "
                                           r"config\.json implies"):
        read(tmp_path / form)
