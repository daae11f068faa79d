"""An output directory belongs to one run at a time.

`with output_lock(run_dir):` takes an exclusive `fcntl.flock` on `run_dir/.lock`; the kernel drops it when the
holder exits, even on `kill -9`, so a lock left by a dead process is simply taken over. The file holds the
holder's pid, host and start time for the message a second run gets (`OutputLockedError`, one line, exit 2).
Taking the lock removes the temporaries a killed run left (`core.files.remove_temps`), and releasing it removes
those of this run (an interrupted or failed one), so no `*.tmp` outlives a run.

Processes started by the holder belong to its run: forked or spawned executor workers and torchrun workers
inherit `LMFORGE_HELD_LOCKS` (set while the lock is held) and do not lock again; neither does a nested call in
the holder itself. Lock once per run, in the process that starts the others.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from lmforge.core.errors import OutputLockedError
from lmforge.core.files import LOCK_NAME, remove_temps

HELD_ENV = "LMFORGE_HELD_LOCKS"  # os.pathsep-separated directories this process tree holds
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # filesystems without flock


def _held() -> list[str]:
    return [d for d in os.environ.get(HELD_ENV, "").split(os.pathsep) if d]


def _set_held(directories: list[str]) -> None:
    if directories:
        os.environ[HELD_ENV] = os.pathsep.join(directories)
    else:
        os.environ.pop(HELD_ENV, None)


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["lmforge", *sys.argv[1:]]),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 1 << 16) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse(directory: Path, holder: dict) -> OutputLockedError:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
           + (f": {holder['command']}" if holder.get("command") else ""))
    return OutputLockedError(f"{directory} is in use by another lmforge run ({who}); wait for it to finish or "
                             "write somewhere else")


def _acquire(directory: Path) -> int:
    """The open, locked lock file of `directory` (retrying when a releasing holder unlinked the file under us)."""
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise _refuse(directory, holder) from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            # No flock here (some network filesystems): trust the recorded holder while it is alive on this host.
            holder = _read_holder(fd)
            if holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid() \
                    and _pid_alive(holder.get("pid")):
                os.close(fd)
                raise _refuse(directory, holder) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one


@contextlib.contextmanager
def output_lock(*directories: str | Path) -> Iterator[None]:
    """Hold the lock of each directory (created if missing) for the block; see the module docstring."""
    wanted = sorted({str(Path(d).resolve()) for d in directories} - set(_held()))
    fds: list[tuple[Path, int]] = []
    created: list[Path] = []  # removed again if the run leaves them empty (it failed before writing)
    try:
        for name in wanted:
            directory = Path(name)
            created += reversed([d for d in (directory, *directory.parents) if not d.exists()])
            directory.mkdir(parents=True, exist_ok=True)
            fd = _acquire(directory)
            fds.append((directory, fd))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_info()).encode() + b"\n", 0)
            remove_temps(directory)
        _set_held(_held() + wanted)
        yield
    finally:
        _set_held([d for d in _held() if d not in wanted])
        for directory, fd in reversed(fds):
            try:
                remove_temps(directory)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / LOCK_NAME)  # before unlocking: a waiter re-checks the inode
            finally:
                os.close(fd)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
