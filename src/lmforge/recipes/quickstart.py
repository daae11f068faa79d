"""`make quickstart`: the whole pipeline at laptop scale, through the same `lmforge` commands a user runs.

raw documents -> tagged, deduplicated, mixed corpus (+ statistics) -> BPE tokenizer -> token memmaps -> a tiny
OLMo 2 pretrained on CPU -> lineage of a batch -> evaluated (downstream tasks + bits per byte on held-out
documents) -> exported to Hugging Face format, with `REPORT.md` tying it together.

The raw documents are built offline from what every Python install has: the standard library's docstrings
(English prose) and its source files (code); every 20th document is held out for perplexity. Each stage
skips work that is already done, so a rerun is quick.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import sys
import sysconfig
import time
from pathlib import Path

from lmforge.cli import main as lmforge
from lmforge.core.config import packaged_config

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELD_OUT_EVERY = 20


def stdlib_documents(limit_bytes: int) -> list[dict]:
    """Prose documents from module docstrings and code documents from source files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts) or total > limit_bytes:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        doc_id = hashlib.sha1(str(rel).encode()).hexdigest()[:16]
        meta = {"path": str(rel), "license": "PSF-2.0"}
        docstrings = [ast.get_docstring(n) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        prose = "\n\n".join(d for d in docstrings if d and len(d.split()) >= 5)
        if prose:
            docs.append({"id": f"prose-{doc_id}", "text": prose, "source": "stdlib-prose", "metadata": meta})
        docs.append({"id": f"code-{doc_id}", "text": source, "source": "stdlib-code", "metadata": meta})
        total += len(source.encode()) + len(prose.encode())
    return docs


def write_raw_corpus(out: Path, limit_bytes: int) -> dict:
    from lmforge.curation.documents import DocumentWriter

    added = "2026-01-01T00:00:00.000Z"
    counts = {"train": 0, "heldout": 0}
    by_source: dict[str, list[dict]] = {}
    for doc in stdlib_documents(limit_bytes):
        by_source.setdefault(doc["source"], []).append({**doc, "added": added, "created": None})
    for source, docs in by_source.items():
        held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == 0]
        train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != 0]
        for shard in range(2):
            with DocumentWriter(out / "raw" / "documents" / f"{source}-{shard:04d}.jsonl.gz") as writer:
                for doc in train[shard::2]:
                    writer.write(doc)
        with DocumentWriter(out / "heldout" / f"{source}-0000.jsonl.gz") as writer:
            for doc in held:
                writer.write(doc)
        counts["train"] += len(train)
        counts["heldout"] += len(held)
    return counts


def run(title: str, argv: list[str], capture: bool = False) -> str:
    print(f"\n== {title}\n$ lmforge {' '.join(argv)}", flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
        code = lmforge(argv)
    if capture:
        print(buffer.getvalue(), end="", flush=True)
    if code:
        sys.exit(code)
    return buffer.getvalue()


def rewrite_paths(config_name: str, out: Path, dest: Path) -> Path:
    """The repo's quickstart configs name `quickstart/...`; point them at `out` instead."""
    text = packaged_config(config_name).read_text(encoding="utf-8").replace("quickstart/", f"{out.as_posix()}/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return dest


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quickstart")
    parser.add_argument("--raw-bytes", type=int, default=6_000_000, help="size of the raw corpus to build")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--eval-limit", type=int, default=100, help="instances per downstream task")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.time()
    docs_glob = str(out / "raw" / "documents" / "*.jsonl.gz")

    if not (out / "raw" / "documents").is_dir():
        print("== building raw documents from the Python standard library", flush=True)
        write_raw_corpus(out, args.raw_bytes)
    run("tag: Gopher and C4 quality rules, PII spans, language id",
        ["data", "tag", "--documents", docs_glob, "--taggers", "gopher,c4,pii,langid"], capture=True)
    run("dedup: exact documents and URLs, paragraphs (Bloom filter)",
        ["data", "dedup", "--documents", docs_glob], capture=True)
    mix_config = rewrite_paths("data/quickstart_mix.yaml", out, out / "configs" / "mix.yaml")
    run("mix: filter on the attributes, mask PII, drop duplicate paragraphs", ["data", "mix", str(mix_config)], capture=True)
    mixed_glob = str(out / "mixed" / "documents" / "*.jsonl.gz")
    run("stats: what is in the corpus", ["data", "stats", "--documents", mixed_glob, "--out", str(out / "stats")],
        capture=True)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        run("train a byte-level BPE tokenizer", ["data", "train-tokenizer", "--documents", mixed_glob,
                                                 "--vocab-size", str(args.vocab_size), "--out", str(out / "tokenizer")])
    run("tokenize into token memmaps", ["data", "tokenize", "--documents", mixed_glob, "--tokenizer",
                                        str(out / "tokenizer"), "--out", str(out / "tokens")])
    train_config = rewrite_paths("train/quickstart.yaml", out, out / "configs" / "train.yaml")
    run_dir = out / "run"
    run("pretrain a tiny OLMo 2 (rerun resumes from the last checkpoint)",
        ["train", str(train_config), f"data.paths=[{out / 'tokens'}]", f"run_dir={run_dir}", f"max_steps={args.steps}"])
    lineage = run("lineage: the documents in the batch at step 1",
                  ["data", "inspect", "--run", str(run_dir), "--step", "1", "--instance", "0"], capture=True)
    model_dir = out / "model"
    run("export the final checkpoint as a model directory", ["checkpoint", "export", str(run_dir), "--out", str(model_dir)])
    run("evaluate: downstream tasks (OLMo 1 regime) and bits per byte on held-out documents",
        ["eval", str(model_dir), "--tasks", "arc_easy,hellaswag,piqa,sciq,copa", "--regime", "olmo1",
         "--limit", str(args.eval_limit), "--ppl", str(out / "heldout" / "*.jsonl.gz"), "--out", str(out / "eval"),
         "--no-progress"], capture=True)
    sample = run("generate", ["generate", str(model_dir), "--prompt", "def read_file(path):", "--max-new-tokens",
                              "48", "--temperature", "0.7", "--top-p", "0.9", "--seed", "0"], capture=True)
    run("export to Hugging Face format", ["export", "hf", str(model_dir), "--out", str(out / "hf")], capture=True)
    write_report(out, time.time() - start, lineage, sample)
    print(f"\nquickstart finished in {time.time() - start:.0f} s; read {out / 'REPORT.md'}")


def check_hf_export(out: Path) -> str:
    """Load the export with transformers (when installed) and compare its logits with lmforge's."""
    try:
        import torch
        import transformers
    except ImportError:
        return "transformers is not installed (pip install 'lmforge[hf]'), so the export was not loaded back."
    from lmforge.model.directory import load_model_dir

    ours, tokenizer = load_model_dir(out / "model")
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = torch.tensor([tokenizer.encode("def read_file(path):\n    with open(path) as f:")])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    return (f"Loaded back with `transformers.AutoModelForCausalLM.from_pretrained` as `{type(theirs).__name__}`; "
            f"its logits differ from lmforge's by at most {diff:.2e} on a test prompt.")


def write_report(out: Path, elapsed: float, lineage: str, sample: str) -> None:
    mix = read_json(out / "mixed" / "documents" / "manifest.json").get("counts", {}).get("streams", {})
    mix = next(iter(mix.values()), {})
    dedup_manifest = read_json(out / "raw" / "attributes" / "dedup" / "manifest.json")
    dedup = dedup_manifest.get("counts", {})
    near_duplicates = (f"{dedup.get('near_duplicates', 0)} near-duplicates (MinHash), "
                       if "minhash" in dedup_manifest.get("config", {}).get("modes", []) else "")
    tokens = read_json(out / "tokens" / "manifest.json").get("counts", {})
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    eval_md = out / "eval" / "results.md"
    lines = [
        "# lmforge quickstart report",
        "",
        f"Everything below was produced by `make quickstart` in {elapsed:.0f} s, through the `lmforge` commands",
        "printed in its log. Each directory has a `manifest.json` (config, inputs with hashes, counts).",
        "",
        "## Data",
        "",
        f"- raw documents: `{out}/raw/documents/` (Python standard library docstrings and code); every "
        f"{HELD_OUT_EVERY}th document is held out in `{out}/heldout/` for perplexity",
        f"- tagged and deduplicated: attributes in `{out}/raw/attributes/`; {dedup.get('duplicate_docs', 0)} exact "
        f"duplicate documents, {near_duplicates}"
        f"{dedup.get('duplicate_paragraph_char_fraction', 0):.1%} of characters in duplicate paragraphs",
        f"- mixed (`{out}/mixed/documents/`, config `{out}/configs/mix.yaml`): {mix.get('read', '?')} documents read, "
        f"{mix.get('excluded_by_exclude', 0) + mix.get('excluded_by_include', 0)} dropped by the quality/PII/dedup "
        f"filters, {mix.get('written', '?')} written; {mix.get('spans_replaced', 0):,} spans replaced (PII masks, "
        f"duplicate paragraphs); {mix.get('text_chars_in', 0):,} -> {mix.get('text_chars_out', 0):,} characters",
        f"- statistics: `{out}/stats/` (JSON, and PNG plots when matplotlib is installed)",
        f"- tokenizer: `{out}/tokenizer/` (byte-level BPE); tokens: `{out}/tokens/` — {tokens.get('tokens', 0):,} "
        f"tokens in {tokens.get('documents', 0):,} documents",
        "",
        "## Training",
        "",
    ]
    if metrics:
        first, last = metrics[0], metrics[-1]
        lines += [f"- run directory: `{out}/run/` (config.yaml, metrics.jsonl, checkpoints/, data.json, batches.jsonl)",
                  f"- loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']} "
                  f"({last['tokens']:,} tokens, {last['tokens_per_second']:,.0f} tokens/s at the last log)", ""]
    lines += ["### Lineage: the documents behind step 1, instance 0 (`lmforge data inspect`)", "", "```",
              lineage.strip()[:2000], "```", "", "## Evaluation", "",
              "A model this small scores near chance on downstream tasks; bits per byte is the signal to watch.", ""]
    lines += [eval_md.read_text().strip() if eval_md.is_file() else "(no results)", ""]
    lines += ["## A sample (temperature 0.7, top-p 0.9)", "", "```", sample.strip(), "```", "",
              "## Release", "", f"`{out}/hf/`: {check_hf_export(out)}", ""]
    (out / "REPORT.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
