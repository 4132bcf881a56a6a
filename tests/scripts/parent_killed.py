"""A parent to be SIGKILLed: three children, their pids on one line, then a wait.

Run by ``tests/test_exit.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.connection import wait

import anyio

from aioproc import AsyncProcess


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    assert parent is not None
    wait([parent.sentinel])  # readable once the parent is gone
    os._exit(0)


async def main() -> None:
    daemon = AsyncProcess(target=sleep, args=(60,), daemon=True)
    worker = AsyncProcess(target=sleep, args=(60,))
    watchful = AsyncProcess(target=exit_with_parent)  # last: no later sibling holds its pipe
    for p in (daemon, worker, watchful):
        p.start()
    print(daemon.pid, worker.pid, watchful.pid, flush=True)
    await anyio.sleep(60)


if __name__ == "__main__":
    anyio.run(main)
