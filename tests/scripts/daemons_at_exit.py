"""Interpreter exit with a daemon and a worker (which left a child) still running.

Run by ``tests/test_exit.py``; prints what became of them after
multiprocessing's exit handler.
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Any

#: The two children, by name; filled by main().
procs: dict[str, Any] = {}


def report() -> None:  # runs after multiprocessing's exit handler (atexit is LIFO)
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        left = "some"
    except ChildProcessError:
        left = "none"
    daemon, worker = procs["daemon"], procs["worker"]
    print(f"daemon={daemon.exitcode} worker={worker.exitcode} children={left}", flush=True)


atexit.register(report)  # before multiprocessing is imported: so it runs after its handler

import asyncio  # noqa: E402

from aioproc import AsyncProcess  # noqa: E402


def sleep(s: float) -> None:
    time.sleep(s)


def start_grandchild_and_leave() -> None:
    AsyncProcess(target=sleep, args=(0.3,)).start()  # never joined: waited at exit


async def main() -> None:
    procs["daemon"] = AsyncProcess(target=sleep, args=(60,), daemon=True)
    procs["worker"] = AsyncProcess(target=start_grandchild_and_leave)
    procs["daemon"].start()
    procs["worker"].start()


if __name__ == "__main__":
    asyncio.run(main())
