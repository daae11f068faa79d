#!/usr/bin/env bash
# Create .peers/datatrove-venv (in the repository, git-ignored; override with DATATROVE_VENV) with datatrove 0.10.1
# (Hugging Face's MinHash dedup pipeline) and rensa 0.5.0 (a Rust MinHash): the peers of benchmarks/bench_dedup.py.
set -euo pipefail
VENV="${DATATROVE_VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.peers/datatrove-venv}"
PYTHON="${PYTHON:-python3.11}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import datatrove.pipeline.dedup, rensa, spacy" 2>/dev/null; then
  echo "datatrove already installed in $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# datatrove's dedup package imports regex and tokenizers, and its English word tokenizer is spaCy's: none of them
# comes with its base install (the [processing] extra would pull much more). It hashes shingles as str, which
# xxhash 4 refuses ("Strings must be encoded before hashing"): xxhash 3.
"$VENV/bin/pip" install -q "datatrove[io]==0.10.1" regex tokenizers spacy "xxhash<4" "rensa==0.5.0" zstandard
"$VENV/bin/python" -c "import datatrove.pipeline.dedup, rensa, spacy"
echo "datatrove installed in $VENV"
