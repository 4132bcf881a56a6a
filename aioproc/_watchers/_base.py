"""What every watcher provides, and the facts a watcher is chosen by."""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from multiprocessing.popen_fork import Popen

WatcherName = Literal["pidfd", "sigchld", "sentinel", "thread"]


@dataclass(frozen=True)
class Place:
    """Where a child is being started or joined: what decides which watchers work."""

    start_method: str
    main_thread: bool
    #: True under uvloop, False under another loop, None outside any event loop.
    uvloop: bool | None

    @classmethod
    def here(cls, start_method: str) -> Place:
        return cls(
            start_method=start_method,
            main_thread=threading.current_thread() is threading.main_thread(),
            uvloop=running_under_uvloop(),
        )


def running_under_uvloop() -> bool | None:
    """Whether the event loop running in this thread is uvloop (None: no loop)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return type(loop).__module__.startswith("uvloop")
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        return False
    return None


class Watch:
    """How the parent learns that one child has exited.

    A watch only says "exited"; it never decides the exit code.  The status is
    consumed through the child's ``multiprocessing`` Popen, so that
    ``is_alive()``, ``exitcode`` and ``multiprocessing.active_children()``
    agree with ``join()``.  ``wait_exited`` is awaited by one task at a time
    (the process serialises its joiners), may be cancelled and awaited again.
    """

    name: ClassVar[WatcherName]

    def __init__(self, popen: Popen) -> None:
        self.popen = popen
        self._owner = os.getpid()

    def owned_here(self) -> bool:
        """False in a forked copy of the parent, where the watch's descriptors are closed."""
        return self._owner == os.getpid()

    @classmethod
    def unavailable(cls, place: Place) -> str | None:
        """Why this watcher cannot serve a child started at *place* (None: it can)."""
        return None

    async def wait_exited(self) -> None:
        """Return once the child has exited (its status may still be uncollected)."""
        raise NotImplementedError

    def wake_fd(self) -> int | None:
        """The descriptor a waiter sleeps on that ``close()`` is about to close."""
        return None

    def pidfd(self) -> int | None:
        """A pidfd naming the child, if this watch holds one."""
        return None

    def send_signal(self, sig: signal.Signals) -> None:
        """Send *sig* to the child unless it is already known to have exited."""
        if self.popen.returncode is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Release what the watch holds; called once no task waits on it."""
