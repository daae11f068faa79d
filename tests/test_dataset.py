"""Training data: instances vs a brute-force chunking, global order independent of world/batch size, exact
resume, mixture shares, fingerprint checks, the repeated n-gram filter vs brute force, lineage, bad input."""

from __future__ import annotations

import csv
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.tokens.dataset import DataConfig, SourceConfig
from lmforge.tokens.instance_filter import InstanceFilterConfig, has_repeated_ngram
from lmforge.tokens.lineage import BatchLog, batch_instances, write_run_data_record
from lmforge.tokens.loader import epoch_order
from lmforge.tokens.tokenize import TokenizeConfig, sidecar_metadata, tokenize
from lmforge.tokens.tokenizer import train_bpe


def write_token_file(path, docs: list[np.ndarray], sources: list[str] | None = None, dtype: str = "uint16"):
    """A token file plus lmforge sidecar, written directly (not through `data tokenize`)."""
    tokens = np.concatenate(docs).astype(dtype)
    tokens.tofile(path)
    ends = np.cumsum([len(d) for d in docs])
    starts = np.concatenate([[0], ends[:-1]])
    name = path.name[:-4]
    table = pa.table({
        "id": [f"{name}-doc{i}" for i in range(len(docs))],
        "source": sources or [name] * len(docs),
        "start": pa.array(starts, pa.int64()), "end": pa.array(ends, pa.int64()),
        "line": pa.array(np.arange(1, len(docs) + 1), pa.int64()),
    }).replace_schema_metadata(sidecar_metadata(dtype=dtype, eos_id=0, bos_id=None, vocab_size=65536,
                                                shard=f"{name}.jsonl"))
    pq.write_table(table, str(path)[:-4] + ".docs.parquet")
    return tokens


def _split(values: np.ndarray, rng, max_len=40) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, len(values)), size=len(values) // 15, replace=False))
    return [d for d in np.split(values, cuts) if len(d)]


@pytest.fixture
def files(tmp_path):
    """Three token files whose token values encode their stream position (file f holds f*10000 + i)."""
    rng = np.random.default_rng(0)
    streams, doc_ends, offset = [], [], 0
    for f, n in enumerate((523, 310, 777)):
        values = (f * 10_000 + np.arange(n)).astype(np.uint16)
        docs = _split(values, rng)
        write_token_file(tmp_path / f"part-{f}.npy", docs)
        streams.append(values)
        doc_ends.extend(offset + np.cumsum([len(d) for d in docs]))
        offset += n
    return {"dir": tmp_path, "stream": np.concatenate(streams).astype(np.int64), "doc_ends": np.array(doc_ends)}


def test_instances_are_chunks_of_the_concatenated_stream(files):
    L = 64
    ds = DataConfig(paths=[str(files["dir"] / "*.npy")], sequence_length=L, document_boundaries=True).build()
    stream = files["stream"]
    assert len(ds) == len(stream) // L
    for k in range(len(ds)):
        window = stream[k * L:(k + 1) * L]
        assert ds.instance_tokens(k).tolist() == window.tolist()
        # Document boundaries: every document end strictly inside the window (brute force).
        cuts = [k * L] + [e for e in files["doc_ends"] if k * L < e < (k + 1) * L] + [(k + 1) * L]
        assert ds.instance_document_lengths(k) == np.diff(cuts).tolist()
    loader = ds.loader(4, prefetch_batches=0)
    batch = next(loader)
    ids = batch["instance_ids"].tolist()
    assert batch["input_ids"].tolist() == [stream[i * L:(i + 1) * L].tolist() for i in ids]
    lens = [ds.instance_document_lengths(i) for i in ids]
    flat = [x for row in lens for x in row]
    assert batch["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(flat)]).tolist()
    assert batch["doc_lens"].sum(dim=1).tolist() == [L] * 4
    assert batch["max_doc_len"] == max(flat)


def _global_sequence(dataset, batch_schedule, world_size, state=None, epochs=None):
    """Instance ids in global order for a list of global batch sizes, gathering every rank's part."""
    loaders = [dataset.loader(batch_schedule[0], rank=r, world_size=world_size, prefetch_batches=2)
               for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for size in batch_schedule:
        parts = []
        for loader in loaders:
            loader.set_global_batch_instances(size)
            batch = next(loader)
            parts.append(batch["instance_ids"].tolist())
            assert batch["input_ids"].shape == (size // world_size, dataset.sequence_length)
        out.append([i for p in parts for i in p])
    state = loaders[0].state_dict()
    for loader in loaders:
        loader.close()
    return out, state


def test_order_independent_of_world_size_and_batch_size(files):
    ds = DataConfig(paths=[str(files["dir"])], sequence_length=16, seed=5).build()
    n = len(ds)
    order0 = epoch_order(n, 5, 0, ds.fingerprint)
    assert sorted(order0.tolist()) == list(range(n))
    a, _ = _global_sequence(ds, [8] * 6, world_size=1)
    b, _ = _global_sequence(ds, [8] * 6, world_size=4)
    c, _ = _global_sequence(ds, [4] * 12, world_size=2)
    flat = [i for batch in a for i in batch]
    assert a == b
    assert flat == [i for batch in c for i in batch] == order0[:48].tolist()
    order1 = epoch_order(n, 5, 1, ds.fingerprint)
    assert sorted(order1.tolist()) == list(range(n)) and order1.tolist() != order0.tolist()
    # The second epoch starts after the last full batch of the first one and uses the new permutation.
    per_epoch = n // 16
    batches, state = _global_sequence(ds, [16] * (per_epoch + 2), world_size=2)
    assert batches[per_epoch] == order1[:16].tolist()
    assert state["epoch"] == 1 and state["instances_consumed"] == 32
    # max_epochs ends the iteration after that many epochs of full batches.
    loader = ds.loader(16, max_epochs=2, prefetch_batches=1)
    assert sum(1 for _ in loader) == 2 * per_epoch
    assert loader.state_dict()["epoch"] == 1 and loader.batches_in_epoch() == per_epoch


def test_exact_resume_after_world_size_and_batch_size_change(files):
    ds = DataConfig(paths=[str(files["dir"])], sequence_length=16, seed=1).build()
    uninterrupted, _ = _global_sequence(ds, [8] * 8, world_size=2)
    first, state = _global_sequence(ds, [8] * 3, world_size=2)
    assert state["instances_consumed"] == 24 and state["tokens_consumed"] == 24 * 16
    # Resume on 4 ranks, same batch size: the very same batches.
    resumed, _ = _global_sequence(ds, [8] * 5, world_size=4, state=json.loads(json.dumps(state)))
    assert first + resumed == uninterrupted
    # Resume on 1 rank with batches of 4 then 12: the same instances in the same order.
    rebuilt = DataConfig(paths=[str(files["dir"])], sequence_length=16, seed=1).build()
    resumed2, _ = _global_sequence(rebuilt, [4, 4, 12, 4, 8, 8], world_size=1, state=state)
    flat = lambda batches: [i for b in batches for i in b]  # noqa: E731
    assert flat(first) + flat(resumed2) == flat(uninterrupted)


def test_fingerprint_mismatch_refused(files, tmp_path):
    ds = DataConfig(paths=[str(files["dir"])], sequence_length=16).build()
    state = ds.loader(4).state_dict()
    for changed in (DataConfig(paths=[str(files["dir"])], sequence_length=32),
                    DataConfig(paths=[str(files["dir"] / "part-0.npy")], sequence_length=16),
                    DataConfig(paths=[str(files["dir"])], sequence_length=16, seed=9)):
        with pytest.raises(LmforgeError, match="fingerprint"):
            changed.build().loader(4).load_state_dict(state)
    # Same files in another folder: same fingerprint, so a moved dataset still resumes.
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in files["dir"].glob("part-*"):
        (moved / p.name).write_bytes(p.read_bytes())
    DataConfig(paths=[str(moved)], sequence_length=16).build().loader(4).load_state_dict(state)


def _source_sets(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_token_file(a / "a.npy", [np.arange(1000, dtype=np.uint16)])
    write_token_file(b / "b.npy", [np.arange(20_000, 24_000, dtype=np.uint16)])
    return a, b


def test_mixture_down_and_up_sampling(tmp_path):
    a, b = _source_sets(tmp_path)
    mixture = {"a": SourceConfig(paths=[str(a)], share=0.5), "b": SourceConfig(paths=[str(b)], share=0.5)}
    down = DataConfig(mixture=mixture, sequence_length=10, seed=3).build()
    first = [int(down.instance_tokens(i)[0]) for i in range(len(down))]
    from_a = [t for t in first if t < 20_000]
    from_b = [t for t in first if t >= 20_000]
    assert len(from_a) == 100 and sorted(from_a) == list(range(0, 1000, 10))  # all of a, once
    assert len(from_b) == 100 and len(set(from_b)) == 100  # a quarter of b, no repeats
    up = DataConfig(mixture=mixture, mixture_tokens=8000, sequence_length=10, seed=3).build()
    first = [int(up.instance_tokens(i)[0]) for i in range(len(up))]
    from_a = [t for t in first if t < 20_000]
    from_b = [t for t in first if t >= 20_000]
    assert len(from_a) == 400 and all(from_a.count(t) == 4 for t in range(0, 1000, 10))  # a repeated 4x
    assert len(from_b) == 400 and len(set(from_b)) == 400
    skewed = DataConfig(mixture={"a": SourceConfig(paths=[str(a)], share=0.2),
                                 "b": SourceConfig(paths=[str(b)], share=0.8)}, sequence_length=10).build()
    assert skewed.summary()["sources"]["a"]["instances"] * 4 == skewed.summary()["sources"]["b"]["instances"]
    # Another seed picks another subset of b (the fingerprint holds the seed whatever the subset is, so
    # compare the instances themselves); the same seed picks the same subset again.
    def b_subset(ds):
        return sorted(int(ds.instance_tokens(i)[0]) for i in range(len(ds)) if ds.instance_tokens(i)[0] >= 20_000)

    other = DataConfig(mixture=mixture, sequence_length=10, seed=4).build()
    assert other.fingerprint != down.fingerprint
    assert len(b_subset(other)) == 100 and b_subset(other) != b_subset(down)
    assert b_subset(DataConfig(mixture=mixture, sequence_length=10, seed=3).build()) == b_subset(down)
    with pytest.raises(LmforgeError, match="repeated 8.00 times"):
        DataConfig(mixture=mixture, mixture_tokens=16_000, sequence_length=10).build()


def test_mixture_by_document_source_field(tmp_path):
    docs = [np.full(7, 100 + i, dtype=np.uint16) for i in range(30)]
    names = ["web" if i % 3 else "code" for i in range(30)]
    write_token_file(tmp_path / "mixed.npy", docs, sources=names)
    ds = DataConfig(paths=[str(tmp_path)], mixture={"web": SourceConfig(), "code": SourceConfig()},
                    sequence_length=5).build()
    web_values = {100 + i for i in range(30) if names[i] == "web"}
    for i in range(len(ds)):
        values = set(ds.instance_tokens(i).tolist())
        source = ds.sources[int(ds.source_of[i])].name
        assert values <= web_values if source == "web" else not values & web_values
    assert ds.summary()["sources"]["code"]["instances"] == 10 * 7 // 5
    with pytest.raises(LmforgeError, match="'books' has no documents.*sources found there: code, web"):
        DataConfig(paths=[str(tmp_path)], mixture={"books": SourceConfig(share=1.0)}, sequence_length=5).build()


def test_bad_token_files_and_configs(files, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_token_file(bad / "t.npy", [np.arange(100, dtype=np.uint16)])
    (bad / "t.npy").write_bytes((bad / "t.npy").read_bytes()[:150])
    with pytest.raises(LmforgeError, match="truncated"):
        DataConfig(paths=[str(bad)], sequence_length=8).build()
    np.arange(100, dtype=np.uint32).tofile(bad / "t.npy")
    with pytest.raises(LmforgeError, match="wrong dtype"):
        DataConfig(paths=[str(bad)], sequence_length=8).build()
    with pytest.raises(LmforgeError, match="configured dtype uint32"):
        DataConfig(paths=[str(files["dir"])], sequence_length=8, dtype="uint32").build()
    np.arange(100, dtype=np.uint16).tofile(bad / "orphan.npy")
    with pytest.raises(LmforgeError, match="no sidecar"):
        DataConfig(paths=[str(bad / "orphan.npy")], sequence_length=8).build()
    unfinished = tmp_path / "unfinished"
    (unfinished / ".progress").mkdir(parents=True)
    write_token_file(unfinished / "t.npy", [np.arange(100, dtype=np.uint16)])
    with pytest.raises(LmforgeError, match="tokenization has not finished"):
        DataConfig(paths=[str(unfinished)], sequence_length=8).build()
    with pytest.raises(LmforgeError, match="fewer than one instance"):
        DataConfig(paths=[str(files["dir"])], sequence_length=10_000).build()
    with pytest.raises(LmforgeError, match="mixture source 'wiki': no token files match"):
        DataConfig(mixture={"wiki": SourceConfig(paths=[str(tmp_path / "wiki" / "*.npy")], share=1.0)},
                   sequence_length=8).build()
    with pytest.raises(LmforgeError, match="does not split evenly"):
        DataConfig(paths=[str(files["dir"])], sequence_length=8).build().loader(6, world_size=4)


def test_dolma_token_files(tmp_path):
    """Dolma's layout: raw memmap plus `start,end,id,src,loc` rows in shuffled order; dtype given in the config."""
    docs = [np.arange(i * 10, i * 10 + 5 + i, dtype=np.uint16) for i in range(12)]
    np.concatenate(docs).tofile(tmp_path / "part-0-00000.npy")
    ends = np.cumsum([len(d) for d in docs])
    rows = [(int(e - len(d)), int(e), f"d{i}", "s3://x/documents/a.jsonl.gz", i + 1) for i, (d, e) in
            enumerate(zip(docs, ends))]
    rows = rows[::2] + rows[1::2]
    with gzip.open(tmp_path / "part-0-00000.csv.gz", "wt", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(LmforgeError, match="set dtype"):
        DataConfig(paths=[str(tmp_path)], sequence_length=8).build()
    ds = DataConfig(paths=[str(tmp_path)], sequence_length=8, dtype="uint16").build()
    stream = np.concatenate(docs)
    assert ds.instance_tokens(3).tolist() == stream[24:32].tolist()
    # doc i has 5 + i tokens: d3 covers [18, 26), d4 covers [26, 35)
    assert [d["id"] for d in ds.instance_documents(3)] == ["d3", "d4"]


def brute_force_repeated_ngram(tokens, min_period, max_period, max_count) -> bool:
    tokens = list(tokens)
    for n in range(min_period, max_period + 1):
        for i in range(len(tokens) - n + 1):
            gram = tokens[i:i + n]
            k = 1
            while tokens[i + k * n:i + (k + 1) * n] == gram:
                k += 1
            if k >= max_count:
                return True
    return False


def test_repeated_ngram_filter_vs_brute_force():
    rng = np.random.default_rng(0)
    cases = 0
    for trial in range(300):
        length = int(rng.integers(20, 120))
        tokens = rng.integers(0, 3 if trial % 2 else 50, size=length)
        if trial % 3 == 0:  # plant a run near the threshold
            period = int(rng.integers(1, 6))
            count = int(rng.integers(3, 7))
            gram = rng.integers(0, 50, size=period)
            at = int(rng.integers(0, length))
            tokens = np.concatenate([tokens[:at], np.tile(gram, count), tokens[at:]])
        lo, hi, cnt = int(rng.integers(1, 3)), int(rng.integers(3, 7)), int(rng.integers(3, 6))
        expected = brute_force_repeated_ngram(tokens, lo, hi, cnt)
        assert has_repeated_ngram(tokens, lo, hi, cnt) == expected, (tokens.tolist(), lo, hi, cnt)
        cases += expected
    assert 30 < cases < 270  # both outcomes well represented
    # OLMo 2 defaults: a 13-gram repeated 32 times is caught, 31 times is not.
    gram = np.arange(13)
    assert has_repeated_ngram(np.concatenate([[99], np.tile(gram, 32), [98]]))
    assert not has_repeated_ngram(np.concatenate([[99], np.tile(gram, 31), [98]]))
    assert not has_repeated_ngram(np.tile(np.arange(14), 40))  # period 14 is out of range


def test_filter_masks_instances_in_batches(tmp_path):
    docs = [np.arange(100, 164, dtype=np.uint16), np.full(64, 7, dtype=np.uint16), np.arange(200, 264, dtype=np.uint16)]
    write_token_file(tmp_path / "t.npy", docs)
    config = DataConfig(paths=[str(tmp_path)], sequence_length=64,
                        instance_filter=InstanceFilterConfig(enabled=True, max_count=32))
    batch = next(config.build().loader(3, prefetch_batches=0))
    repeated = batch["input_ids"][:, 0] == 7
    assert batch["instance_mask"].tolist() == (~repeated).tolist()
    assert batch["label_mask"].all(dim=1).tolist() == (~repeated).tolist()
    assert not batch["label_mask"][repeated].any()


@pytest.fixture
def tokenized_run(tmp_path):
    """Real documents through `data tokenize`, a loader, and a fake run directory written with the helpers."""
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta data model token step loss batch".split()
    docs = [{"id": f"doc-{i}", "text": " ".join(rng.choice(words, size=int(rng.integers(3, 12)))),
             "source": "web" if i % 2 else "books"} for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok_dir = tmp_path / "tok"
    train_bpe(iter([d["text"] for d in docs]), vocab_size=300).save(tok_dir)
    tokenize(TokenizeConfig(documents=[str(tmp_path / "docs.jsonl")], tokenizer=str(tok_dir),
                            out=str(tmp_path / "tokens")))
    dataset = DataConfig(paths=[str(tmp_path / "tokens")], sequence_length=32, seed=2).build()
    run = tmp_path / "run"
    write_run_data_record(run, dataset)
    loader = dataset.loader(4, rank=0, world_size=2)
    batches = []
    with BatchLog(run) as log:
        for step in range(1, 4):
            if step == 3:
                loader.set_global_batch_instances(6)
            batch = next(loader)
            log.append(step, batch)
            batches.append(batch)
    loader.close()
    return {"run": run, "dataset": dataset, "docs": {d["id"]: d for d in docs}, "batches": batches}


def test_inspect_lists_the_documents_of_a_step(tokenized_run, capsys):
    run, dataset, docs = tokenized_run["run"], tokenized_run["dataset"], tokenized_run["docs"]
    assert main(["data", "inspect", "--run", str(run), "--step", "3"]) == 0
    out = capsys.readouterr().out
    order = epoch_order(len(dataset), 2, 0, dataset.fingerprint)
    ids = order[8:14]  # steps 1 and 2 took 4 instances each, step 3 takes 6
    assert tokenized_run["batches"][2]["instance_ids"].tolist() == ids[:3].tolist()  # rank 0's half
    # Reference: the documents whose token range overlaps the instance window, from the sidecar alone.
    table = pq.read_table(next((run.parent / "tokens").glob("*.docs.parquet"))).to_pylist()
    for position, index in enumerate(ids):
        lo, hi = int(index) * 32, int(index) * 32 + 32
        expected = [r["id"] for r in table if r["start"] < hi and r["end"] > lo]
        header = f"instance {position} (rank {position // 3}): id {index},"
        assert header in out
        block = out.split(header)[1].split("\ninstance ")[0]
        assert [line.split()[0] for line in block.strip().splitlines()[1:]] == expected
    # Step 2 covers order positions 4..7; take one of its instances that holds a whole document.
    whole_docs = {}
    for position in range(4):
        index = int(order[4 + position])
        full = [d for d in dataset.instance_documents(index) if d["doc_span"] == [0, d["doc_tokens"]]]
        if full:
            whole_docs[position] = (index, full[0])
    assert whole_docs, "expected a whole document inside some 32-token window"
    position, (index, doc) = next(iter(whole_docs.items()))
    args = ["data", "inspect", "--run", str(run), "--step", "2", "--instance", str(position), "--text"]
    assert main(args) == 0
    assert f"    | {docs[doc['id']]['text']}<|endoftext|>" in capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["start"] == 4 and record["size"] == 4 and record["instances"][0]["instance_id"] == index
    pieces = record["instances"][0]["documents"]
    assert sum(d["instance_span"][1] - d["instance_span"][0] for d in pieces) == 32
    whole = next(d for d in pieces if d["id"] == doc["id"])
    assert whole["text"] == docs[whole["id"]]["text"] + "<|endoftext|>"
    assert main(["data", "inspect", "--run", str(run), "--step", "9"]) == 2
    assert "step 9 is not in" in capsys.readouterr().err


def test_run_record_refuses_another_dataset(tokenized_run, files):
    other = DataConfig(paths=[str(files["dir"])], sequence_length=16).build()
    with pytest.raises(LmforgeError, match="different dataset"):
        write_run_data_record(tokenized_run["run"], other)


def test_lineage_shard_paths_resolve_from_another_working_directory(tmp_path, monkeypatch):
    """Documents tokenized by a relative path are traced back to their shard from any working directory."""
    (tmp_path / "work" / "data").mkdir(parents=True)
    docs = [{"id": f"d{i}", "text": f"alpha beta gamma {i} " * 4, "source": "web"} for i in range(8)]
    (tmp_path / "work" / "data" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    train_bpe(iter([d["text"] for d in docs]), vocab_size=300).save(tmp_path / "tok")
    monkeypatch.chdir(tmp_path / "work")
    tokenize(TokenizeConfig(documents=["data/docs.jsonl"], tokenizer=str(tmp_path / "tok"), out="tokens"))
    write_run_data_record(tmp_path / "run", DataConfig(paths=["tokens"], sequence_length=16, seed=0).build())
    with BatchLog(tmp_path / "run") as log:
        log.append(1, {"epoch": 0, "batch_start": 0, "global_batch_instances": 2, "world_size": 1})
    shard = str(tmp_path / "work" / "data" / "docs.jsonl")
    monkeypatch.chdir(tmp_path)  # elsewhere: "data/docs.jsonl" no longer names the shard
    manifest = json.loads((tmp_path / "work" / "tokens" / "manifest.json").read_text())
    entry = manifest["shards"][0]
    assert entry["absolute_path"] == shard
    assert os.path.normpath(tmp_path / "work" / "tokens" / entry["path"]) == shard
    _, instances, _ = batch_instances(tmp_path / "run", 1)
    shards = {doc["shard"] for inst in instances for doc in inst["documents"]}
    assert shards == {shard}
    assert main(["data", "inspect", "--run", str(tmp_path / "run"), "--step", "1"]) == 0
