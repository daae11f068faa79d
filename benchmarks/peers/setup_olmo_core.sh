#!/usr/bin/env bash
# Create .peers/olmo-core-venv (in the repository, git-ignored; override with OLMO_CORE_VENV) with OLMo-core 3.0.0 (ai2-olmo-core) on CPU torch: the peer trainer for
# benchmarks/bench_train_cpu.py. Same torch as lmforge's venv so the comparison measures the trainers.
set -euo pipefail
VENV="${OLMO_CORE_VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.peers/olmo-core-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import olmo_core.train" 2>/dev/null; then
  echo "ai2-olmo-core already installed in $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
"$VENV/bin/pip" install -q "ai2-olmo-core==3.0.0" "transformers>=4.48"
"$VENV/bin/python" -c "import olmo_core.train, transformers"
echo "ai2-olmo-core installed in $VENV"
