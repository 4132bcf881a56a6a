"""The ``pidfd`` watcher: a process file descriptor, readable once the child exits.

Linux >= 5.3 (``pidfd_open``).  Every child's handle opens one right after the
child exists, whatever the watcher, because signals sent through it
(``pidfd_send_signal``) can never reach a recycled pid; this watcher also waits
on it: ``anyio.wait_readable`` turns the child's exit into a wake-up of the
event loop, with no thread and no polling.  When the handle could not open one
(the child was already gone: reaped by the fork server, or by someone else),
the child has exited and there is nothing to wait for.
"""

from __future__ import annotations

import errno
import os

import anyio.lowlevel

from ._base import Watch

#: Tests set this to False to play an old kernel; None means "not probed yet".
supported: bool | None = None

# pidfd_open fails like this where the kernel or a sandbox does not allow it.
UNSUPPORTED_ERRNOS = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL})


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
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise  # EMFILE and friends say nothing about support
                supported = False
            else:
                supported = True
    return supported


class PidfdWatch(Watch):
    name = "pidfd"

    async def wait_exited(self) -> None:
        if self.pidfd < 0:  # gone before it could be opened
            await anyio.lowlevel.checkpoint()
            return
        await self.wait_readable(self.pidfd)
