"""Starting a child so that a start that fails leaves nothing behind.

``multiprocessing`` starts a child through one ``Popen`` class per start
method.  The fork method's opens two pipes, then forks, and registers the
finalizer that closes the pipes only once the fork has succeeded.  When
``os.fork()`` fails (EAGAIN: RLIMIT_NPROC or the pid space is exhausted;
ENOMEM) or the second ``os.pipe()`` does (EMFILE), the descriptors it opened
are lost: nothing refers to them any more, so they stay open for the life of
the program (CPython 3.10 to 3.14).  spawn and forkserver register their
finalizer in time, but it only runs when the ``Popen`` is garbage collected,
and the traceback of the failure keeps it alive.

So ``AsyncProcess.start()`` goes through ``launch()``:

- fork: the pipes and the fork are done here, closing what was opened when a
  step fails; the child runs exactly what the stdlib's fork child runs.
- spawn and forkserver: the stdlib's launch; when it fails, its descriptors
  are closed at once, and a spawn child that already exists (it died before
  the process object could be written to it) is killed and reaped.  A
  request that finds the fork server dying is made once more, to a new one.

Either way the error says what ran out and what to do (``start_error``), and
the ``AsyncProcess`` stays unstarted: ``start()`` may be called again.

One leak is left, inside the stdlib's forkserver client
(``forkserver.connect_to_new_process``): when its second ``os.pipe()`` fails
with EMFILE, the first pipe is lost.  Fixing it would mean rewriting the fork
server protocol, which differs between Python versions.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
import time
from multiprocessing import forkserver, popen_fork, popen_forkserver, popen_spawn_posix, util
from typing import TYPE_CHECKING, Any

from ._usage import ResourceUsage

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

#: Python 3.13 runs the child's atexit handlers in a forked child (gh-83856).
_ATEXIT_IN_FORK_CHILD = sys.version_info >= (3, 13)


def _reap(popen: ForkPopen | SpawnPopen, flag: int) -> int | None:
    """``Popen.poll()``, collecting the child's resource usage with its status.

    The stdlib reaps with ``waitpid``, which drops the kernel's accounting;
    ``wait4`` is the same call with it.  Every reaping of a fork or spawn
    child goes through here (``poll()``, ``wait()``, ``is_alive()``,
    ``exitcode``, ``join()`` whatever the watcher, interpreter exit).
    """
    if popen.returncode is None:
        try:
            pid, status, usage = os.wait4(popen.pid, flag)
        except OSError:
            return None  # as the stdlib: not our child (yet)
        if pid == popen.pid:
            popen.resource_usage = ResourceUsage.from_rusage(usage)
            popen.returncode = os.waitstatus_to_exitcode(status)
    return popen.returncode


class ForkPopen(popen_fork.Popen):
    """The fork method's Popen, closing its pipes when the fork fails."""

    #: Set when the child is reaped (see ``_reap``).
    resource_usage: ResourceUsage | None = None

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        return _reap(self, flag)

    def _launch(self, process_obj: BaseProcess) -> None:
        opened: list[int] = []
        try:
            parent_r, child_w = os.pipe()
            opened += (parent_r, child_w)
            child_r, parent_w = os.pipe()
            opened += (child_r, parent_w)
            self.pid = os.fork()
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        if self.pid == 0:
            _run_forked_child(process_obj, (parent_r, parent_w), child_r)
        os.close(child_w)
        os.close(child_r)
        self.finalizer = util.Finalize(
            self,
            util.close_fds,  # type: ignore[attr-defined]
            (parent_r, parent_w),
        )
        self.sentinel = parent_r


def _run_forked_child(process_obj: BaseProcess, unused: tuple[int, int], sentinel: int) -> None:
    """Run the process object in the forked child, as the stdlib's fork child does."""
    code = 1
    try:
        if _ATEXIT_IN_FORK_CHILD:
            atexit._clear()
            atexit.register(util._exit_function)  # type: ignore[attr-defined]
        for fd in unused:
            os.close(fd)
        code = process_obj._bootstrap(parent_sentinel=sentinel)  # type: ignore[attr-defined]
    finally:
        if _ATEXIT_IN_FORK_CHILD:
            atexit._run_exitfuncs()
        os._exit(code)


def clean_up_failed_launch(popen: Any) -> None:
    """Close what a failed stdlib launch opened, and reap a child it created."""
    if popen.finalizer is not None:
        popen.finalizer()
    pid = getattr(popen, "pid", None)
    if pid and popen.method == "spawn":  # a forkserver child is the server's
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


class SpawnPopen(popen_spawn_posix.Popen):
    """The spawn method's Popen, closing its pipes at once when the start fails."""

    #: Set when the child is reaped (see ``_reap``).
    resource_usage: ResourceUsage | None = None

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        return _reap(self, flag)

    def _launch(self, process_obj: BaseProcess) -> None:
        try:
            super()._launch(process_obj)  # type: ignore[misc]
        except BaseException:
            clean_up_failed_launch(self)
            raise


class ForkServerPopen(popen_forkserver.Popen):
    """The forkserver method's Popen, closing its pipes at once when the start fails."""

    #: Always None: the fork server reaps the child, and the kernel's
    #: accounting goes to it; only the exit code is passed on to us.
    resource_usage: ResourceUsage | None = None

    def _launch(self, process_obj: BaseProcess) -> None:
        try:
            super()._launch(process_obj)  # type: ignore[misc]
        except BaseException:
            clean_up_failed_launch(self)
            raise


_CLASSES: dict[str, type[popen_fork.Popen]] = {
    "fork": ForkPopen,
    "spawn": SpawnPopen,
    "forkserver": ForkServerPopen,
}


def launch(process_obj: BaseProcess, ctx: BaseContext) -> popen_fork.Popen:
    """Start *process_obj*'s child with *ctx*'s start method; return its Popen.

    When it fails, nothing is left open or running, and the error says what
    ran out and what to do (see ``start_error``).
    """
    method = ctx.get_start_method()
    cls = _CLASSES.get(method)
    try:
        if cls is None:  # a start method of someone else's making
            popen: popen_fork.Popen = ctx.Process._Popen(process_obj)  # type: ignore[attr-defined]
            return popen
        if method == "forkserver":
            return _launch_through_fork_server(cls, process_obj)
        return cls(process_obj)
    except OSError as exc:
        error = start_error(exc)
        if error is exc:
            raise
        raise error from exc


def _launch_through_fork_server(
    cls: type[popen_fork.Popen], process_obj: BaseProcess
) -> popen_fork.Popen:
    """Ask the fork server for the child, once more if the server was going away.

    The stdlib's fork server dies when a request fails half-way (a client that
    ran out of descriptors after connecting) or when it cannot fork.  The next
    request then finds it dying: refused, hung up on, or a broken pipe.  That
    request is made once more, once the old server is gone, so that a new one
    is started.
    """
    try:
        return cls(process_obj)
    except (ConnectionError, EOFError):  # refused, hung up on, or a broken pipe
        _wait_until_fork_server_exited()
    try:
        return cls(process_obj)
    except EOFError as exc:
        _wait_until_fork_server_exited()
        raise fork_server_died() from exc


def fork_server_died() -> RuntimeError:
    return RuntimeError(
        "the fork server closed the connection before reporting the new child "
        "(it died, or could not fork: see its error output); nothing was started, "
        "and start() may be called again, which starts a new fork server"
    )


def _wait_until_fork_server_exited(timeout: float = 5.0) -> None:
    """Wait (without reaping it) for a fork server that is going away to be gone.

    It closes its socket and our pipe a moment before it becomes a zombie, and
    ``forkserver.ensure_running()`` starts a new server only once the old one
    is a zombie: without this wait, a ``start()`` right after could still find
    the dying one.
    """
    deadline = time.monotonic() + timeout
    while not fork_server_exited() and time.monotonic() < deadline:
        time.sleep(0.001)


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
        "could not open the new child's pipes: too many open files (EMFILE); close "
        "file descriptors or raise RLIMIT_NOFILE"
    ),
    errno.ENFILE: (
        "could not open the new child's pipes: the system's file table is full "
        "(ENFILE); close file descriptors"
    ),
}


def start_error(exc: OSError) -> OSError:
    """The error ``start()`` raises for *exc*: what ran out, and what to do.

    Errors it has nothing to add to are returned unchanged.  The new error has
    the same errno, hence the same class (``BlockingIOError`` for EAGAIN).
    """
    what = _WHAT_RAN_OUT.get(exc.errno or 0)
    if what is None:
        return exc
    return OSError(exc.errno, f"{what}; nothing was started and start() may be called again")
