"""Bad input on the command line: one `lmforge: error:` line naming what is wrong, exit code 2, no traceback."""

import json

import pytest
from conftest import requires_olmo_tokenizer

from lmforge.cli import main


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *mentions):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    for text in mentions:
        assert str(text) in lines[0], err


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(5):
            f.write(json.dumps({"id": str(i), "text": f"document number {i} says hello to the world"}) + "\n")
    return path


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "in_the_way"
    path.write_text("a file where a directory must go\n")
    return path


def test_model_init_output_is_a_file(a_file, capsys):
    argv = ["model", "init", "olmo2-tiny", "n_layers=1", "vocab_size=256", "eos_token_id=0", "--out", a_file]
    assert_one_line_error(*run_cli(argv, capsys), a_file)


def test_data_stats_output_is_a_file(docs, a_file, capsys):
    argv = ["data", "stats", "--documents", docs, "--out", a_file, "--no-plots", "--no-langid"]
    assert_one_line_error(*run_cli(argv, capsys), a_file)


def test_dedup_state_is_a_file(docs, a_file, capsys):
    assert_one_line_error(*run_cli(["data", "dedup", "--documents", docs, "--state", a_file], capsys), a_file)


def test_train_tokenizer_output_is_a_file(docs, a_file, capsys):
    argv = ["data", "train-tokenizer", "--documents", docs, "--vocab-size", "300", "--out", a_file]
    assert_one_line_error(*run_cli(argv, capsys), a_file)


def test_train_tokenizer_negative_min_frequency(docs, tmp_path, capsys):
    argv = ["data", "train-tokenizer", "--documents", docs, "--vocab-size", "300", "--out", tmp_path / "tok",
            "--min-frequency", "-1"]
    assert_one_line_error(*run_cli(argv, capsys), "min_frequency")
    assert not (tmp_path / "tok").exists()


def test_stats_negative_top_k(docs, tmp_path, capsys):
    argv = ["data", "stats", "--documents", docs, "--out", tmp_path / "stats", "--top-k", "-1", "--no-plots",
            "--no-langid"]
    assert_one_line_error(*run_cli(argv, capsys), "--top-k")


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "-1"), ("--temperature", "-0.5"), ("--top-k", "0"),
                                         ("--top-p", "0"), ("--top-p", "1.5")])
def test_generate_rejects_bad_sampling_args(tmp_path, flag, value, capsys):
    argv = ["generate", tmp_path / "model", "--prompt", "hi", flag, value]
    assert_one_line_error(*run_cli(argv, capsys), flag)


@pytest.mark.parametrize("device", ["nosuch", "cuda:999"])
def test_generate_rejects_unusable_device(tmp_path, device, capsys):
    argv = ["generate", tmp_path / "model", "--prompt", "hi", "--device", device]
    assert_one_line_error(*run_cli(argv, capsys), f"device {device!r}")


def test_checkpoint_list_missing_run_dir(tmp_path, capsys):
    assert_one_line_error(*run_cli(["checkpoint", "list", tmp_path / "nope"], capsys),
                          f"run directory not found: {tmp_path / 'nope'}")


def test_checkpoint_list_run_without_checkpoints(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step00000002").mkdir()  # interrupted: no meta.json
    # Not just any error naming the run: one that says no checkpoint is complete (the interrupted one is not).
    assert_one_line_error(*run_cli(["checkpoint", "list", tmp_path / "run"], capsys),
                          f"no complete checkpoints in {tmp_path / 'run' / 'checkpoints'}")


def test_train_nproc_zero(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nmax_steps: 1\n")
    assert_one_line_error(*run_cli(["train", config, "--nproc", "0"], capsys), "--nproc")


@pytest.mark.parametrize("setting, mention", [
    ("data:\n  paths: []\n", "data.paths"),
    ("data:\n  paths: [t]\n  sequence_length: 64\n", "2048 x 8 = 16384 tokens"),  # needs the world size
    ("data:\n  paths: [missing_tokens]\n  sequence_length: 64\nglobal_batch_size: 16384\n", "missing_tokens"),
])
def test_train_nproc_refuses_before_launching_workers(tmp_path, setting, mention, capsys, monkeypatch):
    # One line from the launcher, not one per worker plus torchrun's traceback.
    monkeypatch.chdir(tmp_path)
    launched = []
    monkeypatch.setattr("lmforge.train.distributed.launch_torchrun", lambda *a, **k: launched.append(a) or 0)
    config = tmp_path / "train.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nmax_steps: 1\n{setting}")
    assert_one_line_error(*run_cli(["train", config, "--nproc", "8"], capsys), mention)
    assert not launched


def write_train_config(docs, tmp_path):
    """Token files from `docs` and a one-step training config for a very small model on them."""
    assert main(["data", "tokenize", "--documents", str(docs), "--tokenizer", "olmo", "--out", str(tmp_path / "tok"),
                 "--quiet"]) == 0
    config = tmp_path / "train.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  paths: [{tmp_path / 'tok'}]\n  sequence_length: 8\n"
                      "model:\n  preset: olmo2-tiny\n  vocab_from_tokenizer: true\n"
                      "  overrides: {n_layers: 1, d_model: 32, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}\n"
                      "global_batch_size: 16\nmicro_batch_size: 16\nmax_steps: 1\ncheckpoint: {interval: 1}\n")
    return config


@requires_olmo_tokenizer
@pytest.mark.parametrize("override", ["max_steps=-1", "max_steps=0"])
def test_train_non_positive_max_steps(docs, tmp_path, override, capsys):
    config = write_train_config(docs, tmp_path)
    capsys.readouterr()
    assert_one_line_error(*run_cli(["train", config, override], capsys), "max_steps")
    assert not (tmp_path / "run" / "checkpoints").exists()


@requires_olmo_tokenizer
def test_inspect_counts_unreadable_batch_lines(docs, tmp_path, capsys):
    assert main(["train", str(write_train_config(docs, tmp_path))]) == 0
    batches = tmp_path / "run" / "batches.jsonl"
    batches.write_text("not json\n" + batches.read_text(encoding="utf-8").replace('"step": 1', '"step": 1,'))
    capsys.readouterr()
    code, err = run_cli(["data", "inspect", "--run", tmp_path / "run", "--step", "1"], capsys)
    assert_one_line_error(code, err, batches, "skipped 2 unreadable lines, first line 1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run with one complete checkpoint (trained in memory: no token files needed)."""
    from train_utils import array_loader_factory, random_tokens, tiny_config

    from lmforge.train.trainer import Trainer

    run = tmp_path_factory.mktemp("run")
    config = tiny_config(run, **{"max_steps": 1, "checkpoint.interval": 1, "global_batch_size": 2 * 32})
    Trainer(config, loader_factory=array_loader_factory(random_tokens(2_000), 32)).fit()
    return run


def copy_of(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    return tmp_path / "run", checkpoint


def test_checkpoint_export_garbage_weights(run_dir, tmp_path, capsys):
    run, checkpoint = copy_of(run_dir, tmp_path)
    for shard in (checkpoint / "model_and_optim").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    code, err = run_cli(["checkpoint", "export", run, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, checkpoint / "model_and_optim")
    assert not (tmp_path / "out").exists()


def test_soup_checkpoint_without_dcp_metadata(run_dir, tmp_path, capsys):
    run, checkpoint = copy_of(run_dir, tmp_path)
    (checkpoint / "model_and_optim" / ".metadata").unlink()
    code, err = run_cli(["soup", checkpoint, run_dir / "checkpoints" / checkpoint.name, "--out", tmp_path / "out"],
                        capsys)
    assert_one_line_error(code, err, checkpoint / "model_and_optim" / ".metadata")


def test_checkpoint_list_meta_not_an_object(run_dir, tmp_path, capsys):
    run, checkpoint = copy_of(run_dir, tmp_path)
    (checkpoint / "meta.json").write_text("[1, 2]")
    assert_one_line_error(*run_cli(["checkpoint", "list", run], capsys), checkpoint / "meta.json")


@pytest.mark.parametrize("content", ["[1, 2]", "5"])
def test_model_dir_config_not_an_object(tmp_path, content, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(content)
    argv = ["export", "hf", tmp_path / "model", "--out", tmp_path / "out"]
    assert_one_line_error(*run_cli(argv, capsys), tmp_path / "model" / "config.json")


@pytest.mark.parametrize("config", [[1], {"model_type": "olmo2", "hidden_size": "abc", "num_hidden_layers": 1,
                                          "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 128}])
def test_import_hf_bad_config(tmp_path, config, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    argv = ["import", "hf", tmp_path / "hf", "--out", tmp_path / "out"]
    assert_one_line_error(*run_cli(argv, capsys), tmp_path / "hf" / "config.json")


def test_import_hf_corrupt_shard_index(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        {"model_type": "olmo2", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 128}))
    (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    argv = ["import", "hf", tmp_path / "hf", "--out", tmp_path / "out"]
    assert_one_line_error(*run_cli(argv, capsys), tmp_path / "hf" / "model.safetensors.index.json")


@pytest.fixture
def dedup_state(docs, tmp_path):
    """A dedup state directory built from `docs` (CURRENT naming a generation that holds state.json,
    documents.npy, paragraphs.bloom)."""
    state = tmp_path / "state"
    assert main(["data", "dedup", "--documents", str(docs), "--state", str(state), "--name", "first"]) == 0
    return state


@pytest.mark.parametrize("name, damage", [("state.json", b"{x"), ("documents.npy", b"junk"),
                                          ("paragraphs.bloom", None), ("CURRENT", b"gen-x\n")])
def test_dedup_corrupt_state(docs, dedup_state, name, damage, capsys):
    generation = dedup_state if name == "CURRENT" else dedup_state / (dedup_state / "CURRENT").read_text().strip()
    path = generation / name
    path.write_bytes(damage if damage is not None else path.read_bytes()[:1001])  # None: truncated mid-word
    capsys.readouterr()
    code, err = run_cli(["data", "dedup", "--documents", docs, "--state", dedup_state, "--name", "again"], capsys)
    assert_one_line_error(code, err, path)


def test_eval_task_file_malformed_yaml(tmp_path, capsys):
    task = tmp_path / "task.yaml"
    task.write_text("name: [unclosed\n")
    code, err = run_cli(["eval", tmp_path / "model", "--tasks", task], capsys)
    assert_one_line_error(code, err, task, "line 2")


@requires_olmo_tokenizer
def test_eval_ppl_reports_skipped_lines(docs, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["model", "init", "olmo2-tiny", "n_layers=1", "d_model=32", "n_heads=2", "n_kv_heads=2", "mlp_hidden_size=64",
                 "--out", str(model), "--tokenizer", "olmo"]) == 0
    with open(docs, "a") as f:
        f.write('{"id": "broken", "text": \n')
    capsys.readouterr()
    assert main(["eval", str(model), "--ppl", str(docs), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "| 5 |" in captured.out.replace("  ", " ")  # the five good documents were scored
    assert "skipped 1 unreadable lines" in captured.err and f"{docs}:6" in captured.err


@requires_olmo_tokenizer
def test_resume_from_corrupt_rank_state(docs, tmp_path, capsys):
    config = write_train_config(docs, tmp_path)
    assert main(["train", str(config)]) == 0
    (rank_file,) = (tmp_path / "run" / "checkpoints").glob("step*/train/rank0.pt")
    rank_file.write_bytes(b"junk")
    capsys.readouterr()
    assert_one_line_error(*run_cli(["train", config, "max_steps=2"], capsys), rank_file)


def test_dedup_read_only_without_state(docs, tmp_path, capsys):
    code, err = run_cli(["data", "dedup", "--documents", docs, "--state", tmp_path / "nope", "--read-only"], capsys)
    assert_one_line_error(code, err, tmp_path / "nope" / "state.json")
    assert not (tmp_path / "attributes").exists()


@pytest.mark.parametrize("command", [["data", "mix"], ["train"]])
def test_config_not_utf8(tmp_path, command, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xff\xfe seed: 1\n")
    assert_one_line_error(*run_cli([*command, config], capsys), config, "UTF-8")


@pytest.mark.parametrize("seq_len", ["0", "-5"])
def test_model_info_non_positive_seq_len(seq_len, capsys):
    assert_one_line_error(*run_cli(["model", "info", "olmo2-tiny", "--seq-len", seq_len], capsys), "--seq-len")


NOT_UTF8 = b"\xff\xfe{}\n"


@pytest.mark.parametrize("kind", ["model", "hf"])
def test_config_json_not_utf8(tmp_path, kind, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_bytes(NOT_UTF8)
    argv = (["export", "hf", tmp_path / "in", "--out", tmp_path / "out"] if kind == "model"
            else ["import", "hf", tmp_path / "in", "--out", tmp_path / "out"])
    assert_one_line_error(*run_cli(argv, capsys), tmp_path / "in" / "config.json")


def test_checkpoint_meta_not_utf8(run_dir, tmp_path, capsys):
    run, checkpoint = copy_of(run_dir, tmp_path)
    (checkpoint / "meta.json").write_bytes(NOT_UTF8)
    assert_one_line_error(*run_cli(["checkpoint", "list", run], capsys), checkpoint / "meta.json")


def test_stats_count_file_not_utf8(docs, tmp_path, capsys):
    count_file = tmp_path / "strings.txt"
    count_file.write_bytes(NOT_UTF8)
    argv = ["data", "stats", "--documents", docs, "--out", tmp_path / "stats", "--count-file", count_file,
            "--no-plots", "--no-langid"]
    assert_one_line_error(*run_cli(argv, capsys), count_file, "UTF-8")


@pytest.mark.parametrize("name, where", [("task.yaml", ""), ("task.jsonl", ":2")])
def test_eval_task_file_not_utf8(tmp_path, name, where, capsys):
    task = tmp_path / name
    task.write_bytes(b'{"context": "q", "choices": ["a", "b"], "gold": 0}\n' + NOT_UTF8 if where else NOT_UTF8)
    code, err = run_cli(["eval", tmp_path / "model", "--tasks", task], capsys)
    assert_one_line_error(code, err, f"{task}{where}", "UTF-8")


@requires_olmo_tokenizer
def test_tokenizer_larger_than_embedding(docs, tmp_path, capsys):
    import shutil

    from lmforge.tokens.tokenizer import Tokenizer, resolve_tokenizer_path

    model = tmp_path / "model"
    assert main(["model", "init", "olmo2-tiny", "n_layers=1", "d_model=32", "n_heads=2", "n_kv_heads=2",
                 "mlp_hidden_size=64", "vocab_size=256", "eos_token_id=0", "pad_token_id=1", "--out", str(model)]) == 0
    capsys.readouterr()
    olmo = resolve_tokenizer_path("olmo")
    # The message names the tokenizer and both sizes (the tokenizer's path alone contains "olmo", so any error
    # about loading it would have matched a bare "olmo").
    too_big = (f"has {Tokenizer.load(olmo).vocab_size} tokens", "embedding has 256 rows")
    assert_one_line_error(*run_cli(["generate", model, "--prompt", "hi", "--tokenizer", "olmo"], capsys),
                          olmo, *too_big)
    shutil.copy(olmo, model / "tokenizer.json")
    assert_one_line_error(*run_cli(["eval", model, "--ppl", docs], capsys), model / "tokenizer.json", *too_big)


@requires_olmo_tokenizer
def test_train_model_vocab_smaller_than_tokenizer(docs, tmp_path, capsys):
    config = write_train_config(docs, tmp_path)
    capsys.readouterr()
    argv = ["train", config, "model.vocab_from_tokenizer=false", "model.overrides.vocab_size=256",
            "model.overrides.eos_token_id=0", "model.overrides.pad_token_id=1"]
    assert_one_line_error(*run_cli(argv, capsys), tmp_path / "tok" / "tokenizer", "256 rows")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("weights", [["nan", "1"], ["inf", "1"]])
def test_soup_non_finite_weights(run_dir, tmp_path, weights, capsys):
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    argv = ["soup", checkpoint, checkpoint, "--weights", *weights, "--out", tmp_path / "soup"]
    assert_one_line_error(*run_cli(argv, capsys), "finite")
    assert not (tmp_path / "soup").exists()


def test_generate_nan_temperature(tmp_path, capsys):
    argv = ["generate", tmp_path / "model", "--prompt", "hi", "--temperature", "nan"]
    assert_one_line_error(*run_cli(argv, capsys), "--temperature")


@pytest.mark.parametrize("command", ["tag", "dedup", "stats"])
def test_curation_workers_must_be_positive(tmp_path, capsys, command):
    argv = ["data", command, "--documents", tmp_path / "*.jsonl", "--workers", "0"]
    assert_one_line_error(*run_cli(argv, capsys), "--workers", "'executor.workers' = 0: must be at least 1")


@pytest.mark.parametrize("preset, override, field", [
    ("olmo3-tiny", "sliding_window=1000", "sliding_window"),  # window larger than the 512-token context
    ("olmoe-tiny", "moe_top_k=9", "moe_top_k"),  # top-k above the 8 experts
    ("olmo3-tiny", "n_kv_heads=3", "n_kv_heads"),  # 4 heads are not divisible by 3 KV heads
    ("olmo3-tiny", "yarn_factor=0.5", "yarn_factor"),  # YaRN cannot shrink the context
])
def test_model_options_out_of_range(preset, override, field, capsys):
    value = override.split("=")[1]
    assert_one_line_error(*run_cli(["model", "info", preset, override], capsys), f"model.{field}", value)


def test_import_hf_olmo3_with_an_inexpressible_layer_pattern(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    config = {"model_type": "olmo3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 96, "vocab_size": 384, "layer_types": ["full_attention", "sliding_attention"]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    argv = ["import", "hf", tmp_path / "hf", "--out", tmp_path / "out"]
    assert_one_line_error(*run_cli(argv, capsys), tmp_path / "hf" / "config.json", "layer_types")
