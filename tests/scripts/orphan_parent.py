"""A parent to be SIGKILLed: it starts children, reports their pids, and waits.

Run as ``python -m tests.scripts.orphan_parent METHOD MODE`` by ``test_tree.py``.  It
prints ``NAME PID`` lines and sleeps until killed:

- ``both``: ``lives`` (an AsyncProcess with die_with_parent=False), ``dies``
  (one with die_with_parent=True), and ``run`` (a child of ``aioproc.run`` with
  its defaults), all started with METHOD;
- ``at-once``: one die_with_parent=True child, then the parent SIGKILLs itself
  as soon as ``start()`` returns, likely before the child has set its death
  signal (the race the parent-pid check closes).
"""

from __future__ import annotations

import os
import signal
import sys

import anyio

import aioproc
from tests import targets


async def main(method: str, mode: str) -> None:
    if mode == "at-once":
        p = aioproc.AsyncProcess(
            target=targets.sleep, args=(60,), context=method, die_with_parent=True
        )
        p.start()
        print("dies", p.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    procs = {
        "lives": aioproc.AsyncProcess(target=targets.sleep, args=(60,), context=method),
        "dies": aioproc.AsyncProcess(
            target=targets.sleep, args=(60,), context=method, die_with_parent=True
        ),
    }
    for name, p in procs.items():
        p.start()
        print(name, p.pid, flush=True)
    # The child prints its own line; this waits until the parent is killed.
    await aioproc.run(targets.print_pid_then_sleep, "run", 60, context=method)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
