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
The pipe also closes a moment before a fork or spawn child is a zombie (or
when it execs): then the kernel is asked again, backing off, until it says so.
"""

from __future__ import annotations

import anyio

from .._popen import Exit
from ._base import Watch


class SentinelWatch(Watch):
    name = "sentinel"

    async def wait_exited(self) -> None:
        await self.wait_readable(self.popen.sentinel)
        delay = 0.0001
        while self.popen.exit_state() is Exit.RUNNING:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
