#!/usr/bin/env bash
# Create .peers/trl-venv (in the repository, git-ignored; override with TRL_VENV) with TRL 1.16 on CPU torch: the
# peer for the adaptation loss checks (tests/test_adapt_*.py) and benchmarks/bench_adapt_cpu.py. Same torch as
# lmforge's venv so the comparison measures the trainers.
set -euo pipefail
VENV="${TRL_VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.peers/trl-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import trl" 2>/dev/null; then
  echo "trl already installed in $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
"$VENV/bin/pip" install -q "trl==1.16.0"
"$VENV/bin/python" -c "import trl, transformers; from trl import GRPOTrainer"
echo "trl installed in $VENV"
