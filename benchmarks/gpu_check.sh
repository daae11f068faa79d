#!/usr/bin/env bash
# One command on a GPU machine, at most 8 minutes on one GPU: the GPU-marked tests, then lmforge's training
# tokens/s and MFU on olmo2-1b (seq 4096, 4 x 2 micro-batches, bf16, compile) beside OLMo-core 3.0's own run of
# the same model (olmo2_1B_v2, the peer script of ../shared/peers/olmo_core/) in the same call, and the ratio.
# Each phase has its own time limit; a phase that fails or runs out of time is reported and the next one runs.
#
#   benchmarks/gpu_check.sh [--out DIR] [--float8]   # on the GPU machine
#   benchmarks/gpu_check.sh --dry [--out DIR]        # anywhere: CPU, tiny model, no peer, tens of seconds
#
# Writes DIR/gpu_check.json (every phase's status, seconds and results, the ratio) and DIR/<phase>.log;
# DIR defaults to /tmp/lmforge-gpu-check. Exit status 0 when every phase passed, 1 otherwise.
# Environment (all optional):
#   PYTHON            lmforge's interpreter (default: .venv/bin/python, else python3)
#   OLMO_CORE_PYTHON  the peer's interpreter (default: .peers/olmo-core-venv/bin/python, else $PYTHON)
#   OLMO_CORE_BENCH   the peer script (default: ../shared/peers/olmo_core/olmo_core_bench.py, else
#                     benchmarks/peers/olmo_core/olmo_core_bench.py, a copy taken to a machine without ../shared)
#   OLMO_CORE_WHEELS  a folder of wheels (ai2-olmo-core and its small dependencies, torchao for --float8)
#                     installed offline into DIR/peer-site for the peer and, for torchao, for lmforge too
set -euo pipefail

ROOT="$(cd -P "$(dirname "$0")/.." && pwd)"  # -P: the repository, also when reached through a link
OUT_DIR=/tmp/lmforge-gpu-check
DRY=0
FLOAT8=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --float8) FLOAT8=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry, --float8, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
PEER_PYTHON="${OLMO_CORE_PYTHON:-}"
if [ -z "$PEER_PYTHON" ]; then
  if [ -x "$ROOT/.peers/olmo-core-venv/bin/python" ]; then PEER_PYTHON="$ROOT/.peers/olmo-core-venv/bin/python"
  else PEER_PYTHON="$PYTHON"; fi
fi
PEER_BENCH="${OLMO_CORE_BENCH:-}"
if [ -z "$PEER_BENCH" ]; then
  for candidate in "$ROOT/../shared/peers/olmo_core/olmo_core_bench.py" "$ROOT/benchmarks/peers/olmo_core/olmo_core_bench.py"; do
    if [ -f "$candidate" ]; then PEER_BENCH="$candidate"; break; fi
  done
fi

# Limits in seconds; together with start-up they stay under 8 minutes.
if [ "$DRY" = 1 ]; then
  TESTS_LIMIT=120; OURS_LIMIT=120; PEER_LIMIT=0
  BENCH_ARGS=(--device cpu --preset olmo2-tiny --override vocab_size=512 --override n_layers=2 --seq-len 64
              --micro-batch 2 --grad-accum 1 --steps 4 --warmup 1 --no-compile)
  PEER_ARGS=()
else
  TESTS_LIMIT=90; OURS_LIMIT=170; PEER_LIMIT=170
  BENCH_ARGS=(--device cuda --preset olmo2-1b --seq-len 4096 --micro-batch 4 --grad-accum 2 --steps 20 --warmup 8)
  PEER_ARGS=(--model olmo2_1B_v2 --seq-len 4096 --micro-batch 4 --grad-accum 2 --steps 20 --warmup-steps 8)
  if [ "$FLOAT8" = 1 ]; then BENCH_ARGS+=(--float8); PEER_ARGS+=(--float8); fi
fi

declare -A STATUS SECONDS_TAKEN
PHASES=()

# run_phase NAME LIMIT COMMAND...: runs COMMAND under `timeout`, output to OUT_DIR/NAME.log (and its tail to
# the terminal); records passed / failed (exit N) / timed out (after LIMIT s).
run_phase() {
  local name="$1" limit="$2"; shift 2
  PHASES+=("$name")
  local start=$SECONDS rc=0
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1 || rc=$?
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  if [ "$rc" = 0 ]; then STATUS[$name]="passed"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then STATUS[$name]="timed out after ${limit}s"
  else STATUS[$name]="failed (exit $rc)"; fi
  tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/   | /'
  echo "== $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
}

skip_phase() {
  PHASES+=("$1"); STATUS[$1]="skipped: $2"; SECONDS_TAKEN[$1]=0
  echo "== $1: skipped: $2"
}

if [ -n "${OLMO_CORE_WHEELS:-}" ]; then
  run_phase wheels 120 "$PYTHON" -m pip install -q --no-index --no-deps --target "$OUT_DIR/peer-site" \
    "$OLMO_CORE_WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$OUT_DIR/peer-site"  # after lmforge's own src: torchao for --float8
fi

# The GPU-marked tests (on CPU they are collected and skip: the dry run checks the marker and the imports).
run_phase gpu_tests "$TESTS_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "$ROOT/tests"

run_phase lmforge "$OURS_LIMIT" "$PYTHON" "$ROOT/benchmarks/bench_train_gpu.py" "${BENCH_ARGS[@]}" \
  --work "$OUT_DIR/lmforge-work"

if [ "$DRY" = 1 ]; then
  skip_phase olmo_core "dry run"
elif [ -z "$PEER_BENCH" ]; then
  skip_phase olmo_core "no olmo_core_bench.py (set OLMO_CORE_BENCH)"
else
  # cached_path imports boto3 / google-cloud-storage; the peer folder's stubs/ stand in for them.
  run_phase olmo_core "$PEER_LIMIT" env PYTHONPATH="$OUT_DIR/peer-site:$(dirname "$PEER_BENCH")/stubs" \
    "$PEER_PYTHON" "$PEER_BENCH" "${PEER_ARGS[@]}" --work-dir "$OUT_DIR/olmo-core-work" \
    --out-json "$OUT_DIR/olmo_core.json"
fi

# The summary: every phase, our figures, the peer's, the ratio; also as JSON.
STATUS_JSON="{"
for name in "${PHASES[@]}"; do
  STATUS_JSON+="\"$name\": {\"status\": \"${STATUS[$name]}\", \"seconds\": ${SECONDS_TAKEN[$name]}},"
done
STATUS_JSON="${STATUS_JSON%,}}"
"$PYTHON" - "$OUT_DIR" "$DRY" "$STATUS_JSON" <<'PY'
import datetime, json, sys
from pathlib import Path

out, dry, phases = Path(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])


def result(log: str, prefix: str):
    path = out / log
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    found = [json.loads(line[len(prefix):]) for line in lines if line.startswith(prefix)]
    return found[-1] if found else None


ours, peer = result("lmforge.log", "RESULT "), result("olmo_core.log", "BENCH_RESULT ")
ratio = None
if ours and peer and peer.get("tokens_per_sec_per_device"):
    ratio = ours["tokens_per_second"] / peer["tokens_per_sec_per_device"]
summary = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "mode": "dry" if dry else "gpu",
           "phases": phases, "lmforge": ours, "olmo_core": peer, "tokens_per_second_ratio": ratio}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"== summary ({summary['mode']}), {out / 'gpu_check.json'}")
for name, phase in phases.items():
    print(f"   {name:10s} {phase['status']} ({phase['seconds']}s)")


def line(name, tps, mfu):
    mfu_text = f"{mfu:.1f}%" if mfu is not None else "n/a"
    return f"   {name:10s} {tps:>10,.0f} tokens/s/device   MFU {mfu_text}"


if ours:
    print(line("lmforge", ours["tokens_per_second"], ours.get("mfu_pct")))
if peer and peer.get("tokens_per_sec_per_device"):
    print(line("olmo-core", peer["tokens_per_sec_per_device"], peer.get("mfu_pct_olmo_formula")))
print(f"   lmforge / olmo-core tokens/s: {ratio:.3f}" if ratio is not None else "   lmforge / olmo-core: n/a")
PY

for name in "${PHASES[@]}"; do
  case "${STATUS[$name]}" in passed|skipped:*) ;; *) exit 1 ;; esac
done
