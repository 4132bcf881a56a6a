"""Functions the Dask tests call on the workers (importable there by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import time


class Refused(Exception):
    """An exception type of the caller's own, to check that types survive."""


def pids_and_sleep(path: str, seconds: float) -> None:
    """Start a grandchild, write "worker child grandchild" pids to *path*, then sleep."""
    grandchild = subprocess.Popen(["sleep", "300"])
    _write(path, f"{os.getppid()} {os.getpid()} {grandchild.pid}\n")
    time.sleep(seconds)


def leave_grandchild() -> tuple[int, int]:
    """Return at once, leaving a grandchild running; (child pid, grandchild pid)."""
    grandchild = subprocess.Popen(["sleep", "300"])
    return os.getpid(), grandchild.pid


def where() -> tuple[int, int]:
    """(worker pid, child pid)."""
    return os.getppid(), os.getpid()


def refuse(value: int) -> None:
    raise Refused(f"refused {value}")


def segfault() -> None:
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
