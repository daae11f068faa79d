"""`lmforge.model.loading.load`: the one loader every stage uses, on every saved form of a model.

One tiny real run (BPE trained in the test -> `data tokenize` -> `lmforge train` for 4 steps, checkpoints at
steps 2 and 4) is shared by all tests: the run directory, its checkpoints, the model directory exported from
it and the transformers directory exported from that must all load as the same weights, with the tokenizer
chosen by the one lookup rule (explicit, else the model directory's, else the one the run recorded)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.model.checkpoints import read_meta
from lmforge.model.directory import save_model_dir
from lmforge.model.hf import export_hf
from lmforge.model.loading import export_model_dir, load
from lmforge.tokens.tokenizer import Tokenizer

CONFIG = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "configs" / "train" / "quickstart.yaml"
TEXT = "def main(argv):\n    return sorted(set(argv))[0]  # the first"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-step run with complete checkpoints at steps 2 and 4; its data, tokenizer and a second tokenizer."""
    from lmforge.tokens.tokenize import TokenizeConfig, TrainTokenizerConfig, tokenize, train_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("loading")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = root / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for path in sorted(stdlib.glob("*.py"))[:30]:
            text = path.read_text(encoding="utf-8", errors="replace")[:6000]
            f.write(json.dumps({"id": path.name, "text": text, "source": "stdlib"}) + "\n")
    train_tokenizer(TrainTokenizerConfig(documents=[str(docs)], vocab_size=512, out=str(root / "bpe")))
    # Another vocabulary (384 tokens) that still fits the run's 512-row embedding: encodes differently.
    train_tokenizer(TrainTokenizerConfig(documents=[str(docs)], vocab_size=300, out=str(root / "bpe_small")))
    tokenize(TokenizeConfig(documents=[str(docs)], tokenizer=str(root / "bpe"), out=str(root / "tokens")))
    ppl = root / "ppl.jsonl"  # Dolma-format documents for `eval --ppl`
    with open(ppl, "w", encoding="utf-8") as f:
        for i, path in enumerate(sorted(stdlib.glob("*.py"))[40:43]):
            text = path.read_text(encoding="utf-8", errors="replace")[:1500]
            f.write(json.dumps({"id": f"d{i}", "text": text, "source": "held_out"}) + "\n")

    run_dir = root / "run"
    overrides = [f"data.paths=[{root / 'tokens'}]", f"run_dir={run_dir}", "data.sequence_length=64",
                 "global_batch_size=256", "micro_batch_size=256", "max_steps=4", "schedule.warmup=1",
                 "checkpoint.interval=2", "checkpoint.keep_last=5", "metrics.log_interval=1",
                 "metrics.tensorboard=false", "model.overrides.n_layers=2", "model.overrides.d_model=64",
                 "model.overrides.n_heads=4", "model.overrides.mlp_hidden_size=128"]
    assert main(["train", str(CONFIG), *overrides]) == 0
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step00000002", "step00000004"]
    return {"root": root, "run": run_dir, "ckpt2": ckpts / "step00000002", "ckpt4": ckpts / "step00000004",
            "bpe": root / "bpe", "bpe_small": root / "bpe_small", "ppl": ppl}


@pytest.fixture(scope="module")
def exported(setup):
    """The run's latest checkpoint as a model directory, and that model as a transformers directory."""
    model_dir = export_model_dir(setup["run"], setup["root"] / "model")
    loaded = load(model_dir)
    hf_dir = setup["root"] / "hf"
    export_hf(loaded.model, loaded.tokenizer, hf_dir)
    return {"model": model_dir, "hf": hf_dir}


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _ids(setup) -> torch.Tensor:
    return torch.tensor([Tokenizer.load(setup["bpe"]).encode(TEXT)])


# --- 1. run directory, step selection, checkpoint directory ---------------------------------------------

def test_run_dir_resolves_latest_or_given_step(setup):
    # Guards: a run directory loads its *latest* checkpoint; `step` picks that checkpoint (not silently the
    # latest); a checkpoint directory and run+step give the very same weights.
    latest = load(setup["run"])
    assert latest.kind == "checkpoint" and latest.step == 4 and latest.path == setup["ckpt4"]
    two = load(setup["run"], step=2)
    assert two.kind == "checkpoint" and two.step == 2 and two.path == setup["ckpt2"]
    assert not _state_equal(latest.model, two.model)  # 2 optimizer steps apart
    direct = load(setup["ckpt2"])
    assert direct.kind == "checkpoint" and direct.step == 2 and direct.path == setup["ckpt2"]
    assert _state_equal(direct.model, two.model)
    assert not direct.model.training  # eval mode
    assert read_meta(setup["ckpt2"])["step"] == 2


def test_missing_step_lists_the_available_ones(setup):
    # Guards: an absent step is one clear error naming what exists, not the latest checkpoint or a traceback.
    with pytest.raises(LmforgeError) as e:
        load(setup["run"], step=3)
    message = str(e.value)
    assert "3" in message and "2, 4" in message
    with pytest.raises(LmforgeError, match="step 2"):  # a checkpoint directory is one step only
        load(setup["ckpt2"], step=4)


# --- 2. reference comparisons: checkpoint == model directory == transformers directory ------------------

def test_exported_model_dir_gives_identical_logits(setup, exported):
    # Guards: `export_model_dir` writes exactly the checkpoint's weights (no dropped/transposed/retied tensor,
    # no dtype change) and `load` reads a model directory back bit for bit.
    ids = _ids(setup)
    ckpt = load(setup["run"])
    model_dir = load(exported["model"])
    assert model_dir.kind == "model" and model_dir.step is None
    assert _state_equal(ckpt.model, model_dir.model)
    assert torch.equal(_logits(ckpt.model, ids), _logits(model_dir.model, ids))
    manifest = json.loads((exported["model"] / "manifest.json").read_text())
    assert manifest["counts"]["step"] == 4 and manifest["source"] == str(setup["ckpt4"])


def test_hf_dir_matches_model_dir_and_transformers(setup, exported):
    # Guards: `read_hf` (the in-memory transformers -> lmforge conversion `load` uses) inverts `export_hf`,
    # and the exported directory is what transformers itself computes.
    ids = _ids(setup)
    reference = _logits(load(exported["model"]).model, ids)
    hf = load(exported["hf"])
    assert hf.kind == "hf" and hf.tokenizer is not None
    assert (_logits(hf.model, ids) - reference).abs().max().item() <= 1e-5
    with pytest.raises(LmforgeError, match="no steps"):
        load(exported["hf"], step=2)
    try:
        import transformers
    except ImportError:
        return
    peer = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"]).eval()
    with torch.no_grad():
        peer_logits = peer(ids).logits
    vocab = peer_logits.shape[-1]
    assert (peer_logits - reference[..., :vocab]).abs().max().item() <= 1e-4


# --- 3. the tokenizer rule ------------------------------------------------------------------------------

def test_run_dir_uses_the_recorded_tokenizer(setup):
    # Guards: a checkpoint has no tokenizer.json of its own; `load` must fall back to the tokenizer the run
    # recorded in meta.json (the one it trained with), not return None or some other tokenizer.
    recorded = read_meta(setup["ckpt4"])["tokenizer"]
    assert recorded  # the `data tokenize` path records it
    used = Tokenizer.load(setup["bpe"])
    tok = load(setup["run"]).tokenizer
    assert tok is not None
    assert tok.vocab_size == used.vocab_size == 512
    assert tok.hf.get_vocab() == used.hf.get_vocab()
    assert tok.encode(TEXT) == used.encode(TEXT)
    assert load(setup["ckpt2"], require_tokenizer=True).tokenizer.encode(TEXT) == used.encode(TEXT)


def test_explicit_tokenizer_overrides_model_dir_and_recorded(setup, exported):
    # Guards: `tokenizer=` wins over the model directory's tokenizer.json and over the run's recorded one.
    small = Tokenizer.load(setup["bpe_small"])
    own = load(exported["model"]).tokenizer
    assert own is not None and own.vocab_size == 512
    assert small.encode(TEXT) != own.encode(TEXT)  # the test can tell them apart
    for source in (exported["model"], setup["run"]):
        tok = load(source, tokenizer=setup["bpe_small"]).tokenizer
        assert tok.vocab_size == small.vocab_size == 384
        assert tok.encode(TEXT) == small.encode(TEXT)


def test_missing_tokenizer_is_one_error_when_required(setup, tmp_path):
    # Guards: a model directory without tokenizer.json (and no run to fall back on) loads without one, but
    # with require_tokenizer=True it is one LmforgeError that says so (not a crash later in eval/generate).
    bare = save_model_dir(load(setup["ckpt2"]).model, tmp_path / "bare")
    assert not (bare / "tokenizer.json").exists()
    assert load(bare).tokenizer is None
    with pytest.raises(LmforgeError, match="tokenizer"):
        load(bare, require_tokenizer=True)
    assert load(bare, tokenizer=setup["bpe"], require_tokenizer=True).tokenizer.vocab_size == 512


# --- 4. the CLI commands that use `load` -----------------------------------------------------------------

def _bpb(out: Path) -> float:
    return json.loads((out / "results.json").read_text())["perplexity"]["total"]["bits_per_byte"]


def test_cli_eval_any_form_gives_the_same_numbers(setup, exported, tmp_path, capsys):
    # Guards: `eval` on a run directory evaluates its latest checkpoint (same numbers as the exported model
    # directory) with the recorded tokenizer, and `--step` really selects another checkpoint.
    common = ["--ppl", str(setup["ppl"]), "--device", "cpu", "--no-progress"]
    assert main(["eval", str(setup["run"]), *common, "--out", str(tmp_path / "run")]) == 0
    assert main(["eval", str(exported["model"]), *common, "--out", str(tmp_path / "model")]) == 0
    assert main(["eval", str(setup["run"]), "--step", "2", *common, "--out", str(tmp_path / "step2")]) == 0
    run, model_dir, step2 = _bpb(tmp_path / "run"), _bpb(tmp_path / "model"), _bpb(tmp_path / "step2")
    assert 0 < run < 20
    assert run == model_dir
    assert step2 != run
    info = json.loads((tmp_path / "step2" / "results.json").read_text())["model"]
    assert info["kind"] == "checkpoint" and info["step"] == 2 and info["source"] == str(setup["ckpt2"])
    assert Path(info["tokenizer"]).parent == Path(read_meta(setup["ckpt2"])["tokenizer"])  # the recorded one


def test_cli_generate_from_run_dir(setup, capsys):
    # Guards: `generate` accepts a run directory and finds the recorded tokenizer (it requires one).
    capsys.readouterr()
    assert main(["generate", str(setup["run"]), "--prompt", "x", "--max-new-tokens", "3", "--json",
                 "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["x"] and isinstance(rows[0]["completion"], str)


def test_cli_export_step(setup, tmp_path, capsys):
    # Guards: `checkpoint export RUN --step N` and `export hf RUN --step N` export that step, not the latest.
    assert main(["checkpoint", "export", str(setup["run"]), "--out", str(tmp_path / "m2"), "--step", "2"]) == 0
    assert _state_equal(load(tmp_path / "m2").model, load(setup["ckpt2"]).model)
    assert main(["export", "hf", str(setup["run"]), "--out", str(tmp_path / "h2"), "--step", "2"]) == 0
    ids = _ids(setup)
    diff = _logits(load(tmp_path / "h2").model, ids) - _logits(load(setup["ckpt2"]).model, ids)
    assert diff.abs().max().item() <= 1e-5


def test_cli_missing_model_is_a_one_line_error(setup, tmp_path, capsys):
    # Guards: a user error is exit 2 and one `lmforge: error:` line naming the path, not a traceback.
    capsys.readouterr()
    assert main(["eval", "/nonexistent", "--ppl", str(setup["ppl"]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error:") and "/nonexistent" in err[0]


# --- 5. what is not a model -------------------------------------------------------------------------------

def test_not_a_model_is_refused_naming_the_path(setup, exported, tmp_path):
    # Guards: a directory of none of the forms is one LmforgeError naming it (not an empty model or a crash);
    # `step` on a model directory is refused rather than ignored.
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a model\n")
    (other / "data.bin").write_bytes(b"\0" * 16)
    for path in (empty, other, tmp_path / "missing"):
        with pytest.raises(LmforgeError) as e:
            load(path)
        assert str(path) in str(e.value)
    with pytest.raises(LmforgeError, match="model directory.*no steps"):
        load(exported["model"], step=1)
