"""The ``thread`` watcher: a blocking wait in a thread of its own.

The last resort, and the baseline the benchmarks compare against.  One thread
per child at most, however many tasks join it and however often they are
cancelled: the thread is started by the first join and ends when the child
does; later joins wait on the same pipe it writes to when it is done.  The
thread only waits (``waitid`` with ``WNOWAIT``, or the forkserver sentinel); the
status is collected in the event loop, like every other watcher's.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import threading
from typing import TYPE_CHECKING

import anyio

from .. import _fds
from ._base import Watch

if TYPE_CHECKING:
    from multiprocessing.popen_fork import Popen


class ThreadWatch(Watch):
    name = "thread"

    def __init__(self, popen: Popen) -> None:
        super().__init__(popen)
        self._thread: threading.Thread | None = None
        self._rfd = self._wfd = -1

    async def wait_exited(self) -> None:
        if self._thread is None:
            if self._rfd < 0:
                self._rfd, self._wfd = os.pipe()
                _fds.hold(self._rfd, self._wfd)
            thread = threading.Thread(
                target=self._wait_blocking,
                name=f"aioproc-wait-{self.popen.pid}",
                daemon=True,
            )
            try:
                thread.start()
            except RuntimeError as exc:  # RLIMIT_NPROC, or no memory for a stack
                raise RuntimeError(
                    f"join() could not start the thread watcher's thread ({exc}); the "
                    "child is unaffected and can be joined again; raise RLIMIT_NPROC, "
                    "wait for threads or processes to exit, or use another watcher"
                ) from exc
            self._thread = thread
        await anyio.wait_readable(self._rfd)

    def _wait_blocking(self) -> None:
        # Wait without collecting the status: the loop does that, through Popen.
        try:
            if self.popen.method == "forkserver":
                multiprocessing.connection.wait([self.popen.sentinel])
            else:
                os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass  # already collected by a poll in another thread
        finally:
            os.write(self._wfd, b"\0")

    def wake_fd(self) -> int | None:
        return self._rfd if self._rfd >= 0 else None

    def close(self) -> None:
        if not self.owned_here():  # a forked copy: no thread, descriptors closed
            self._rfd = self._wfd = -1
            return
        if self._thread is not None:
            # The child has exited, so the thread has written or is about to.
            self._thread.join()
            self._thread = None
        fds = (self._rfd, self._wfd)
        self._rfd = self._wfd = -1
        for fd in fds:
            if fd >= 0:
                _fds.release(fd)
                os.close(fd)
