"""Issue 5: under torchrun elastic (`lmforge train --nproc 2 --max-restarts 1`) a worker killed with SIGKILL
is restarted by torchrun, resumes from the run's latest checkpoint by itself, and the run ends as if it had
never been interrupted.

The reference is an uninterrupted 2-process run of the same command: the restarted workers have the same world
size, so they reload their own RNG and data positions and the losses must match bit for bit (test_train_parallel
shows that 2 processes train like 1 within rtol 1e-5; here the world size never changes, so no tolerance).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_dataset import write_token_file
from train_utils import TINY_MODEL, random_tokens, read_metrics

from lmforge.model.checkpoints import CHECKPOINTS, list_checkpoints

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "quickstart.yaml"
STEPS, INTERVAL, KILL_AFTER_STEP = 30, 5, 12
RUN_TIMEOUT = 90
# What a launcher that could not set up its rendezvous says; anything else that stops it is a failure.
CANNOT_START = ("EADDRINUSE", "Address already in use", "RendezvousConnectionError", "DistNetworkError",
                "RendezvousTimeoutError")


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    write_token_file(root / "part-0.npy", np.array_split(random_tokens(40_000), 100))
    return root


def overrides(tokens_dir, run_dir) -> list[str]:
    model = json.dumps(TINY_MODEL["overrides"])
    return [f"data.paths=[{tokens_dir}]", f"run_dir={run_dir}", "data.sequence_length=32",
            "global_batch_size=256", "micro_batch_size=64", f"max_steps={STEPS}", "schedule.warmup=3",
            f"checkpoint.interval={INTERVAL}", "checkpoint.keep_last=2", "metrics.log_interval=1",
            "metrics.tensorboard=false", "model.vocab_from_tokenizer=false", f"model.overrides={model}"]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:  # the process or thread is gone
            pass
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def local_rank(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"LOCAL_RANK="):
            return item.split(b"=", 1)[1].decode()
    return None


def workers(launcher_pid: int) -> dict[str, int]:
    """{local rank: pid} of the training workers: the processes torchrun's agent started."""
    agents = [p for p in descendants(launcher_pid) if "torch.distributed.run" in cmdline(p)]
    found = {}
    for agent in agents:
        for pid in children(agent):
            rank = local_rank(pid)
            if rank is not None and "lmforge" in cmdline(pid):
                found[rank] = pid
    return found


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Launch:
    """`python -m lmforge train ... --nproc 2` in its own session; every process it started is killed at exit
    (torchrun puts each worker in a session of its own, so killing the launcher's group is not enough)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        # LOGLEVEL=INFO: torchrun's agent reports the failure and the restart, which a failing test then shows.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO"}
        with open(log, "wb") as f:
            self.process = subprocess.Popen([sys.executable, "-m", "lmforge", "train", *args], cwd=REPO, env=env,
                                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[int] = set()

    def remember(self) -> None:
        if self.process.poll() is None:
            self.seen.update(descendants(self.process.pid))

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the launcher ran past {timeout} s:\n{self.output()}\n{self.processes()}")
            self.remember()
            time.sleep(0.05)
        return self.process.returncode

    def output(self, tail: int = 8000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if tail else self.log.read_text(errors="replace")

    def processes(self) -> str:
        """What each process of the run waits on, for a run that hangs."""
        lines = []
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                wchan = Path(f"/proc/{pid}/wchan").read_text()
            except OSError:
                wchan = "?"
            lines.append(f"{pid} {wchan} {cmdline(pid)[:100]}")
        return "\n".join(lines)

    def skip_if_it_could_not_start(self) -> None:
        text = self.output()
        if any(marker in text for marker in CANNOT_START):
            pytest.skip(f"torchrun could not start its rendezvous:\n{text}")

    def close(self) -> None:
        self.remember()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_all(self.seen)
        self.process.wait(timeout=10)


def run_uninterrupted(args: list[str], log: Path) -> None:
    launch = Launch(args, log)
    try:
        code = launch.wait(RUN_TIMEOUT)
        if code != 0:
            launch.skip_if_it_could_not_start()
        assert code == 0, launch.output()
    finally:
        launch.close()


def wait_until_killable(launch: Launch, run_dir: Path, timeout: float = RUN_TIMEOUT) -> dict[str, int]:
    """Workers' pids once a checkpoint exists and the run has logged KILL_AFTER_STEP steps."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if launch.process.poll() is not None:
            launch.skip_if_it_could_not_start()
            raise AssertionError(f"the run ended before a worker could be killed:\n{launch.output()}")
        launch.remember()
        if (metrics.is_file() and sum(1 for _ in metrics.open()) >= KILL_AFTER_STEP
                and list_checkpoints(run_dir / CHECKPOINTS)):
            found = workers(launch.process.pid)
            if len(found) == 2:
                return found
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for step {KILL_AFTER_STEP}:\n{launch.output()}")


def test_killed_worker_is_restarted_by_torchrun_and_resumes(tmp_path, tokens_dir):
    reference_dir, elastic_dir = tmp_path / "reference", tmp_path / "elastic"
    launcher_args = ["--nproc", "2", "--max-restarts", "1"]
    run_uninterrupted([str(CONFIG), *overrides(tokens_dir, reference_dir), *launcher_args], tmp_path / "reference.log")

    launch = Launch([str(CONFIG), *overrides(tokens_dir, elastic_dir), *launcher_args], tmp_path / "elastic.log")
    try:
        victims = wait_until_killable(launch, elastic_dir)
        killed_at = len(read_metrics(elastic_dir))
        os.kill(victims["1"], signal.SIGKILL)  # one worker, not the launcher
        code = launch.wait(RUN_TIMEOUT)
        log = launch.output(tail=0)
    finally:
        launch.close()
    assert code == 0, log[-8000:]
    assert killed_at < STEPS, "the run finished before the kill"

    # torchrun restarted the worker group, and the new workers resumed from a checkpoint, not from step 0.
    assert "will restart worker group" in log and "resumed from" in log, log[-8000:]
    resumed_step = int(log.split("resumed from", 1)[1].split("(step ", 1)[1].split(",", 1)[0])
    assert INTERVAL <= resumed_step <= killed_at and resumed_step % INTERVAL == 0, log[-8000:]
    manifest = json.loads((elastic_dir / "manifest.json").read_text())
    assert manifest["counts"]["finished"] is True and manifest["counts"]["world_size"] == 2
    assert [s for s, _ in list_checkpoints(elastic_dir / CHECKPOINTS)][-1] == STEPS

    # Each step logged once (the killed attempt's rows after its checkpoint were dropped), losses bit for bit.
    elastic, reference = read_metrics(elastic_dir), read_metrics(reference_dir)
    assert [r["step"] for r in elastic] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "tokens", "lr"):
        assert [r[key] for r in elastic] == [r[key] for r in reference], key
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.5  # it learned, so equal losses are not trivial
