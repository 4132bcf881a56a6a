"""The parent's side of one started child: its Popen, its watch, its joiners.

Theory of operation.  The exit status is consumed exactly once, through the
``multiprocessing`` Popen (``poll()``), which is also what ``is_alive()``,
``exitcode`` and ``multiprocessing.active_children()`` use, so they all agree.
A watch (see ``_watchers``) only tells us *when* to poll.

Many tasks may join one child.  They queue on one lock: the task holding it
waits on the watch, the others wait for the lock and find the exit code
already collected when they get it.  Cancelling the holder releases the lock,
and the next task in the queue takes over the wait, so a cancelled join never
loses a wake-up and never leaves a thread or a registration behind.  The lock
belongs to one event loop; a join from another loop is refused while the first
loop still has joiners, and gets a fresh lock once it has none.

A child that leads its own process group (``new_process_group``) gets every
signal as a group (see ``_tree``).  ``aioproc.run`` also asks for what is left
of the group to be killed when the child exits (``kill_group_at_exit``): the
status is then collected only after the watch or the kernel says the child
has exited, and the group is sent SIGKILL in between, while the unreaped
child still holds the group's id.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing.connection
import os
import signal
from typing import TYPE_CHECKING

import anyio
from anyio.lowlevel import EventLoopToken, current_token

from . import _fds
from ._exceptions import ExitStatusLost
from ._tree import signal_group
from ._watchers import Watch, usable_at_join
from ._watchers.pidfd import _readable_now

if TYPE_CHECKING:
    from multiprocessing.popen_fork import Popen

    from ._usage import ResourceUsage


class ChildState:
    _fds: tuple[int, ...] = ()

    def __init__(
        self, popen: Popen, watch: Watch, *, group: bool = False, kill_group_at_exit: bool = False
    ) -> None:
        self.popen = popen
        #: The child leads its own process group: signals go to the group.
        self.group = group
        #: SIGKILL what is left of the group once the child has exited (``run``).
        self.kill_group_at_exit = group and kill_group_at_exit
        self._parent_pid = os.getpid()
        finalizer = popen.finalizer  # the stdlib's: it closes the pipe ends
        self._fds = (popen.sentinel, *(finalizer._args if finalizer is not None else ()))  # type: ignore[attr-defined]
        _fds.hold(*self._fds)
        self.watch: Watch | None = watch
        self.watcher_name = watch.name
        self._token: EventLoopToken | None = None
        self._lock: anyio.Lock | None = None
        self._joiners = 0
        self._waiting = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    @property
    def resource_usage(self) -> ResourceUsage | None:
        """What the kernel accounted to the child, once reaped; None where unknown.

        Only our own Popen classes read it (fork and spawn); a forkserver child
        is reaped by the fork server, a foreign start method's Popen by itself.
        """
        usage: ResourceUsage | None = getattr(self.popen, "resource_usage", None)
        return usage

    def poll(self) -> int | None:
        """The exit code if the child has exited (collecting it), else None."""
        code = self._poll()
        if code is not None and not self._waiting:
            self._release_watch()
        return code

    async def wait(self) -> int:
        """Wait for the child to exit and return its exit code."""
        code = self.poll()
        if code is not None:
            await anyio.lowlevel.checkpoint()
            return code
        lock = self._lock_for_this_loop()
        self._joiners += 1
        try:
            async with lock:
                code = self.popen.returncode
                if code is None:
                    code = await self._wait_locked()
                self._release_watch()
                return code
        finally:
            self._joiners -= 1

    def _lock_for_this_loop(self) -> anyio.Lock:
        token = current_token()
        if self._lock is None or self._token != token:
            if self._joiners:
                raise RuntimeError(
                    f"pid {self.pid} is already being joined in another event loop; "
                    "join a process from one event loop at a time"
                )
            self._token = token
            # No yield when nobody else holds it: the wait itself is the checkpoint.
            self._lock = anyio.Lock(fast_acquire=True)
        return self._lock

    async def _wait_locked(self) -> int:
        watch = self.watch
        if watch is None:  # pragma: no cover - released only once collected
            raise RuntimeError("internal error: no watch for a running child")
        watch = self.watch = usable_at_join(watch)
        self.watcher_name = watch.name
        self._waiting = True
        try:
            await watch.wait_exited()
        except anyio.ClosedResourceError:
            pass  # close() released the watch: the child had already exited
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            raise OSError(
                exc.errno,
                f"join() could not set up the {watch.name} watcher: too many open files "
                f"({errno.errorcode[exc.errno]}); the child is unaffected and can be joined "
                "again; close file descriptors or raise RLIMIT_NOFILE",
            ) from exc
        finally:
            self._waiting = False
        return await self._collect()

    async def _collect(self) -> int:
        """Collect the status of a child its watch saw exit."""
        delay = 0.0001
        while True:
            code = self._poll()
            if code is not None:
                return code
            if self.popen.method == "forkserver":
                # The child is gone; the fork server is about to write its code.
                await anyio.wait_readable(self.popen.sentinel)
                continue
            try:
                exited = os.waitid(  # noqa: ASYNC222 - WNOHANG: never blocks
                    os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT
                )
            except ChildProcessError:
                await anyio.lowlevel.checkpoint()
                if self.popen.returncode is not None:  # collected by another thread
                    return self.popen.returncode
                raise ExitStatusLost(self.pid) from None
            if exited is None:
                # Only the sentinel watcher gets here: the pipe closed a moment
                # before the child became a zombie, or the child exec'd.
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _poll(self) -> int | None:
        """``Popen.poll()``; first, if asked, SIGKILL what is left of the group."""
        if not self.kill_group_at_exit or self.popen.returncode is not None:
            return self.popen.poll()
        if self.popen.method == "forkserver":
            exited = _readable_now(self.popen.sentinel)  # the fork server reported it
        else:
            try:
                exited = (
                    os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                )
            except ChildProcessError:
                exited = True  # collected elsewhere: Popen tells
        if not exited:
            return None
        self._kill_group()
        return self.popen.poll()

    def _kill_group(self) -> None:
        """SIGKILL the child's group; the child has exited but is not collected yet."""
        watch = self.watch
        pidfd = None if watch is None else watch.pidfd()
        signal_group(self.popen, pidfd, signal.SIGKILL, parent=os.getpid() == self._parent_pid)

    def wait_blocking(self) -> int | None:
        """Wait for the child without an event loop (interpreter exit)."""
        if self.kill_group_at_exit and self.popen.returncode is None:
            if self.popen.method == "forkserver":
                multiprocessing.connection.wait([self.popen.sentinel])
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            self._kill_group()
        code = self.popen.wait()
        if code is None:
            code = self.popen.returncode
        if not self._waiting:
            self._release_watch()
        return code

    def send_signal(self, sig: signal.Signals) -> None:
        """Send *sig* to the child, or its group; nothing once it is collected."""
        watch = self.watch
        if (
            self.group
            and self.popen.returncode is None
            and signal_group(
                self.popen,
                None if watch is None else watch.pidfd(),
                sig,
                parent=os.getpid() == self._parent_pid,
            )
        ):
            return
        if watch is not None:
            watch.send_signal(sig)
        elif self.popen.returncode is None:  # pragma: no cover - defensive
            self.popen._send_signal(sig)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Release everything; the child must have exited and been collected."""
        watch = self.watch
        if watch is not None and self._waiting:
            fd = watch.wake_fd()
            if fd is not None:
                try:
                    anyio.notify_closing(fd)
                except Exception:
                    raise ValueError(
                        "cannot close a process while join() waits for it in an "
                        "event loop of another thread; await that join first"
                    ) from None
        self._release_watch()
        self._release_fds()
        self.popen.close()

    def _release_fds(self) -> None:
        fds, self._fds = self._fds, ()
        if os.getpid() == self._parent_pid:
            _fds.release(*fds)

    def __del__(self) -> None:
        self._release_fds()  # the stdlib's finalizer closes them with the Popen

    def _release_watch(self) -> None:
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.close()
