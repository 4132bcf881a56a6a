"""The ``thread`` watcher: a blocking wait in a thread of its own.

The last resort, and the baseline the benchmarks compare against.  One thread
per child at most, however many tasks join it and however often they are
cancelled: the thread is started by the first join and ends when the child
does; later joins wait on the same pipe it writes to when it is done.  The
thread only waits (the start method's blocking wait, which collects nothing);
the status is collected in the event loop, like every other watcher's.
"""

from __future__ import annotations

import os
import threading

from .. import _fds
from ._base import Watch


class ThreadWatch(Watch):
    name = "thread"
    _thread: threading.Thread | None = None
    _rfd = _wfd = -1

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
        await self.wait_readable(self._rfd)

    def _wait_blocking(self) -> None:
        try:
            self.popen.wait_exited_blocking(pidfd=self.pidfd)
        finally:
            os.write(self._wfd, b"\0")

    def close(self) -> None:
        super().close()
        if not self.popen.owned_here():  # a forked copy: no thread, descriptors closed
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
