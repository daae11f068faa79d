#!/usr/bin/env bash
# Install lm-evaluation-harness (hf backend) into lmforge's own venv: the parity test and bench_eval.py import
# it in-process, next to lmforge, to score the same model object's HF export. About 70 s on a fresh venv;
# it adds datasets/evaluate/accelerate and removes nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
if "$PY" -c "import lm_eval, accelerate" 2>/dev/null; then
  echo "lm-eval already installed for $PY"
  exit 0
fi
"$PY" -m pip install -q "lm-eval[hf]==0.4.13"
"$PY" -c "import lm_eval, accelerate"
echo "lm-eval installed for $PY"
