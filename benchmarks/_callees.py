"""The functions the "calls" scenario runs in another process.  Standard library
only: every peer's workers import this module (spawned, exec'd or forked).

``hold`` is the probe of the semantics table: it reports the pid of the process
running it (and of a ``sleep 1000`` it started, if asked) by writing them into
a file, renamed into place so that the parent never reads half of it, then
sleeps.  The parent reads the pids and checks with ``/proc`` whether those
processes are still there after a timeout, a cancellation or a SIGKILL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def trivial() -> int:
    """Return at once: what a call costs when the function costs nothing."""
    return 1


def spin(seconds: float) -> int:
    """Burn *seconds* of this thread's CPU time (a fixed amount of work, however
    busy the machine is), and return how many rounds that took."""
    end = time.thread_time() + seconds
    rounds = 0
    while time.thread_time() < end:
        rounds += 1
    return rounds


def hold(report: str, seconds: float, grandchild: bool) -> str:
    """Write this process's pid (and a ``sleep 1000`` grandchild's) to *report*,
    then sleep *seconds* and return ``"finished"``."""
    pids = [os.getpid()]
    if grandchild:
        pids.append(_spawn_sleep())
    with open(report + ".part", "w") as f:
        f.write(" ".join(str(pid) for pid in pids))
    os.rename(report + ".part", report)
    time.sleep(seconds)
    return "finished"


def _spawn_sleep() -> int:
    """Start ``sleep 1000`` as ``subprocess.Popen`` would: stdio only, every other
    descriptor closed (a pool's pipes held by the grandchild would change what
    the pool sees).  Not Popen itself: its object, collected while the process
    runs, warns, in a worker that may exit at any time."""
    close = [
        (os.POSIX_SPAWN_CLOSE, fd)
        for fd in (int(name) for name in os.listdir("/proc/self/fd"))
        if fd > 2
    ]
    return os.posix_spawnp("sleep", ["sleep", "1000"], os.environ, file_actions=close)


def raise_value_error() -> None:
    """Raise ``ValueError`` two frames down: the parent looks for the inner frame's
    name in the traceback it gets, which only the child's traceback can hold."""
    _deep_in_the_child()


def _deep_in_the_child() -> None:
    raise ValueError("raised in the child")


async def as_coroutine(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` as a coroutine function (aiomultiprocess runs only those)."""
    return fn(*args)
