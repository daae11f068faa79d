"""benchmarks/gpu_check.sh in its dry mode (CPU, tiny model, no peer): the same phases as on a GPU machine —
the GPU-marked tests (collected, skipped), lmforge's throughput run, the peer's place — and the same results
file, so the script is known to work before a GPU is at hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_dry_run_goes_through_every_phase_and_writes_the_results(tmp_path):
    run = subprocess.run([str(SCRIPT), "--dry", "--out", str(tmp_path)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["mode"] == "dry"
    assert {name: phase["status"] for name, phase in results["phases"].items()} == {
        "gpu_tests": "passed", "lmforge": "passed", "olmo_core": "skipped: dry run"}
    ours = results["lmforge"]
    assert ours["device"] == "cpu" and ours["timed_steps"] == 2 and ours["tokens_per_second"] > 0
    assert results["olmo_core"] is None and results["tokens_per_second_ratio"] is None
    assert "lmforge / olmo-core: n/a" in run.stdout
    # The GPU-marked tests were selected (and skipped on this CPU), not an empty selection.
    assert "SKIPPED" in (tmp_path / "gpu_tests.log").read_text()


def test_unknown_arguments_are_refused():
    run = subprocess.run([str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "unknown argument --bogus" in run.stderr
