"""Peak memory and wall time of every stage on ONE long document (1, 10, 50 MB of UTF-8 text).

    .venv/bin/python benchmarks/bench_long_documents.py [--sizes 1 10 50] [--stages tag:gopher tokenize ppl]
        [--src OTHER_CHECKOUT/src] [--max-document-bytes N] [--work DIR]

The document is ../shared/corpus text (`--corpus`) (its documents taken round-robin across shards, joined by blank lines)
when that corpus exists, else words drawn from a seeded Zipf vocabulary with punctuation and newlines
(`--generated` forces this). Each stage runs as its own subprocess (`python -m lmforge ...`, with `--src` first
on PYTHONPATH, so another checkout can be measured with the same script); peak RSS is the stage's
`ru_maxrss` (RUSAGE_CHILDREN of a small launcher process, descendants included). Stages: `tag:<tagger>` for gopher, c4, pii, langid,
langid_paragraph, repetition, code and fasttext (lid.176 as the classifier); `tokenize` (OLMo tokenizer when
installed); `ppl` (`eval --ppl` of a 2-layer d=32 model with a 512-token byte-level BPE and a 256-token context).
`--timeout` (seconds per stage) stops a stage and reports it as timed out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

REPO = Path(__file__).resolve().parents[1]
TAGGERS = ("gopher", "c4", "pii", "langid", "langid_paragraph", "repetition", "code", "fasttext")
STAGES = (*(f"tag:{t}" for t in TAGGERS), "tokenize", "ppl")
PUNCTUATION = (".", ",", ";", ":", "?", "!", "")


def corpus_text(corpus: Path, target_bytes: int) -> str:
    """Corpus documents, one from each shard in turn, joined by blank lines, cut at target_bytes."""
    shards = []
    for path in sorted(corpus.glob("*.jsonl.zst")):
        with open(path, "rb") as f:
            shards.append([json.loads(line)["text"]
                           for line in zstandard.ZstdDecompressor().stream_reader(f).read().splitlines()])
    parts, size, i = [], 0, 0
    while size < target_bytes:
        text = shards[i % len(shards)][(i // len(shards)) % len(shards[i % len(shards)])]
        parts.append(text)
        size += len(text.encode("utf-8")) + 2
        i += 1
    return "\n\n".join(parts).encode("utf-8")[:target_bytes].decode("utf-8", errors="ignore")


def generated_text(target_bytes: int, seed: int = 0) -> str:
    """Zipf-distributed words from a seeded 50 000-word vocabulary, sentences of 5..30 words, paragraphs of
    1..8 sentences; ASCII, so characters equal bytes."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    vocab = ["".join(chr(c) for c in rng.choice(letters, size=int(rng.integers(1, 12)))) for _ in range(50_000)]
    out, size = [], 0
    while size < target_bytes:
        n = int(rng.integers(5, 31))
        words = [vocab[min(int(r), len(vocab)) - 1] for r in rng.zipf(1.3, size=n)]
        words[0] = words[0].capitalize()
        sentence = " ".join(words) + str(rng.choice(PUNCTUATION[:1] * 6 + PUNCTUATION[4:6]))
        sentence += "\n\n" if rng.random() < 0.15 else " "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:target_bytes]


def write_document(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"id": path.name.split(".")[0], "text": text, "source": "long"}, ensure_ascii=False)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        f.write(line + "\n")


# Measures its command from a small process: a child's ru_maxrss counts the memory it inherited at fork, so
# forking the stage from this script (which holds the document) would report at least this script's size.
MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run(cmd: list[str], env: dict, timeout: float) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB of the stage and its descendants, exit code; -9 on timeout)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", MEASURE, *cmd], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return time.perf_counter() - started, float("nan"), -9
    wall = time.perf_counter() - started
    lines = err.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 and len(lines) > 1:
        print(f"    stderr: {lines[-2]}", file=sys.stderr)
    return wall, int(lines[-1]) / 1024, proc.returncode


def prepare_model(work: Path, python: list[str], env: dict, text: str) -> Path:
    """A 512-token BPE trained on the start of the document and a 2-layer model using it (built once)."""
    model = work / "ppl-model"
    if (model / "model.safetensors").is_file():
        return model
    sample = work / "sample" / "documents" / "sample.jsonl.gz"
    chunk = 20_000
    write_sample = [{"id": f"s{i}", "text": text[i * chunk:(i + 1) * chunk]} for i in range(50)]
    sample.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(sample, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in write_sample if d["text"])
    subprocess.run([*python, "data", "train-tokenizer", "--documents", str(sample), "--vocab-size", "512",
                    "--out", str(work / "ppl-tokenizer")], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*python, "model", "init", "olmo2-tiny", "--out", str(model), "--tokenizer",
                    str(work / "ppl-tokenizer"), "--seed", "0", "d_model=32", "n_heads=2", "n_kv_heads=2",
                    "n_layers=2", "mlp_hidden_size=64", "max_sequence_length=256", "vocab_size=512",
                    "eos_token_id=0", "pad_token_id=1"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return model


def olmo_tokenizer_installed(python: list[str], env: dict) -> bool:
    probe = "from lmforge.tokens.tokenizer import resolve_tokenizer_path as r; r('olmo')"
    return subprocess.run([python[0], "-c", probe], env=env, capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50], help="document sizes in MB (1e6 bytes)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--src", default=str(REPO / "src"), help="the lmforge sources to measure")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--work", default="/tmp/bench_long_documents")
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    parser.add_argument("--generated", action="store_true", help="generated text even when the corpus exists")
    parser.add_argument("--max-document-bytes", type=int, default=None,
                        help="pass max_document_bytes=N to `data tag` (0: no limit); default: the code's own")
    parser.add_argument("--ppl-stride", type=int, default=None,
                        help="pass --ppl-stride N to `eval` (the original code takes no stride: disjoint windows)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    work = Path(args.work)
    # One thread each: on a shared 2-core machine torch's second thread turned a 37 ms forward into 550 ms.
    env = dict(os.environ, PYTHONPATH=args.src, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    python = [args.python, "-m", "lmforge"]
    corpus = Path(args.corpus)
    source = "generated" if args.generated or not corpus.is_dir() else str(corpus)
    largest = int(max(args.sizes) * 1e6)
    full_text = generated_text(largest) if source == "generated" else corpus_text(corpus, largest)
    tokenizer = "olmo" if olmo_tokenizer_installed(python, env) else None
    rows = []
    for mb in args.sizes:
        text = full_text.encode("utf-8")[:int(mb * 1e6)].decode("utf-8", errors="ignore")
        doc = work / f"{mb:g}mb" / "documents" / f"long-{mb:g}mb.jsonl.gz"
        write_document(doc, text)
        for stage in args.stages:
            if stage.startswith("tag:"):
                name = stage[4:]
                cmd = [*python, "data", "tag", "--documents", str(doc), "--taggers", name, "--overwrite",
                       "--workers", "1", "--no-progress"]
                if name == "fasttext":
                    probe = "from lmforge.curation.taggers.language import lid176_path as p; print(p())"
                    model = subprocess.run([args.python, "-c", probe], env=env, capture_output=True, text=True)
                    cmd += ["--tagger-option", f"fasttext.model={model.stdout.strip()}"]
                if args.max_document_bytes is not None:
                    cmd.append(f"max_document_bytes={args.max_document_bytes}")
            elif stage == "tokenize":
                tok = tokenizer or str(work / "ppl-tokenizer")
                if tokenizer is None:
                    prepare_model(work, python, env, full_text)
                cmd = [*python, "data", "tokenize", "--documents", str(doc), "--tokenizer", tok,
                       "--out", str(work / f"{mb:g}mb" / "tokens"), "--workers", "1", "--no-progress"]
            else:
                model = prepare_model(work, python, env, full_text)
                cmd = [*python, "eval", str(model), "--ppl", str(doc), "--device", "cpu", "--no-progress",
                       "--batch-size", "16"] + (["--ppl-stride", str(args.ppl_stride)] if args.ppl_stride else [])
            wall, rss, code = run(cmd, env, args.timeout)
            status = "ok" if code == 0 else ("timeout" if code == -9 else f"exit {code}")
            rows.append((f"{mb:g}", stage, wall, rss, status))
            print(f"{mb:g} MB  {stage:22s} {wall:8.1f} s  {rss:8.0f} MiB  {status}", flush=True)
    print(f"\nsource: {source}; sources measured: {args.src}; tokenize tokenizer: {tokenizer or 'trained 512 BPE'}")
    print("\n| MB | stage | wall s | peak RSS MiB | status |\n|---|---|---|---|---|")
    for mb, stage, wall, rss, status in rows:
        print(f"| {mb} | {stage} | {wall:.1f} | {rss:.0f} | {status} |")


if __name__ == "__main__":
    main()
