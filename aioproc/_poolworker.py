"""The worker's side of ``aioproc.Pool``: a loop of calls, nothing left behind.

See the theory of operation in ``_pool``.  Everything here runs in the worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from . import _wire
from ._runchild import exit_now, ignore_sigint

_PR_SET_CHILD_SUBREAPER = 36
#: Seconds to wait for what a call left to die once SIGKILLed.
_REAP_WAIT = 5.0
#: Seconds a worker that has answered keeps looking for the next request before
#: it sleeps in the kernel (see ``_Requests``).
SPIN = 0.0002
#: A ``sched_yield`` that takes longer than this gave the CPU to another process:
#: the machine is busy, and the worker sleeps rather than looks (a sleeper that
#: is woken gets the CPU sooner there than one that kept running).
_YIELDED = 0.00002


def _become_subreaper() -> bool:
    """Adopt the orphans of the calls (Linux); False where that cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # noqa: PLC0415 - once per worker, Linux only

    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _children() -> set[int] | None:
    """This process's children, alive or zombies, from /proc; None if unknown."""
    pids: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        except OSError:
            return None
    return pids


def _own_helpers() -> set[int]:
    """multiprocessing's long-lived helpers of this worker: kept (they end with it)."""
    pids = set()
    server = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    for pid in (server, tracker):
        if pid:
            pids.add(pid)
    return pids


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def end_leftovers(subreaper: bool) -> bool:
    """Kill and reap what the call left running; False if that cannot be done here.

    Our direct children are unreaped, so their pids cannot name anyone else;
    the orphans of the ones killed are handed to us (a subreaper) before their
    parent can be reaped, so each round finds them.  Without /proc or a
    subreaper, the worker says it must be replaced instead (its group is
    killed when it exits).
    """
    if not _has_children():
        return True
    if not subreaper:
        return False
    keep = _own_helpers()
    while True:
        pids = _children()
        if pids is None:
            return False
        pids -= keep
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not _reap(pids):
            return False  # one is stuck in the kernel: this worker is replaced


def _reap(pids: set[int]) -> bool:
    """Reap *pids*, SIGKILLed; False if one is still there after ``_REAP_WAIT`` s."""
    deadline = time.monotonic() + _REAP_WAIT
    delay = 0.0001
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            except ChildProcessError:
                pass  # reaped by someone else (a SIGCHLD handler of the function's)
            left.discard(pid)
        if left:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)  # SIGKILLed processes go within microseconds
            delay = min(2 * delay, 0.01)
    return True


class _Requests:
    """The request pipe, read by a worker that looks for its next request for a
    moment (``SPIN``) before it sleeps.

    A sleeping reader costs the writer a wake-up (2-4 us in the parent's
    ``writev``) and costs itself the time its CPU takes to leave the idle state
    (tens of microseconds in a virtual machine), on every call of a sequence.
    Between two tries the worker yields its CPU (``sched_yield``), so that the
    parent, or any other process that is ready to run there, runs first, and
    once a yield has let another process run the worker sleeps at once: the
    looking uses CPU time that would have been idle.
    """

    __slots__ = ("_fd", "_poll")

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def next(self) -> _wire.Incoming | None:
        """The next frame; None at the pipe's end."""
        inc = _wire.Incoming()
        until = 0.0
        while True:
            if inc.read_some(self._fd, float("inf")):
                return inc
            if inc.eof:
                return None
            now = time.perf_counter()
            if not until:
                until = now + SPIN
            if now < until:
                os.sched_yield()
                if time.perf_counter() - now > _YIELDED:
                    until = now  # another process ran meanwhile: sleep next time
            else:
                self._poll.poll()
                until = time.perf_counter() + SPIN  # a large request arrives in pieces


def worker_main(
    requests: Connection,
    results: Connection,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    forked: bool,
) -> None:
    """The target of every worker of a ``Pool``.

    *forked*: a copy of the pool's process, which closes the pool's ends of its
    siblings' pipes, as they were at the fork (a list made before it may name
    descriptors closed since, whose numbers this child has reused: its
    parent's sentinel).
    """
    if forked:
        from ._pool import _parent_ends  # noqa: PLC0415 - a cycle at import time

        for fd in _parent_ends:
            with contextlib.suppress(OSError):
                os.close(fd)
    ignore_sigint()
    subreaper = _become_subreaper()
    rfd, wfd = requests.fileno(), results.fileno()
    me = os.getpid()
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:  # sys.exit() too: the calls say why
            meta, body, buffers = _wire.exception_outcome(exc)
            end_leftovers(subreaper)
            _wire.write_blocking(wfd, _wire.frame(("init-failed", meta), body, buffers))
            exit_now(0)
    clean = end_leftovers(subreaper)
    _wire.write_blocking(wfd, _wire.frame(("ready", clean)))
    pending = _Requests(rfd)
    while clean:
        inc = pending.next()
        if inc is None or inc.meta() is not None:
            break  # the pool is gone, or asks us to exit
        try:
            func, args = _wire.loads(inc.body(), inc.objects)
        except Exception as exc:
            outcome = _wire.unloadable_outcome(exc)
        else:
            del inc
            outcome = _wire.outcome_of(func, args)
            del func, args
            if os.getpid() != me:  # a copy the function forked, returning: not ours to answer
                os._exit(0)
        clean = end_leftovers(subreaper)
        meta, body, buffers = outcome
        del outcome
        try:
            _wire.write_blocking(wfd, _wire.frame((meta, clean), body, buffers))
        except BrokenPipeError:
            break
        del meta, body, buffers
    exit_now(0)
