"""What every watcher provides, and the facts a watcher is chosen by."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import anyio
from anyio.lowlevel import EventLoopToken, current_token

if TYPE_CHECKING:
    from .._popen import AioprocPopen

WatcherName = Literal["pidfd", "sigchld", "sentinel", "thread"]


@dataclass(frozen=True)
class Place:
    """Where a child is being started or joined: what decides which watchers work."""

    #: Whether the child's SIGCHLD reaches this process (not a forkserver child's).
    reaped_here: bool
    main_thread: bool
    #: True under uvloop, False under another loop, None outside any event loop.
    uvloop: bool | None

    @classmethod
    def here(cls, popen_class: type[AioprocPopen]) -> Place:
        return cls(
            reaped_here=popen_class.reaped_here,
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

    A watch only says "exited": ``wait_exited`` returns once the child's status
    can be collected (or someone else collected it); the child's handle then
    collects it through the Popen.  It is awaited by one task at a time (the
    handle serialises its joiners), may be cancelled and awaited again, and
    ``close()`` wakes a task still waiting (``anyio.notify_closing``) before it
    lets go of what the watch holds.
    """

    name: ClassVar[WatcherName]
    #: The descriptor a task is waiting on right now, for close() to announce,
    #: and the event loop it waits in.
    _parked = -1
    _parked_in: EventLoopToken | None = None

    def __init__(self, popen: AioprocPopen, pidfd: int) -> None:
        self.popen = popen
        #: The child's pidfd (owned by its handle), or -1.
        self.pidfd = pidfd

    @classmethod
    def unavailable(cls, place: Place) -> str | None:
        """Why this watcher cannot serve a child started at *place* (None: it can)."""
        return None

    async def wait_exited(self) -> None:
        """Return once the child has exited (its status may still be uncollected)."""
        raise NotImplementedError

    async def wait_readable(self, fd: int) -> None:
        """``anyio.wait_readable(fd)``, announced by ``close()`` if it is closed meanwhile."""
        self._parked, self._parked_in = fd, current_token()
        try:
            await anyio.wait_readable(fd)
        finally:
            self._parked = -1

    def forget_loop(self, token: EventLoopToken) -> None:
        """The event loop of *token* is gone: drop what the watch kept for it."""
        if self._parked_in == token:
            self._parked = -1

    def close(self) -> None:
        """Wake a task still waiting in this event loop, and release everything.

        A task of a loop that was closed meanwhile will never run again: it is
        forgotten.  (The child's handle refuses a close while a live loop of
        another thread waits.)
        """
        if self._parked >= 0 and self._parked_in == token_here():
            anyio.notify_closing(self._parked)
        self._parked = -1


def token_here() -> EventLoopToken | None:
    """The running event loop's token, or None outside any loop."""
    try:
        return current_token()
    except Exception:  # no event loop in this thread
        return None
