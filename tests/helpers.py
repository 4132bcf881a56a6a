"""Helpers for tests: the kernel's view of our children and descriptors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from multiprocessing import forkserver, resource_tracker


def children_of_this_process() -> set[int]:
    """Pids of every live or zombie child of this process, from /proc."""
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def fork_server_and_helpers() -> set[int]:
    """Long-lived children multiprocessing keeps on purpose."""
    pids = set()
    server_pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server_pid:
        pids.add(server_pid)
    tracker_pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    if tracker_pid:
        pids.add(tracker_pid)
    return pids


def open_fds() -> set[int]:
    """This process's open descriptors (not the one used to list them)."""
    listed = {int(fd) for fd in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.get_inheritable(fd)
    except OSError:
        return False
    return True


def fork_server_fd() -> set[int]:
    """The pipe multiprocessing keeps to its fork server (renewed with the server)."""
    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    return {fd} if fd is not None else set()


def pid_exists(pid: int) -> bool:
    """Whether *pid* names a process that has not been reaped (zombies count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def state_of(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat (Z for a zombie), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def killed_afterwards(pid: int) -> Iterator[None]:
    """Make sure a process that is not our child (a grandchild) is gone afterwards."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        fd = None
        with contextlib.suppress(ProcessLookupError):
            fd = os.pidfd_open(pid)
        if fd is not None:
            import select

            select.select([fd], [], [], 10)
            os.close(fd)


# -- a child that survives SIGKILL, and orphans -------------------------------------

# A tracer that holds a process in its PTRACE_EVENT_EXIT stop: once SIGKILL
# arrives, the process is dying but not dead (not reaped, its pidfd not readable)
# for as long as the tracer wants, which is what a process stuck in the kernel
# looks like to its parent.  Stops before that (SIGTERM) are passed on.  It
# lets go when its stdin closes.
TRACER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_CONT, PTRACE_DETACH, PTRACE_SEIZE = 7, 17, 0x4206
PTRACE_O_TRACEEXIT, PTRACE_EVENT_EXIT, WALL = 0x40, 6, 0x40000000
pid = int(sys.argv[1])
if libc.ptrace(PTRACE_SEIZE, pid, None, ctypes.c_void_p(PTRACE_O_TRACEEXIT)) != 0:
    print("error", os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
print("seized", flush=True)
while True:
    _, status = os.waitpid(pid, WALL)
    if not os.WIFSTOPPED(status):
        print("gone", flush=True)
        break
    if status >> 16 == PTRACE_EVENT_EXIT:
        print("holding", flush=True)
        sys.stdin.read()
        libc.ptrace(PTRACE_DETACH, pid, None, None)
        break
    libc.ptrace(PTRACE_CONT, pid, None, ctypes.c_void_p(os.WSTOPSIG(status)))
"""

_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


@contextlib.contextmanager
def reaping_orphans(deadline: float = 30.0) -> Iterator[None]:
    """Adopt and reap the orphans of the scripts a test runs (their fork server...).

    PID 1 of some containers never reaps, so an orphan would stay a zombie
    for good.  Inside the block this process is a child subreaper; at the end it
    waits for every child that appeared meanwhile, killing it after *deadline*.
    """
    import time

    before = children_of_this_process()
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)
        end = time.monotonic() + deadline
        while left := children_of_this_process() - before:
            for pid in left:
                if time.monotonic() > end:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)


def rss_bytes() -> int:
    """This process's resident set size, from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def has_zombie_child() -> bool:
    """Whether some child of this process has exited and not been reaped."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


@contextlib.contextmanager
def only_free_fds(free: int) -> Iterator[list[int]]:
    """Leave exactly *free* descriptor numbers available to this process.

    Lowers the soft RLIMIT_NOFILE just above the highest open descriptor and
    fills every hole below it with /dev/null, then frees *free* of them.  The
    filler descriptors are yielded (a test may close more) and closed on exit;
    the limit is restored.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 1 + free, hard))
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        for _ in range(free):
            os.close(fillers.pop())
        yield fillers
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
