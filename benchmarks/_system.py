"""What the kernel says about this process and this machine (Linux /proc)."""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import platform
import resource
import signal
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def own_cpu_seconds() -> float:
    """CPU time of this process, of the children it has reaped, and of the fork
    server (which reaps its own children, so their time is counted in it)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    server = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if server:
        try:
            with open(f"/proc/{server}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return total
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), counted from 3
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


class OthersMeter:
    """How much CPU the rest of the machine used while we ran (noise in our figures)."""

    def __init__(self) -> None:
        self.busy, self.total = machine_cpu_seconds()
        self.own = own_cpu_seconds()

    def share(self) -> float:
        """Fraction of the machine's CPU time used by other processes since creation."""
        busy, total = machine_cpu_seconds()
        others = (busy - self.busy) - (own_cpu_seconds() - self.own)
        return max(others, 0.0) / max(total - self.total, 1e-9)


def os_threads() -> int:
    """Threads of this process as the kernel counts them (native ones included)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[17])  # field 20 of proc(5), counted from field 3


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size from /proc/PID/status (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def private_bytes(pid: int) -> int | None:
    """Private (unshared) memory of *pid*, clean + dirty, from smaps_rollup."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return total


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no {key} in /proc/meminfo")


def mem_available_bytes() -> int:
    return _meminfo("MemAvailable")


def mem_total_bytes() -> int:
    return _meminfo("MemTotal")


def children() -> set[int]:
    """Pids of every live or zombie child of this process."""
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def raise_fd_limit(needed: int) -> tuple[int, str | None]:
    """Raise RLIMIT_NOFILE's soft limit (and the hard one, if allowed) to *needed*.

    Returns the soft limit now in force and, when it is below *needed*, why.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft, None
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:  # root (CAP_SYS_RESOURCE) may raise the hard limit up to fs.nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed, None
        except (ValueError, OSError) as exc:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard, f"RLIMIT_NOFILE hard limit is {hard} and cannot be raised ({exc})"
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed, None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine, interpreter and libraries the figures were taken with."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = mem_total_bytes()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_total / 2**30, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            name: _version(name)
            for name in ("aioproc", "anyio", "uvloop", "trio", "aiomultiprocess", "matplotlib")
        },
    }


def process_gone(pid: int) -> bool:
    """Whether *pid* has exited: no such process, or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in (b"Z", b"X")


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def is_descendant(pid: int) -> bool:
    """Whether *pid* is a child of this process, or a child of one, and so on
    (a pid whose process is gone and that was reused elsewhere is not)."""
    me, seen = os.getpid(), 0
    while pid > 1 and seen < 64:
        parent = _parent_of(pid)
        if parent is None:
            return False
        if parent == me:
            return True
        pid, seen = parent, seen + 1
    return False


def threads_back_to(count: int, within: float) -> int:
    """Wait up to *within* seconds for this process to be back to *count* threads;
    return how many more it has then (0: every thread started meanwhile ended)."""
    end = time.monotonic() + within
    while (extra := os_threads() - count) > 0 and time.monotonic() < end:
        time.sleep(0.01)
    return max(extra, 0)


_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def long_lived_helpers() -> set[int]:
    """Children kept for the whole run: multiprocessing's fork server and resource
    tracker, and loky's resource tracker (stopped at the end of the run)."""
    found = {
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
    }
    loky_tracker = sys.modules.get("loky.backend.resource_tracker")
    if loky_tracker is not None:
        found.add(getattr(loky_tracker._resource_tracker, "_pid", None))
    return {pid for pid in found if pid}


@contextlib.contextmanager
def adopting_orphans(grace: float = 2.0, settle: float = 0.2) -> Iterator[list[int]]:
    """Adopt the orphans of what runs in the block, and leave no new child behind.

    Inside the block this process is a child subreaper (Linux), so a process
    whose parent died while it ran becomes our child instead of init's (the
    PID 1 of some containers never reaps).  At the end, children that
    appeared meanwhile get *grace* seconds to exit, and their owners (a
    library's watcher thread, say) *settle* seconds to reap them; then those
    still running are SIGKILLed and listed in the yielded list, and all are
    reaped.  multiprocessing's own fork server and resource tracker are left alone.
    """
    before = children()
    left: list[int] = []
    _set_subreaper(True)
    try:
        yield left
    finally:
        _set_subreaper(False)
        began = time.monotonic()
        while True:
            new = children() - before - long_lived_helpers()
            running = {pid for pid in new if not process_gone(pid)}
            waited = time.monotonic() - began
            if not new or (not running and waited > settle) or waited > grace:
                break
            time.sleep(0.01)
        for pid in sorted(running):
            left.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in sorted(new):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
