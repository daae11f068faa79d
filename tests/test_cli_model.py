import json
import subprocess
import sys

import pytest
from conftest import requires_olmo_tokenizer

from lmforge.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_model_info_json(capsys):
    code, out, _ = run(capsys, "model", "info", "olmo2-7b", "--json", "--seq-len", "4096")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == 7_298_617_344
    assert info["memory_bytes"]["fp32"]["total"] == 16 * info["parameters"]


@requires_olmo_tokenizer
def test_init_generate_export_import(tmp_path, capsys):
    m = tmp_path / "m"
    assert run(capsys, "model", "init", "olmo2-tiny", "n_layers=2", "--out", str(m), "--tokenizer", "olmo")[0] == 0
    assert (m / "manifest.json").is_file() and (m / "tokenizer.json").is_file()
    code, out, _ = run(capsys, "generate", str(m), "--prompt", "Hello", "--prompt", "A b", "--max-new-tokens", "4", "--json")
    generated = json.loads(out)
    assert code == 0 and [r["prompt"] for r in generated] == ["Hello", "A b"]
    code, _, err = run(capsys, "export", "hf", str(m), str(tmp_path / "hf"))  # the spelling before --out
    assert code == 0 and "deprecated; use --out" in err
    assert run(capsys, "export", "hf", str(m), "--out", str(tmp_path / "hf2"))[0] == 0
    assert run(capsys, "import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))[0] == 0

    # What each command wrote, not only its exit code.
    import torch

    from lmforge.model.directory import load_model_dir
    from lmforge.tokens.tokenizer import Tokenizer, resolve_tokenizer_path

    model, tokenizer = load_model_dir(m)
    olmo = Tokenizer.load(resolve_tokenizer_path("olmo"))
    assert model.config.n_layers == 2 and tokenizer.hf.to_str() == olmo.hf.to_str()
    # Both spellings of the export write the same files; the import gives back the very same model.
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name
    back, back_tokenizer = load_model_dir(tmp_path / "back")
    assert back.config == model.config and back_tokenizer is not None
    assert back_tokenizer.hf.to_str() == tokenizer.hf.to_str()
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # `generate` is greedy by default: its completions equal transformers' greedy decoding of the export.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for row in generated:
        ids = torch.tensor([tokenizer.encode(row["prompt"])])
        with torch.no_grad():
            new = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.pad_id)[0, ids.shape[1]:].tolist()
        new = new[:-1] if new and new[-1] == tokenizer.eos_id else new
        assert len(new) >= 1 and row["completion"] == tokenizer.decode(new), row


@pytest.mark.parametrize("argv, message", [
    (["model", "info", "no-such-preset"], "unknown model preset 'no-such-preset'"),
    (["model", "info", "olmo2-tiny", "d_model=abc"], "not of type int"),
    (["generate", "/nonexistent", "--prompt", "x"], "model directory not found"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


@requires_olmo_tokenizer
def test_prompt_longer_than_context(tmp_path, capsys):
    m = tmp_path / "m"
    run(capsys, "model", "init", "olmo2-tiny", "n_layers=1", "--out", str(m), "--tokenizer", "olmo")
    code, _, err = run(capsys, "generate", str(m), "--prompt", "word " * 600)
    assert code == 2 and "longer than the model's context" in err


def test_help_at_every_level():
    for argv in (["--help"], ["model", "--help"], ["model", "info", "--help"], ["export", "hf", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: lmforge" in proc.stdout


def test_model_yaml_files_match_presets_and_malformed_yaml_is_refused(tmp_path, capsys):
    from pathlib import Path

    from lmforge.model.presets import get_preset, resolve_model_config

    configs = sorted(Path(__file__).parent.parent.glob("configs/model/*.yaml"))
    assert configs
    for path in configs:
        assert resolve_model_config(str(path)) == get_preset(path.stem)
    small = tmp_path / "small.yaml"
    small.write_text("preset: olmo2-tiny\nn_layers: 2\n")
    assert resolve_model_config(str(small), ["d_model=64"]).n_layers == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: olmo2-tiny\nn_layers: [2\n")
    code, _, err = run(capsys, "model", "info", str(bad))
    assert code == 2 and "malformed YAML" in err and "bad.yaml line 3" in err


def _chat_model_dir(path):
    from gguf_utils import CHAT_TEMPLATE

    from lmforge.model.directory import build_model, save_model_dir
    from lmforge.model.presets import get_preset
    from lmforge.tokens.tokenizer import train_bpe

    tokenizer = train_bpe(iter(["the cat sat on the mat", "a dog ran"] * 4), vocab_size=300,
                          special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = get_preset("olmo2-tiny")
    config.vocab_size, config.eos_token_id, config.pad_token_id = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    config.n_layers, config.init, config.init_std = 1, "normal", 0.3  # varied tokens, few of them EOS
    save_model_dir(build_model(config, seed=0), path, tokenizer)
    return tokenizer


@pytest.mark.parametrize("kind", ["--prompt", "--chat"])
def test_generate_streams_what_it_would_print_at_once(tmp_path, capsys, kind):
    """One prompt streams to stdout; the text equals the --json completion, and --chat equals generating from
    the chat template's rendering of the message (independently rendered here)."""
    _chat_model_dir(tmp_path / "m")
    common = [str(tmp_path / "m"), kind, "the cat", "--max-new-tokens", "12", "--temperature", "1", "--seed", "3"]
    code, streamed, _ = run(capsys, "generate", *common)
    assert code == 0
    code, out, _ = run(capsys, "generate", *common, "--json")
    [row] = json.loads(out)
    assert streamed == ("the cat" if kind == "--prompt" else "") + row["completion"] + "\n"
    if kind == "--chat":
        assert row["message"] == "the cat"
        code, out, _ = run(capsys, "generate", str(tmp_path / "m"), "--prompt",
                           "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n", "--max-new-tokens", "12",
                           "--temperature", "1", "--seed", "3", "--json")
        assert json.loads(out)[0]["completion"] == row["completion"] != ""


def test_generate_token_healing_is_passed_through_and_streams_the_same(tmp_path, capsys):
    """--token-healing gives what `generate_text` with token healing gives (and not what it gives without), in
    --json and streamed; a --chat prompt cannot be healed."""
    from lmforge.model.directory import load_model_dir
    from lmforge.model.generation import SamplingConfig, generate_text

    _chat_model_dir(tmp_path / "m")
    common = [str(tmp_path / "m"), "--prompt", "the cat ", "--max-new-tokens", "8", "--temperature", "1", "--seed", "5"]
    code, out, _ = run(capsys, "generate", *common, "--token-healing", "--json")
    assert code == 0
    [row] = json.loads(out)
    model, tokenizer = load_model_dir(tmp_path / "m")
    healed = generate_text(model, tokenizer, ["the cat "], SamplingConfig(8, temperature=1, seed=5, token_healing=True))
    assert [row["completion"]] == healed != generate_text(model, tokenizer, ["the cat "],
                                                           SamplingConfig(8, temperature=1, seed=5))
    code, streamed, _ = run(capsys, "generate", *common, "--token-healing")
    assert code == 0 and streamed == "the cat " + row["completion"] + "\n"
    code, _, err = run(capsys, "generate", str(tmp_path / "m"), "--chat", "hi", "--token-healing")
    assert code == 2 and "--token-healing continues a --prompt" in err and err.count("\n") == 1


def test_generate_chat_without_a_template_is_one_line(tmp_path, capsys):
    tokenizer = _chat_model_dir(tmp_path / "m")
    tokenizer.chat_template = None
    tokenizer.save(tmp_path / "m")
    code, _, err = run(capsys, "generate", str(tmp_path / "m"), "--chat", "hi")
    assert code == 2 and "has no chat template" in err and err.count("\n") == 1
