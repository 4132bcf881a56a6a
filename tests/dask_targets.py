"""Functions the Dask tests call on the workers (importable there by name)."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import time


class Refused(Exception):
    """An exception type of the caller's own, to check that types survive."""


def dask_worker_pid() -> int:
    """The Dask worker this child runs for: the nearest ancestor the nanny spawned.

    Not always the parent: a child of a worker-local forkserver Pool is the
    fork server's.  Outside Dask, the parent.
    """
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return pid
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return os.getppid()  # not under Dask: an aioproc.Pool of the test process


def pids_and_sleep(path: str, seconds: float) -> None:
    """Start a grandchild, write "worker child grandchild" pids to *path*, then sleep."""
    grandchild = subprocess.Popen(["sleep", "300"])
    _write(path, f"{dask_worker_pid()} {os.getpid()} {grandchild.pid}\n")
    time.sleep(seconds)


def leave_grandchild() -> tuple[int, int]:
    """Return at once, leaving a grandchild running; (child pid, grandchild pid)."""
    grandchild = subprocess.Popen(["sleep", "300"])
    return os.getpid(), grandchild.pid


def where() -> tuple[int, int]:
    """(worker pid, child pid)."""
    return dask_worker_pid(), os.getpid()


def refuse(value: int) -> None:
    raise Refused(f"refused {value}")


def segfault() -> None:
    faulthandler.disable()  # enabled by pytest in the test process: no traceback wanted
    os.kill(os.getpid(), signal.SIGSEGV)


def square(x: int) -> int:
    return x * x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _write(path: str, text: str) -> None:
    # Written whole, then renamed: a reader never sees half of it.
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def sleep_first_time(path: str) -> str:
    """The first call records its pids and sleeps; a later one (a retry) returns."""
    if os.path.exists(path):
        return "again"
    pids_and_sleep(path, 300)
    return "first"


def unpicklable_result() -> object:
    import threading

    return threading.Lock()
