"""A parent to be SIGKILLed, for ``python -m benchmarks.pdeathsig``.

Run as ``python -m benchmarks._orphan_parent METHOD``.  It starts, with METHOD,
``lives`` (an AsyncProcess with die_with_parent=False), ``dies`` (one with
die_with_parent=True) and ``run`` (a child of ``aioproc.run`` with its
defaults); each prints ``NAME PID``; then it waits until it is killed.
"""

from __future__ import annotations

import sys

import anyio

import aioproc

from ._children import print_pid_then_sleep


async def main(method: str) -> None:
    procs = {
        "lives": aioproc.AsyncProcess(
            target=print_pid_then_sleep, args=("lives", 60), context=method
        ),
        "dies": aioproc.AsyncProcess(
            target=print_pid_then_sleep, args=("dies", 60), context=method, die_with_parent=True
        ),
    }
    for p in procs.values():
        p.start()
    await aioproc.run(print_pid_then_sleep, "run", 60, context=method)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
