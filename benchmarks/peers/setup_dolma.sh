#!/usr/bin/env bash
# Create .peers/dolma-venv (in the repository, git-ignored; override with DOLMA_VENV) with dolma 1.2.1, the peer for the curation benchmarks and agreement tests.
# An unconstrained install spends minutes backtracking through boto3 releases (s3fs==2023.6.0 pins
# aiobotocore~=2.5); these constraints make it resolve in under a minute.
set -euo pipefail
VENV="${DOLMA_VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.peers/dolma-venv}"
PYTHON="${PYTHON:-python3.11}"
if [ -x "$VENV/bin/dolma" ]; then
  echo "dolma already installed in $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'boto3==1.28.17\nbotocore==1.31.17\naiobotocore==2.5.4\nfsspec==2023.6.0\ns3fs==2023.6.0\n' > "$CONSTRAINTS"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q dolma==1.2.1 -c "$CONSTRAINTS"
"$VENV/bin/dolma" --help > /dev/null
echo "dolma installed in $VENV"
