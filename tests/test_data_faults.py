"""Nothing lost under faults, through the CLI of every stage that reads documents (tag, dedup, mix, stats,
tokenize): a truncated compressed shard keeps every complete document before the cut and says where the stream
broke (`--strict` makes it exit 2); shards of an lmforge output directory without their completion mark are not
read; empty shards are counted; the same input and config give byte-identical outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.cli import main
from lmforge.curation.attributes import read_attributes
from lmforge.curation.documents import read_documents
from lmforge.tokens.tokenizer import train_bpe

WORDS = ("river stone cloud paper lamp window garden silver thunder maple orbit candle harbor violet ember "
         "meadow quartz falcon willow copper lantern glacier cobalt saffron tundra prism marble cedar").split()
STAGES = ("tag", "dedup", "mix", "stats", "tokenize")


def _docs(prefix: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))),
             "source": prefix} for i in range(n)]


def _jsonl(docs: list[dict]) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


def _compress(data: bytes, kind: str) -> bytes:
    if kind == "gz":
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()
    return zstandard.ZstdCompressor(level=3).compress(data)


def _complete_prefix(cut: bytes, kind: str) -> tuple[list[str], bool]:
    """Ids of the complete lines decompressed from `cut` (the peer libraries, fed the whole cut at once), and
    whether a partial line follows them."""
    d = zlib.decompressobj(31) if kind == "gz" else zstandard.ZstdDecompressor().decompressobj()
    data = d.decompress(cut)
    *lines, rest = data.split(b"\n")
    return [json.loads(line)["id"] for line in lines], rest != b""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tok")
    train_bpe(iter([" ".join(WORDS)] * 20), vocab_size=300).save(out)
    return str(out / "tokenizer.json")


def _run(capsys, argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _stage_argv(stage: str, pattern: str, tokenizer: str, root: Path) -> list[str]:
    if stage == "mix":
        (root / "mix.yaml").write_text(textwrap.dedent(f"""
            streams:
              - name: web
                documents: ["{pattern}"]
            output:
              path: mixed
        """))
        return ["data", "mix", "mix.yaml"]
    extra = {"tag": ["--taggers", "c4"], "dedup": [],
             "stats": ["--out", "stats", "--no-langid", "--no-plots"],
             "tokenize": ["--tokenizer", tokenizer, "--out", "tokens"]}[stage]
    return ["data", stage, "--documents", pattern, *extra, "--no-progress"]


def _kept(stage: str, root: Path, shard: str) -> list[str] | int:
    """The ids a stage processed from documents/<shard> (stats: how many)."""
    stem = shard.split(".")[0]
    if stage in ("tag", "dedup"):
        name = "c4" if stage == "tag" else "dedup"
        return [i for i, _ in read_attributes(root / "attributes" / name / shard)]
    if stage == "mix":
        return [d["id"] for p in sorted((root / "mixed").glob("*.jsonl.gz")) for _, d in read_documents(p)
                if d["source"] == stem]
    if stage == "stats":
        return json.loads((root / "stats/stats.json").read_text())["per_source"][stem]["documents"]
    return [r["id"] for p in sorted((root / "tokens").glob(f"{stem}-*.docs.parquet"))
            for r in pq.read_table(p).to_pylist()]


def _manifest_counts(stage: str, root: Path) -> dict:
    where = {"tag": "attributes/c4", "dedup": "attributes/dedup", "mix": "mixed", "stats": "stats",
             "tokenize": "tokens"}[stage]
    counts = json.loads((root / where / "manifest.json").read_text())["counts"]
    return counts["streams"]["web"] if stage == "mix" else counts


@pytest.mark.parametrize("kind", ["gz", "zst"])
@pytest.mark.parametrize("stage", STAGES)
def test_truncated_shard_keeps_complete_documents_and_says_where(tmp_path, capsys, monkeypatch, tokenizer,
                                                                  stage, kind):
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "documents"
    docs.mkdir()
    whole = _docs("good", 30, 1)
    (docs / f"good.jsonl.{kind}").write_bytes(_compress(_jsonl(whole), kind))
    # several zstd blocks (128 KiB of text each) before the cut, so the cut falls inside the stream
    compressed = _compress(_jsonl(_docs("cut", 1500, 2)), kind)
    cut = compressed[: int(len(compressed) * 0.6)]
    (docs / f"cut.jsonl.{kind}").write_bytes(cut)
    expected, partial = _complete_prefix(cut, kind)
    assert len(expected) > 300 and partial
    argv = _stage_argv(stage, f"documents/*.jsonl.{kind}", tokenizer, tmp_path)

    code, err = _run(capsys, [*argv, "--strict"])
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    assert f"cut.jsonl.{kind}" in lines[0] and f"after line {len(expected)}" in lines[0]
    assert f"compressed byte {len(cut)}" in lines[0]

    code, err = _run(capsys, argv)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("lmforge: warning: ")]
    assert len(warnings) == 1, err
    assert f"cut.jsonl.{kind}" in warnings[0] and f"after line {len(expected)}" in warnings[0]
    assert f"compressed byte {len(cut)}" in warnings[0]
    kept = _kept(stage, tmp_path, f"cut.jsonl.{kind}")
    assert kept == (len(expected) if stage == "stats" else expected)
    assert _kept(stage, tmp_path, f"good.jsonl.{kind}") == (30 if stage == "stats" else [d["id"] for d in whole])
    counts = _manifest_counts(stage, tmp_path)
    assert counts["truncated_files"] == 1
    skipped = counts["skipped_bad_lines" if stage == "tokenize" else "skipped_lines"]
    assert skipped == 1  # the partial last line


def _attributes_shard(root: Path, docs: list[dict], kind: str) -> Path:
    """documents/a.jsonl.<kind> with complete attributes beside it under attributes/t/."""
    (root / "documents").mkdir(parents=True)
    (root / "attributes/t").mkdir(parents=True)
    path = root / "documents" / f"a.jsonl.{kind}"
    path.write_bytes(_compress(_jsonl(docs), kind))
    # several zstd blocks (128 KiB) of attributes, as for the documents
    rows = [{"id": d["id"], "attributes": {"t__x": [[i, i + 1, 1.0] for i in range(8)]}} for d in docs]
    (root / "attributes/t" / f"a.jsonl.{kind}").write_bytes(_compress(_jsonl(rows), kind))
    return path


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_mixer_with_a_truncated_attribute_file_keeps_documents_before_the_cut(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    docs = _docs("web", 1500, 3)
    _attributes_shard(tmp_path, docs, kind)
    attr = tmp_path / "attributes/t" / f"a.jsonl.{kind}"
    cut = attr.read_bytes()[: int(attr.stat().st_size * 0.6)]
    attr.write_bytes(cut)
    expected, _ = _complete_prefix(cut, kind)
    assert 0 < len(expected) < len(docs)
    (tmp_path / "mix.yaml").write_text(textwrap.dedent(f"""
        streams:
          - name: web
            documents: ["documents/*.jsonl.{kind}"]
            attributes: [t]
        output:
          path: mixed
    """))
    code, err = _run(capsys, ["data", "mix", "mix.yaml", "--strict"])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"attributes/t/a.jsonl.{kind}" in err and f"after line {len(expected)}" in err
    code, err = _run(capsys, ["data", "mix", "mix.yaml"])
    assert code == 0 and "Traceback" not in err, err
    assert f"lmforge: warning: attributes/t/a.jsonl.{kind}" in err and f"compressed byte {len(cut)}" in err
    assert [d["id"] for p in sorted((tmp_path / "mixed").glob("*.gz")) for _, d in read_documents(p)] == expected
    counts = _manifest_counts("mix", tmp_path)
    assert counts["truncated_files"] == 1 and counts["written"] == len(expected)
    assert counts["skipped_lines"] == len(docs) - len(expected)  # documents after the cut have no attributes


def _mixed_output(root: Path, capsys) -> list[Path]:
    """A mixer output directory (mixed/) of two tasks, each of several parts."""
    (root / "documents").mkdir()
    for name, seed in (("a", 4), ("b", 5)):
        (root / "documents" / f"{name}.jsonl").write_bytes(_jsonl(_docs(name, 40, seed)))
    (root / "mix.yaml").write_text(textwrap.dedent("""
        streams:
          - name: web
            documents: ["documents/*.jsonl"]
        output:
          path: mixed
          max_size_in_bytes: 4000
    """))
    code, err = _run(capsys, ["data", "mix", "mix.yaml"])
    assert code == 0, err
    return sorted((root / "mixed").glob("*.jsonl.gz"))


@pytest.mark.parametrize("stage", STAGES)
def test_shards_without_completion_mark_are_not_read(tmp_path, capsys, monkeypatch, tokenizer, stage):
    monkeypatch.chdir(tmp_path)
    parts = _mixed_output(tmp_path, capsys)
    orphans = [p for p in parts if p.name.startswith("web-0001-")]
    assert len(orphans) > 1 and len(parts) > len(orphans)
    # a task killed after its parts got their names but before its completion mark
    (tmp_path / "mixed/.done/web-0001.json").unlink()
    (tmp_path / "mixed/manifest.json").unlink()
    root = tmp_path / "second"
    root.mkdir()
    shutil.move(str(tmp_path / "mixed"), str(root / "documents"))
    monkeypatch.chdir(root)
    argv = _stage_argv(stage, "documents/*.jsonl.gz", tokenizer, root)

    code, err = _run(capsys, [*argv, "--strict"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(p.name in err for p in orphans) and "completion mark" in err

    code, err = _run(capsys, argv)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("lmforge: warning: ")]
    assert len(warnings) == 1 and all(p.name in warnings[0] for p in orphans), err
    counts = _manifest_counts(stage, root)
    assert counts["incomplete_shards"] == len(orphans)
    documents = counts["written"] if stage == "mix" else counts["documents"]
    assert documents == 40  # task web-0000's parts: every document of a.jsonl, none of b.jsonl


@pytest.mark.parametrize("stage", STAGES)
def test_empty_shards_are_counted(tmp_path, capsys, monkeypatch, tokenizer, stage):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents/full.jsonl.gz").write_bytes(_compress(_jsonl(_docs("full", 5, 6)), "gz"))
    (tmp_path / "documents/empty.jsonl.gz").write_bytes(_compress(b"", "gz"))
    (tmp_path / "documents/zero.jsonl.gz").write_bytes(b"")
    code, err = _run(capsys, _stage_argv(stage, "documents/*.jsonl.gz", tokenizer, tmp_path))
    assert code == 0, err
    counts = _manifest_counts(stage, tmp_path)
    assert counts["empty_shards"] == 2 and counts.get("truncated_files", 0) == 0


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every output file; manifests without their time field ("created")."""
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.parts[len(root.parts)] == "documents":
            continue
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            del manifest["created"]
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def test_same_input_and_config_give_byte_identical_outputs(tmp_path, capsys, monkeypatch, tokenizer):
    source = tmp_path / "source"
    (source / "documents").mkdir(parents=True)
    for name, seed in (("a", 7), ("b", 8)):
        (source / "documents" / f"{name}.jsonl.gz").write_bytes(_compress(_jsonl(_docs(name, 60, seed)), "gz"))
    runs = []
    for run in ("one", "two"):
        # In the same place both times: outputs record the absolute paths of their inputs (lineage).
        root = tmp_path / "work"
        if root.exists():
            root.rename(tmp_path / "first")
        shutil.copytree(source, root)  # copy2: same bytes and modification times, which the .done marks record
        monkeypatch.chdir(root)
        for stage in ("tag", "dedup", "mix", "tokenize"):
            code, err = _run(capsys, _stage_argv(stage, "documents/*.jsonl.gz", tokenizer, root))
            assert code == 0, err
        code, err = _run(capsys, ["data", "tokenize", "--documents", "mixed/*.jsonl.gz", "--tokenizer", tokenizer,
                                  "--out", "mixed_tokens"])
        assert code == 0, err
        runs.append(_digests(root))
    assert runs[0] == runs[1]
    names = set(runs[0])
    assert {"attributes/c4/a.jsonl.gz", "attributes/dedup/b.jsonl.gz", "mixed/web-0000-000.jsonl.gz",
            "tokens/a-00000.npy", "mixed_tokens/web-0000-000-00000.docs.parquet"} <= names
