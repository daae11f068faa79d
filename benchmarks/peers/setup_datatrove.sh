#!/usr/bin/env bash
# Create .peers/datatrove-venv (in the repository, git-ignored; override with DATATROVE_VENV) with datatrove 0.10.1
# (Hugging Face's MinHash dedup pipeline) and rensa 0.5.0 (a Rust MinHash): the peers of benchmarks/bench_dedup.py.
set -euo pipefail
VENV="${DATATROVE_VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.peers/datatrove-venv}"
PYTHON="${PYTHON:-python3.11}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import datatrove.pipeline.dedup, rensa" 2>/dev/null; then
  echo "datatrove already installed in $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# datatrove's dedup package imports regex and tokenizers, which its base install lacks ([processing] would
# pull spaCy and more)
"$VENV/bin/pip" install -q "datatrove[io]==0.10.1" regex tokenizers "rensa==0.5.0" zstandard
"$VENV/bin/python" -c "import datatrove.pipeline.dedup, rensa"
echo "datatrove installed in $VENV"
