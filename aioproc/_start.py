"""Starting a child: ``start()`` and ``start_async()`` share every step here.

1. The start method's Popen creates the child (``_popen``); for
   ``start_async()`` spawn and forkserver stop once the child exists and send
   its data as the pipe drains (forkserver also awaits the server's reply with
   the pid), so that every wait happens in the event loop.  What stays in the
   loop's thread is the start method's own system calls: the fork, the vfork +
   exec, a connect and a ``sendmsg()`` to the fork server.
2. A request that finds the fork server dying (it dies when a request fails
   half-way, or when it cannot fork) is made once more, to a new server.
3. An ``OSError`` that says a resource ran out is raised again with what ran out
   and what to do (``start_error``); nothing is left open or running, and the
   process may be started again.

The child's handle (``_child.Child``) is made by the caller from the Popen.

Why the fork path is written to touch little.  A forked child shares every page
of its parent until one of them writes it, and CPython writes an object each
time it takes or drops a reference to it.  So every page the parent writes
between two forks is copied for each child still alive from before, and every
page a child's first steps touch is copied for that child: with thousands of
sleeping children, those pages are most of what a child costs.  Measured with
``python -m benchmarks.fork_pages`` (pagemap and kpagecount, a parent that
imports only aioproc and anyio, Python 3.11, 2026-12-07): a bare ``os.fork()``
child keeps about 235 private pages, most of them CPython's own after-fork
work, a stdlib ``Process`` child about 400.  Hence a start here binds the parent
side once instead of importing it per start, calls a check only for a value it
may refuse, keeps defaults as class attributes, and uses no generator-based
context manager around the fork.  What counts is how many distinct pages a
cycle of starts writes (every function called, every object referenced or
allocated), not on which side of the fork: when starts follow one another, the
work before one fork comes after the previous one.  Measured (2026-12-07):
40 objects more per start cost 12 pages a cycle whether made before the fork
or after it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from multiprocessing import forkserver
from typing import TYPE_CHECKING

from ._popen import POPEN_CLASSES, AioprocPopen, ForkServerPopen

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

Around = Callable[[], AbstractContextManager[object]]


def launch(process_obj: BaseProcess, method: str) -> AioprocPopen:
    """Start *process_obj*'s child with *method*, blocking; return its Popen."""
    cls = POPEN_CLASSES[method]
    # Not `with explained()`: a generator-based context manager is five more
    # Python calls a start, and after a fork every page touched is copied.
    try:
        if cls is not ForkServerPopen:
            return cls(process_obj)
        popen: AioprocPopen | None = None
        try:
            popen = cls(process_obj, deferred=True)
            popen.finish()
            return popen
        except (ConnectionError, EOFError):
            if popen is not None and popen.server_forked:
                raise  # the child died reading its data: one failed start, no retry
        _wait_until_fork_server_exited()
        try:
            return cls(process_obj)
        except EOFError as exc:
            _wait_until_fork_server_exited()
            raise fork_server_died() from exc
    except OSError as exc:
        error = start_error(exc)
        if error is exc:
            raise
        raise error from exc


async def launch_async(
    process_obj: BaseProcess, method: str, around: Around, made: list[AioprocPopen]
) -> AioprocPopen:
    """Start *process_obj*'s child as ``launch()`` does, waiting only in the event loop.

    *around* is entered around the part that creates the child (the fork, the
    vfork + exec, the request to the fork server), never across an await.
    Fails, and is cancelled, leaving nothing open or running.  Each Popen is
    added to *made* before its child exists: a caller interrupted before it
    holds the one returned (trio's KeyboardInterrupt lands anywhere) abandons
    them all.
    """
    cls = POPEN_CLASSES[method]
    with explained():
        try:
            return await _once(cls, process_obj, around, made)
        except (ConnectionError, EOFError):
            if cls is not ForkServerPopen or (made and made[0].server_forked):
                raise  # the child died reading its data: one failed start, no retry
        await _until_fork_server_exited()
        try:
            return await _once(cls, process_obj, around, made)
        except EOFError as exc:
            await _until_fork_server_exited()
            raise fork_server_died() from exc


async def _once(
    cls: type[AioprocPopen],
    process_obj: BaseProcess,
    around: Around,
    made: list[AioprocPopen],
) -> AioprocPopen:
    first = len(made)
    try:
        # Leaving *around* may raise: SIGINT blocked for the fork is delivered then.
        with around():
            cls(process_obj, deferred=True, made=made)
        popen = made[-1]
        await popen.finish_async()
    except BaseException:
        for popen in made[first:]:
            popen.abandon()  # a KeyboardInterrupt too: nothing is left behind
        raise
    return popen


def fork_server_died() -> RuntimeError:
    return RuntimeError(
        "the fork server closed the connection before reporting the new child "
        "(it died, or could not fork: see its error output); nothing was started, "
        "and start() may be called again, which starts a new fork server"
    )


# The dying fork server closes its socket and our pipe a moment before it is a
# zombie, and forkserver.ensure_running() starts a new one only once the old
# one is a zombie: without this wait a start right after could find it again.
_SERVER_EXIT_WAIT = 5.0


def _wait_until_fork_server_exited() -> None:
    deadline = time.monotonic() + _SERVER_EXIT_WAIT
    while not fork_server_exited() and time.monotonic() < deadline:
        time.sleep(0.001)


async def _until_fork_server_exited() -> None:
    import anyio  # noqa: PLC0415 - the parent's event-loop side

    with anyio.move_on_after(_SERVER_EXIT_WAIT):
        while not fork_server_exited():  # noqa: ASYNC110 - no event to wait for: a zombie
            await anyio.sleep(0.001)


def fork_server_exited() -> bool:
    """Whether the fork server we know of (if any) has exited; it is not reaped."""
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if not pid:
        return True
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


_WHAT_RAN_OUT = {
    errno.EAGAIN: (
        "fork failed: too many processes (EAGAIN); raise RLIMIT_NPROC or wait for children to exit"
    ),
    errno.ENOMEM: (
        "fork failed: not enough memory (ENOMEM); free memory or start fewer processes at once"
    ),
    errno.EMFILE: (
        "could not open the new child's descriptors (its pipes, its pidfd): too many "
        "open files (EMFILE); close file descriptors or raise RLIMIT_NOFILE"
    ),
    errno.ENFILE: (
        "could not open the new child's descriptors (its pipes, its pidfd): the "
        "system's file table is full (ENFILE); close file descriptors"
    ),
}


def start_error(exc: OSError, what: str = "start()") -> OSError:
    """The error a start raises for *exc*: what ran out, and what to do.

    Errors it has nothing to add to are returned unchanged.  The new error has
    the same errno, hence the same class (``BlockingIOError`` for EAGAIN).
    """
    why = _WHAT_RAN_OUT.get(exc.errno or 0)
    if why is None or exc.strerror != os.strerror(exc.errno or 0):
        return exc  # nothing to add, or explained already
    return OSError(exc.errno, f"{why}; nothing was started and {what} may be called again")


@contextlib.contextmanager
def explained(what: str = "start()") -> Iterator[None]:
    """Raise an ``OSError`` from the block again as ``start_error`` explains it."""
    try:
        yield
    except OSError as exc:
        error = start_error(exc, what)
        if error is exc:
            raise
        raise error from exc
