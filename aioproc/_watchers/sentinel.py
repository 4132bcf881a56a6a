"""The ``sentinel`` watcher: the multiprocessing sentinel pipe, read in the event loop.

Every ``multiprocessing`` child has a sentinel: a pipe whose far end the child
holds, so the parent's end becomes readable when the child has gone.  For a
forkserver child it carries more: the fork server, which owns the child, writes
the exit code into it.  That makes this the watcher for forkserver children
where pidfd is missing (SIGCHLD never reaches us for them).

Its limit, which is the pipe's: any process holding the far end keeps it from
becoming readable.  A fork- or spawn-started child that forks a grandchild which
outlives it passes the far end on, and the join waits for the grandchild too.
A forkserver child does not (the exit code is written by the fork server).
"""

from __future__ import annotations

import anyio

from ._base import Watch


class SentinelWatch(Watch):
    name = "sentinel"

    async def wait_exited(self) -> None:
        await anyio.wait_readable(self.popen.sentinel)

    def wake_fd(self) -> int | None:
        return self.popen.sentinel
