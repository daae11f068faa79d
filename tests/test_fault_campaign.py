"""The fault campaign (benchmarks/fault_campaign.py): it must catch a stage that writes in place or answers a full
disk with a traceback (planted in a fake stage, so the campaign cannot silently pass), and a short version of it
runs on real stages that are known to survive kill -9."""

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_campaign():
    spec = importlib.util.spec_from_file_location("fault_campaign", ROOT / "benchmarks" / "fault_campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_campaign"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fc = load_campaign()

# A stand-in for a stage: three parts and a manifest, each written in two halves with a pause between them;
# finished parts are skipped on a rerun. VARIANT says how it writes and how it meets the ENOSPC hook:
# atomic (temp file + rename, one error line), in-place (under the final name), traceback (an OSError escapes),
# no-hook (ignores the hook).
FAKE_STAGE = textwrap.dedent("""
    import json, os, sys, time
    out, variant = sys.argv[1], sys.argv[2]
    enospc_at = 0 if variant == "no-hook" else int(os.environ.get("LMFORGE_FAULT_ENOSPC_AT") or 0)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a rerun removes the temporary files it owns
        if ".tmp" in name:
            os.remove(os.path.join(out, name))
    writes = 0

    def write(name, data):
        global writes
        writes += 1
        path = os.path.join(out, name)
        if writes == enospc_at:
            if variant == "traceback":
                raise OSError(28, "No space left on device", path)
            sys.exit(f"lmforge: error: {path}: No space left on device")
        target = path if variant == "in-place" else path + ".tmp"
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.15)
            f.write(data[len(data) // 2:])
        if target != path:
            os.replace(target, path)

    for i in range(3):
        if not os.path.exists(os.path.join(out, f"part-{i}.txt")):
            write(f"part-{i}.txt", f"part {i}\\n".encode() * 1000)
    write("manifest.json", json.dumps({"parts": 3}).encode())
""")


def fake_stage(tmp_path, variant: str):
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE, encoding="utf-8")
    return fc.Stage(f"fake-{variant}", (), lambda work: [[str(script), str(work / "out"), variant]],
                    manifests=("out",))


def run_campaign(tmp_path, stages, faults, trials, seed=0):
    return fc.Campaign(tmp_path / "campaign", stages, log=lambda *a: None).run(faults, trials, seed)


def test_a_stage_that_writes_in_place_is_caught(tmp_path):
    result = run_campaign(tmp_path, [fake_stage(tmp_path, "in-place")], ["kill"], trials=4)
    counts = result["summary"]["fake-in-place"]["kill"]
    assert counts["tried"] >= 1 and counts["held"] < counts["tried"], counts
    failure = result["failures"][0]
    kinds = fc.problem_kinds(failure)
    assert {"half-written", "lost"} <= kinds, failure  # a half part under its final name, kept by the rerun
    assert failure["replay"] == (f"python benchmarks/fault_campaign.py --stage fake-in-place --fault kill "
                                 f"--seed {failure['seed']} --trials 1")


def test_a_stage_that_writes_atomically_holds(tmp_path):
    result = run_campaign(tmp_path, [fake_stage(tmp_path, "atomic")], ["kill", "enospc"], trials=3)
    summary = result["summary"]["fake-atomic"]
    assert summary["repeat"]["held"] == 1 and summary["renames"] == [4]
    assert result["failures"] == []
    assert summary["kill"]["tried"] >= 1 and summary["enospc"]["tried"] == 3  # N <= its 4 writes: always hit


def test_enospc_with_a_traceback_fails_and_a_missing_hook_is_not_a_failure(tmp_path):
    result = run_campaign(tmp_path, [fake_stage(tmp_path, "traceback"), fake_stage(tmp_path, "no-hook")],
                          ["enospc"], trials=2)
    traceback = result["summary"]["fake-traceback"]["enospc"]
    assert traceback["tried"] == 2 and traceback["held"] == 0 and traceback["error-message"] == 2
    assert result["summary"]["fake-no-hook"]["enospc"] == {"tried": 0, "held": 0, "not_injected": 2}


def test_half_written_compares_each_file_with_before_and_after(tmp_path):
    def snap(**files):
        return fc.Snapshot(keys=dict(files), raw=dict(files), temps=[])

    def check(got, before, clean, units=()):
        return fc.half_written(got, before, clean, units, tmp_path / "got", tmp_path / "clean")

    before, clean = snap(a="1", s_x="old", s_y="old"), snap(a="2", b="3", s_x="new", s_y="new")
    assert check(snap(a="1", b="3", s_x="old", s_y="old"), before, clean) == []
    assert check(snap(a="9"), before, clean) == ["a differs from both the previous and the clean output"]
    assert check(snap(c="1"), before, clean) == ["c is in neither the previous nor the clean output"]
    before, clean = snap(**{"s/x": "old", "s/y": "old"}), snap(**{"s/x": "new", "s/y": "new"})
    assert check(snap(**{"s/x": "new", "s/y": "old"}), before, clean, ("s",)) == [
        "s/ mixes the previous and the new state (s/y not new)"]


def test_an_interrupted_log_must_be_a_prefix_of_the_clean_one(tmp_path):
    rows = [{"step": i, "loss": 1.0 / i, "tokens_per_second": 1000 + i} for i in (1, 2, 3)]
    (tmp_path / "clean" / "run").mkdir(parents=True)
    (tmp_path / "clean" / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "got" / "run").mkdir(parents=True)
    got = tmp_path / "got" / "run" / "metrics.jsonl"
    snaps = [fc.Snapshot(keys={"run/metrics.jsonl": key}, raw={}, temps=[]) for key in ("got", "before", "clean")]

    def check(text):
        got.write_text(text)
        return fc.half_written(*snaps, (), tmp_path / "got", tmp_path / "clean")

    other_speed = dict(rows[1], tokens_per_second=5)  # a measured field: volatile
    assert check(json.dumps(rows[0]) + "\n" + json.dumps(other_speed) + '\n{"step": 3, "lo') == []
    assert check(json.dumps(rows[1]) + "\n") == [
        "run/metrics.jsonl is not a prefix of the clean run's log (line 1 differs)"]
    assert check('{"step": 1\n' + json.dumps(rows[1]) + "\n") == ["run/metrics.jsonl has a torn line 1 before its end"]


@pytest.mark.slow
def test_kill_and_full_disk_of_tag_dedup_and_mix_lose_nothing(tmp_path):
    names = ("tag", "dedup", "mix")
    stages = [s for s in fc.STAGES if s.name in names]
    result = run_campaign(tmp_path, stages, ["kill", "enospc"], trials=2, seed=7)
    for name in names:
        summary = result["summary"][name]
        assert summary["repeat"]["held"] == 1, result["failures"]
        assert summary["kill"]["tried"] >= 1, summary
    assert [(r["replay"], r["problems"]) for r in result["failures"]] == []
