"""A program whose run() child cannot be killed (a tracer holds it) when it exits.

Run by ``tests/test_exit.py`` from the repository's root; prints the child's pid,
waits for a line on stdin, cancels, prints ``cancelled`` and exits.
"""

from __future__ import annotations

import functools
import multiprocessing
import sys

import anyio

import aioproc
import aioproc._exit
import aioproc._run
from tests import targets

aioproc._run._KILL_WAIT = aioproc._exit.KILL_WAIT = 0.3


async def main() -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            functools.partial(
                aioproc.run, targets.ignore_sigterm_send_pid_then_sleep, send, 60, grace=0.1
            )
        )
        await anyio.wait_readable(recv.fileno())
        print(recv.recv(), flush=True)
        await anyio.wait_readable(sys.stdin.fileno())  # the tracer holds the child
        sys.stdin.readline()
        tg.cancel_scope.cancel()
    print("cancelled", flush=True)


if __name__ == "__main__":
    anyio.run(main)
