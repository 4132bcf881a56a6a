"""The ``pidfd`` watcher: a process file descriptor, readable once the child exits.

Linux >= 5.3 (``pidfd_open``).  The descriptor is opened right after the child
exists, before anything could reap the pid, so it always names our child; it
becomes readable when the child exits, which ``anyio.wait_readable`` turns into a
wake-up of the event loop with no thread and no polling.  Signals go through
``pidfd_send_signal``, which cannot hit a recycled pid even for a forkserver
child that the fork server has already reaped.

Forkserver children are the exception to "before anything could reap": the
fork server is their parent and reaps them at once, and ``Popen`` learns the
pid only after sending the child its work, so a quick child can be gone before
``pidfd_open`` runs.  Then there is nothing to open (or worse, the pid names a
stranger by now): the watch knows the child has exited, and its exit code is on
the sentinel, where the fork server writes it.
"""

from __future__ import annotations

import errno
import os
import select
import signal
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from .. import _fds
from ._base import Watch

if TYPE_CHECKING:
    from multiprocessing.popen_fork import Popen

#: Tests set this to False to play an old kernel; None means "not probed yet".
supported: bool | None = None

# pidfd_open fails like this where the kernel or a sandbox does not allow it.
_UNSUPPORTED_ERRNOS = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL})


def is_supported() -> bool:
    """Whether this kernel and sandbox let us open a pidfd (probed once)."""
    global supported
    if supported is None:
        if not hasattr(os, "pidfd_open"):
            supported = False
        else:
            try:
                os.close(os.pidfd_open(os.getpid()))
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED_ERRNOS:
                    raise  # EMFILE and friends say nothing about support
                supported = False
            else:
                supported = True
    return supported


def _readable_now(fd: int) -> bool:
    poller = select.poll()  # not select(): descriptors go past FD_SETSIZE here
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class PidfdWatch(Watch):
    name = "pidfd"
    fd = -1  # until pidfd_open succeeds: __del__ runs even when __init__ raised
    #: The child was gone before its pidfd could be opened (forkserver only).
    gone = False

    def __init__(self, popen: Popen) -> None:
        super().__init__(popen)
        if popen.method != "forkserver":
            self.fd = os.pidfd_open(popen.pid)
            _fds.hold(self.fd)
            return
        try:
            fd = os.pidfd_open(popen.pid)
        except ProcessLookupError:
            self.gone = True
            return
        if _readable_now(popen.sentinel):
            # The fork server has already reported the exit, so the pid was
            # free before we opened it: the pidfd may name another process.
            os.close(fd)
            self.gone = True
            return
        self.fd = fd
        _fds.hold(fd)

    async def wait_exited(self) -> None:
        if self.gone:
            await anyio.lowlevel.checkpoint()
            return
        await anyio.wait_readable(self.fd)

    def wake_fd(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def pidfd(self) -> int | None:
        return self.fd if self.fd >= 0 and self.owned_here() else None

    def send_signal(self, sig: signal.Signals) -> None:
        if self.gone:
            return  # exited; its pid may be someone else's by now
        if self.popen.returncode is None and self.pidfd() is not None:
            try:
                signal.pidfd_send_signal(self.fd, sig)
            except ProcessLookupError:
                pass
        else:
            super().send_signal(sig)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0 and self.owned_here():
            _fds.release(fd)
            os.close(fd)

    def __del__(self) -> None:
        self.close()
